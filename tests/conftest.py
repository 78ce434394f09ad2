"""Fixtures every test directory may use."""
from collections.abc import Iterator

import pytest

from testbed.etcd_cluster import EtcdCluster


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster on loopback, removed (processes and data dirs) at the end."""
    with EtcdCluster() as cluster:
        yield cluster

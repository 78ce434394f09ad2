"""Fixtures of the XDP packet tests (tests/xdp/).

* `xdp_program` (session): compiles and loads the XDP program once, as the test
  build (its forward trace tells a test which VM and port a packet went to).
* `gw` (function): (re)programs the standard setup of tests/xdp/harness.py, empties
  the flow table and the offload map, and hands the test an `XdpHarness`.
"""
from __future__ import annotations

import pytest

from tests.xdp.harness import HASH_SEED, MAGLEV_M, XdpHarness


@pytest.fixture(scope="session")
def xdp_program():
    """(bpf, fn, sizes): the XDP program compiled and loaded once per session."""
    from dataplane.program import Sizes, load

    sizes = Sizes(flow_entries=4096, maglev_m=MAGLEV_M, hash_seed=HASH_SEED)
    bpf, fn = load(sizes, trace=True)
    yield bpf, fn, sizes
    bpf.cleanup()


@pytest.fixture
def gw(xdp_program) -> XdpHarness:
    """The standard gateway setup, freshly programmed, with an empty flow table."""
    g = XdpHarness(xdp_program)
    g.reset()
    yield g

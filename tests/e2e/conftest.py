"""The one way the e2e modules bring up a namespace testbed and take it down.

`running_testbed(prefix, **testbed_kwargs)` builds `Testbed(prefix, ...)`, yields a
`TestbedEnv` that tracks the gateway daemons started through it, and always (also
on failure) stops those daemons by pid, then the testbed (which stops every other
process it started, by pid, and removes the namespaces, pins and registry files of
the prefix). After a clean exit it checks that nothing of the prefix is left."""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from typing import Iterator

from control.config import Config
from testbed.kit import GatewayDaemon
from testbed.topology import Testbed, leftovers


def unique_prefix(stem: str) -> str:
    """`stem` + 3 random hex digits: parallel or crashed runs never share namespaces."""
    return stem + secrets.token_hex(2)[:3]


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass
class TestbedEnv:
    __test__ = False                 # not a pytest test class, despite the name

    tb: Testbed
    daemons: list[GatewayDaemon] = field(default_factory=list)

    def daemon(self, config_path: str | os.PathLike[str]) -> GatewayDaemon:
        """A daemon on `config_path`, not started yet; stopped at teardown."""
        d = GatewayDaemon(self.tb, str(config_path))
        self.daemons.append(d)
        return d

    def launch(self, config: Config, path: str | os.PathLike[str], timeout: float = 60.0) -> GatewayDaemon:
        """Write `config` to `path` and start a daemon on it (GatewayDaemon.launch); stopped at teardown."""
        d = GatewayDaemon.launch(self.tb, config, path, timeout=timeout)
        self.daemons.append(d)
        return d


@contextlib.contextmanager
def running_testbed(prefix: str, **testbed_kwargs: object) -> Iterator[TestbedEnv]:
    env = TestbedEnv(Testbed(prefix, **testbed_kwargs))
    try:
        env.tb.up()
        yield env
    finally:
        for d in env.daemons:
            d.stop()
        env.tb.down()
    assert leftovers(prefix) == [], f"the testbed {prefix} left things behind"

"""The testbed's region-offload parties, shared by the demo and the e2e tests:
the control center (`xdpgw center`, in the router's namespace at 198.18.0.1), the
target data center's agent (testbed/dcagent.py, in dc2, which adds the VMs it makes
to dc2's own xdpgw: testbed/config.py dc2_config) and what the gateway needs to
reach them ([center] and [agent] of its config).

dc1 is the gateway gw1 with vm1..vm3; dc2 is the only other data center, so the
center always picks it. Both processes are started in the testbed (its `down()`
stops them by pid) and waited for, bounded, until they print their ready line."""
from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from control.config import AgentConfig, CenterLinkConfig
from testbed.addresses import DC2_ENDPOINT, ROUTER_IP, UPLINK_IP, VIP4, VIP6
from testbed.config import WEB_PORT
from testbed.topology import Testbed

# What the ready lines contain: the center logs `event=center.up` (control/logs.py,
# on stderr); dc2's agent prints its own line on stdout.
CENTER_READY = "event=center.up"
DC_AGENT_READY = "xdpgw: dc agent up"


class ReadyProcess:
    """A process whose stdout and stderr are read line by line on threads (into
    `lines`); the constructor waits (at most `timeout` s) for a line containing `ready`."""

    def __init__(self, tb: Testbed, proc: subprocess.Popen, ready: str, timeout: float = 30.0) -> None:
        self.tb, self.proc, self.lines = tb, proc, []
        seen = threading.Event()
        streams = [s for s in (proc.stdout, proc.stderr) if s is not None]
        left = [len(streams)]

        def drain(stream) -> None:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if ready in line:
                    seen.set()
            left[0] -= 1
            if not left[0]:
                seen.set()           # every stream closed: the process is gone
        for stream in streams:
            threading.Thread(target=drain, args=(stream,), daemon=True).start()
        seen.wait(timeout)
        if not any(ready in line for line in self.lines):
            tb.stop(proc)
            raise RuntimeError(f"no {ready!r} line within {timeout:.0f} s: {self.lines[-5:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.tb.stop(self.proc)


@dataclass(frozen=True)
class OffloadLab:
    """Tokens and ports of the center, gw1's agent and dc2's agent; fresh tokens per lab.

    The three listen on testbed addresses in plain HTTP, which takes `insecure = true`
    (--insecure for dc2's agent) in so many words: a testbed is a lab of namespaces on
    one host, with fresh tokens per run, not a network anyone else is on."""
    center_token: str = field(default_factory=lambda: secrets.token_hex(8))
    gw_token: str = field(default_factory=lambda: secrets.token_hex(8))
    dc_token: str = field(default_factory=lambda: secrets.token_hex(8))
    center_port: int = 7300
    gw_agent_port: int = 7301
    dc_agent_port: int = 7302

    def center_link(self, timeout: float = 5.0) -> CenterLinkConfig:
        """gw1's [center]: how the gateway reaches the center."""
        return CenterLinkConfig(url=f"http://{ROUTER_IP}:{self.center_port}", token=self.center_token,
                                timeout=timeout)

    def agent(self) -> AgentConfig:
        """gw1's [agent]: where the center reaches the gateway."""
        return AgentConfig(listen=f"{UPLINK_IP}:{self.gw_agent_port}", token=self.gw_token, insecure=True)

    def write_center_config(self, directory: str | Path, vms: int = 2, retry_s: float = 0.2,
                            release_after: float = 300.0, encap: str = "ipip") -> Path:
        """center.toml, its SQLite db and the master images of web and web6 (what dc2's
        VMs serve: the web VIP, IPv4 or IPv6) in `directory`; `encap`: how gw1 tunnels
        offloaded flows to dc2. Returns the config's path."""
        d = Path(directory)
        images = []
        for service, bind in (("web", f"tcp:{VIP4}:{WEB_PORT}"), ("web6", f"tcp:[{VIP6}]:{WEB_PORT}")):
            image = d / f"{service}-1.json"
            image.write_text(json.dumps({"binds": [bind]}))
            images.append(f'\n[[image]]\nservice = "{service}"\nname = "{service}-1"\npath = "{image}"\n')
        path = d / "center.toml"
        path.write_text(self._center_toml(str(d / "center.db"), vms, retry_s, release_after, encap) + "".join(images))
        return path

    def _center_toml(self, db: str, vms: int, retry_s: float, release_after: float, encap: str) -> str:
        return f"""
[center]
listen = "{ROUTER_IP}:{self.center_port}"
insecure = true
token = "{self.center_token}"
db = "{db}"
vms = {vms}
retry_s = {retry_s}
release_after = {release_after}

[weights]
location = 1.0
latency = 1.0

[[region]]
name = "r1"
lat = 50.1
lon = 8.7

[[region]]
name = "r2"
lat = 52.5
lon = 13.4

[[datacenter]]
name = "dc1"
lat = 50.1
lon = 8.7
timezone = "Europe/Berlin"
capacity = 8
load = 3
tunnel_endpoint = "{UPLINK_IP}"

[[datacenter]]
name = "dc2"
lat = 48.1
lon = 11.6
timezone = "Europe/Berlin"
capacity = 8
load = 0
latency_ms = 5.0
transmit_mbps = 10000
tunnel_endpoint = "{DC2_ENDPOINT}"
encap = "{encap}"
agent = "http://{DC2_ENDPOINT}:{self.dc_agent_port}"
agent_token = "{self.dc_token}"

[[gateway]]
name = "gw1"
datacenter = "dc1"
agent = "http://{UPLINK_IP}:{self.gw_agent_port}"
agent_token = "{self.gw_token}"
"""

    @staticmethod
    def start_center(tb: Testbed, xdpgw: str, config_path: str | Path) -> ReadyProcess:
        """`xdpgw center --config FILE` in the router's namespace."""
        p = tb.popen("rt", [xdpgw, "center", "--config", str(config_path)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return ReadyProcess(tb, p, CENTER_READY)

    def start_dc_agent(self, tb: Testbed, drain_idle: float = 1.0) -> ReadyProcess:
        """dc2's agent (it enters dc2's namespace itself, to create VM namespaces); its VMs
        are drained after `drain_idle` s without a packet at dc2's gateway."""
        p = tb.spawn([sys.executable, "-m", "testbed.dcagent", "--netns", tb.ns("dc2"), "--prefix", tb.prefix,
                      "--listen", f"{DC2_ENDPOINT}:{self.dc_agent_port}", "--token", self.dc_token, "--insecure",
                      "--drain-idle", str(drain_idle)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return ReadyProcess(tb, p, DC_AGENT_READY)

    @staticmethod
    def center_cli(tb: Testbed, xdpgw: str, config_path: str | Path, *args: str) -> subprocess.CompletedProcess:
        """`xdpgw center ARGS --config FILE`, run where the center listens (the router's namespace)."""
        argv: Sequence[str] = [xdpgw, "center", *args, "--config", str(config_path)]
        return tb.cmd("rt", argv, check=False)


class Ramp:
    """A region growing heavy: UDP from client `role` (its region) to the gateway's own
    address (no service: counted under the region, then passed), at about `pps`, until
    `end()` or `max_s` (bounded)."""

    def __init__(self, tb: Testbed, role: str, pps: int, max_s: float) -> None:
        self.pps, self.max_s = pps, max_s
        self.sock = tb.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((tb.client(role).ip, 0))
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        batch = max(1, self.pps // 100)
        while not self.stop.is_set() and time.monotonic() - t0 < self.max_s:
            for _ in range(batch):
                try:
                    self.sock.sendto(b"r" * 64, (UPLINK_IP, 9))
                    self.sent += 1
                except OSError:
                    pass
            self.stop.wait(0.01)

    def start(self) -> "Ramp":
        self.thread.start()
        return self

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()

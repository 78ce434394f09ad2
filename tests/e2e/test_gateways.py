"""Two independent gateways in front of the same VMs (issue 5), end to end.

Testbed(prefix, gateways=2): gw1 and gw2 each run the real daemon (`xdpgw run`)
with health checks (TCP on the web port, UDP on the echo port, at each VM's own
address of the VIP's family); the VMs run servers; the router sends the VIPs to
gw1, to gw2, or to both by ECMP (a per-flow layer-4 hash), as a test steers it. The gateways never
talk to each other. Shown here:

1. the same flows, sent alternately through gw1 and gw2 (and sprayed by ECMP),
   each land on one VM whichever gateway carried the packet; both build the
   same Maglev tables, TCP connections survive a switch of gateway;
2. a gateway dies (its daemon stops, its link goes down): the other carries its
   flows, flows it never saw included, to the same VMs; it comes back and agrees;
3. a VM dies (its server killed): both gateways notice on their own, and move
   exactly that VM's flows, to the same new VMs; flows on other VMs stay; the
   time from the kill to the VM's removal from each gateway's tables is printed;
4. `xdpgw vm list` / `xdpgw stats` show health, last probe and time in state;
5. `xdpgw vm drain` on both gateways keeps flows and takes no new ones; `vm up` clears it.

One testbed per module, prefix "xgh" + 3 random hex digits; the fixture stops
every process it started (by pid) and removes every namespace, also on failure.
Every wait is bounded. No time is asserted; measurements are printed (-s).
"""
from __future__ import annotations

import collections
import itertools
import json
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.waiting import wait_for

from control.api import unix as api
from control.config import HealthConfig
from testbed.kit import (ConnectionLost, GatewayDaemon, LineConn, start_server, udp_exchange, vm_binds,
                          vm_health_binds)
from testbed.config import ECHO_PORT, WEB_PORT
from testbed.config import testbed_config as make_config
from testbed.addresses import GW2_ROLE, UPLINK, VIP4
from testbed.topology import Testbed
from tests.e2e.conftest import TestbedEnv, running_testbed, unique_prefix

PREFIX = unique_prefix("xgh")
LOCAL_VMS = ("vm1", "vm2", "vm3")
PROBE = dict(interval=0.2, timeout=0.2, rise=2, fall=2)
HEALTH = {"web": HealthConfig("tcp", **PROBE), "web6": HealthConfig("tcp", **PROBE),
          "echo": HealthConfig("udp", **PROBE)}
MEASURED: dict[str, list[float]] = collections.defaultdict(list)



@dataclass
class Env:
    tb: Testbed
    paths: dict[str, str]                    # gw1/gw2 -> config path
    socks: dict[str, str]                    # gw1/gw2 -> API socket
    daemons: dict[str, GatewayDaemon]
    servers: dict[str, subprocess.Popen] = field(default_factory=dict)
    tmp: Path | None = None
    bed: TestbedEnv | None = None            # stops the daemons started through it at teardown

    def call(self, gw: str, cmd: str, **args):
        return api.call(self.socks[gw], cmd, **args)

    def vms(self, gw: str) -> dict[str, dict]:
        return {v["name"]: v for v in self.call(gw, "vm.list")}

    def cli(self, gw: str, *args: str) -> subprocess.CompletedProcess:
        # the API is a unix socket: the CLI needs no network namespace
        return subprocess.run([self.daemons[gw].xdpgw, *args, "--config", self.paths[gw]], capture_output=True,
                              text=True, timeout=30)

    def start_vm_server(self, vm: str) -> None:
        self.servers[vm] = start_server(self.tb, vm, vm, vm_binds() + vm_health_binds(self.tb, vm))

    def all_healthy(self, gw: str) -> bool:
        vms = self.vms(gw)
        return all(vms[n]["health"] == "up" and vms[n]["state"] == "active" for n in LOCAL_VMS)

    def tables(self, gw: str) -> dict:
        return self.call(gw, "maglev.tables")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xdpgw-gateways")
    try:
        with running_testbed(PREFIX, gateways=2) as bed:
            tb = bed.tb
            paths, socks = {}, {}
            for name, which in (("gw1", 1), ("gw2", 2)):
                config = make_config(PREFIX, name, which=which, health=HEALTH)
                path = tmp / f"{name}.toml"
                path.write_text(config.to_toml())
                paths[name], socks[name] = str(path), config.gateway.api_socket
            daemons = {name: bed.daemon(paths[name]) for name in ("gw1", "gw2")}
            e = Env(tb, paths, socks, daemons, tmp=tmp, bed=bed)
            for vm in LOCAL_VMS:
                e.start_vm_server(vm)
            for name in ("gw1", "gw2"):
                daemons[name].start(timeout=90)
            for name in ("gw1", "gw2"):
                wait_for(lambda: e.all_healthy(name), what=f"{name}: every VM healthy")
            yield e
    finally:
        if MEASURED:
            print("\nmeasured (issue 5):")
            for key, values in MEASURED.items():
                print(f"  {key}: " + ", ".join(f"{v:.0f}" for v in values)
                      + f"  (mean {sum(values) / len(values):.0f})")


# --------------------------------------------------------------------- helpers

# Source ports below the ephemeral range, each used once per module: a port the
# kernel handed out again would be a flow a gateway already knows.
_PORTS = itertools.count(20000)


class UdpFlows:
    """UDP flows (one socket each) from the client namespaces to the echo service."""

    def __init__(self, env: Env, per_source: int) -> None:
        self.env = env
        self.socks: list[tuple[str, socket.socket]] = []
        c1, c2 = env.tb.client("c1"), env.tb.client("c2")
        for role, src in (("c1", c1.ips[0]), ("c1", c1.ips[1]), ("c2", c2.ip)):
            for _ in range(per_source):
                s = env.tb.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(1.0)
                s.bind((src, next(_PORTS)))
                self.socks.append((src, s))
        self.n = 0

    def __len__(self) -> int:
        return len(self.socks)

    def key(self, i: int) -> tuple[str, int]:
        src, s = self.socks[i]
        return src, s.getsockname()[1]

    def send(self, tries: int = 3) -> list[str]:
        """One request per flow; the name of the VM that answered each."""
        out = []
        for src, s in self.socks:
            for attempt in range(tries):
                self.n += 1
                payload = f"flow {src}:{s.getsockname()[1]} #{self.n}".encode()
                reply = udp_exchange(s, payload, (VIP4, ECHO_PORT))
                if reply is not None:
                    name, _, echoed = reply.partition(b":")
                    assert echoed == payload, reply
                    out.append(name.decode())
                    break
            else:
                pytest.fail(f"flow {src}:{s.getsockname()[1]}: no answer in {tries} tries")
        return out

    def close(self) -> None:
        for _, s in self.socks:
            s.close()


def echo_packets(env: Env, gw: str) -> int:
    return env.call(gw, "stats")["services"]["echo"]["packets"]


def assert_same_tables(env: Env) -> dict:
    t1, t2 = env.tables("gw1"), env.tables("gw2")
    for service in ("web", "web6", "echo"):
        assert t1[service]["sha256"] == t2[service]["sha256"], (service, t1[service], t2[service])
    return t1


# ----------------------------------------------------------------------- tests

def test_flows_land_on_one_vm_whichever_gateway_carries_them(env):
    tb = env.tb
    flows = UdpFlows(env, per_source=16)
    c1 = tb.client("c1")
    conns: list[LineConn] = []
    try:
        tables = assert_same_tables(env)
        assert set(tables["echo"]["slots"]) == set(LOCAL_VMS)
        rounds: list[list[str]] = []
        carried = {"gw1": 0, "gw2": 0}
        for r in range(6):
            gw = "gw1" if r % 2 == 0 else "gw2"
            tb.steer(gw)
            before = {g: echo_packets(env, g) for g in carried}
            rounds.append(flows.send())
            after = {g: echo_packets(env, g) for g in carried}
            other = "gw2" if gw == "gw1" else "gw1"
            assert after[other] == before[other], f"round {r}: {other} carried packets steered to {gw}"
            carried[gw] += after[gw] - before[gw]
        assert carried["gw1"] >= 3 * len(flows) and carried["gw2"] >= 3 * len(flows)
        first = rounds[0]
        for r, answers in enumerate(rounds):
            assert answers == first, f"round {r} ({'gw1' if r % 2 == 0 else 'gw2'}) moved flows"
        assert len(set(first)) >= 2, first
        for i in range(len(flows)):                   # both recorded the flow, for the same VM
            src, sport = flows.key(i)
            for gw in ("gw1", "gw2"):
                r = env.call(gw, "flow.lookup", service="echo", src=src, sport=sport)
                assert (r["vm"], r["reason"]) == (first[i], "flow table"), (gw, r)
        for sport in range(40000, 40200):             # flows neither has seen: the same choice
            r1 = env.call("gw1", "flow.lookup", service="web", src=c1.ip, sport=sport)
            r2 = env.call("gw2", "flow.lookup", service="web", src=c1.ip, sport=sport)
            assert r1["reason"].startswith("maglev slot") and (r1["vm"], r1["reason"]) == (r2["vm"], r2["reason"])

        # ECMP sprays the flows over both gateways: still one VM per flow
        tb.steer("ecmp")
        before = {g: echo_packets(env, g) for g in carried}
        for _ in range(2):
            assert flows.send() == first
        spread = {g: echo_packets(env, g) - before[g] for g in carried}
        assert spread["gw1"] > 0 and spread["gw2"] > 0 and sum(spread.values()) >= 2 * len(flows), spread
        print(f"\nECMP spread {2 * len(flows)} requests: gw1 {spread['gw1']}, gw2 {spread['gw2']}")

        # TCP connections survive a switch of gateway (no flow state needed on the new one)
        tb.steer("gw1")
        conns = [LineConn(tb, "c1", c1.ips[i % 2], VIP4, WEB_PORT) for i in range(10)]
        for c in conns:
            c.ask("via gw1")
        for gw in ("gw2", "gw1", "gw2"):
            tb.steer(gw)
            for c in conns:
                assert c.ask(f"via {gw}") == c.served_by, c
        assert len({c.served_by for c in conns}) >= 2
    finally:
        flows.close()
        for c in conns:
            c.close()
        tb.steer("gw1")


def test_a_gateway_dies_and_the_other_carries_its_flows(env):
    """Flows that only gw2 ever saw go on through gw1 after gw2 dies, to the same VMs."""
    tb = env.tb
    c1, c2 = tb.client("c1"), tb.client("c2")
    flows = UdpFlows(env, per_source=10)
    conns: list[LineConn] = []
    try:
        tb.steer("gw2")
        served = flows.send()
        conns = [LineConn(tb, role, src, VIP4, WEB_PORT) for role, src in
                 (("c1", c1.ips[0]), ("c1", c1.ips[1]), ("c2", c2.ip)) for _ in range(3)]
        for c in conns:
            c.ask("via gw2")
        for i in range(len(flows)):                   # gw1 has never seen them, yet it predicts them
            src, sport = flows.key(i)
            r = env.call("gw1", "flow.lookup", service="echo", src=src, sport=sport)
            assert r["reason"].startswith("maglev slot") and r["vm"] == served[i], r

        # gw2 dies: its daemon stops (XDP detached), its link goes down; ECMP skips it
        rc = env.daemons["gw2"].stop()
        assert rc == 0
        tb.cmd(GW2_ROLE, ["ip", "link", "set", UPLINK, "down"])
        tb.steer("ecmp")
        before = echo_packets(env, "gw1")
        assert flows.send() == served
        assert echo_packets(env, "gw1") - before >= len(flows)
        for c in conns:
            try:
                assert c.ask("via gw1 after gw2 died") == c.served_by
            except ConnectionLost as exc:
                pytest.fail(f"connection lost when gw2 died: {exc}")
        for i in range(len(flows)):
            src, sport = flows.key(i)
            r = env.call("gw1", "flow.lookup", service="echo", src=src, sport=sport)
            assert (r["vm"], r["reason"]) == (served[i], "flow table")

        # gw2 comes back (a new daemon), agrees, and carries the flows again
        tb.cmd(GW2_ROLE, ["ip", "link", "set", UPLINK, "up"])
        env.daemons["gw2"] = env.bed.daemon(env.paths["gw2"])
        env.daemons["gw2"].start(timeout=90)
        wait_for(lambda: env.all_healthy("gw2"), what="gw2: every VM healthy again")
        assert_same_tables(env)
        tb.steer("gw2")
        assert flows.send() == served
        for c in conns:
            assert c.ask("via gw2 again") == c.served_by
    finally:
        flows.close()
        for c in conns:
            c.close()
        tb.cmd(GW2_ROLE, ["ip", "link", "set", UPLINK, "up"], check=False)
        tb.steer("gw1")


def _until_down(env: Env, gw: str, vm: str) -> dict:
    return env.vms(gw)[vm] if env.vms(gw)[vm]["state"] == "down" else None


def test_a_vm_dies_and_both_gateways_move_exactly_its_flows(env):
    tb = env.tb
    c1 = tb.client("c1")
    flows = UdpFlows(env, per_source=20)
    conns: list[LineConn] = []
    try:
        tb.steer("gw1")
        served = flows.send()
        tb.steer("gw2")
        assert flows.send() == served                  # both gateways know every flow
        conns = [LineConn(tb, "c1", c1.ips[i % 2], VIP4, WEB_PORT) for i in range(12)]
        for c in conns:
            c.ask("before")
        counts = collections.Counter(served)
        victim = max(sorted(counts), key=lambda n: counts[n])
        assert counts[victim] > 0 and len(counts) >= 2

        t_kill = time.time()
        tb.stop(env.servers.pop(victim))              # the VM's service dies (SIGTERM, by pid)
        seen = {}
        for gw in ("gw1", "gw2"):
            vm = wait_for(lambda: _until_down(env, gw, victim), timeout=10, step=0.01,
                          what=f"{gw}: {victim} down")
            seen[gw] = time.time() - t_kill
            assert vm["health"] == "down" and not vm["last_probe"]["ok"], vm
            removal = (vm["tables_at"] - t_kill) * 1000
            MEASURED[f"VM failure -> removal from {gw}'s tables (ms)"].append(removal)
            rebuild = env.call(gw, "stats")["health"]["last_rebuild"]
            MEASURED[f"{gw} rebuild + swap after the health change (ms)"].append(rebuild["total_ms"])
            print(f"\n{gw}: {victim}'s server killed -> health down at "
                  f"{(vm['health_since'] - t_kill) * 1000:.0f} ms, out of the Maglev tables at {removal:.0f} ms "
                  f"(rebuild of {', '.join(rebuild['services'])} in {rebuild['total_ms']:.1f} ms; "
                  f"last probe: {vm['last_probe']['detail']}); seen by polling at {seen[gw] * 1000:.0f} ms")
        tables = assert_same_tables(env)
        for service in ("web", "web6", "echo"):
            assert victim not in tables[service]["slots"]

        # both gateways, alternately: the victim's flows move, and to the same VM whichever carries them
        rounds = []
        for r in range(4):
            tb.steer("gw1" if r % 2 == 0 else "gw2")
            rounds.append(flows.send())
        for answers in rounds[1:]:
            assert answers == rounds[0]
        after = rounds[0]
        moved = [i for i in range(len(flows)) if after[i] != served[i]]
        assert moved == [i for i in range(len(flows)) if served[i] == victim]
        assert victim not in after
        print(f"{len(moved)} of {len(flows)} flows moved (exactly {victim}'s); the others kept their VM")
        for c in conns:
            if c.served_by != victim:
                assert c.ask("after the VM died") == c.served_by

        # the VM comes back: both take it in again; established flows stay where they are
        env.start_vm_server(victim)
        for gw in ("gw1", "gw2"):
            wait_for(lambda: env.all_healthy(gw), timeout=10, what=f"{gw}: {victim} healthy again")
        tables = assert_same_tables(env)
        assert victim in tables["echo"]["slots"]
        for gw in ("gw1", "gw2"):
            tb.steer(gw)
            assert flows.send() == after
    finally:
        flows.close()
        for c in conns:
            c.close()
        tb.steer("gw1")


def test_cli_shows_health_last_probe_and_time_in_state(env):
    for gw in ("gw1", "gw2"):
        r = env.cli(gw, "vm", "list")
        assert r.returncode == 0, r.stderr
        lines = {line.split()[0]: line for line in r.stdout.splitlines()}
        for vm in LOCAL_VMS:
            line = lines[vm]
            assert "active" in line and "health up" in line and " for " in line, line
            # web and echo probe the VM's IPv4 address, web6 its IPv6 one
            assert "last probe ok " in line and any(p in line for p in ("tcp 198.18.", "udp 198.18.",
                                                                        "tcp [2001:db8:")), line
        assert "health unknown" in lines["vm9"] and "never probed" in lines["vm9"], lines["vm9"]
        r = env.cli(gw, "stats")
        assert r.returncode == 0, r.stderr
        assert "health: 9 checks" in r.stdout and "VMs up 3, down 0, unknown 0" in r.stdout, r.stdout
        stats = json.loads(env.cli(gw, "stats", "--json").stdout)
        vm1 = stats["vms"]["vm1"]
        assert (vm1["state"], vm1["admin_state"], vm1["health"]) == ("active", "active", "up")
        assert vm1["last_probe"]["ok"] and vm1["in_state_s"] >= 0 and time.time() - vm1["last_probe"]["at"] < 5
        assert stats["health"]["checks"] == 9 and stats["health"]["probes"] > 0


def test_drain_on_both_gateways(env):
    """Flow state is each gateway's own: a draining VM keeps a flow on the gateways
    that have seen it (here both), while a gateway that never saw a flow picks it
    from its table, which no longer names the VM."""
    tb = env.tb
    flows = UdpFlows(env, per_source=12)
    try:
        tb.steer("gw1")
        served = flows.send()
        tb.steer("gw2")
        assert flows.send() == served
        target = collections.Counter(served).most_common(1)[0][0]
        for gw in ("gw1", "gw2"):
            r = env.cli(gw, "vm", "drain", target)
            assert r.returncode == 0 and json.loads(r.stdout)["state"] == "draining", r.stderr
        tables = assert_same_tables(env)
        assert target not in tables["echo"]["slots"]
        for gw in ("gw1", "gw2", "gw1"):
            tb.steer(gw)
            assert flows.send() == served            # the draining VM keeps its flows
        fresh = UdpFlows(env, per_source=12)
        try:
            for gw in ("gw2", "gw1"):
                tb.steer(gw)
                assert target not in fresh.send()   # and takes no new ones
        finally:
            fresh.close()
        vms = env.vms("gw1")
        assert (vms[target]["state"], vms[target]["admin_state"], vms[target]["health"]) == \
            ("draining", "draining", "up")
        for gw in ("gw1", "gw2"):
            r = env.cli(gw, "vm", "up", target)
            assert r.returncode == 0 and json.loads(r.stdout)["state"] == "active", r.stderr
        tables = assert_same_tables(env)
        assert target in tables["echo"]["slots"]
        assert flows.send() == served
    finally:
        flows.close()
        tb.steer("gw1")


def test_daemons_stop_cleanly(env):
    for gw in ("gw1", "gw2"):
        rc = env.daemons[gw].stop()
        assert rc == 0, env.daemons[gw].stderr[-5:]
        assert any("stopped" in line for line in env.daemons[gw].stderr)

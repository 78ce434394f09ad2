"""End to end: the real daemon (`xdpgw run`) in the testbed's gateway namespace,
servers in the VMs and in the remote DC, real sockets from the client namespaces.

One testbed and one daemon per module (prefix "xgi" + 3 random hex digits, so
parallel or crashed runs never collide); the fixture always stops the daemon and
its servers by pid and removes every namespace, also on failure. The tests run
in file order; the last one stops the daemon and checks that nothing is left.
"""
from __future__ import annotations

import collections
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from control.api import unix as api
from testbed.kit import (
    ConnectionLost,
    GatewayDaemon,
    LineConn,
    dc2_binds,
    link_stats,
    start_server,
    udp_exchange,
    vm_binds,
)
from testbed.ports import add_port, port_for, switch_to
from tests.e2e.conftest import running_testbed, unique_prefix
from testbed.config import ECHO_PORT, REMOTE_PORT, WEB_PORT
from testbed.config import testbed_config as make_config
from dataplane.program import attached_program_id
from testbed.addresses import DC2_ENDPOINT, UPLINK, UPLINK_IP6, VIP4, VIP6
from testbed.topology import Testbed

PREFIX = unique_prefix("xgi")
ETH, IP4, IP6, UDP = 14, 20, 40, 8


@dataclass
class Env:
    tb: Testbed
    daemon: GatewayDaemon
    config_path: str
    sock: str
    xdpgw: str
    tmp: Path

    def cli(self, *args: str, role: str = "gw", config: str | None = None) -> subprocess.CompletedProcess:
        return self.tb.cmd(role, [self.xdpgw, *args, "--config", config or self.config_path], check=False)

    def stats(self) -> dict:
        return api.call(self.sock, "stats")

    def lookup(self, service: str, src: str, sport: int) -> dict:
        return api.call(self.sock, "flow.lookup", service=service, src=src, sport=sport)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xdpgw")
    with running_testbed(PREFIX) as bed:
        tb = bed.tb
        config = make_config(PREFIX)
        path = tmp / "xdpgw.toml"
        daemon = bed.launch(config, path)
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        start_server(tb, "dc2", "dc2", dc2_binds())
        yield Env(tb, daemon, str(path), config.gateway.api_socket, daemon.xdpgw, tmp)
        rc = daemon.stop()
        assert rc == 0, f"xdpgw run exited {rc}: {daemon.stderr[-5:]}"


# --------------------------------------------------------------------- helpers

def quiet_regions(env: Env, names=("r1", "r2"), tries: int = 20, section: str = "regions") -> dict:
    """Stats once the named regions' (or VMs') counters stand still (bounded wait)."""
    prev = env.stats()
    for _ in range(tries):
        time.sleep(0.15)
        now = env.stats()
        if all(delta(now, prev, section, n) == (0, 0) for n in names):
            return now
        prev = now
    pytest.fail(f"{section} counters never stood still: {prev[section]}")


def delta(after: dict, before: dict, section: str, name: str) -> tuple[int, int]:
    a, b = after[section][name], before[section][name]
    return a["packets"] - b["packets"], a["bytes"] - b["bytes"]


def udp_socket(env: Env, role: str, src: str, family: int = socket.AF_INET) -> socket.socket:
    s = env.tb.socket(role, family, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    s.bind((src, 0))
    return s


# ----------------------------------------------------------------------- tests

def test_udp_echo_and_exact_region_counters(env):
    """Known datagrams from c1 (both addresses) and c2: every echo comes from the VM
    the gateway says, and the region counters grow by exactly what was sent
    (bytes = Ethernet frame = 14 + IP total length)."""
    tb = env.tb
    c1, c2 = tb.client("c1"), tb.client("c2")
    sizes = [1, 64, 200, 512, 1000, 1400]
    flows_per_src = 3
    for role, srcs, other in (("c1", c1.ips, "r2"), ("c2", c2.ips, "r1")):
        region = "r1" if role == "c1" else "r2"
        socks = [(src, udp_socket(env, role, src)) for src in srcs for _ in range(flows_per_src)]
        try:
            predicted = {}
            for src, s in socks:
                r = env.lookup("echo", src, s.getsockname()[1])
                assert r["region"] == region and r["reason"].startswith("maglev slot"), r
                predicted[s] = r["vm"]
            before = quiet_regions(env)
            sent_bytes, per_vm = 0, collections.Counter()
            for i, size in enumerate(sizes):
                for src, s in socks:
                    payload = bytes((65 + (i + k) % 26) for k in range(size))
                    reply = udp_exchange(s, payload, (VIP4, ECHO_PORT))
                    assert reply == predicted[s].encode() + b":" + payload, \
                        f"{src}:{s.getsockname()[1]} size {size}: {reply[:40] if reply else reply!r}"
                    sent_bytes += ETH + IP4 + UDP + size
                    per_vm[predicted[s]] += 1
            sent = len(sizes) * len(socks)
            after = env.stats()
            assert delta(after, before, "regions", region) == (sent, sent_bytes)
            assert delta(after, before, "regions", other) == (0, 0), f"{other} counted {role}'s traffic"
            svc = after["services"]["echo"]
            assert svc["packets"] - before["services"]["echo"]["packets"] == sent
            assert svc["new_flows"] - before["services"]["echo"]["new_flows"] == len(socks)
            for vm in ("vm1", "vm2", "vm3"):
                assert delta(after, before, "vms", vm)[0] == per_vm[vm], vm
            for src, s in socks:
                r = env.lookup("echo", src, s.getsockname()[1])
                assert (r["vm"], r["reason"]) == (predicted[s], "flow table")
        finally:
            for _, s in socks:
                s.close()

    # IPv6 too: datagrams from c1's two IPv6 addresses to the gateway's own uplink
    # address (no service: the XDP program passes them on; the gateway's stack
    # answers with port unreachable). Region accounting happens first, exactly.
    socks = [udp_socket(env, "c1", a, socket.AF_INET6) for a in c1.ip6s]
    try:
        before = quiet_regions(env)
        n = nbytes = 0
        for size in sizes:
            for s in socks:
                s.sendto(b"6" * size, (UPLINK_IP6, 9))
                n, nbytes = n + 1, nbytes + ETH + IP6 + UDP + size
        time.sleep(0.3)
        after = env.stats()
        assert delta(after, before, "regions", "r1") == (n, nbytes)
        assert delta(after, before, "regions", "r2") == (0, 0)
    finally:
        for s in socks:
            s.close()


def test_tcp_connections_survive_vm_move(env):
    """Open connections (IPv4 from both of c1's addresses, and IPv6), move the VM
    serving the most of them to a new gateway port: every connection keeps its VM."""
    tb = env.tb
    c1 = tb.client("c1")
    conns = [LineConn(tb, "c1", c1.ips[i % 2], VIP4, WEB_PORT) for i in range(8)]
    conns += [LineConn(tb, "c1", c1.ip6s[i % 2], VIP6, WEB_PORT) for i in range(2)]
    try:
        before = env.stats()
        for c in conns:
            who = c.ask("before the move")
            r = env.lookup("web6" if ":" in c.src else "web", c.src, c.sport)
            assert (r["vm"], r["reason"]) == (who, "flow table"), (c, r)
        counts = collections.Counter(c.served_by for c in conns)
        vm = max(sorted(counts), key=lambda n: counts[n])
        vm_conns = [c for c in conns if c.served_by == vm]
        old_port = tb.vm(vm).port

        p = port_for(PREFIX, vm, "b")
        add_port(p, gw_ns=tb.ns("gw"))
        switch_to(p)                                 # the VM now lives behind the new port only
        eth0 = link_stats(tb, vm, tb.vm(vm).ifname)
        assert "UP" not in eth0["flags"], eth0
        eth1_before = link_stats(tb, vm, p.vm_if)

        r = env.cli("vm", "move", vm, "--port", p.port)
        assert r.returncode == 0, r.stderr
        assert f'"port": "{p.port}"' in r.stdout and p.vm_mac in r.stdout, r.stdout
        listed = {v["name"]: v for v in api.call(env.sock, "vm.list")}
        assert (listed[vm]["port"], listed[vm]["mac"]) == (p.port, p.vm_mac)
        assert tb.vm(vm).port == old_port != p.port

        rounds = 3
        for i in range(rounds):
            for c in conns:
                try:
                    who = c.ask(f"after the move {i}")
                except ConnectionLost as exc:
                    pytest.fail(f"connection lost after moving {vm}: {exc}")
                assert who == c.served_by, f"{c!r} now answered by {who}"
        eth1_after = link_stats(tb, vm, p.vm_if)
        assert eth1_after["rx_packets"] - eth1_before["rx_packets"] >= rounds * len(vm_conns)
        assert link_stats(tb, vm, tb.vm(vm).ifname)["rx_packets"] == eth0["rx_packets"]
        for c in conns:                               # the flow table still pins them
            r = env.lookup("web6" if ":" in c.src else "web", c.src, c.sport)
            assert (r["vm"], r["reason"]) == (c.served_by, "flow table")
        after = env.stats()
        assert delta(after, before, "regions", "r2") == (0, 0)
        assert delta(after, before, "regions", "r1")[0] >= (rounds + 1) * len(conns)
        assert delta(after, before, "vms", vm)[0] >= (rounds + 1) * len(vm_conns)
        assert {k: v for k, v in after["drops"].items() if v} == {}
    finally:
        for c in conns:
            c.close()


def test_tunnel_vm_is_served_by_the_remote_dc(env):
    """Service "remote" is vm9 behind dc2's endpoint: the gateway encapsulates
    (IP-in-IP, XDP_TX), dc2 decapsulates and answers from the VIP directly."""
    tb = env.tb
    c1 = tb.client("c1")
    # the last packets of an earlier test's connections (closing handshakes) are
    # not this test's: start once the local VMs' counters stand still
    before = quiet_regions(env, ("vm1", "vm2", "vm3"), section="vms")
    conn = LineConn(tb, "c1", c1.ip, VIP4, REMOTE_PORT)
    try:
        for i in range(3):
            assert conn.ask(f"remote {i}") == "dc2"
        r = env.lookup("remote", c1.ip, conn.sport)
        assert (r["vm"], r["reason"]) == ("vm9", "flow table")
    finally:
        conn.close()
    after = env.stats()
    tunnelled = after["datapath"]["tunnel_fwd"] - before["datapath"]["tunnel_fwd"]
    assert tunnelled >= 4                             # SYN, ACK, 3 lines (ACKs may ride along)
    assert delta(after, before, "vms", "vm9")[0] == tunnelled
    for vm in ("vm1", "vm2", "vm3"):
        assert delta(after, before, "vms", vm) == (0, 0)


def test_region_offload_sends_new_flows_to_the_remote_dc(env):
    tb = env.tb
    c1, c2 = tb.client("c1"), tb.client("c2")
    old_c2 = [LineConn(tb, "c2", c2.ip, VIP4, WEB_PORT) for _ in range(3)]
    old_c1 = [LineConn(tb, "c1", c1.ip, VIP4, WEB_PORT) for _ in range(2)]
    new_c2: list[LineConn] = []
    others: list[LineConn] = []
    try:
        for c in old_c2 + old_c1:
            assert c.ask("before offload").startswith("vm")
        before = env.stats()
        r = env.cli("offload", "set", "--region", "r2", "--service", "web", "--endpoint", DC2_ENDPOINT)
        assert r.returncode == 0, r.stderr
        r = env.cli("offload", "list")
        assert r.stdout.strip() == f"region r2 service web -> {DC2_ENDPOINT}"

        new_c2 = [LineConn(tb, "c2", c2.ip, VIP4, WEB_PORT) for _ in range(3)]
        for c in new_c2:
            assert c.ask("offloaded") == "dc2"
            assert env.lookup("web", c.src, c.sport)["reason"] == f"flow table: offloaded to {DC2_ENDPOINT}"
        for c in old_c2 + old_c1:                     # sessions served locally stay
            assert c.ask("during offload") == c.served_by
        new_c1 = [LineConn(tb, "c1", c1.ip, VIP4, WEB_PORT) for _ in range(2)]
        others += new_c1
        for c in new_c1:                              # the other region is unaffected
            assert c.ask("r1 during offload").startswith("vm")
        after = env.stats()
        assert after["datapath"]["offload_fwd"] - before["datapath"]["offload_fwd"] >= 2 * len(new_c2)

        r = env.cli("offload", "clear", "--region", "r2", "--service", "web")
        assert r.returncode == 0, r.stderr
        assert env.cli("offload", "list").stdout.strip() == ""
        assert api.call(env.sock, "offload.list") == []

        newer_c2 = [LineConn(tb, "c2", c2.ip, VIP4, WEB_PORT) for _ in range(3)]
        others += newer_c2
        for c in newer_c2:
            who = c.ask("after clear")
            assert who.startswith("vm"), who
            r = env.lookup("web", c.src, c.sport)
            assert (r["vm"], r["reason"]) == (who, "flow table"), r
        for c in old_c2 + old_c1:
            assert c.ask("after clear") == c.served_by
        for c in new_c2:                              # offloaded sessions finish where they are
            assert c.ask("after clear") == "dc2"
            r = env.lookup("web", c.src, c.sport)
            assert r["reason"] == f"flow table: offloaded to {DC2_ENDPOINT}", r
    finally:
        for c in old_c2 + old_c1 + new_c2 + others:
            c.close()


def _xdp_on(tb: Testbed, role: str) -> list[str]:
    """Interfaces of a namespace with an XDP program attached."""
    out = tb.cmd(role, ["ip", "-d", "-o", "link", "show"]).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if " xdp" in line
            or "prog/xdp" in line]


def test_cli_errors(env):
    tb = env.tb
    up0_prog = tb.run("gw", attached_program_id, UPLINK)
    assert up0_prog is not None

    r = env.cli("vm", "move", "nosuchvm", "--port", "gwv1")
    assert r.returncode != 0
    assert r.stderr.strip() == "xdpgw: unknown VM 'nosuchvm'" and r.stdout == ""

    # the interface does not exist in this namespace
    bad = env.tmp / "no-interface.toml"
    bad.write_text(make_config(PREFIX, name="gwbad", interface="nosuch0").to_toml())
    r = env.cli("run", config=str(bad))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "gateway.interface" in lines[0] and "'nosuch0'" in lines[0], lines
    assert not os.path.exists(f"/run/xdpgw/{PREFIX}-gwbad.sock")
    assert tb.run("gw", attached_program_id, UPLINK) == up0_prog

    # the testbed config in a namespace without its uplink: nothing gets attached there
    other = env.tmp / "in-c2.toml"
    other.write_text(make_config(PREFIX, name="gwc2", netns=tb.ns("c2")).to_toml())
    r = env.cli("run", role="c2", config=str(other))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "gateway.interface" in lines[0] and f"'{UPLINK}'" in lines[0], lines
    assert _xdp_on(tb, "c2") == []

    # a network namespace that does not exist
    nons = env.tmp / "no-netns.toml"
    nons.write_text(make_config(PREFIX, name="gwns", netns=f"{PREFIX}-nosuch").to_toml())
    r = env.cli("run", config=str(nons))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "gateway.netns" in lines[0] and f"{PREFIX}-nosuch" in lines[0], lines

    # a service naming a VM that is not configured
    text = Path(env.config_path).read_text()
    assert 'vms = ["vm9"]' in text
    unknown = env.tmp / "unknown-vm.toml"
    unknown.write_text(text.replace('vms = ["vm9"]', 'vms = ["vm9", "vm42"]')
                       .replace(f"{PREFIX}-gw1.sock", f"{PREFIX}-gwvm.sock"))
    r = env.cli("run", config=str(unknown))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "vm42" in lines[0] and "unknown VM" in lines[0], lines
    assert tb.run("gw", attached_program_id, UPLINK) == up0_prog
    assert _xdp_on(tb, "gw") == [UPLINK]


def test_daemon_stop_detaches_and_removes_its_socket(env):
    """Runs last: SIGTERM the daemon; exit 0, no XDP program left, no API socket."""
    tb = env.tb
    assert tb.run("gw", attached_program_id, UPLINK) is not None
    assert os.path.exists(env.sock)
    rc = env.daemon.stop()
    assert rc == 0, env.daemon.stderr[-5:]
    assert any("event=gateway.stopped" in line and "xdp=detached" in line for line in env.daemon.stderr)
    assert tb.run("gw", attached_program_id, UPLINK) is None
    assert _xdp_on(tb, "gw") == []
    assert not os.path.exists(env.sock)
    r = env.cli("stats")
    assert r.returncode == 1 and "no xdpgw daemon is listening" in r.stderr

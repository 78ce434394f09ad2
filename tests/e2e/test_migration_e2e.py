"""Migration-aware forwarding end to end: the real daemon in the testbed with the
VM-port watcher on gwv*; VMs "live-migrate" by getting a new port (the VM's
namespace gets a veth with the VM's MAC, testbed/ports.py) and
announce themselves with raw frames sent from their namespace. No CLI or API
call moves a VM in the GARP tests: detection does.

One testbed per module, prefix "xgm" + 3 hex digits; the fixture stops the
daemon and servers by pid and removes every namespace, pin and registry file,
also on failure. Tests run in file order (later ones start where earlier ones
left the VMs). Times are measured and printed, never asserted."""
from __future__ import annotations

import dataclasses
import socket
import sys
import time
from dataclasses import dataclass

import pytest

from tests.waiting import wait_for

from control.api import unix as api
from control.config import HostConfig, validate
from testbed.kit import GatewayDaemon, LineConn, link_stats, start_server, vm_binds
from control.migration.manager import convergence_summary
from testbed.config import WEB_PORT
from testbed.config import testbed_config as make_config
from testbed.ports import add_port, announce, garp, na, port_for, rarp, send_frame, switch_to
from testbed.addresses import VIP4, VIP6
from testbed.topology import Testbed
from tests.e2e.conftest import running_testbed, unique_prefix

PREFIX = unique_prefix("xgm")
SUFFIXES = "ha=a,hb=b"
HOLD_DOWN = 0.2


@dataclass
class Env:
    tb: Testbed
    daemon: GatewayDaemon
    sock: str
    config_path: str

    def call(self, cmd, **args):
        return api.call(self.sock, cmd, **args)

    def location(self, vm):
        return next(r for r in self.call("vm.registry") if r["name"] == vm)["location"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xdpgw-mig")
    with running_testbed(PREFIX) as bed:
        tb = bed.tb
        base = make_config(PREFIX, vm_ports=("gwv*",), migration_hold_down=HOLD_DOWN,
                           orchestrator=(sys.executable, "-m", "testbed.orchestrator", PREFIX, SUFFIXES))
        tenants = {"vm1": "t2", "vm2": "t1", "vm3": "t1"}
        vms = tuple(dataclasses.replace(v, tenant=tenants.get(v.name)) for v in base.vms)
        hosts = (HostConfig("ha", ("gwv1", "gwv2", "gwv?a", "gwv1[mno]"), 3), HostConfig("hb", ("gwv3", "gwv?b"), 3))
        config = validate(dataclasses.replace(base, vms=vms, hosts=hosts))
        path = tmp / "xdpgw.toml"
        daemon = bed.launch(config, path, timeout=90)
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        yield Env(tb, daemon, config.gateway.api_socket, str(path))
        rc = daemon.stop()
        assert rc == 0, f"xdpgw run exited {rc}: {daemon.stderr[-5:]}"


# ------------------------------------------------------------------ helpers

def new_port(env: Env, vm: str, suffix: str):
    p = port_for(PREFIX, vm, suffix)
    add_port(p, gw_ns=env.tb.ns("gw"))
    assert wait_for(lambda: p.port in env.call("migration.status")["watcher"]["ports"]), \
        f"the watcher never attached to {p.port}: {env.call('migration.status')} {env.daemon.stderr[-5:]}"
    return p


def open_conns(env: Env, vm: str, want: int = 2, tries: int = 24, v6: bool = False) -> list[LineConn]:
    """Connections from c1 to the web VIP (`v6`: web6's) until `want` are served by `vm` (bounded)."""
    c1 = env.tb.client("c1")
    srcs, vip = (c1.ip6s, VIP6) if v6 else (c1.ips, VIP4)
    mine, others = [], []
    for i in range(tries):
        conn = LineConn(env.tb, "c1", srcs[i % len(srcs)], vip, WEB_PORT)
        conn.ask("hello")
        (mine if conn.served_by == vm else others).append(conn)
        if len(mine) >= want:
            break
    for c in others:
        c.close()
    assert mine, f"no connection landed on {vm} in {tries} tries"
    return mine


def last_migration(env: Env, vm: str) -> dict:
    return env.call("vm.history", name=vm)["migrations"][-1]


# -------------------------------------------------------------------- tests

def test_watcher_is_on_every_vm_port_and_routing_is_unchanged(env):
    st = env.call("migration.status")
    assert set(st["watcher"]["ports"]) == {"gwv1", "gwv2", "gwv3"}
    assert st["journal_mode"] == "wal"
    conns = open_conns(env, "vm1", want=1)
    for c in conns:
        assert c.ask("still there") == "vm1"
        c.close()


def test_garp_on_a_new_port_moves_the_vm_and_tcp_survives(env):
    conns = open_conns(env, "vm1", want=2)
    p = new_port(env, "vm1", "m")
    before = link_stats(env.tb, "vm1", p.vm_if)["rx_packets"]
    switch_to(p)                                  # the VM now lives behind gwv1m ...
    announce(p)                                   # ... and says so
    assert wait_for(lambda: env.location("vm1") == "gwv1m", timeout=3)
    for i, c in enumerate(conns):
        for j in range(3):
            assert c.ask(f"after move {i}.{j}") == "vm1"        # no reset, same VM
    assert link_stats(env.tb, "vm1", p.vm_if)["rx_packets"] > before
    m = last_migration(env, "vm1")
    assert (m["from_location"], m["to_location"], m["detected_by"], m["status"]) == ("gwv1", "gwv1m", "garp", "ok")
    assert env.call("vm.list")[0]["port"] == "gwv1m"
    print(f"\nGARP-driven move vm1 gwv1 -> gwv1m converged in {m['convergence_ms']:.3f} ms")
    for c in conns:
        c.close()


def test_convergence_over_repeated_moves(env):
    """vm1 has ports gwv1m and gwv1n (both up, same MAC): GARPs alternate between
    them, each after the hold-down; TCP keeps working throughout."""
    conns = open_conns(env, "vm1", want=1)
    n = new_port(env, "vm1", "n")
    m = port_for(PREFIX, "vm1", "m")
    moves = 20
    for i in range(moves):
        p = (n, m)[i % 2]
        time.sleep(HOLD_DOWN + 0.05)
        send_frame(env.tb.ns("vm1"), p.vm_if, garp(p.vm_mac, p.vm_ip))
        assert wait_for(lambda: env.location("vm1") == p.port, timeout=3), \
            f"move {i} to {p.port}: {env.call('migration.status')} {env.call('vm.events')[-3:]}"
        assert conns[0].ask(f"move {i}") == "vm1"
    rows = [r for r in env.call("vm.history", name="vm1", limit=moves)["migrations"] if r["detected_by"] == "garp"]
    summary = convergence_summary(rows)
    assert summary["count"] == moves
    print(f"\nconvergence over {moves} GARP-driven moves (announcement in the kernel -> gateway re-programmed): "
          f"median {summary['median_ms']:.3f} ms, p90 {summary['p90_ms']:.3f} ms, max {summary['max_ms']:.3f} ms")
    cli = env.tb.cmd("gw", [env.daemon.xdpgw, "vm", "history", "vm1", "--config", env.config_path], check=False)
    assert cli.returncode == 0 and "median" in cli.stdout, cli.stderr
    conns[0].close()


def test_spoofed_announcement_is_ignored_and_reported(env):
    here = env.location("vm1")
    other = port_for(PREFIX, "vm1", "n" if here == "gwv1m" else "m")
    time.sleep(HOLD_DOWN + 0.05)
    vm2_ip = env.tb.vm("vm2").ip
    send_frame(env.tb.ns("vm1"), other.vm_if, garp(other.vm_mac, vm2_ip))     # vm1's MAC, vm2's address
    ev = wait_for(lambda: [e for e in env.call("vm.events", kind="spoofed")
                           if e["detail"]["port"] == other.port], timeout=3)
    assert ev and ev[-1]["vm"] == "vm1" and ev[-1]["detail"]["ip"] == vm2_ip
    time.sleep(0.1)
    assert env.location("vm1") == here


def test_flapping_is_held_down(env):
    here = env.location("vm1")
    there = port_for(PREFIX, "vm1", "n" if here == "gwv1m" else "m")
    back = port_for(PREFIX, "vm1", here[-1])
    time.sleep(HOLD_DOWN + 0.05)
    send_frame(env.tb.ns("vm1"), there.vm_if, garp(there.vm_mac, there.vm_ip))
    send_frame(env.tb.ns("vm1"), back.vm_if, garp(back.vm_mac, back.vm_ip))      # straight back: a flap
    assert wait_for(lambda: [e for e in env.call("vm.events", kind="flap") if e["detail"]["port"] == back.port],
                    timeout=3)
    time.sleep(0.1)
    assert env.location("vm1") == there.port
    conn = open_conns(env, "vm1", want=1)[0]
    assert conn.ask("after the flap") == "vm1"
    conn.close()


def test_rarp_moves_a_vm(env):
    conns = open_conns(env, "vm2", want=1)
    p = new_port(env, "vm2", "a")
    switch_to(p)
    send_frame(env.tb.ns("vm2"), p.vm_if, rarp(p.vm_mac))
    assert wait_for(lambda: env.location("vm2") == "gwv2a", timeout=3)
    assert conns[0].ask("after rarp") == "vm2"
    assert last_migration(env, "vm2")["detected_by"] == "rarp"
    conns[0].close()


def test_unsolicited_na_moves_a_vm_with_both_addresses(env):
    """vm1 has an IPv4 and an IPv6 address; on a new port it announces only the IPv6
    one (an unsolicited NA, no GARP): the gateway moves it, its connections in both
    families follow, and every packet the gateway now forwards to it arrives on the
    new port. An NA from vm1 for vm2's IPv6 address is reported as spoofed."""
    vm1 = env.tb.vm("vm1")
    assert next(r for r in env.call("vm.registry") if r["name"] == "vm1")["ips"] == [vm1.ip, vm1.ip6]
    conns = open_conns(env, "vm1", want=1) + open_conns(env, "vm1", want=1, v6=True)
    here = env.location("vm1")
    p = new_port(env, "vm1", "o")
    applied = env.call("migration.status")["outcomes"].get("applied", 0)
    time.sleep(HOLD_DOWN + 0.05)
    switch_to(p)
    send_frame(p.vm_ns, p.vm_if, na(p.vm_mac, p.vm_ip6))
    assert wait_for(lambda: env.location("vm1") == p.port, timeout=3), \
        f"{env.call('migration.status')} {env.call('vm.events')[-3:]}"
    m = last_migration(env, "vm1")
    assert (m["from_location"], m["to_location"], m["detected_by"], m["status"]) == (here, p.port, "na", "ok")
    assert env.call("migration.status")["outcomes"]["applied"] == applied + 1
    gw_before = env.call("stats")["vms"]["vm1"]["packets"]
    port_before = link_stats(env.tb, "vm1", p.vm_if)["rx_packets"]
    asks = 5
    for c in conns:
        for j in range(asks):
            assert c.ask(f"after the NA {j}") == "vm1"              # no reset, same VM, both families
    forwarded = env.call("stats")["vms"]["vm1"]["packets"] - gw_before
    arrived = link_stats(env.tb, "vm1", p.vm_if)["rx_packets"] - port_before
    assert forwarded >= asks * len(conns) and arrived >= forwarded, (forwarded, arrived)
    print(f"\nNA-driven move vm1 {here} -> {p.port} converged in {m['convergence_ms']:.3f} ms; "
          f"{forwarded} packets forwarded to vm1 since, {arrived} arrived on {p.vm_if}")
    vm2_ip6 = env.tb.vm("vm2").ip6
    send_frame(p.vm_ns, p.vm_if, na(p.vm_mac, vm2_ip6))                # vm1's MAC, vm2's IPv6 address
    ev = wait_for(lambda: [e for e in env.call("vm.events", kind="spoofed") if e["detail"]["ip"] == vm2_ip6],
                  timeout=3)
    assert ev and (ev[-1]["vm"], ev[-1]["detail"]["kind"], ev[-1]["detail"]["owner"]) == ("vm1", "na", "vm2")
    time.sleep(0.1)
    assert env.location("vm1") == p.port
    for c in conns:
        c.close()


def _vm_traffic(env: Env, src: str, dst_ip: str, count: int = 200, size: int = 1000) -> None:
    s = env.tb.socket(src, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(count):
            s.sendto(b"x" * size, (dst_ip, 9))
    finally:
        s.close()


def test_defrag_apply_reduces_the_cross_host_share(env):
    """vm2 (host ha) and vm3 (host hb) are tenant t1 and chatty; the plan brings
    them together, `xdpgw defrag apply` runs it through the orchestrator and the
    migration path, and the measured share of cross-host bytes falls."""
    vm2, vm3 = env.tb.vm("vm2"), env.tb.vm("vm3")

    def measure() -> float:
        env.call("defrag.reset")
        _vm_traffic(env, "vm2", vm3.ip)
        _vm_traffic(env, "vm3", vm2.ip)
        time.sleep(0.2)
        return env.call("defrag.matrix")["fragmentation"]["tenants"]["t1"]["share"]

    before = measure()
    assert before == 1.0
    cli = env.tb.cmd("gw", [env.daemon.xdpgw, "defrag", "plan", "--config", env.config_path], check=False)
    assert cli.returncode == 0 and "100.0% -> 0.0%" in cli.stdout, cli.stdout + cli.stderr
    cli = env.tb.cmd("gw", [env.daemon.xdpgw, "defrag", "apply", "--json", "--config", env.config_path],
                     check=False, timeout=120)
    assert cli.returncode == 0, cli.stderr
    import json
    applied = json.loads(cli.stdout)["applied"]
    assert applied and all(a["status"] in ("ok", "already detected") for a in applied), applied
    placement = env.call("defrag.matrix")["placement"]
    assert placement["vm2"] == placement["vm3"]
    after = measure()
    print(f"\ndefrag: tenant t1 cross-host share {before:.1%} -> {after:.1%}; moves {applied}")
    assert after < before
    hist = [m for v in ("vm2", "vm3") for m in env.call("vm.history", name=v)["migrations"]]
    assert any(m["detected_by"] in ("defrag", "netlink") for m in hist)

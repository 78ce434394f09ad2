"""Real gateway daemons (`xdpgw run`, XDP attached) in the testbed's namespaces,
four of them (two data centers x two gateways), following one real 3-member
etcd (testbed/etcd_cluster.py): a migration is one store write that every daemon
applies from its watch.

Data center 1: Testbed(prefix, gateways=2) gives gw1 and gw2, each with its own
ports to the VMs; both own host "ha" (the VMs' host), so a VM's location
(ha, gwvNx) is a local port on each. Data center 2: dc2a runs in the testbed's
dc2 namespace (on its eth0, the testbed's decapsulator left off) and dc2b in a
namespace of this module's, {p}-dc2b, whose uplink is a veth to dc2. They do not
own ha: they map the same locations to a tunnel to ha's endpoint. They follow
the store like the others and carry no traffic (the router sends the VIPs to
gw1 or gw2 only).

The etcd members run in a namespace of their own, {p}-etcd, on 198.18.250.1-3;
each gateway namespace reaches it by a veth of its own (mgmt0), not through the
uplink XDP runs on, so a gateway is cut off from the store, for real, by taking
its mgmt0 down (and back up at the end).

A VM's new ports (testbed/ports.py) are made on gw1, which watches its VM ports
for announcements, and a twin port of the same name on gw2 (to the same VM):
the host's ports exist on both gateways of its data center. The VMs answer on
whichever port a packet arrives and reply by their default route (direct server
return), so a connection survives every move.

One testbed per module (prefix "xgf" + 3 hex digits); every daemon and etcd
member is stopped by pid and every namespace, pin and data dir removed, also on
failure. Waits are bounded; times are printed (-s), never asserted."""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from control.api import unix as api
from control.config import Config, HostConfig, StoreConfig, validate
from testbed.addresses import DC2_ENDPOINT, DC2_ENDPOINT6, DC2_IF, GW2_ROLE, ROUTER_DC2_MAC, UPLINK_IP, VIP4
from testbed.config import WEB_PORT
from testbed.config import testbed_config as make_config
from testbed.etcd_cluster import EtcdCluster
from testbed.kit import GatewayDaemon, LineConn, start_server, vm_binds, xdpgw_executable
from testbed.ports import VmPort, add_port, garp, port_for
from testbed.topology import Testbed
from tests.e2e.conftest import running_testbed, unique_prefix
from tests.waiting import wait_for

PREFIX = unique_prefix("xgf")
GATEWAYS = ("gw1", "gw2", "dc2a", "dc2b")
ROLE = {"gw1": "gw", "gw2": GW2_ROLE, "dc2a": "dc2"}        # dc2b: a namespace of this module's, {p}-dc2b
LOCAL = ("gw1", "gw2")                       # own host ha: a VM's port is a local port there
VMS = ("vm1", "vm2", "vm3")
NEW_PORTS = "mn"                             # each VM gets ports gwvNm and gwvNn on gw1 and gw2
ETCD_IPS = ("198.18.250.1", "198.18.250.2", "198.18.250.3")
MGMT_IF = "mgmt0"
HA_ENDPOINT = UPLINK_IP                      # what dc1's host ha is tunnelled to from dc2 (nothing decapsulates there)
DC2B = ("198.18.210.1", "198.18.210.2", "02:00:00:00:21:01", "02:00:00:00:21:02")   # dc2 end, dc2b end (up0)
HOLD_DOWN = 0.2
MEASURED: list[str] = []


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=20)


# ------------------------------------------------------------- the store's network

@dataclass
class StoreNet:
    """{p}-etcd, linked to each gateway namespace by its own veth: to-<gw> there,
    mgmt0 (198.18.(240 + i).2/24) in the gateway's namespace."""
    tb: Testbed
    ns: str

    def gw_ns(self, gw: str) -> str:
        return self.tb.ns(ROLE[gw]) if gw in ROLE else f"{self.tb.prefix}-{gw}"

    def connect(self, gw: str) -> None:
        """mgmt0 up and the route to the members through it."""
        i = GATEWAYS.index(gw)
        _ip("-n", self.gw_ns(gw), "link", "set", MGMT_IF, "up")
        _ip("-n", self.gw_ns(gw), "route", "replace", "198.18.250.0/24", "via", f"198.18.{240 + i}.1", "dev", MGMT_IF)

    def cut(self, gw: str) -> None:
        """mgmt0 down: the route goes with it, and the router the gateway falls back
        to has none to the members."""
        _ip("-n", self.gw_ns(gw), "link", "set", MGMT_IF, "down")


@contextlib.contextmanager
def store_net(tb: Testbed) -> Iterator[StoreNet]:
    """The store's namespace and its links; first, dc2's second gateway {p}-dc2b,
    whose uplink up0 is a veth to dc2's namespace (to-dc2b there)."""
    net = StoreNet(tb, f"{tb.prefix}-etcd")
    dc2b = net.gw_ns("dc2b")
    _ip("netns", "add", net.ns)
    _ip("netns", "add", dc2b)
    try:
        _ip("-n", dc2b, "link", "set", "lo", "up")
        _ip("-n", tb.ns("dc2"), "link", "add", "to-dc2b", "address", DC2B[2], "type", "veth", "peer", "name", "up0",
            "address", DC2B[3], "netns", dc2b)
        _ip("-n", tb.ns("dc2"), "addr", "add", f"{DC2B[0]}/24", "dev", "to-dc2b")
        _ip("-n", tb.ns("dc2"), "link", "set", "to-dc2b", "up")
        _ip("-n", dc2b, "addr", "add", f"{DC2B[1]}/24", "dev", "up0")
        _ip("-n", dc2b, "link", "set", "up0", "up")
        _ip("-n", dc2b, "route", "add", "default", "via", DC2B[0])
        _ip("-n", net.ns, "link", "set", "lo", "up")
        for addr in ETCD_IPS:
            _ip("-n", net.ns, "addr", "add", f"{addr}/32", "dev", "lo")
        for i, gw in enumerate(GATEWAYS):
            there = f"to-{gw}"
            _ip("-n", net.ns, "link", "add", there, "type", "veth", "peer", "name", MGMT_IF, "netns", net.gw_ns(gw))
            _ip("-n", net.ns, "addr", "add", f"198.18.{240 + i}.1/24", "dev", there)
            _ip("-n", net.ns, "link", "set", there, "up")
            _ip("-n", net.gw_ns(gw), "addr", "add", f"198.18.{240 + i}.2/24", "dev", MGMT_IF)
            net.connect(gw)
        yield net
    finally:
        # the veths go with the namespaces (their ends in the testbed's too)
        for ns in (net.ns, dc2b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


# ------------------------------------------------------------------ the fleet

def fleet_config(tb: Testbed, gw: str, url: str) -> Config:
    """The testbed's config for `gw` on the store at `url`, the VMs on host ha (owned by dc1's gateways)."""
    ha = HostConfig("ha", ("gwv1", "gwv2", "gwv3", "gwv?m", "gwv?n"), endpoint=ipaddress.ip_address(HA_ENDPOINT))
    if gw == "dc2a":
        base = make_config(tb.prefix, gw, netns=tb.ns("dc2"), interface=DC2_IF,
                           tunnel_source=ipaddress.ip_address(DC2_ENDPOINT),
                           tunnel_source6=ipaddress.ip_address(DC2_ENDPOINT6), next_hop_mac=ROUTER_DC2_MAC)
    elif gw == "dc2b":
        base = make_config(tb.prefix, gw, netns=f"{tb.prefix}-dc2b", interface="up0",
                           tunnel_source=ipaddress.ip_address(DC2B[1]), tunnel_source6=None, next_hop_mac=DC2B[2])
    else:
        watch = {"vm_ports": ("gwv*",)} if gw == "gw1" else {}
        base = make_config(tb.prefix, gw, which=1 if gw == "gw1" else 2, migration_hold_down=HOLD_DOWN, **watch)
    vms = tuple(dataclasses.replace(v, host="ha") if v.port else v for v in base.vms)
    own = ("ha",) if gw in LOCAL else ()
    return validate(dataclasses.replace(base, gateway=dataclasses.replace(base.gateway, hosts=own), vms=vms,
                                        hosts=(ha,), store=StoreConfig(url)))


@dataclass
class Fleet:
    tb: Testbed
    net: StoreNet
    cluster: EtcdCluster
    daemons: dict[str, GatewayDaemon]
    socks: dict[str, str]

    def call(self, gw: str, cmd: str, **args):
        return api.call(self.socks[gw], cmd, **args)

    def vms(self, gw: str) -> dict[str, dict]:
        return {v["name"]: v for v in self.call(gw, "vm.list") if v["name"] in VMS}

    def store(self, gw: str) -> dict:
        return self.call(gw, "migration.status")["store"]

    def where(self, gw: str) -> dict[str, tuple]:
        """Per VM: its location (host, port) and this gateway's forwarding (its port or tunnel)."""
        return {n: ((v["location"]["host"], v["location"]["port"]), v.get("port") or v.get("tunnel"))
                for n, v in self.vms(gw).items()}

    def agree(self, want: dict[str, str] | None = None) -> bool:
        """Every gateway has applied the store up to the VM records' last write and has every
        VM at the same (host, port), forwarding to that port (own host) or tunnelling
        to ha's endpoint (dc2a); `want`: the ports. (A VM's `revision` in `vm list` is
        where this gateway last changed its forwarding: a gateway that missed a move
        away and back did not need to, so those may differ.)"""
        latest = max(r["revision"] for r in self.call("gw1", "vm.registry"))     # the VM records' last write
        views = {}
        for gw in GATEWAYS:
            if self.store(gw)["revision"] < latest:
                return False
            views[gw] = self.where(gw)
        first = {n: loc for n, (loc, _) in views["gw1"].items()}
        for gw, view in views.items():
            for n, (loc, fwd) in view.items():
                if loc != first[n] or fwd != (loc[1] if gw in LOCAL else HA_ENDPOINT):
                    return False
        return want is None or all(first[n] == ("ha", p) for n, p in want.items())


def twin_port(tb: Testbed, p: VmPort, suffix: str) -> None:
    """gw2's port of the same name to the same VM (its VM end e2<suffix>, with the
    VM's MAC and GRO on: a veth takes XDP-redirected frames only if its peer runs NAPI)."""
    vm_if = f"e2{suffix}"
    _ip("-n", tb.ns(GW2_ROLE), "link", "add", p.port, "address", p.port_mac, "type", "veth", "peer", "name",
        vm_if, "address", p.vm_mac, "netns", p.vm_ns)
    _ip("-n", tb.ns(GW2_ROLE), "link", "set", p.port, "up")
    _ip("-n", p.vm_ns, "link", "set", vm_if, "up")
    subprocess.run(["ip", "netns", "exec", p.vm_ns, "ethtool", "-K", vm_if, "gro", "on"], check=True,
                   capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xdpgw-fleet")
    with running_testbed(PREFIX, gateways=2, dc2_decap=False) as bed:
        tb = bed.tb
        with store_net(tb) as net, EtcdCluster(hosts=ETCD_IPS, netns=net.ns) as cluster:
            daemons: dict[str, GatewayDaemon] = {}
            try:
                socks = {}
                for gw in GATEWAYS:
                    config = fleet_config(tb, gw, cluster.url)
                    socks[gw] = config.gateway.api_socket
                    daemons[gw] = bed.launch(config, tmp / f"{gw}.toml", timeout=90)
                f = Fleet(tb, net, cluster, daemons, socks)
                for vm in VMS:
                    start_server(tb, vm, vm, vm_binds())
                    for s in NEW_PORTS:
                        p = port_for(PREFIX, vm, s)
                        add_port(p, gw_ns=tb.ns("gw"))
                        twin_port(tb, p, s)
                wait_for(lambda: {f"gwv{n}{s}" for n in (1, 2, 3) for s in NEW_PORTS}
                         <= set(f.call("gw1", "migration.status")["watcher"]["ports"]),
                         what="gw1 watches the new ports")
                yield f
            finally:
                # before the members go: a daemon leaving revokes its lease in the store
                for d in daemons.values():
                    d.stop()
    if MEASURED:
        print("\n" + "\n".join(MEASURED))


# ------------------------------------------------------------------ helpers

_SRC = itertools.count()


def conns_on(f: Fleet, vm: str, want: int = 2, tries: int = 30) -> list[LineConn]:
    """Connections from c1 to the web VIP (through gw1) until `want` are served by `vm` (bounded)."""
    f.tb.steer("gw1")
    c1 = f.tb.client("c1")
    mine = []
    for _ in range(tries):
        conn = LineConn(f.tb, "c1", c1.ips[next(_SRC) % 2], VIP4, WEB_PORT)
        conn.ask("hello")
        if conn.served_by == vm:
            mine.append(conn)
            if len(mine) >= want:
                break
        else:
            conn.close()
    assert mine, f"no connection landed on {vm} in {tries} tries"
    return mine


def ask_through_each(f: Fleet, conns: list[LineConn], vm: str, text: str) -> None:
    """Every connection answered by `vm`, carried by gw1 and then by gw2."""
    for gw in LOCAL:
        f.tb.steer(gw)
        for c in conns:
            assert c.ask(f"{text} via {gw}") == vm
    f.tb.steer("gw1")


def move(f: Fleet, gw: str, vm: str, port: str, tries: int = 60) -> dict:
    """`vm.move` through `gw`'s API, retried while the store elects a leader (bounded)."""
    last: Exception | None = None
    for _ in range(tries):
        try:
            return f.call(gw, "vm.move", timeout=20.0, name=vm, port=port, host="ha")
        except Exception as exc:   # noqa: BLE001 - the store may be electing a leader
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"{gw}: move of {vm} to {port} never went through: {last}")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -------------------------------------------------------------------- tests

def test_every_daemon_follows_the_store(fleet):
    f = fleet
    members = f.call("gw1", "migration.status")["gateways"]
    assert set(GATEWAYS) <= set(members), members
    assert wait_for(lambda: f.agree({vm: f"gwv{vm[2:]}" for vm in VMS}), timeout=10,
                    what="every daemon on the configured locations")
    for gw in GATEWAYS:
        st = f.call(gw, "status")["store"]
        assert st["state"] == "ok" and st["url"] == f.cluster.url, st


def test_a_vm_announces_itself_on_new_ports_every_daemon_repoints_it_and_tcp_survives(fleet):
    f = fleet
    conns = conns_on(f, "vm1")
    ask_through_each(f, conns, "vm1", "before")
    ports = [port_for(PREFIX, "vm1", s) for s in NEW_PORTS]
    # opened beforehand: what is timed is the frame, not making a socket in the VM's namespace
    raw = []
    for p in ports:
        raw.append(f.tb.socket("vm1", socket.AF_PACKET, socket.SOCK_RAW))
        raw[-1].bind((p.vm_if, 0))
    fleet_ms, detector_ms, sent_ms = [], [], []
    rev = f.vms("gw1")["vm1"]["revision"] or 0

    def applied_everywhere() -> dict[str, dict] | None:
        views = {gw: f.vms(gw)["vm1"] for gw in GATEWAYS}
        return views if all((v["revision"] or 0) > rev for v in views.values()) else None

    try:
        for i in range(50):
            p = ports[i % 2]
            time.sleep(HOLD_DOWN + 0.05)                 # a move back sooner would be held down as a flap
            t_send = time.time()
            raw[i % 2].send(garp(p.vm_mac, p.vm_ip))
            # polled slowly: each daemon stamps its own apply (moved_at), the polls only compete for the CPU
            views = wait_for(applied_everywhere, timeout=10, step=0.05,
                             what=f"move {i} of vm1 to {p.port} applied by every daemon")
            revs = {gw: v["revision"] for gw, v in views.items()}
            assert len(set(revs.values())) == 1, revs
            rev = revs["gw1"]
            for gw, v in views.items():
                assert (v["location"]["host"], v["location"]["port"]) == ("ha", p.port), (gw, v)
                assert (v.get("port") or v.get("tunnel")) == (p.port if gw in LOCAL else HA_ENDPOINT), (gw, v)
            m = f.call("gw1", "vm.history", name="vm1", limit=1)["migrations"][-1]
            assert (m["to_location"], m["detected_by"], m["status"]) == (p.port, "garp", "ok"), m
            # the detector's convergence starts at the kernel's timestamp of the GARP and ends
            # at its own apply (moved_at): the other daemons' applies are on the same clock from there
            last = max(v["moved_at"] for v in views.values())
            detector_ms.append(m["convergence_ms"])
            fleet_ms.append(m["convergence_ms"] + (last - views["gw1"]["moved_at"]) * 1000)
            sent_ms.append((last - t_send) * 1000)
            ask_through_each(f, conns, "vm1", f"after move {i}")
    finally:
        for s in raw:
            s.close()
    # gw1's own account of each move (its vm.moved log line): where the detector's milliseconds went
    moved = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
             for line in f.daemons["gw1"].stderr if "event=vm.moved" in line and "by=garp" in line][-50:]
    parts = {k: statistics.median(float(m[k]) for m in moved) for k in ("before_write_ms", "write_ms", "apply_ms")}
    MEASURED.append(
        f"1. 50 GARP-driven moves of vm1 (gwv1m <-> gwv1n), 4 daemons on one etcd: GARP in the kernel (its timestamp "
        f"in the migration record) -> last daemon re-pointed: median {statistics.median(fleet_ms):.2f} ms, "
        f"p99 {pct(fleet_ms, 0.99):.2f} ms, max {max(fleet_ms):.2f} ms; -> gw1 (the detecting daemon) re-pointed: "
        f"median {statistics.median(detector_ms):.2f} ms, p99 {pct(detector_ms, 0.99):.2f} ms; GARP sent by the "
        f"test -> last daemon: median {statistics.median(sent_ms):.2f} ms, p99 {pct(sent_ms, 0.99):.2f} ms; "
        f"{len(conns)} TCP connections answered through gw1 and through gw2 after each move; gw1's medians: GARP -> "
        f"its store write {parts['before_write_ms']:.2f} ms, the write (etcd compare-and-swap) "
        f"{parts['write_ms']:.2f} ms, -> applied {parts['apply_ms']:.2f} ms; last daemon after gw1: "
        f"median {statistics.median(a - b for a, b in zip(fleet_ms, detector_ms)):.2f} ms")
    for c in conns:
        c.close()


def test_a_member_dies_during_200_migrations_none_lost(fleet):
    f = fleet
    ports = {vm: [f"gwv{vm[2:]}", *(f"gwv{vm[2:]}{s}" for s in NEW_PORTS)] for vm in VMS}
    last: dict[str, str] = {}
    t0 = time.monotonic()

    def killer():
        time.sleep(1.0)
        f.cluster.kill_member(0)

    killed = threading.Thread(target=killer)
    killed.start()
    try:
        for i in range(200):
            vm = VMS[i % len(VMS)]
            port = ports[vm][(i // len(VMS)) % 3]
            if port == last.get(vm, f"gwv{vm[2:]}"):
                port = ports[vm][((i // len(VMS)) + 1) % 3]
            move(f, GATEWAYS[i % len(GATEWAYS)], vm, port)
            last[vm] = port
    finally:
        killed.join(10)
    took = time.monotonic() - t0
    assert f.cluster.members[0].process is None
    assert wait_for(lambda: f.agree(last), timeout=20, what="every daemon on the last moves"), \
        {gw: f.where(gw) for gw in GATEWAYS}
    views = {gw: f.where(gw) for gw in GATEWAYS}
    MEASURED.append(f"2. 200 vm.move calls through gw1/gw2/dc2a/dc2b in turn, member m0 SIGKILLed after 1 s: "
                    f"{took:.1f} s; every daemon ends on the last move of each VM: "
                    f"{ {n: loc for n, (loc, _) in views['gw1'].items()} }")
    f.cluster.restart_member(0)


def _cut_and_migrate(f: Fleet, gw: str, compact: bool) -> dict:
    """Cut `gw` off the store, migrate through the others for at least 10 s and
    until it reports degraded (bounded), with a connection through it answered
    all along; optionally compact the history it missed; reconnect it."""
    others = [g for g in GATEWAYS if g != gw]
    conn = conns_on(f, "vm1", want=1)[0]
    f.tb.steer(gw)
    before = f.where(gw)
    relists = f.store(gw)["relists"]
    moved: dict[str, str] = {}
    t_cut = time.monotonic()
    f.net.cut(gw)
    try:
        degraded_after = None
        i = 0
        # long enough for the gateway's silent watch to be given up (its idle limit) when the history is compacted
        minimum = 35.0 if compact else 10.0
        while (time.monotonic() - t_cut < minimum or degraded_after is None) and time.monotonic() - t_cut < 60:
            vm = VMS[i % len(VMS)]
            port = f"gwv{vm[2:]}{NEW_PORTS[(i // len(VMS)) % 2]}"
            move(f, others[i % len(others)], vm, port)
            moved[vm] = port
            assert conn.ask(f"cut {i}") == "vm1"            # it forwards with what it has
            if degraded_after is None and f.call(gw, "status")["store"]["state"] == "degraded":
                degraded_after = time.monotonic() - t_cut
            i += 1
            time.sleep(0.1)
        assert degraded_after is not None, f"{gw} never reported degraded: {f.store(gw)}"
        assert f.where(gw) == before                         # nothing applied while cut off
        stats = f.call(gw, "stats")
        assert stats["store"]["state"] == "degraded", stats.get("store")
        if compact:
            f.cluster.compact(max(f.store(g)["revision"] for g in others))
    finally:
        cut_s = time.monotonic() - t_cut
        f.net.connect(gw)
    t_back = time.monotonic()
    wait_for(lambda: f.store(gw)["state"] == "ok", timeout=30, what=f"{gw} back to ok")
    ok_s = time.monotonic() - t_back
    wait_for(lambda: f.agree(moved), timeout=30, what=f"{gw} caught up")
    caught_s = time.monotonic() - t_back
    assert conn.ask("after the cut") == "vm1"
    f.tb.steer("gw1")
    conn.close()
    wait_for(lambda: gw in f.call(others[0], "migration.status")["gateways"], timeout=15, what=f"{gw} re-joined")
    return {"moves": i, "cut_s": cut_s, "degraded_after_s": degraded_after, "ok_s": ok_s, "caught_up_s": caught_s,
            "relists": f.store(gw)["relists"] - relists}


def _report(label: str, r: dict) -> str:
    return (f"{label}: gw2 cut off (mgmt0 down) {r['cut_s']:.1f} s, {r['moves']} moves through gw1/dc2a/dc2b meanwhile, "
            f"a connection through gw2 answered throughout; degraded after {r['degraded_after_s']:.1f} s; after "
            f"reconnecting: ok again in {r['ok_s']:.2f} s, on the same locations in {r['caught_up_s']:.2f} s; "
            f"re-lists: {r['relists']}")


def test_a_gateway_cut_off_keeps_forwarding_reports_degraded_and_catches_up(fleet):
    MEASURED.append(_report("3a. no compaction", _cut_and_migrate(fleet, "gw2", compact=False)))


def test_a_gateway_cut_off_re_lists_after_a_compaction_it_missed(fleet):
    r = _cut_and_migrate(fleet, "gw2", compact=True)
    assert r["relists"] >= 1, r
    MEASURED.append(_report("3b. history compacted while cut off", r))


def test_a_gateway_started_while_the_store_is_unreachable_forwards_and_converges(fleet):
    """gw2 restarted while cut off from etcd (mgmt0 down), after vm1 and vm2 moved in
    the store: it comes up (XDP attached, its ready line), forwards real connections on
    its config's locations, reports degraded, refuses run-time changes it could not
    save over additions it has not read; reconnected, it lists and applies the store's
    locations, as after a reconnect, and the connection goes on."""
    f = fleet
    gw = "gw2"
    now = f.where("gw1")
    moved = {vm: next(f"gwv{vm[2:]}{s}" for s in NEW_PORTS if f"gwv{vm[2:]}{s}" != now[vm][0][1]) for vm in VMS}
    for vm, port in moved.items():                           # none where gw2's config has it
        move(f, "gw1", vm, port)
    old = f.daemons[gw]
    old.stop()
    f.net.cut(gw)
    try:
        daemon = GatewayDaemon(f.tb, old.config_path)
        f.daemons[gw] = daemon                      # stopped by the fixture, whatever happens here
        t0 = time.monotonic()
        daemon.start(timeout=60)
        up_s = time.monotonic() - t0
        assert daemon.ready_line is not None, "\n".join(daemon.stderr[-20:])
        status = f.call(gw, "status")["store"]
        assert status["state"] == "degraded" and status["revision"] == 0, status
        assert f.call(gw, "stats")["store"]["state"] == "degraded"
        configured = {vm: (("ha", f"gwv{vm[2:]}"), f"gwv{vm[2:]}") for vm in VMS}
        assert f.where(gw) == configured                     # the config's locations, not the store's
        conns = conns_on(f, "vm1", want=1)                   # opened through gw1, then carried by gw2
        f.tb.steer(gw)
        assert conns[0].ask("through gw2, store unreachable") == "vm1"
        with pytest.raises(api.ApiError, match="waiting for its store"):
            f.call(gw, "vm.remove", name="vm1")
    finally:
        f.net.connect(gw)
    t_back = time.monotonic()
    wait_for(lambda: f.call(gw, "status")["store"]["state"] == "ok", timeout=30, what=f"{gw} reaches the store")
    wait_for(lambda: f.agree(moved), timeout=30, what=f"{gw} on the store's locations")
    caught_s = time.monotonic() - t_back
    f.tb.steer(gw)
    assert conns[0].ask("through gw2, store back") == "vm1"
    f.tb.steer("gw1")
    conns[0].close()
    assert f.call(gw, "config.reload")["vms"]["added"] == []   # its run-time additions were read
    wait_for(lambda: gw in f.call("gw1", "migration.status")["gateways"], timeout=15, what=f"{gw} joined")
    MEASURED.append(f"4. gw2 started cut off from etcd: up (ready) in {up_s:.1f} s, degraded, forwarding on its "
                    f"config's locations; reconnected: on the store's locations in {caught_s:.2f} s")


def test_vm_move_with_host_from_the_cli(fleet):
    """`xdpgw vm move NAME --host HOST --port PORT` through gw1's API: every daemon ends
    on (host, port); an unknown host is one line naming it and the hosts there are,
    nothing moved; --host with --tunnel is a usage error."""
    f = fleet

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([xdpgw_executable(), "vm", *argv, "--config", f.daemons["gw1"].config_path],
                              capture_output=True, text=True, timeout=60)

    now = f.where("gw1")["vm3"][0][1]
    port = next(f"gwv3{s}" for s in NEW_PORTS if f"gwv3{s}" != now)
    r = cli("move", "vm3", "--host", "ha", "--port", port)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: f.agree({"vm3": port}), timeout=10, what="every daemon on the CLI's move")
    before = f.where("gw1")
    r = cli("move", "vm3", "--host", "hz", "--port", now)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == ("xdpgw: vm.move: unknown host 'hz' (not a [[host]] of this gateway's config; "
                        "hosts: ha)\n"), r.stderr
    r = cli("move", "vm3", "--host", "ha", "--tunnel", HA_ENDPOINT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--host goes with --port" in r.stderr, r.stderr
    assert f.where("gw1") == before

"""MigrationManager (control/migration/manager.py) with a fake clock and a fake
gateway on the SQLite store: validation, rate limit, hold-down (flapping),
conflicts, and every gateway applying a move from its watch of the store; a
gateway that starts while its store (a real etcd) is unreachable."""
import ipaddress
import threading
import time

import pytest

from control.migration.follow import START_WAIT_S
from control.migration.manager import Announcement, MigrationError, MigrationManager, convergence_summary
from control.migration.registry import Registry
from control.store import open_store
from control.store.sqlite import SqliteStore
from control.vms import Location

MAC1, MAC2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
IP1, IP2 = ipaddress.ip_address("198.18.101.2"), ipaddress.ip_address("198.18.102.2")
IP1_6, IP2_6 = ipaddress.ip_address("2001:db8:101::2"), ipaddress.ip_address("2001:db8:102::2")


class Clock:
    def __init__(self):
        self.ns = 1_000_000_000_000

    def __call__(self):
        return self.ns

    def advance(self, s):
        self.ns += int(s * 1e9)


@pytest.fixture
def env(tmp_path):
    reg = Registry(str(tmp_path / "r.db"))
    reg.sync_vm("vm1", 1, [str(IP1), str(IP1_6)], MAC1, "t", "port", "gwv1")
    reg.sync_vm("vm2", 2, [str(IP2), str(IP2_6)], MAC2, "t", "port", "gwv2")
    clock = Clock()
    moves = []

    def move_local(name, port=None, mac=None, tunnel=None, **_):
        moves.append((name, port, tunnel))
        return {}

    m = MigrationManager(reg, "gw1", move_local, hold_down=2.0, conflict_window=0.5, rate=5, burst=3,
                         clock=clock)
    yield m, reg, clock, moves
    m.close()
    reg.close()


def ann(clock, port, mac=MAC1, ip=IP1, kind="garp"):
    return Announcement(kind, mac, ip, port, clock())


def test_garp_moves_and_records_history(env):
    m, reg, clock, moves = env
    out = m.announce(ann(clock, "gwv1b"))
    assert out.result == "applied" and out.vm == "vm1"
    assert moves == [("vm1", "gwv1b", None)]
    rec = reg.vm("vm1")
    assert (rec.location, rec.state) == ("gwv1b", "running")
    (h,) = reg.history("vm1")
    assert h["detected_by"] == "garp" and h["status"] == "ok" and h["convergence_ms"] is not None
    # the hypervisor repeats its announcement: nothing more happens
    clock.advance(0.05)
    assert m.announce(ann(clock, "gwv1b")).result == "current"
    assert len(moves) == 1


def test_rarp_without_ip_and_na(env):
    m, reg, clock, moves = env
    assert m.announce(Announcement("rarp", MAC1, None, "gwv1c", clock())).result == "applied"
    clock.advance(3)
    assert m.announce(Announcement("na", MAC2, IP2, "gwv2c", clock())).result == "applied"
    assert [x[1] for x in moves] == ["gwv1c", "gwv2c"]


def test_an_announcement_for_any_of_the_vms_addresses_moves_it(env):
    """An unsolicited NA for the VM's IPv6 address moves it like a GARP for its IPv4 one."""
    m, reg, clock, moves = env
    out = m.announce(ann(clock, "gwv1b", ip=IP1_6, kind="na"))
    assert (out.result, out.vm) == ("applied", "vm1")
    clock.advance(3)                                            # past the hold-down
    assert m.announce(ann(clock, "gwv1c", ip=IP1)).result == "applied"
    assert moves == [("vm1", "gwv1b", None), ("vm1", "gwv1c", None)]
    assert reg.vm("vm1").location == "gwv1c"
    assert [(h["to_location"], h["detected_by"]) for h in reg.history("vm1")] == [("gwv1b", "na"), ("gwv1c", "garp")]
    clock.advance(0.05)
    assert m.announce(ann(clock, "gwv1c", ip=IP1_6, kind="na")).result == "current"
    assert reg.events() == []


def test_na_for_another_vms_address_is_spoofed(env):
    m, reg, clock, moves = env
    out = m.announce(ann(clock, "gwv1b", ip=IP2_6, kind="na"))  # vm1's MAC with vm2's IPv6 address
    assert (out.result, out.vm, out.detail["owner"]) == ("spoofed", "vm1", "vm2")
    assert out.detail["reason"] == (f"{IP2_6} is the address of vm2, not one of vm1's ({IP1}, {IP1_6}) "
                                    f"whose MAC is {MAC1}")
    assert moves == [] and reg.vm("vm1").location == "gwv1"
    (e,) = reg.events("spoofed")
    assert (e["vm"], e["detail"]["ip"], e["detail"]["kind"], e["detail"]["owner"]) == ("vm1", str(IP2_6), "na", "vm2")
    out = m.announce(ann(clock, "gwv1b", ip=ipaddress.ip_address("2001:db8:999::2"), kind="na"))
    assert (out.result, out.detail["owner"]) == ("spoofed", None) and "is no VM's address" in out.detail["reason"]
    assert moves == []


def test_spoofed_and_unknown_are_reported_not_applied(env):
    m, reg, clock, moves = env
    out = m.announce(ann(clock, "gwv1b", mac=MAC1, ip=IP2))      # vm1's MAC with vm2's address
    assert out.result == "spoofed" and out.vm == "vm1"
    assert m.announce(ann(clock, "gwv1b", mac="02:00:00:00:00:77")).result == "unknown"
    assert moves == [] and reg.vm("vm1").location == "gwv1"
    (e,) = reg.events("spoofed")
    assert e["vm"] == "vm1" and e["detail"]["port"] == "gwv1b" and e["detail"]["ip"] == str(IP2)


def test_netlink_neighbour_of_another_address_is_ignored_quietly(env):
    m, reg, clock, moves = env
    out = m.announce(ann(clock, "gwv1b", ip=ipaddress.ip_address("198.18.111.2"), kind="netlink"))
    assert out.result == "ignored" and moves == [] and reg.events() == []
    assert m.announce(ann(clock, "gwv1b", kind="netlink")).result == "applied"


def test_flapping_is_held_down(env):
    m, reg, clock, moves = env
    assert m.announce(ann(clock, "gwv1b")).result == "applied"
    clock.advance(0.8)                      # back to the old port: a flap
    out = m.announce(ann(clock, "gwv1"))
    assert out.result == "flap" and reg.vm("vm1").location == "gwv1b"
    clock.advance(0.7)                      # a third port, still within the hold-down
    assert m.announce(ann(clock, "gwv1c")).result == "held_down"
    clock.advance(1.0)                      # hold-down over: a real move again
    assert m.announce(ann(clock, "gwv1")).result == "applied"
    assert [x[1] for x in moves] == ["gwv1b", "gwv1"]
    assert [e["kind"] for e in reg.events()] == ["flap", "held_down"]


def test_two_ports_claiming_one_vm_is_a_conflict(env):
    m, reg, clock, moves = env
    assert m.announce(ann(clock, "gwv1b")).result == "applied"
    clock.advance(0.1)
    out = m.announce(ann(clock, "gwv1c"))
    assert out.result == "conflict" and out.detail["claims"] == ["gwv1b", "gwv1c"]
    assert reg.vm("vm1").location == "gwv1b" and len(moves) == 1
    assert reg.events("conflict")[0]["vm"] == "vm1"


def test_rate_limit_per_mac(env):
    m, reg, clock, moves = env
    results = [m.announce(ann(clock, "gwv1")).result for _ in range(10)]   # same instant
    assert results[:3] == ["current"] * 3 and set(results[3:]) == {"rate_limited"}
    # another VM's MAC has its own bucket
    assert m.announce(ann(clock, "gwv2", mac=MAC2, ip=IP2)).result == "current"
    clock.advance(1.0)
    assert m.announce(ann(clock, "gwv1")).result == "current"


def test_failed_local_move_changes_nothing(tmp_path):
    reg = Registry(str(tmp_path / "r.db"))
    reg.sync_vm("vm1", 1, [str(IP1)], MAC1, None, "port", "gwv1")

    def broken(name, **kw):
        raise RuntimeError("interface 'gwv1b' does not exist")

    m = MigrationManager(reg, "gw1", broken, check_local=broken)
    out = m.announce(Announcement("garp", MAC1, IP1, "gwv1b", 0))
    assert out.result == "failed" and "does not exist" in out.detail["reason"]
    rec = reg.vm("vm1")
    assert (rec.location, rec.state) == ("gwv1", "running")
    assert reg.history()[0]["status"] == "failed"
    m.close()
    reg.close()


def test_every_gateway_applies_a_move_from_its_watch(tmp_path):
    """Two gateways on one store: gw1 sees the announcement and writes the move once;
    gw2 (and gw1 itself) re-point the VM from their watch. gw2 then holds
    announcements of the VM down like gw1 does."""
    store = SqliteStore(str(tmp_path / "state.db"))
    reg, peer_reg = Registry(store, "gw1"), Registry(store, "gw2")
    reg.sync_vm("vm1", 1, [str(IP1)], MAC1, None, "port", "gwv1")
    peer_reg.sync_vm("vm1", 1, [str(IP1)], MAC1, None, "port", "gwv1")
    moves, peer_moves = [], []
    peer = MigrationManager(peer_reg, "gw2", lambda name, **kw: peer_moves.append((name, kw["port"])))
    m = MigrationManager(reg, "gw1", lambda name, **kw: moves.append((name, kw["port"])))
    try:
        out = m.announce(Announcement("garp", MAC1, IP1, "gwv1b", m.clock()))
        assert out.result == "applied" and out.detail["gateways"]["gw1"] == "ok"
        assert out.detail["status"] == "ok" and moves == [("vm1", "gwv1b")]
        assert peer.follower.wait_applied(out.detail["revision"], 5.0)
        assert peer_moves == [("vm1", "gwv1b")]
        assert peer_reg.vm("vm1").location == "gwv1b"
        (h,) = peer_reg.history()
        assert h["detected_by"] == "garp" and h["gateway"] == "gw1"
        assert peer.announce(Announcement("garp", MAC1, IP1, "gwv1", peer.clock())).result == "flap"
        print(f"\nconvergence through the store's watch: {out.detail['convergence_ms']:.3f} ms")
    finally:
        m.close()
        peer.close()
        store.close()


def test_two_gateways_writing_one_vm_at_once_one_wins(tmp_path):
    """The compare-and-swap: a move written on a record another gateway has moved
    since it was read loses, and is reported as a conflict."""
    store = SqliteStore(str(tmp_path / "state.db"))
    reg1, reg2 = Registry(store, "gw1"), Registry(store, "gw2")
    reg1.sync_vm("vm1", 1, [str(IP1)], MAC1, None, "port", "gwv1")
    seen_by_gw2 = reg2.vm("vm1")
    m1 = MigrationManager(reg1, "gw1", lambda name, **kw: None)
    m2 = MigrationManager(reg2, "gw2", lambda name, **kw: None, hold_down=0.0, conflict_window=0.0)
    try:
        assert m1.announce(Announcement("garp", MAC1, IP1, "gwv1b", m1.clock())).result == "applied"
        stale = iter([seen_by_gw2])                 # gw2 decided on what it read before gw1's write
        reg2.vm = lambda name: next(stale, None) or Registry.vm(reg2, name)
        m2.follower.record = lambda name: None      # ... before its watch delivered that write, too
        out = m2.announce(Announcement("garp", MAC1, IP1, "gwv1c", m2.clock()))
        assert out.result == "conflict" and "by gw1" in out.detail["reason"]
        assert reg1.vm("vm1").location == "gwv1b"
        assert reg1.events("conflict")[0]["gateway"] == "gw2"
    finally:
        m1.close()
        m2.close()
        store.close()


def test_concurrent_announcements_apply_once(env):
    m, reg, clock, moves = env
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(m.announce(ann(clock, "gwv1b")).result))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(outs) == ["applied", "current", "current"] and len(moves) == 1


def test_convergence_summary():
    rows = [{"convergence_ms": v, "status": "ok"} for v in (5, 1, 3, 2, 4)] + \
           [{"convergence_ms": None, "status": "failed"}]
    s = convergence_summary(rows)
    assert (s["count"], s["median_ms"], s["max_ms"]) == (5, 3, 5)
    assert convergence_summary([]) == {"count": 0}


def test_a_gateway_starting_without_its_store_comes_up_degraded_and_converges(etcd_cluster):
    """A real etcd that has lost its quorum (two of three members killed): the manager
    starts within the start wait, degraded, forwarding where its config says (nothing
    applied, nothing registered); once the members are back it registers (`prepare`),
    lists, applies the store's location and follows the next move, state ok."""
    writer = open_store(etcd_cluster.url)
    Registry(writer, "gw0").sync_vm("vm1", 1, [str(IP1)], MAC1, None, "port", "gwv1b")   # moved before we start
    for i in (1, 2):
        etcd_cluster.kill_member(i)
    store = open_store(etcd_cluster.url)
    moves, prepared = [], []
    t0 = time.monotonic()
    m = MigrationManager(Registry(store, "gw1"), "gw1", lambda name, **kw: moves.append((name, kw["port"])),
                         known={"vm1": Location(port="gwv1", mac=MAC1)},
                         prepare=lambda: prepared.append(store.revision()))
    try:
        started_s = time.monotonic() - t0
        assert started_s < START_WAIT_S + 1.0, started_s
        status = m.follower.status()
        assert status["state"] == "degraded" and status["revision"] == 0, status
        assert moves == [] and prepared == []
        for i in (1, 2):
            etcd_cluster.restart_member(i)
        deadline = time.monotonic() + 30
        while m.follower.status()["state"] != "ok" or not moves:
            assert time.monotonic() < deadline, (m.follower.status(), moves)
            time.sleep(0.1)
        assert moves == [("vm1", "gwv1b")] and len(prepared) == 1     # once, when the store answered
        rec = Registry(writer, "gw0").vm("vm1")
        moved = Registry(writer, "gw0").move(rec, Location(port="gwv1c", mac=MAC1), {"by": "gw0"}, ["gw0"])
        assert m.follower.wait_applied(moved.revision, 10.0)
        assert moves[-1] == ("vm1", "gwv1c")
    finally:
        m.close()
        store.close()
        writer.close()


def test_an_explicit_move_to_a_host_names_a_port(env):
    """A host is where a port is: with a tunnel (an endpoint, on no host) the move is
    refused before anything is written; with a port it is recorded in the location."""
    m, reg, clock, moves = env
    with pytest.raises(MigrationError, match="host goes with port"):
        m.move("vm1", tunnel="198.18.50.1", host="ha")
    assert moves == [] and reg.history() == []
    m.move("vm1", port="gwv1b", host="ha")
    assert moves == [("vm1", "gwv1b", None)] and reg.vm("vm1").host == "ha"

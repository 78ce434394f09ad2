"""Gateways following one etcd (a real 3-member cluster on loopback,
testbed/etcd_cluster.py): a migration is one compare-and-swap write that every
gateway applies from its watch; members die, a gateway is cut off, history is
compacted behind its back, and every gateway ends on the same locations; the
migration history stays within its bound.

Each "gateway" here is the gateway's control plane (control/migration: registry,
manager, follower, membership) on its own store connection, with the dataplane
write (Gateway.move_vm) replaced by a record of what it was told: what is under
test is the path from the store to that call. The daemons in namespaces with
XDP attached take the same path (tests/e2e/test_migration_e2e.py on SQLite).
Convergence is printed (-s), never asserted."""
from __future__ import annotations

import statistics
import threading
import time

import pytest

from control.migration.follow import Membership
from control.migration.manager import MigrationManager
from control.migration.registry import MIGRATIONS, Registry, Retention
from control.store import open_store
from testbed.etcd_cluster import EtcdCluster
from tests.waiting import wait_for

VMS = [f"vm{i}" for i in range(1, 9)]


class Gw:
    """One gateway's control plane on its own connection to the store."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.store = open_store(url)
        self.registry = Registry(self.store, name)
        for i, vm in enumerate(VMS, start=1):
            self.registry.sync_vm(vm, i, [f"198.18.{100 + i}.2"], f"02:00:00:00:00:{i:02x}", None, "port", f"p{i}")
        self.applied: dict[str, tuple[str | None, int]] = {}       # vm -> (port, revision)
        self.at_ns: dict[tuple[str, int], int] = {}                 # (vm, revision) -> when applied (monotonic)
        self.membership = Membership(self.store, name, ttl_s=2.0)
        self.membership.renew()
        self.manager = MigrationManager(self.registry, name, self._move_local, hold_down=0.0, conflict_window=0.0,
                                        membership=self.membership, store_url=url)

    def _move_local(self, name: str, port=None, mac=None, tunnel=None, host=None, revision=None) -> dict:
        self.at_ns[(name, revision)] = time.monotonic_ns()
        self.applied[name] = (port, revision)
        return {}

    def locations(self) -> dict[str, str | None]:
        return {vm: self.manager.follower.known[vm].port for vm in VMS}

    def close(self) -> None:
        self.manager.close()
        self.membership.leave()
        self.store.close()


@pytest.fixture
def fleet():
    with EtcdCluster() as cluster:
        gws: list[Gw] = []
        try:
            # two data centers x two gateways; the last one talks to member 2 only
            for i, name in enumerate(("dc1a", "dc1b", "dc2a", "dc2b")):
                gws.append(Gw(name, cluster.url if i < 3 else cluster.member_url(2)))
            yield cluster, gws
        finally:
            for g in gws:
                g.close()


def move(gw: Gw, vm: str, port: str, tries: int = 50) -> dict:
    """An explicit move, retried while the store is unreachable (bounded)."""
    for _ in range(tries):
        try:
            return gw.manager.move(vm, port=port, mac=None)
        except Exception as exc:   # noqa: BLE001 - the store may be electing a leader
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"{gw.name}: move of {vm} to {port} never went through: {last}")


def agree(gws: list[Gw]) -> bool:
    want = {r.name: r.location for r in gws[0].registry.vms()}
    return all(g.locations() == want for g in gws)


def test_every_gateway_applies_each_move_and_convergence(fleet):
    cluster, gws = fleet
    assert sorted(gws[0].membership.members()) == ["dc1a", "dc1b", "dc2a", "dc2b"]
    times = []
    for i in range(50):
        vm = VMS[i % len(VMS)]
        t0 = time.monotonic_ns()
        rev = move(gws[i % 3], vm, f"m{i}")["revision"]
        assert wait_for(lambda: all(g.manager.follower.revision >= rev for g in gws), timeout=10), \
            f"move {i} not applied everywhere: {[g.manager.follower.status() for g in gws]}"
        times.append((max(g.at_ns[(vm, rev)] for g in gws) - t0) / 1e6)
        assert all(g.applied[vm] == (f"m{i}", rev) for g in gws)
    times.sort()
    print(f"\nconvergence over 50 moves on etcd (move called -> last of 4 gateways applied): median "
          f"{statistics.median(times):.2f} ms, p99 {times[min(len(times) - 1, int(0.99 * len(times)))]:.2f} ms")


def test_a_member_dies_during_200_migrations_none_lost(fleet):
    cluster, gws = fleet
    last: dict[str, str] = {}

    def killer():
        time.sleep(1.0)
        cluster.kill_member(0)

    t = threading.Thread(target=killer)
    t.start()
    for i in range(200):
        vm = VMS[i % len(VMS)]
        move(gws[i % 3], vm, f"k{i}")
        last[vm] = f"k{i}"
    t.join(10)
    assert wait_for(lambda: agree(gws), timeout=20), [g.locations() for g in gws]
    assert gws[0].locations() == last
    cluster.restart_member(0)


def test_a_gateway_cut_off_keeps_what_it_has_reports_degraded_and_catches_up_after_a_compaction(fleet):
    cluster, gws = fleet
    cut = gws[3]                                 # its store URL names member 2 only
    before = cut.locations()
    cluster.kill_member(2)
    assert wait_for(lambda: cut.manager.follower.status()["state"] == "degraded", timeout=10)
    t_cut = time.monotonic()
    moved = {}
    i = 0
    while time.monotonic() - t_cut < 10.0 and i < 1000:      # 10 s of migrations, one every ~50 ms
        vm = VMS[i % len(VMS)]
        move(gws[i % 3], vm, f"c{i}")
        moved[vm] = f"c{i}"
        i += 1
        time.sleep(0.05)
    assert cut.manager.follower.status()["state"] == "degraded"
    assert cut.locations() == before             # it forwards on with what it had
    cluster.compact(gws[0].store.revision())     # the history it missed is gone
    cluster.restart_member(2)
    assert wait_for(lambda: cut.manager.follower.status()["state"] == "ok", timeout=20)
    assert wait_for(lambda: agree(gws), timeout=20), [g.locations() for g in gws]
    assert cut.locations() == {**before, **moved}
    assert cut.manager.follower.status()["relists"] >= 1
    assert "dc2b" in gws[0].membership.members()


def test_history_stays_within_its_bound_over_many_moves(fleet):
    """120 moves through three gateways with history_rows = 40: after every move the
    store holds at most 40 migration rows, and they are the newest moves, in order."""
    cluster, gws = fleet
    for g in gws:
        g.registry.retention = Retention(rows=40, max_age_s=0)
    ports = []
    for i in range(120):
        move(gws[i % 3], VMS[i % len(VMS)], f"h{i}")
        ports.append(f"h{i}")
        assert gws[3].store.keys(MIGRATIONS, 0)[1] <= 40
    kept = [h["to_location"] for h in gws[3].registry.history(limit=1000)]
    assert 36 <= len(kept) <= 40 and kept == ports[-len(kept):]

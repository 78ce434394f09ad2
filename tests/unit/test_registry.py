"""The VM registry (control/registry.py): WAL, state transitions, locations,
holders, history; and that it survives a reopen (a daemon restart). A VM's
addresses round-trip through both stores (SQLite and a real etcd), and the
histories stay within their retention in both."""
import ipaddress
import json
import time

import pytest

from control.config import ConfigError, parse_config
from control.migration.registry import (EVENTS, MIGRATIONS, TRANSITIONS, VMS, InvalidTransition, Registry,
                                        RegistryError, Retention)
from control.store import open_store
from control.vms import Location


@pytest.fixture
def reg(tmp_path):
    r = Registry(str(tmp_path / "reg.db"))
    r.sync_vm("vm1", 1, ["198.18.101.2"], "02:00:00:00:00:01", "t1", "port", "gwv1")
    yield r
    r.close()


def test_wal_and_sync(reg):
    assert reg.journal_mode == "wal"
    rec = reg.vm("vm1")
    assert (rec.kind, rec.location, rec.state, rec.tenant) == ("port", "gwv1", "running", "t1")
    assert reg.by_mac("02:00:00:00:00:01").name == "vm1"
    assert reg.by_mac("02:00:00:00:00:99") is None
    with pytest.raises(RegistryError, match="unknown VM"):
        reg.vm("nope")


def test_valid_and_invalid_transitions(reg):
    reg.transition("vm1", "migrating")
    with pytest.raises(InvalidTransition, match="migrating -> stopped"):
        reg.transition("vm1", "stopped")
    assert reg.vm("vm1").state == "migrating"            # unchanged by the refused step
    reg.transition("vm1", "running")
    with pytest.raises(InvalidTransition, match="running -> running"):
        reg.transition("vm1", "running")
    with pytest.raises(InvalidTransition, match="unknown state"):
        reg.transition("vm1", "flying")
    assert ("running", "migrating") in TRANSITIONS and ("migrating", "running") in TRANSITIONS


def test_location_holders_history_survive_reopen(tmp_path):
    path = str(tmp_path / "reg.db")
    r = Registry(path)
    r.sync_vm("vm1", 1, ["198.18.101.2"], "02:00:00:00:00:01", None, "port", "gwv1")
    r.set_location("vm1", "port", "gwv1b")
    r.set_holders("vm1", ["gw1", "gw2"])
    r.record_migration("vm1", ("port", "gwv1"), ("port", "gwv1b"), "garp", 1.25, {"gw1": "ok", "gw2": "ok"})
    r.record_event("spoofed", {"port": "gwv2"}, vm="vm1")
    r.close()
    r = Registry(path)
    # a restart re-syncs from the config: the moved location is kept
    rec = r.sync_vm("vm1", 1, ["198.18.101.2"], "02:00:00:00:00:01", "t9", "port", "gwv1")
    assert (rec.location, rec.tenant) == ("gwv1b", "t9")
    assert r.holders("vm1") == ["gw1", "gw2"]
    r.set_holders("vm1", ["gw1"])
    assert r.holders("vm1") == ["gw1"]
    (h,) = r.history("vm1")
    assert (h["from_location"], h["to_location"], h["detected_by"], h["convergence_ms"]) == \
        ("gwv1", "gwv1b", "garp", 1.25)
    assert h["gateways"] == {"gw1": "ok", "gw2": "ok"}
    assert r.events("spoofed")[0]["detail"] == {"port": "gwv2"}
    r.close()


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/state.db"
    return request.getfixturevalue("etcd_cluster").url


def test_addresses_round_trip_in_both_stores(store_url):
    """Every address of a VM, both families, through the store and a reopen; a record
    the single-address code wrote ("ip") reads as a one-address VM and is written back
    with "ips"."""
    ips = ["198.18.101.2", "2001:db8:101::2"]
    store = open_store(store_url)
    try:
        r = Registry(store, "gw1")
        assert r.sync_vm("vm1", 1, ips, "02:00:00:00:00:01", None, "port", "gwv1").ips == tuple(ips)
        assert store.get(VMS + "vm1").value["ips"] == ips
        rec = r.vm("vm1")
        ip = ipaddress.ip_address
        assert rec.has_address(ip("2001:db8:101:0::2")) and rec.has_address(ip(ips[0]))
        assert not rec.has_address(ip("2001:db8:102::2"))
        moved = r.move(rec, Location(None, "gwv1b", "02:00:00:00:00:01"), {"by": "gw1"}, ["gw1"])
        assert (moved.ips, moved.location) == (tuple(ips), "gwv1b")
        # the config drops the IPv4 address: the registry follows, the location stays
        assert r.sync_vm("vm1", 1, ips[1:], "02:00:00:00:00:01", None, "port", "gwv1").ips == (ips[1],)
        old = {"name": "vm2", "vm_id": 2, "ip": "198.18.102.2", "tenant": None, "state": "running", "holders": [],
               "move": None, "host": None, "port": "gwv2", "tunnel": None, "mac": "02:00:00:00:00:02",
               "updated_at": 1.0}
        store.put(VMS + "vm2", old)
        assert r.vm("vm2").ips == ("198.18.102.2",) and r.by_mac("02:00:00:00:00:02").name == "vm2"
        r.transition("vm2", "stopped")
        written = store.get(VMS + "vm2").value
        assert written["ips"] == ["198.18.102.2"] and "ip" not in written
    finally:
        store.close()
    store = open_store(store_url)
    try:
        r = Registry(store, "gw2")
        assert {(v.name, v.ips, v.location) for v in r.vms()} == {("vm1", (ips[1],), "gwv1b"),
                                                                  ("vm2", ("198.18.102.2",), "gwv2")}
    finally:
        store.close()


def test_history_is_bounded_and_keeps_the_newest(store_url):
    """Two gateways record 70 migrations and 70 refused announcements into one store
    with a bound of 20 rows each: after every write the store holds at most 20 of
    each, and what it holds is the newest, in order; `history(vm)` still finds a VM's
    latest moves."""
    retention = Retention(rows=20, max_age_s=0)
    store = open_store(store_url)
    try:
        gw1, gw2 = Registry(store, "gw1", retention), Registry(store, "gw2", retention)
        for i in range(70):
            r = (gw1, gw2)[i % 2]
            r.record_migration(f"vm{i % 3}", ("port", f"p{i}"), ("port", f"p{i + 1}"), "garp", 1.0, {})
            r.record_event("spoofed", {"n": i}, vm=f"vm{i % 3}")
            assert store.keys(MIGRATIONS, 0)[1] <= 20 and store.keys(EVENTS, 0)[1] <= 20
        kept = gw1.history(limit=100)
        assert 18 <= len(kept) <= 20          # trimmed to a tenth below the bound, then filled again
        assert [h["to_location"] for h in kept] == [f"p{i + 1}" for i in range(70 - len(kept), 70)]
        assert [e["detail"]["n"] for e in gw2.events(limit=100)] == list(range(70 - len(gw2.events()), 70))
        assert [h["to_location"] for h in gw2.history("vm0", limit=2)] == ["p67", "p70"]
        assert len(store.range(MIGRATIONS)[0]) == len(kept)
    finally:
        store.close()


def test_history_older_than_the_age_bound_goes_at_the_next_write(store_url):
    """Rows written two hours ago (keys begin with their time) go, as one range, at the
    first write under a one-hour bound; the recent ones and the new one stay."""
    store = open_store(store_url)
    try:
        now_ns = time.time_ns()
        for k, age_s in enumerate((7300, 7200, 1800, 60)):
            store.put(f"{MIGRATIONS}{now_ns - age_s * 10**9:020d}-gw0-{k}",
                      {"vm": "vm1", "at": time.time() - age_s, "to_location": f"age{age_s}"})
        r = Registry(store, "gw1", Retention(rows=100, max_age_s=3600))
        r.record_migration("vm1", ("port", "a"), ("port", "now"), "garp", 1.0, {})
        assert [h["to_location"] for h in r.history("vm1")] == ["age1800", "age60", "now"]
        assert store.keys(MIGRATIONS, 10)[1] == 3
    finally:
        store.close()


@pytest.mark.parametrize("key, value, expected", [
    ("history_rows", 0, "gateway.history_rows"),
    ("history_rows", "many", "gateway.history_rows"),
    ("history_max_age", -5, "gateway.history_max_age: -5 is not a number of seconds"),
    ("history_max_age", "1d", "gateway.history_max_age: expected a number of seconds (0: no limit)"),
])
def test_retention_keys_are_validated(key, value, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(f'[gateway]\nname = "gw1"\ninterface = "eth0"\n{key} = {json.dumps(value)}\n')
    assert expected in str(info.value) and "\n" not in str(info.value)

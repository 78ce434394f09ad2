"""The VM registry (control/registry.py): WAL, state transitions, locations,
holders, history; and that it survives a reopen (a daemon restart)."""
import pytest

from control.migration.registry import TRANSITIONS, InvalidTransition, Registry, RegistryError


@pytest.fixture
def reg(tmp_path):
    r = Registry(str(tmp_path / "reg.db"))
    r.sync_vm("vm1", 1, "198.18.101.2", "02:00:00:00:00:01", "t1", "port", "gwv1")
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
    r.sync_vm("vm1", 1, "198.18.101.2", "02:00:00:00:00:01", None, "port", "gwv1")
    r.set_location("vm1", "port", "gwv1b")
    r.set_holders("vm1", ["gw1", "gw2"])
    r.record_migration("vm1", ("port", "gwv1"), ("port", "gwv1b"), "garp", 1.25, {"gw1": "ok", "gw2": "ok"})
    r.record_event("spoofed", {"port": "gwv2"}, vm="vm1")
    r.close()
    r = Registry(path)
    # a restart re-syncs from the config: the moved location is kept
    rec = r.sync_vm("vm1", 1, "198.18.101.2", "02:00:00:00:00:01", "t9", "port", "gwv1")
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

"""The control center without HTTP: scoring (factors, weights, exclusions), the store
(SQLite, restart), and the request state machine with fake agents (retries, failure,
clear, and a restart mid-workflow that resumes with nothing lost)."""
from __future__ import annotations

import asyncio

import pytest

from control.center import scoring
from control.center.server import seed
from control.center.store import Store
from control.center.workflow import NoTarget, Workflow
from control.config import ConfigError
from control.center.config import parse_center_document
from tests.unit.center_fixtures import NOON_UTC, FakeAgents, config, document


def make(tmp_path, agents=None, db=None):
    cfg = config(tmp_path, db=db)
    store = Store(cfg.db)
    seed(store, cfg)
    agents = agents or FakeAgents()
    wf = Workflow(store, cfg.weights, agents, vms=cfg.vms, max_attempts=cfg.max_attempts, retry_s=cfg.retry_s,
                  now=lambda: NOON_UTC)
    return store, wf, agents


# ------------------------------------------------------------------ scoring

def test_distance():
    assert scoring.distance_km(0, 0, 0, 0) == 0
    assert 5500 < scoring.distance_km(50.1, 8.7, 40.7, -74.0) < 6500     # Frankfurt - New York


def test_scoring_prefers_near_and_excludes(tmp_path):
    store, wf, _ = make(tmp_path)
    rows = wf.explain("gw1", "r1")
    by = {r["name"]: r for r in rows}
    assert by["dc1"]["excluded"] == "source data center"
    assert by["dc2"]["eligible"] and by["dc3"]["eligible"]
    assert rows[0]["name"] == "dc2"                      # near Frankfurt, low latency
    assert set(by["dc2"]["factors"]) == set(scoring.FACTORS)
    assert by["dc2"]["factors"]["location"]["weight"] == 2.0
    assert all(0 <= f["score"] <= 1 for r in rows if r["eligible"] for f in r["factors"].values())


def test_timezone_prefers_off_peak():
    ctx = scoring.Context(region={"lat": 0, "lon": 0}, source=None, candidates=[], vms=1, now=NOON_UTC)
    berlin, _ = scoring.FACTORS["timezone"](ctx, {"timezone": "Europe/Berlin"})      # 14:00 local: peak
    tokyo, _ = scoring.FACTORS["timezone"](ctx, {"timezone": "Asia/Tokyo"})          # 21:00 local
    la, _ = scoring.FACTORS["timezone"](ctx, {"timezone": "America/Los_Angeles"})    # 05:00 local: off-peak
    assert la > tokyo > berlin


def test_weights_change_the_choice(tmp_path):
    store, wf, _ = make(tmp_path)
    wf.weights = {name: 0.0 for name in scoring.FACTORS} | {"timezone": 1.0}
    assert wf.explain("gw1", "r1")[0]["name"] == "dc3"   # only off-peak counts: Tokyo at 21:00 beats Munich at 14:00


def test_pluggable_factor(tmp_path):
    store, wf, _ = make(tmp_path)
    scoring.factor("prefer_dc3")(lambda ctx, dc: (1.0 if dc["name"] == "dc3" else 0.0, dc["name"]))
    try:
        wf.weights = {name: 0.0 for name in scoring.FACTORS} | {"prefer_dc3": 1.0}
        assert wf.explain("gw1", "r1")[0]["name"] == "dc3"
    finally:
        del scoring.FACTORS["prefer_dc3"]


def test_no_target_when_capacity_is_short(tmp_path):
    store, wf, _ = make(tmp_path)
    for name in ("dc2", "dc3"):
        dc = store.datacenter(name)
        dc["load"] = dc["capacity"] - 1
        store._put("datacenters", name, dc)
    with pytest.raises(NoTarget, match="not enough free capacity"):
        wf.choose("gw1", "r1", "web")


def test_center_config_errors(tmp_path):
    doc = document(tmp_path)
    doc["weights"]["nearness"] = 1.0
    with pytest.raises(ConfigError, match=r"weights\.nearness: unknown factor"):
        parse_center_document(doc)
    doc = document(tmp_path)
    doc["datacenter"][1]["timezone"] = "Mars/Olympus"
    with pytest.raises(ConfigError, match=r"datacenter\[1\]\.timezone"):
        parse_center_document(doc)
    doc = document(tmp_path)
    doc["gateway"][0]["datacenter"] = "dc9"
    with pytest.raises(ConfigError, match=r"gateway\[0\]\.datacenter: unknown data center"):
        parse_center_document(doc)


# ------------------------------------------------------------------ store

def test_store_open_request_is_unique_and_survives_reopen(tmp_path):
    store, _, _ = make(tmp_path)
    a, created = store.create_request("gw1", "r1", "web", {"pps": 10.0})
    b, again = store.create_request("gw1", "r1", "web", {})
    assert created and not again and a["id"] == b["id"]
    store.transition(a["id"], "target_chosen", target="dc2", data={"x": 1})
    store.close()
    store2 = Store(str(tmp_path / "center.db"))
    r = store2.request(a["id"])
    assert (r["state"], r["target"], r["data"]["x"], r["data"]["pps"]) == ("target_chosen", "dc2", 1, 10.0)
    assert [h["state"] for h in store2.history(a["id"])] == ["requested", "target_chosen"]
    assert store2.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------ workflow

def run(coro):
    return asyncio.run(coro)


def test_workflow_full_path_ships_image_and_clears(tmp_path):
    store, wf, agents = make(tmp_path)
    req, _ = store.create_request("gw1", "r1", "web", {})

    async def go():
        await wf.settle()
        assert store.request(req["id"])["state"] == "active"
        store.request_clear(req["id"])
        await wf.settle()

    run(go())
    r = store.request(req["id"])
    assert r["state"] == "cleared" and r["target"] == "dc2"
    states = [h["state"] for h in store.history(req["id"]) if not (h["note"] or "").startswith("clear")]
    assert states == ["requested", "target_chosen", "preparing", "prepared", "distributing", "active", "cleared"]
    assert agents.commands() == ["images", "image.put", "prepare", "offload.set", "offload.clear"]
    assert agents.calls[3][2] == {"region": "r1", "service": "web", "endpoint": "198.18.200.2"}
    assert store.datacenter("dc2")["load"] == 2 + 2
    assert agents.offloads == {}


def test_workflow_retries_then_succeeds(tmp_path):
    store, wf, agents = make(tmp_path)
    agents.fail["prepare"] = 2                 # max_attempts is 3
    req, _ = store.create_request("gw1", "r1", "web", {})
    run(wf.settle())
    r = store.request(req["id"])
    assert r["state"] == "active"
    assert agents.commands().count("prepare") == 3
    assert agents.commands().count("image.put") == 1       # shipped once; later attempts saw it there
    assert sum(1 for h in store.history(req["id"]) if (h["note"] or "").startswith("error")) == 2


def test_workflow_fails_after_max_attempts_and_retry_resumes(tmp_path):
    store, wf, agents = make(tmp_path)
    agents.fail["offload.set"] = 3
    req, _ = store.create_request("gw1", "r1", "web", {})
    run(wf.settle())
    r = store.request(req["id"])
    assert r["state"] == "failed" and "offload.set failed" in r["error"] and r["data"]["failed_in"] == "distributing"

    async def again():
        wf.retry(req["id"])
        await wf.settle()

    run(again())
    assert store.request(req["id"])["state"] == "active"


def test_clear_before_distribution_never_distributes(tmp_path):
    store, wf, agents = make(tmp_path)
    req, _ = store.create_request("gw1", "r1", "web", {})
    store.request_clear(req["id"])
    run(wf.settle())
    assert store.request(req["id"])["state"] == "cleared"
    assert "offload.set" not in agents.commands()


def test_restart_mid_workflow_resumes(tmp_path):
    """The center dies after `preparing` was recorded (the agent call never made or never
    answered); a new center on the same database finishes the request, calling prepare
    again (agents key it by request id), and nothing recorded before is lost."""
    store, wf, agents = make(tmp_path)
    agents.fail["prepare"] = 1
    wf.max_attempts, wf.retry_s = 10, 60.0
    req, _ = store.create_request("gw1", "r1", "web", {"pps": 123.0})
    run(wf.settle(timeout=0.3))        # one failed prepare, a retry is scheduled ...
    mid = store.request(req["id"])
    assert mid["state"] == "preparing" and mid["attempts"] == 1
    store.close()                      # ... and the center is gone

    store2, wf2, agents2 = make(tmp_path, db=str(tmp_path / "center.db"))
    agents2.images = agents.images     # the target kept the image it was sent
    assert wf2.resume() == 1           # the open request is due at once, whatever backoff it had
    run(wf2.settle())
    r = store2.request(req["id"])
    assert r["state"] == "active" and r["target"] == "dc2" and r["data"]["pps"] == 123.0
    assert "image.put" not in agents2.commands() and agents2.commands().count("prepare") == 1
    assert [h["state"] for h in store2.history(req["id"])][:3] == ["requested", "target_chosen", "preparing"]

"""The control center without HTTP: scoring (factors, weights, exclusions), the store
(SQLite, restart), and the request state machine with fake agents (retries, failure,
clear, a restart mid-workflow that resumes with nothing lost, and the target's VMs
drained and released after the clear: once drained, on release_after, across a restart)."""
from __future__ import annotations

import asyncio
import time

import pytest

from control.center import scoring
from control.center.server import seed
from control.center.store import Store
from control.center.workflow import NoTarget, Workflow
from control.config import ConfigError
from control.center.config import parse_center_document
from tests.unit.center_fixtures import NOON_UTC, FakeAgents, config, document


POLL_S = 0.02


def make(tmp_path, agents=None, db=None, **center):
    cfg = config(tmp_path, db=db, **center)
    store = Store(cfg.db)
    seed(store, cfg)
    agents = agents or FakeAgents()
    wf = Workflow(store, cfg.weights, agents, vms=cfg.vms, max_attempts=cfg.max_attempts, retry_s=cfg.retry_s,
                  release_after=cfg.release_after, poll_s=POLL_S, now=lambda: NOON_UTC)
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
    doc = document(tmp_path)
    doc["datacenter"][1]["encap"] = "vxlan"
    with pytest.raises(ConfigError, match=r"^datacenter\[1\]\.encap: 'vxlan' is not one of ipip, gue$"):
        parse_center_document(doc)
    for bad in (0, -1.0, 86401):
        with pytest.raises(ConfigError, match=rf"^center\.release_after: {bad} is not in \(0, 86400\] seconds$"):
            parse_center_document(document(tmp_path, release_after=bad))
    with pytest.raises(ConfigError, match=r"^center\.release_after: "):
        parse_center_document(document(tmp_path, release_after="soon"))
    cfg = parse_center_document(document(tmp_path))
    assert cfg.release_after == 300.0 and {dc.encap for dc in cfg.datacenters} == {"ipip"}


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


ACTIVE = ["images", "image.put", "prepare", "offload.set"]
BASE_LOAD = 2       # dc2's load in the fixture's config


def states(store, rid):
    return [h["state"] for h in store.history(rid)
            if h["note"] != "clear requested" and not (h["note"] or "").startswith("error")]


def held(store):
    dc = store.datacenter("dc2")
    return dc["load"], dc.get("held", {})


def offload_then_clear(store, wf, timeout: float = 10.0) -> int:
    """A request driven to active, cleared, and driven on for `timeout` s at most: its id."""
    rid = store.create_request("gw1", "r1", "web", {})[0]["id"]

    async def go():
        await wf.settle()
        assert store.request(rid)["state"] == "active"
        store.request_clear(rid)
        await wf.settle(timeout)

    run(go())
    return rid


def call_times(agents, command: str) -> list[float]:
    return [t for (_, c, _), t in zip(agents.calls, agents.times) if c == command]


def test_workflow_full_path_ships_image_clears_drains_and_releases(tmp_path):
    store, wf, agents = make(tmp_path)
    rid = offload_then_clear(store, wf)
    r = store.request(rid)
    assert r["state"] == "released" and r["target"] == "dc2" and r["data"]["released_by"] == "drained"
    assert states(store, rid) == ["requested", "target_chosen", "preparing", "prepared", "distributing", "active",
                                  "draining", "released"]
    assert agents.commands() == ACTIVE + ["offload.clear", "drain", "status", "release"]
    assert agents.calls[3][2] == {"region": "r1", "service": "web", "endpoint": "198.18.200.2", "encap": "ipip"}
    assert [c[2] for c in agents.calls[-3:] if c[1] != "status"] == [{"request": rid}, {"request": rid}]
    assert [c[0] for c in agents.calls[-3:]] == ["http://198.18.200.2:7302"] * 3   # drain, status, release: dc2
    assert held(store) == (BASE_LOAD, {})                          # capacity returned
    assert agents.offloads == {} and agents.released == [rid] and agents.requests == {}


def test_offload_set_carries_the_datacenters_encap(tmp_path):
    doc = document(tmp_path)
    doc["datacenter"][1]["encap"] = "gue"
    cfg = parse_center_document(doc, str(tmp_path))
    store = Store(cfg.db)
    seed(store, cfg)
    agents = FakeAgents()
    wf = Workflow(store, cfg.weights, agents, vms=cfg.vms, now=lambda: NOON_UTC)
    store.create_request("gw1", "r1", "web", {})
    run(wf.settle())
    assert agents.offloads == {("r1", "web"): ("198.18.200.2", "gue")}


def test_release_waits_for_drained(tmp_path):
    """The agent says draining twice, drained the third time: three polls, then one release."""
    store, wf, agents = make(tmp_path, agents=FakeAgents(drain_polls=3))
    rid = offload_then_clear(store, wf)
    assert agents.commands() == ACTIVE + ["offload.clear", "drain", "status", "status", "status", "release"]
    polls = call_times(agents, "status")
    assert all(b - a >= POLL_S for a, b in zip(polls, polls[1:]))     # polled at poll_s, not in a busy loop
    r = store.request(rid)
    assert r["state"] == "released" and r["data"]["released_by"] == "drained"
    assert held(store) == (BASE_LOAD, {})


def test_release_on_timeout_while_still_draining(tmp_path):
    """The agent never says drained (flows still open): the center polls until release_after
    has passed since the clear, never releasing before, then releases once."""
    release_after = 0.3
    store, wf, agents = make(tmp_path, agents=FakeAgents(drain_polls=None), release_after=release_after)
    rid = offload_then_clear(store, wf)
    r = store.request(rid)
    assert r["state"] == "released" and r["data"]["released_by"] == "release_after"
    deadline = r["data"]["cleared_at"] + release_after
    at = {c: call_times(agents, c) for c in ("status", "release")}
    assert len(at["status"]) >= 2 and max(at["status"]) < deadline       # draining: polled, not released
    assert len(at["release"]) == 1 and at["release"][0] >= deadline
    assert agents.commands() == ACTIVE + ["offload.clear", "drain"] + ["status"] * len(at["status"]) + ["release"]
    draining_at = next(h["at"] for h in store.history(rid) if h["state"] == "draining")
    assert draining_at < deadline and held(store) == (BASE_LOAD, {})


def test_agent_errors_while_draining_are_retried(tmp_path):
    """status and release fail once each (max_attempts is 3): retried, released once, the
    capacity returned once."""
    store, wf, agents = make(tmp_path)
    agents.fail.update(status=1, release=1)
    rid = offload_then_clear(store, wf)
    assert agents.commands() == ACTIVE + ["offload.clear", "drain", "status", "status", "release", "status",
                                          "release"]
    errors = [h["note"] for h in store.history(rid) if (h["note"] or "").startswith("error")]
    assert errors == ["error: draining: status failed (injected)", "error: draining: release failed (injected)"]
    assert store.request(rid)["state"] == "released" and agents.released == [rid]
    assert held(store) == (BASE_LOAD, {})


def test_agent_errors_count_in_a_row_while_draining(tmp_path):
    """Two failed polls, an answer (draining), two failed polls again: with max_attempts 3
    the request does not fail, since the answer in between ends the row."""
    store, wf, agents = make(tmp_path, agents=FakeAgents(drain_polls=2))
    req, _ = store.create_request("gw1", "r1", "web", {})
    rid = req["id"]

    async def go():
        await wf.settle()
        store.request_clear(rid)
        agents.fail["status"] = 2
        for _ in range(400):                       # bounded: until the first answer
            await wf.settle(timeout=0.01)
            if agents.polls.get(rid):
                break
        agents.fail["status"] = 2
        await wf.settle()

    run(go())
    assert agents.commands() == ACTIVE + ["offload.clear", "drain"] + ["status"] * 6 + ["release"]
    assert store.request(rid)["state"] == "released" and held(store) == (BASE_LOAD, {})


def test_clear_after_prepare_releases_the_vms(tmp_path):
    """A clear that comes once the VMs exist but before distribution: nothing is offloaded,
    the VMs are drained and released, the capacity comes back."""
    store, wf, agents = make(tmp_path)
    req, _ = store.create_request("gw1", "r1", "web", {})
    rid = req["id"]

    async def go():
        for _ in range(3):                                          # requested -> ... -> prepared
            await wf.step(store.request(rid))
        assert store.request(rid)["state"] == "prepared" and held(store)[0] == BASE_LOAD + 2
        store.request_clear(rid)
        await wf.settle()

    run(go())
    assert store.request(rid)["state"] == "released"
    assert agents.commands() == ["images", "image.put", "prepare", "drain", "status", "release"]
    assert states(store, rid)[-3:] == ["prepared", "draining", "released"] and held(store) == (BASE_LOAD, {})


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


def drain_then_restart(tmp_path, release_after: float) -> tuple[int, float]:
    """A request cleared and draining (its agent never says drained) when the center stops:
    (request id, the clear's time)."""
    store, wf, agents = make(tmp_path, agents=FakeAgents(drain_polls=None), release_after=release_after)
    rid = offload_then_clear(store, wf, timeout=0.2)
    r = store.request(rid)
    assert r["state"] == "draining" and agents.commands()[4:6] == ["offload.clear", "drain"]
    assert set(agents.commands()[6:]) == {"status"} and "release" not in agents.commands()
    assert held(store) == (BASE_LOAD + 2, {str(rid): 2})       # draining VMs still count in dc2's load
    store.close()
    return rid, r["data"]["cleared_at"]


def restarted_center(tmp_path, rid: int, release_after: float, drain_polls: int | None):
    """A new center on the same database; the target still has the request, draining."""
    agents = FakeAgents(drain_polls=drain_polls)
    agents.requests[rid] = "draining"
    store, wf, _ = make(tmp_path, agents=agents, db=str(tmp_path / "center.db"), release_after=release_after)
    assert wf.resume() == 1
    run(wf.settle())
    return store, agents


def test_restart_mid_drain_releases_once_when_drained(tmp_path):
    rid, cleared_at = drain_then_restart(tmp_path, release_after=60)
    store, agents = restarted_center(tmp_path, rid, release_after=60, drain_polls=2)
    r = store.request(rid)
    assert r["state"] == "released" and r["data"]["released_by"] == "drained"
    assert r["data"]["cleared_at"] == cleared_at                     # the clear's time is kept
    assert agents.commands() == ["status", "status", "release"]       # no second offload.clear nor drain
    assert held(store) == (BASE_LOAD, {})                             # returned once
    assert states(store, rid)[-2:] == ["draining", "released"]


def test_restart_mid_drain_counts_release_after_from_the_clear(tmp_path):
    """release_after runs from the clear, not from the restart: a center that comes back
    after it has passed releases at once, without asking the agent's status."""
    release_after = 0.3
    rid, cleared_at = drain_then_restart(tmp_path, release_after=60)
    time.sleep(max(0.0, cleared_at + release_after - time.time()))
    store, agents = restarted_center(tmp_path, rid, release_after=release_after, drain_polls=None)
    r = store.request(rid)
    assert (r["state"], r["data"]["released_by"], r["data"]["cleared_at"]) == ("released", "release_after", cleared_at)
    assert agents.commands() == ["release"] and held(store) == (BASE_LOAD, {})


def test_vms_held_per_request_are_counted_once(tmp_path):
    """hold_vms is idempotent per request: a prepare or a release repeated after a restart
    changes the data center's load once."""
    store, _, _ = make(tmp_path)
    store.hold_vms("dc2", 7, 2)
    store.hold_vms("dc2", 7, 2)
    store.hold_vms("dc2", 8, 3)
    assert held(store) == (BASE_LOAD + 5, {"7": 2, "8": 3})
    store.close()
    store, _, _ = make(tmp_path, db=str(tmp_path / "center.db"))    # a restart's seed keeps what is held
    assert held(store) == (BASE_LOAD + 5, {"7": 2, "8": 3})
    store.hold_vms("dc2", 7, 0)
    store.hold_vms("dc2", 7, 0)
    assert held(store) == (BASE_LOAD + 3, {"8": 3})

"""The center on the store interface (control/center/kvstore.py) with the store's SQLite
backend, several replicas sharing one file as they would share etcd: the state calls
behave as the center's own SQLite store does, two replicas creating the same request at
once make one, a standby serves the API while the leader drives, and when the leader
stops the standby takes over and finishes the requests (also one half-way through its
drain: released once, the clear's time kept). The same on a real etcd cluster,
with a leader killed mid-prepare, is tests/e2e/test_center_failover.py."""
from __future__ import annotations

import asyncio
import contextlib
import threading

from aiohttp.test_utils import TestClient, TestServer

from control.center.kvstore import LEADER_KEY, KvStore
from control.center.server import Center, seed
from control.store.sqlite import SqliteStore
from tests.unit.center_fixtures import TOKEN, FakeAgents, config

AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQ = {"gateway": "gw1", "region": "r1", "service": "web"}


def kv_store(tmp_path) -> KvStore:
    return KvStore(SqliteStore(str(tmp_path / "state.db")))


def test_state_calls_match_the_sqlite_store(tmp_path):
    cfg = config(tmp_path)
    store = kv_store(tmp_path)
    seed(store, cfg)
    assert [d["name"] for d in store.datacenters()] == ["dc1", "dc2", "dc3"]
    store.hold_vms("dc2", 1, 2)
    store.hold_vms("dc2", 1, 2)                            # idempotent per request
    seed(store, cfg)                                       # a restart's seed keeps the running load
    assert (store.datacenter("dc2")["load"], store.datacenter("dc2")["held"]) == (4, {"1": 2})
    store.hold_vms("dc2", 1, 0)
    store.hold_vms("dc2", 1, 0)
    assert (store.datacenter("dc2")["load"], store.datacenter("dc2")["held"]) == (2, {})
    image = store.image("web", with_content=True)
    assert image["content"] == b'{"binds": ["tcp:198.19.0.10:8080"]}' and store.images()[0]["size"] == 35

    a, created = store.create_request("gw1", "r1", "web", {"pps": 10.0})
    b, again = store.create_request("gw1", "r1", "web", {})
    assert created and not again and a["id"] == b["id"] == 1 and "history" not in a
    store.transition(a["id"], "target_chosen", "target dc2", target="dc2", data={"x": 1})
    store.record_failure(a["id"], "boom", 9e9)
    assert store.reset_backoffs() == 1 and store.request(a["id"])["next_try_at"] == 0
    store.request_clear(a["id"])
    c, created_c = store.create_request("gw1", "r1", "web", {})      # a clearing request is no longer "the open one"
    assert created_c and c["id"] == 2
    store.close()

    store = kv_store(tmp_path)                                        # reopened: nothing lost
    r = store.request(a["id"])
    assert (r["state"], r["target"], r["data"], r["attempts"], r["error"], r["clear_requested"]) == \
        ("target_chosen", "dc2", {"pps": 10.0, "x": 1}, 1, "boom", True)
    assert [(h["state"], h["note"]) for h in store.history(a["id"])] == [
        ("requested", '{"pps": 10.0}'), ("target_chosen", "target dc2"), ("target_chosen", "error: boom"),
        ("target_chosen", "clear requested")]
    assert store.state_counts() == {"requested": 1, "target_chosen": 1}
    assert [r["id"] for r in store.requests(open_only=True)] == [1, 2]
    store.close()


def test_replicas_creating_at_once_make_one_request(tmp_path):
    """Eight replicas (one store handle each, as separate processes would have) race to
    create the same request and ids for other ones: one request per triple, ids unique."""
    stores = [kv_store(tmp_path) for _ in range(8)]
    results: list[tuple[dict, bool]] = []
    go = threading.Barrier(len(stores))

    def replica(i: int, store: KvStore) -> None:
        go.wait()
        results.append(store.create_request("gw1", "r1", "web", {}))
        results.append(store.create_request("gw1", f"x{i}", "web", {}))

    threads = [threading.Thread(target=replica, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    shared = [(r["id"], created) for r, created in results if r["region"] == "r1"]
    assert sum(created for _, created in shared) == 1 and len({rid for rid, _ in shared}) == 1
    ids = [r["id"] for r in stores[0].requests()]
    assert len(ids) == 9 and len(set(ids)) == 9
    for s in stores:
        s.close()


async def wait_for(check, tries: int = 300, pause: float = 0.02):
    """check()'s first truthy answer, or its last one after `tries` polls (bounded)."""
    for _ in range(tries):
        got = await check()
        if got:
            return got
        await asyncio.sleep(pause)
    return got


@contextlib.asynccontextmanager
async def two_replicas(tmp_path, agents: FakeAgents):
    """Two centers on one store, serving: (centers, clients, leader index, standby index)."""
    centers = [Center(config(tmp_path, name=n, leader_ttl_s=1), store=kv_store(tmp_path), agent_factory=agents)
               for n in ("a", "b")]
    for c in centers:
        c.workflow.poll_s = 0.05
    clients = [TestClient(TestServer(c.app())) for c in centers]
    try:
        for c in clients:
            await c.start_server()

        async def roles():
            got = [(await (await c.get("/v1/status", headers=AUTH)).json())["role"] for c in clients]
            return got if sorted(got) == ["leader", "standby"] else None
        got = await wait_for(roles)
        assert sorted(got) == ["leader", "standby"], got
        yield centers, clients, *((0, 1) if got[0] == "leader" else (1, 0))
    finally:
        for c in clients:
            await c.close()
        for c in centers:
            c.store.close()


async def request_in(client, rid: int, want: str):
    r = await (await client.get(f"/v1/requests/{rid}", headers=AUTH)).json()
    return r if r["state"] == want else None


async def take_over(centers, clients, leader: int, standby: int) -> None:
    await clients[leader].close()                 # the leader stops (resigns: its key goes at once)
    after = centers[standby]
    assert await wait_for(lambda: asyncio.sleep(0, after.role == "leader")), "no take-over"
    assert after.store.kv.get(LEADER_KEY).value["name"] == after.config.name


def test_standby_serves_leader_drives_then_takes_over(tmp_path):
    agents = FakeAgents()

    async def go():
        async with two_replicas(tmp_path, agents) as (centers, clients, leader, standby):
            resp = await clients[standby].post("/v1/requests", json=REQ, headers=AUTH)   # a write on the standby
            assert resp.status == 201
            rid = (await resp.json())["id"]
            assert await wait_for(lambda: request_in(clients[standby], rid, "active")), "the leader did not drive it"

            await take_over(centers, clients, leader, standby)
            resp = await clients[standby].post(f"/v1/requests/{rid}/clear", headers=AUTH)
            assert resp.status == 200
            assert await wait_for(lambda: request_in(clients[standby], rid, "released")), \
                "the new leader did not clear and release it"

    asyncio.run(go())
    assert agents.commands() == ["images", "image.put", "prepare", "offload.set", "offload.clear", "drain", "status",
                                 "release"]


def test_leader_change_mid_drain_releases_once(tmp_path):
    """The leader clears the offload and polls the draining target; it stops; the new
    leader goes on polling (the clear's time kept) and releases once when drained."""
    agents = FakeAgents(drain_polls=None)

    async def go():
        async with two_replicas(tmp_path, agents) as (centers, clients, leader, standby):
            resp = await clients[leader].post("/v1/requests", json=REQ, headers=AUTH)
            rid = (await resp.json())["id"]
            assert await wait_for(lambda: request_in(clients[leader], rid, "active"))
            await clients[leader].post(f"/v1/requests/{rid}/clear", headers=AUTH)
            draining = await wait_for(lambda: asyncio.sleep(0, agents.polls.get(rid, 0) >= 2 and
                                                            centers[standby].store.request(rid)))
            assert draining["state"] == "draining", "the leader did not poll the draining target"
            await take_over(centers, clients, leader, standby)
            polls = agents.polls[rid]
            agents.drain_polls = polls + 2          # drained at the new leader's second poll
            released = await wait_for(lambda: request_in(clients[standby], rid, "released"))
            assert released, "the new leader did not release it"
            assert released["data"]["cleared_at"] == draining["data"]["cleared_at"]
            assert centers[standby].store.datacenter("dc2")["load"] == 2
            return rid, polls

    rid, polls = asyncio.run(go())
    assert agents.commands() == ["images", "image.put", "prepare", "offload.set", "offload.clear", "drain"] + \
        ["status"] * (polls + 2) + ["release"]
    assert agents.released == [rid]

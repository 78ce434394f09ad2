"""The center's and the agent's HTTP APIs on 127.0.0.1: the happy path, the 4xx cases
(wrong token, malformed JSON, unknown region/gateway/service/request, impossible
target), and the center's request throughput (printed, never asserted)."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from control.center.server import Center
from tests.unit.center_fixtures import TOKEN, FakeAgents, config

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def with_center(tmp_path, body, agents=None):
    async def go():
        center = Center(config(tmp_path), agent_factory=agents or FakeAgents())
        async with TestClient(TestServer(center.app())) as client:
            return await body(client, center)
    return asyncio.run(go())


async def post(client, path, payload, headers=AUTH):
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    resp = await client.post(path, data=data, headers=headers)
    return resp.status, await resp.json()


REQ = {"gateway": "gw1", "region": "r1", "service": "web", "pps": 5000.0}


async def wait_state(client, rid: int, state: str, tries: int = 200) -> dict:
    """The request once it is in `state`, or as it is after `tries` polls (bounded)."""
    for _ in range(tries):
        r = await (await client.get(f"/v1/requests/{rid}", headers=AUTH)).json()
        if r["state"] == state:
            break
        await asyncio.sleep(0.02)
    return r


def test_create_then_active_then_clear(tmp_path):
    agents = FakeAgents()

    async def body(client, center):
        status, req = await post(client, "/v1/requests", REQ)
        assert status == 201 and req["state"] == "requested"
        status, again = await post(client, "/v1/requests", REQ)
        assert status == 200 and again["id"] == req["id"]
        r = await wait_state(client, req["id"], "active")
        assert r["state"] == "active" and r["target"] == "dc2"
        ex = await (await client.get(f"/v1/requests/{req['id']}/explain", headers=AUTH)).json()
        assert ex["target"] == "dc2" and ex["chosen"][0]["name"] == "dc2" and "location" in ex["chosen"][0]["factors"]
        status, cleared = await post(client, "/v1/requests/clear", {"gateway": "gw1", "region": "r1"})
        assert status == 200 and [c["id"] for c in cleared] == [req["id"]]
        r = await wait_state(client, req["id"], "released")
        assert r["state"] == "released" and r["data"]["released_by"] == "drained"
        assert [h["state"] for h in r["history"][-2:]] == ["draining", "released"]
        status = await (await client.get("/v1/status", headers=AUTH)).json()
        assert status["requests"] == {"released": 1}
        dcs = {d["name"]: d for d in await (await client.get("/v1/datacenters", headers=AUTH)).json()}
        assert (dcs["dc2"]["load"], dcs["dc2"]["held"]) == (2, {})
        status, reply = await post(client, f"/v1/requests/{req['id']}/clear", {})
        assert status == 409 and reply["error"] == f"request {req['id']} is released"

    with_center(tmp_path, body, agents)
    assert agents.commands() == ["images", "image.put", "prepare", "offload.set", "offload.clear", "drain", "status",
                                 "release"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_wrong_token_is_401(tmp_path, headers):
    async def body(client, center):
        status, reply = await post(client, "/v1/requests", REQ, headers=headers)
        assert status == 401 and "token" in reply["error"]
        resp = await client.get("/v1/status", headers=headers)
        assert resp.status == 401
    with_center(tmp_path, body)


@pytest.mark.parametrize("payload, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"gateway": "gw1", "service": "web"}, 400, "missing field 'region'"),
    ({**REQ, "region": 7}, 400, "field 'region' must be a str"),
    ({**REQ, "region": "r9"}, 404, "unknown region 'r9'"),
    ({**REQ, "gateway": "gw9"}, 404, "unknown gateway 'gw9'"),
    ({**REQ, "service": "mail"}, 404, "unknown service 'mail'"),
])
def test_bad_requests(tmp_path, payload, status, message):
    async def body(client, center):
        got, reply = await post(client, "/v1/requests", payload)
        assert (got, message in reply["error"]) == (status, True), reply
        assert center.store.requests() == []
    with_center(tmp_path, body)


def test_impossible_target_is_409(tmp_path):
    async def body(client, center):
        for name in ("dc2", "dc3"):
            resp = await client.put(f"/v1/datacenters/{name}/load", json={"load": 16}, headers=AUTH)
            assert resp.status == 200
        status, reply = await post(client, "/v1/requests", REQ)
        assert status == 409 and "no data center can take region 'r1'" in reply["error"]
        assert "not enough free capacity" in reply["error"]
        resp = await client.put("/v1/datacenters/dc2/load", json={"load": 99}, headers=AUTH)
        assert resp.status == 400
    with_center(tmp_path, body)


def test_unknown_request_and_routes(tmp_path):
    async def body(client, center):
        assert (await client.get("/v1/requests/42", headers=AUTH)).status == 404
        assert (await client.get("/v1/requests/x1", headers=AUTH)).status == 400
        assert (await client.post("/v1/requests/42/clear", headers=AUTH)).status == 404
        resp = await client.get("/v1/nothing", headers=AUTH)
        assert resp.status == 404 and "error" in await resp.json()
        status, req = await post(client, "/v1/requests", REQ)
        assert (await client.post(f"/v1/requests/{req['id']}/retry", headers=AUTH)).status == 409
    with_center(tmp_path, body)


def test_throughput(tmp_path):
    """Measured, not asserted: create/get/clear calls per second through the whole HTTP stack."""
    regions = 200

    async def body(client, center):
        for i in range(regions):
            center.store.put_region({"name": f"x{i}", "lat": 50.0, "lon": 8.0, "users": 1})
        center.store._put("datacenters", "dc2", {**center.store.datacenter("dc2"), "capacity": 10 ** 6})
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(16)

        async def one(i):
            async with sem:
                status, _ = await post(client, "/v1/requests", {**REQ, "region": f"x{i}"})
                assert status == 201
        await asyncio.gather(*(one(i) for i in range(regions)))
        t_create = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(regions):
            assert (await client.get("/v1/status", headers=AUTH)).status == 200
        t_get = time.perf_counter() - t0
        for _ in range(500):
            if all(r["state"] == "active" for r in center.store.requests()):
                break
            await asyncio.sleep(0.02)
        t_all = time.perf_counter() - t0 + t_create
        active = sum(r["state"] == "active" for r in center.store.requests())
        print(f"\ncenter throughput: {regions / t_create:.0f} request creations/s (16 concurrent), "
              f"{regions / t_get:.0f} status calls/s; {active}/{regions} requests active "
              f"(full workflow, fake agents) in {t_all:.2f} s = {active / t_all:.0f} requests/s")
        assert active == regions

    with_center(tmp_path, body)


# ------------------------------------------------------------------ the agent API

def test_agent_api_errors():
    from control.api.commands import CENTER, scoped
    from control.api.http import AgentServer
    from control.gateway import UnknownName

    def offload_set(a):
        if a.get("region") != "r1":
            raise UnknownName(f"unknown region {a.get('region')!r}")
        return a

    server = AgentServer("127.0.0.1", 0, "agenttok", {"offload.set": scoped(offload_set, CENTER),
                                                      "status": scoped(lambda a: {"ok": 1}, CENTER)})
    server.port = 0
    # port 0: find the bound port after start
    server.start()
    try:
        port = server.runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}/v1/cmd"

        async def go():
            async with aiohttp.ClientSession() as s:
                async def call(cmd, data, token="agenttok"):
                    async with s.post(f"{base}/{cmd}", data=data, headers={"Authorization": f"Bearer {token}"}) as r:
                        return r.status, await r.json()
                assert (await call("status", b"{}"))[0] == 200
                assert (await call("status", b"{}", token="nope"))[0] == 401
                st, reply = await call("vm.kill", b"{}")
                assert st == 404 and "unknown command" in reply["error"]
                st, reply = await call("offload.set", b"{bad")
                assert st == 400 and "malformed JSON" in reply["error"]
                st, reply = await call("offload.set", json.dumps({"region": "r9"}))
                assert st == 404 and reply["error"] == "unknown region 'r9'"
                st, reply = await call("offload.set", json.dumps({"region": "r1"}))
                assert st == 200 and reply["result"] == {"region": "r1"}
        asyncio.run(go())
    finally:
        server.close()

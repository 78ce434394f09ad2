"""The control center's fail-over on a real 3-member etcd cluster (testbed/etcd_cluster.py):
three `xdpgw center` processes on one store, a distribution request started, the leader
killed (SIGKILL, by pid) while the target data center's agent is preparing; a standby
takes over when the leader's lease expires and finishes the request, and the target
created the request's VMs once. Then the offload is cleared and the new leader killed
while the target drains; the last replica goes on polling and releases the VMs once
they are drained, once, and the data center's load comes back.

The agents are a real aiohttp server on loopback in this process (the target DC and the
source gateway): it answers the center's calls, counts `prepare` per idempotency key
(the request id) and takes PREPARE_S to create a request's VMs, so the leader dies
waiting for the answer. Lease expiry (the leader key's delete, seen by a watch) to the
request active is measured and printed, not asserted."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

from aiohttp import web

from control.center.client import CenterClient, CenterError
from control.center.kvstore import LEADER_KEY
from control.store import open_store
from testbed.etcd_cluster import EtcdCluster
from testbed.netns import free_port
from tests.waiting import wait_for

TOKEN = "c3nter"
AGENT_TOKEN = "ag3nt"
TTL_S = 2
PREPARE_S = 1.0
REPLICAS = ("ca", "cb", "cc")
IMAGE = b'{"binds": ["tcp:198.18.100.10:8080"]}'


class Agents:
    """The target DC's and the source gateway's agent (one server, the agent API:
    POST /v1/cmd/<command>, bearer token). prepare is idempotent per request id: the
    first call starts creating the VMs, a repeated one waits for that and returns it."""

    def __init__(self) -> None:
        self.prepare_calls: dict[int, int] = {}
        self.created: dict[int, int] = {}
        self.jobs: dict[int, asyncio.Future] = {}
        self.images: set[str] = set()
        self.offloads: dict[tuple[str, str], tuple[str, str]] = {}
        self.states: dict[int, str] = {}       # request -> serving, draining, drained (the agent contract)
        self.status_polls = 0
        self.released: list[int] = []
        self.preparing = threading.Event()
        self.port = free_port()
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def _create(self, rid: int, vms: int) -> dict:
        await asyncio.sleep(PREPARE_S)
        self.created[rid] = self.created.get(rid, 0) + 1
        return {"request": rid, "vms": [f"dv{i + 1}" for i in range(vms)]}

    async def command(self, name: str, a: dict):
        if name == "images":
            return [{"sha256": s} for s in self.images]
        if name == "image.put":
            self.images.add(a["sha256"])
            return {"sha256": a["sha256"]}
        if name == "prepare":
            rid = a["request"]
            self.prepare_calls[rid] = self.prepare_calls.get(rid, 0) + 1
            self.preparing.set()
            if rid not in self.jobs:       # not tied to this call: a caller that dies does not stop it
                self.jobs[rid] = asyncio.ensure_future(self._create(rid, a["vms"]))
            self.states.setdefault(rid, "serving")
            return await asyncio.shield(self.jobs[rid])
        if name == "offload.set":
            self.offloads[(a["region"], a["service"])] = (a["endpoint"], a["encap"])
            return a
        if name == "offload.clear":
            return self.offloads.pop((a["region"], a["service"]))
        if name == "drain":
            if self.states.get(a["request"]) == "serving":
                self.states[a["request"]] = "draining"
            return {"request": a["request"]}
        if name == "status":
            self.status_polls += 1
            return {"requests": {str(rid): {"state": state} for rid, state in self.states.items()}}
        if name == "release":
            if self.states.pop(a["request"], None) is not None:
                self.released.append(a["request"])
            return {"request": a["request"], "released": True}
        raise web.HTTPNotFound()

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {AGENT_TOKEN}":
            return web.json_response({"error": "token"}, status=401)
        result = await self.command(request.match_info["command"], await request.json())
        return web.json_response({"result": result})

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/cmd/{command}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> "Agents":
        self.thread.start()
        assert self.ready.wait(10), "the agents did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def center_toml(name: str, port: int, store_url: str, agent: str, image: str) -> str:
    return f"""
[center]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"
name = "{name}"
leader_ttl_s = {TTL_S}
retry_s = 0.2
max_attempts = 20

[store]
url = "{store_url}"

[[region]]
name = "r1"
lat = 50.1
lon = 8.7

[[datacenter]]
name = "dc1"
lat = 50.1
lon = 8.7
timezone = "Europe/Berlin"
capacity = 16
tunnel_endpoint = "198.18.0.2"

[[datacenter]]
name = "dc2"
lat = 48.1
lon = 11.6
timezone = "Europe/Berlin"
capacity = 16
tunnel_endpoint = "198.18.200.2"
agent = "{agent}"
agent_token = "{AGENT_TOKEN}"

[[gateway]]
name = "gw1"
datacenter = "dc1"
agent = "{agent}"
agent_token = "{AGENT_TOKEN}"

[[image]]
service = "web"
name = "web-1"
path = "{image}"
"""


class Replica:
    """One `xdpgw center` process; `lines` collects its output (read on a thread)."""

    def __init__(self, name: str, config: str, port: int) -> None:
        self.name = name
        self.client = CenterClient(f"http://127.0.0.1:{port}", TOKEN, timeout=2.0)
        self.proc = subprocess.Popen([sys.executable, "-m", "control.cli", "center", "--config", config],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            self.lines.append(raw.decode(errors="replace").rstrip())

    def status(self) -> dict | None:
        try:
            return self.client.call("GET", "/v1/status")
        except CenterError:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc.stdout.close()


def test_leader_killed_mid_prepare_standby_finishes(tmp_path):
    image = tmp_path / "web-1.json"
    image.write_bytes(IMAGE)
    replicas: list[Replica] = []
    with EtcdCluster() as cluster, Agents() as agents:
        store = open_store(cluster.url)
        try:
            for name in REPLICAS:
                port, path = free_port(), tmp_path / f"{name}.toml"
                path.write_text(center_toml(name, port, cluster.url, f"http://127.0.0.1:{agents.port}", str(image)))
                replicas.append(Replica(name, str(path), port))
            def one_leader():
                got = [r.status() for r in replicas]
                return got if all(got) and [s["role"] for s in got].count("leader") == 1 else None
            roles = wait_for(one_leader, timeout=30, what="three replicas up, one of them the leader")
            leader = next(r for r, s in zip(replicas, roles) if s["role"] == "leader")
            standbys = [r for r in replicas if r is not leader]
            assert store.get(LEADER_KEY).value["name"] == leader.name

            # a write on a standby: the leader drives it
            req = standbys[0].client.call("POST", "/v1/requests", {"gateway": "gw1", "region": "r1", "service": "web"})
            assert agents.preparing.wait(20), "the leader never asked dc2 to prepare"

            gone: list[float] = []
            watch = store.watch(LEADER_KEY, store.revision() + 1,
                                lambda e: gone.append(time.time()) if e.kind == "delete" and not gone else None)
            t_kill = time.time()
            os.kill(leader.proc.pid, signal.SIGKILL)
            leader.proc.wait(10)

            def done():
                for r in standbys:
                    got = r.status() and r.client.call("GET", f"/v1/requests/{req['id']}")
                    if got and got["state"] == "active":
                        return got
                return None
            final = wait_for(done, timeout=60, step=0.05, what="the request active after the leader died")
            watch.cancel()
            new_leader = store.get(LEADER_KEY).value["name"]
            offloaded = dict(agents.offloads)

            # cleared; the new leader dies while dc2 drains; the last replica releases once drained
            standbys[0].client.call("POST", f"/v1/requests/{req['id']}/clear")
            wait_for(lambda: agents.status_polls >= 1, timeout=20, what="the new leader polling the draining dc2")
            second = next(r for r in standbys if r.name == new_leader)
            last = next(r for r in standbys if r is not second)
            t_kill2 = time.time()
            os.kill(second.proc.pid, signal.SIGKILL)
            second.proc.wait(10)
            wait_for(lambda: (last.status() or {}).get("role") == "leader", timeout=30, what="the last replica leading")
            polls_before = agents.status_polls
            wait_for(lambda: agents.status_polls > polls_before, timeout=20, what="the last replica polling dc2")
            agents.states[req["id"]] = "drained"
            t_drained = time.time()
            released = wait_for(lambda: (r := last.client.call("GET", f"/v1/requests/{req['id']}"))["state"] ==
                                "released" and r, timeout=20, what="the request released")
            load = next(d["load"] for d in last.client.call("GET", "/v1/datacenters") if d["name"] == "dc2")
        finally:
            for r in replicas:
                r.stop()
            store.close()

    history = [h["state"] for h in final["history"] if not (h["note"] or "").startswith("error")]
    assert history == ["requested", "target_chosen", "preparing", "prepared", "distributing", "active"], history
    assert new_leader in {r.name for r in standbys}
    assert offloaded == {("r1", "web"): ("198.18.200.2", "ipip")} and agents.offloads == {}
    rid = req["id"]
    # the dead leader's prepare and the new leader's, with the same key: the VMs were created once
    assert agents.prepare_calls == {rid: 2} and agents.created == {rid: 1}
    assert final["data"]["prepare"] == {"request": rid, "vms": ["dv1", "dv2"]}
    t_active = next(h["at"] for h in final["history"] if h["state"] == "active")
    assert gone, "no delete of the leader key was seen"
    print(f"\ncenter fail-over: leader {leader.name} killed mid-prepare; lease expired {gone[0] - t_kill:.2f} s "
          f"later (TTL {TTL_S} s); {new_leader} finished the request {t_active - gone[0]:.3f} s after the lease "
          f"expired ({t_active - t_kill:.2f} s after the kill); prepare calls {agents.prepare_calls[rid]}, "
          f"VM sets created {agents.created[rid]}")
    after = [h["state"] for h in released["history"] if h["state"] in ("draining", "released")]
    assert after[0] == "draining" and after[-1] == "released" and set(after) == {"draining", "released"}
    assert released["data"]["released_by"] == "drained" and agents.released == [rid] and load == 0
    assert released["data"]["cleared_at"] < t_kill2     # the clear's time survived the take-over
    t_released = next(h["at"] for h in released["history"] if h["state"] == "released")
    print(f"center fail-over mid-drain: {new_leader} killed while dc2 drained; {last.name} released the VMs "
          f"{t_released - t_drained:.2f} s after dc2 said drained ({t_released - t_kill2:.2f} s after the kill)")

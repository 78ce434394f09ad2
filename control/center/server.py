"""The center's HTTP/JSON API (aiohttp). Every call needs ``Authorization: Bearer <token>``.

    GET  /v1/status                      counts of requests by state (active, draining, released, ...); this
                                         replica's name and role (leader, standby)
    GET  /v1/datacenters                 the data centers (with load)
    PUT  /v1/datacenters/{name}/load     {"load": N}
    GET  /v1/images                      master images (no content)
    PUT  /v1/images/{service}            {"name", "content" (base64)}: a new master image
    POST /v1/requests                    {"gateway", "region", "service", ...}: 201 new, 200 the open one
    GET  /v1/requests[?open=1]
    GET  /v1/requests/{id}               with its history
    GET  /v1/requests/{id}/explain       each candidate's score per factor (as now, and as chosen)
    POST /v1/requests/{id}/clear         the region calmed down: new flows go home, the target's VMs drain
                                         and are released (control/center/workflow.py)
    POST /v1/requests/{id}/retry         a failed request resumes where it failed
    POST /v1/requests/clear              {"gateway", "region"[, "service"]}: clear the region's open requests

Every replica serves every call (with a [store], several replicas share one state): reads
and writes go to the store, whose compare-and-swaps keep replicas writing at once apart;
only the leader drives the requests (control/center/leader.py). So a gateway or a load
balancer may call any replica, and a standby needs no way to reach the leader.

Errors are ``{"error": "..."}`` with 400 (malformed JSON, missing or bad fields),
401 (token), 404 (unknown gateway, region, service, request), 409 (no data center
can take the request, or the request is in a state that does not allow it), 503 (the
shared store cannot be reached now: retry, or ask another replica)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import signal
import time

from aiohttp import web

from control.api.commands import arg
from control.api.errors import BadRequest, CommandError, NotFound, Refused
from control.api.http import check_bearer, json_body, ssl_context
from control.api.tls import client_ssl_context
from control.center.client import AgentClient
from control.center.config import CenterConfig
from control.center.kvstore import KvStore
from control.center.leader import Replica
from control.center.store import TERMINAL, Store
from control.center.workflow import NoTarget, Workflow
from control.deploy import notify
from control.logs import event
from control.store import StoreError

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024 * 1024
WORKFLOW_TASK = web.AppKey("workflow", asyncio.Task)


def seed(store: Store, config: CenterConfig) -> None:
    """The config's catalogue into the store (upserts; requests are never touched)."""
    for dc in config.datacenters:
        store.put_datacenter(dict(dc.__dict__))
    for g in config.gateways:
        store.put_gateway(dict(g.__dict__))
    for r in config.regions:
        store.put_region(dict(r.__dict__))
    for img in config.images:
        with open(img.path, "rb") as f:
            content = f.read()
        have = store.image(img.service)
        if have is None or have["name"] != img.name:
            store.put_image(img.service, img.name, content)


def open_center_store(config: CenterConfig) -> Store | KvStore:
    """Without [store]: the center's own SQLite file (one replica). With it: the shared
    store, on which several replicas elect a leader."""
    if config.store is None:
        return Store(config.db)
    from control.store import open_configured

    return KvStore(open_configured(config.store))


class Center:
    def __init__(self, config: CenterConfig, store: Store | KvStore | None = None, agent_factory=None) -> None:
        self.config = config
        self.store = store or open_center_store(config)
        seed(self.store, config)
        self.session = None
        # the agents' TLS, by URL (what the workflow's factory is given): this replica's files
        self.agent_tls = {e.agent.rstrip("/"): client_ssl_context(e.tls_ca, e.tls_cert, e.tls_key)
                          for e in (*config.datacenters, *config.gateways)
                          if e.tls_ca or e.tls_cert}
        self.workflow = Workflow(self.store, config.weights, agent_factory or self._agent, vms=config.vms,
                                 max_attempts=config.max_attempts, retry_s=config.retry_s,
                                 release_after=config.release_after)
        # one SQLite file has one center, the leader; on a shared store the replicas campaign
        self.replica = Replica(self.store.kv, config.name, config.leader_ttl_s, self.workflow) \
            if isinstance(self.store, KvStore) else None
        if self.replica is None:
            self.workflow.resume()
        self.stop_event = asyncio.Event()
        self.calls = 0

    @property
    def role(self) -> str:
        return "leader" if self.replica is None else self.replica.role

    def _agent(self, url: str, token: str) -> AgentClient:
        return AgentClient(self.session, url, token, tls=self.agent_tls.get(url.rstrip("/")))

    # ---- app ---------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/datacenters", self.datacenters)
        r.add_put("/v1/datacenters/{name}/load", self.set_load)
        r.add_get("/v1/images", self.images)
        r.add_put("/v1/images/{service}", self.put_image)
        r.add_post("/v1/requests", self.create)
        r.add_get("/v1/requests", self.list)
        r.add_post("/v1/requests/clear", self.clear_region)
        r.add_get("/v1/requests/{id}", self.get)
        r.add_get("/v1/requests/{id}/explain", self.explain)
        r.add_post("/v1/requests/{id}/clear", self.clear)
        r.add_post("/v1/requests/{id}/retry", self.retry)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.stop_event = asyncio.Event()
        self.workflow.wakeup = asyncio.Event()
        run = self.workflow.run(self.stop_event) if self.replica is None else self.replica.run(self.stop_event)
        app[WORKFLOW_TASK] = asyncio.get_running_loop().create_task(run)

    async def _cleanup(self, app: web.Application) -> None:
        self.stop_event.set()
        self.workflow.wakeup.set()
        await app[WORKFLOW_TASK]
        await self.session.close()

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        self.calls += 1
        if not check_bearer(request, self.config.token):
            return web.json_response({"error": "missing or wrong token (Authorization: Bearer <token>)"},
                                     status=401)
        try:
            return await handler(request)
        except CommandError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except web.HTTPException as exc:
            return web.json_response({"error": f"{exc.status} {exc.reason}: {request.method} {request.path}"},
                                     status=exc.status)
        except StoreError as exc:      # the shared store unreachable: the caller retries (another replica)
            return web.json_response({"error": f"store: {exc}"}, status=503)

    # ---- helpers -----------------------------------------------------------
    def _request(self, request: web.Request) -> dict:
        raw = request.match_info["id"]
        if not raw.isdigit():
            raise BadRequest(f"request id {raw!r} is not a number")
        req = self.store.request(int(raw))
        if req is None:
            raise NotFound(f"unknown request {raw}")
        return req

    # ---- handlers ----------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.store.state_counts(),
                                  "datacenters": len(self.store.datacenters()), "calls": self.calls,
                                  "name": self.config.name, "role": self.role})

    async def datacenters(self, request: web.Request) -> web.Response:
        return web.json_response([{k: v for k, v in dc.items() if k != "agent_token"}
                                  for dc in self.store.datacenters()])

    async def set_load(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        dc = self.store.datacenter(name)
        if dc is None:
            raise NotFound(f"unknown data center {name!r}")
        load = arg(await json_body(request), "load", int, noun="field")
        if not 0 <= load <= dc["capacity"]:
            raise BadRequest(f"load {load} is out of range 0..{dc['capacity']}")
        dc["load"] = load
        self.store.set_datacenter(dc)
        return web.json_response({k: v for k, v in dc.items() if k != "agent_token"})

    async def images(self, request: web.Request) -> web.Response:
        return web.json_response(self.store.images())

    async def put_image(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        name = arg(body, "name", noun="field")
        try:
            content = base64.b64decode(arg(body, "content", noun="field"), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("field 'content' is not base64") from None
        return web.json_response(self.store.put_image(request.match_info["service"], name, content), status=201)

    async def create(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        gateway, region, service = (arg(body, k, noun="field") for k in ("gateway", "region", "service"))
        if self.store.gateway(gateway) is None:
            raise NotFound(f"unknown gateway {gateway!r}")
        if self.store.region(region) is None:
            raise NotFound(f"unknown region {region!r}")
        if self.store.image(service) is None:
            raise NotFound(f"unknown service {service!r} (no master image)")
        try:
            self.workflow.choose(gateway, region, service)     # refuse what cannot be done, up front
        except NoTarget as exc:
            raise Refused(str(exc)) from None
        data = {k: body[k] for k in ("pps", "bps", "crossed_at", "heavy_at") if isinstance(body.get(k), (int, float))}
        data["received_at"] = time.time()
        req, created = self.store.create_request(gateway, region, service, data)
        self.workflow.wakeup.set()
        return web.json_response(req, status=201 if created else 200)

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response(self.store.requests(open_only=request.query.get("open") == "1"))

    async def get(self, request: web.Request) -> web.Response:
        req = self._request(request)
        return web.json_response({**req, "history": self.store.history(req["id"])})

    async def explain(self, request: web.Request) -> web.Response:
        req = self._request(request)
        return web.json_response({"request": req["id"], "target": req["target"],
                                  "chosen": req["data"].get("scores"),
                                  "now": self.workflow.explain(req["gateway"], req["region"])})

    async def clear(self, request: web.Request) -> web.Response:
        req = self._request(request)
        if req["state"] in TERMINAL:
            raise Refused(f"request {req['id']} is {req['state']}")
        out = self.store.request_clear(req["id"])
        self.workflow.wakeup.set()
        return web.json_response(out)

    async def retry(self, request: web.Request) -> web.Response:
        req = self._request(request)
        if req["state"] != "failed":
            raise Refused(f"request {req['id']} is {req['state']}, not failed")
        return web.json_response(self.workflow.retry(req["id"]))

    async def clear_region(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        gateway, region = arg(body, "gateway", noun="field"), arg(body, "region", noun="field")
        service = arg(body, "service", required=False, noun="field")
        if self.store.gateway(gateway) is None:
            raise NotFound(f"unknown gateway {gateway!r}")
        if self.store.region(region) is None:
            raise NotFound(f"unknown region {region!r}")
        out = [self.store.request_clear(r["id"]) for r in self.store.requests(open_only=True)
               if r["gateway"] == gateway and r["region"] == region and service in (None, r["service"])]
        self.workflow.wakeup.set()
        return web.json_response(out)


def serve(config: CenterConfig) -> int:
    """`xdpgw center`: serve until SIGTERM/SIGINT, then exit 0."""
    from control.config import parse_listen

    host, port = parse_listen(config.listen, "center.listen")
    center = Center(config)
    open_requests = len(center.store.requests(open_only=True))   # the store answers before we listen
    metrics = None
    if config.metrics is not None:
        from control.center.metrics import CenterCollector
        from control.metrics import MetricsServer

        metrics = MetricsServer(config.metrics.listen, CenterCollector(center.store, center.workflow.events))

    async def main() -> None:
        runner = web.AppRunner(center.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context(config.tls_cert, config.tls_key))
        await site.start()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        event(log, "center.up", listen=config.listen, scheme="https" if config.tls_cert else "http",
              store=config.db if config.store is None else config.store.url, replica=config.name, role=center.role,
              open_requests=open_requests)
        notify("READY=1")
        await done.wait()
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        if metrics is not None:
            metrics.close()
    center.store.close()
    event(log, "center.stopped")
    return 0

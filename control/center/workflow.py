"""The distribution request's state machine and the engine that drives it.

    requested -> target_chosen -> preparing -> prepared -> distributing -> active -> draining -> released
                                        (any step fails max_attempts times in a row) -> failed
    requested, target_chosen (a clear asked for before any VM was made) -> cleared

* requested:     score the data centers (control/center/scoring.py), record the target and the scores.
* target_chosen: -> preparing (recorded before the agent is called).
* preparing:     ship the service's master image to the target's agent if it lacks it, then
                 `prepare` (create the VMs, add them to its tables); the agent keys the work by
                 request id, so sending it again after a center restart does it once. The VMs
                 count in the target's load (store.hold_vms, idempotent per request).
* prepared:      -> distributing.
* distributing:  the source gateway's agent: `offload.set` (region, service, target's tunnel
                 endpoint and encap); idempotent too.
* active:        waits for a clear (the gateway's monitor says the region calmed down, or an
                 operator); then `offload.clear` on the source (new flows come home) and `drain`
                 on the target's agent (its VMs take no new flows; offloaded flows finish there);
                 -> draining, with the time of the clear (`cleared_at`).
* draining:      polls the target agent's `status` (every poll_s) until it says the request is
                 `drained` (or no longer knows it), or release_after seconds have passed since the
                 clear; then `release` (idempotent at the agent), its VMs no longer count in the
                 target's load -> released.
* A clear asked for before `active` ends the request at the next step, without distributing:
  cleared if no VM was made yet, else through draining and released.

Every transition is one write to the store (one SQLite transaction, or one compare-and-swap
of the request's key on the store interface); the engine only ever acts on what is in the
store, so a center restarted at any point, or a standby that became the leader, resumes
each open request at its state (a draining request keeps its clear time: release_after is
not restarted). A failed step is retried after retry_s * 2^(attempt-1) (capped at 10 s)."""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any, Callable, Protocol

from control.center import scoring
from control.center.store import TERMINAL, Store
from control.events import CenterEvents

log = logging.getLogger(__name__)

STATES = ("requested", "target_chosen", "preparing", "prepared", "distributing", "active", "draining", "released",
          "cleared", "failed")
POLL_S = 1.0        # a draining request's status poll


class NoTarget(RuntimeError):
    """No data center can take the request; `rows` has every candidate's exclusion."""

    def __init__(self, message: str, rows: list[dict]) -> None:
        super().__init__(message)
        self.rows = rows


class Agent(Protocol):
    async def call(self, command: str, **args: Any) -> Any: ...


AgentFactory = Callable[[str, str], Agent]


class Workflow:
    def __init__(self, store: Store, weights: dict[str, float], agent: AgentFactory, vms: int = 2,
                 max_attempts: int = 5, retry_s: float = 0.5, release_after: float = 300.0,
                 poll_s: float = POLL_S, now: Callable[[], Any] = scoring.now_utc) -> None:
        self.store = store
        self.weights = weights
        self.agent = agent
        self.vms = vms
        self.max_attempts = max_attempts
        self.retry_s = retry_s
        self.release_after = release_after
        self.poll_s = poll_s
        self.now = now
        self.polls: dict[int, float] = {}     # a draining request's next status poll (time.time())
        self.wakeup = asyncio.Event()
        self.inflight: set[int] = set()
        self.tasks: set[asyncio.Task] = set()
        self.may_act: Callable[[], bool] = lambda: True   # False once this replica is no longer the leader
        self.events = CenterEvents()          # step latencies, for the metrics

    # ---- target search -----------------------------------------------------
    def context(self, gateway: str, region: str) -> scoring.Context:
        gw = self.store.gateway(gateway)
        reg = self.store.region(region)
        source = self.store.datacenter(gw["datacenter"]) if gw else None
        return scoring.Context(region=reg, source=source, candidates=self.store.datacenters(), vms=self.vms,
                               now=self.now())

    def explain(self, gateway: str, region: str) -> list[dict]:
        return scoring.score(self.context(gateway, region), self.weights)

    def choose(self, gateway: str, region: str, service: str) -> tuple[str, list[dict]]:
        rows = self.explain(gateway, region)
        if self.store.image(service) is None:
            raise NoTarget(f"no master image for service {service!r}", rows)
        best = next((r for r in rows if r["eligible"]), None)
        if best is None:
            why = "; ".join(f"{r['name']}: {r['excluded']}" for r in rows) or "no data centers known"
            raise NoTarget(f"no data center can take region {region!r} service {service!r} ({why})", rows)
        return best["name"], rows

    # ---- the steps ---------------------------------------------------------
    def _target_agent(self, req: dict) -> tuple[dict, Agent]:
        dc = self.store.datacenter(req["target"])
        return dc, self.agent(dc["agent"], dc["agent_token"])

    def _source_agent(self, req: dict) -> Agent:
        gw = self.store.gateway(req["gateway"])
        return self.agent(gw["agent"], gw["agent_token"])

    async def step(self, req: dict) -> dict:
        """Carry out one transition of `req`; returns the request as stored after it."""
        rid, state, store = req["id"], req["state"], self.store
        if req["clear_requested"] and state in ("requested", "target_chosen"):
            return store.transition(rid, "cleared", "cleared before distribution")
        if req["clear_requested"] and state == "prepared":
            return await self._drain(req, time.time(), "cleared before distribution")
        if state == "requested":
            target, rows = self.choose(req["gateway"], req["region"], req["service"])
            return store.transition(rid, "target_chosen", f"target {target}", target=target,
                                    data={"scores": rows})
        if state == "target_chosen":
            return store.transition(rid, "preparing", f"preparing at {req['target']}")
        if state == "preparing":
            dc, agent = self._target_agent(req)
            image = store.image(req["service"], with_content=True)
            have = await agent.call("images")
            shipped = False
            if image["sha256"] not in {i.get("sha256") for i in have}:
                await agent.call("image.put", service=image["service"], name=image["name"], sha256=image["sha256"],
                                 content=base64.b64encode(image["content"]).decode())
                shipped = True
            result = await agent.call("prepare", request=rid, service=req["service"], image=image["sha256"],
                                      vms=self.vms)
            store.hold_vms(dc["name"], rid, self.vms)
            return store.transition(rid, "prepared", f"prepared at {dc['name']}",
                                    data={"prepare": result, "image_shipped": shipped})
        if state == "prepared":
            return store.transition(rid, "distributing", "distributing")
        if state == "distributing":
            dc = store.datacenter(req["target"])
            result = await self._source_agent(req).call("offload.set", region=req["region"], service=req["service"],
                                                        endpoint=dc["tunnel_endpoint"], encap=dc["encap"])
            return store.transition(rid, "active", f"offload to {dc['tunnel_endpoint']}",
                                    data={"offload": result, "active_at": time.time()})
        if state == "active":
            if not req["clear_requested"]:
                return req
            try:
                await self._source_agent(req).call("offload.clear", region=req["region"], service=req["service"])
            except Exception as exc:  # an offload that is already gone is cleared
                if "no offload" not in str(exc):
                    raise
            return await self._drain(req, time.time(), "offload cleared; offloaded flows finish at the target")
        if state == "draining":
            return await self._release_when_drained(req)
        return req

    async def _drain(self, req: dict, cleared_at: float, note: str) -> dict:
        """No new flows reach the target: its agent drains the request's VMs; release_after
        counts from `cleared_at`."""
        dc, agent = self._target_agent(req)
        result = await agent.call("drain", request=req["id"])
        return self.store.transition(req["id"], "draining", f"{note}; draining at {dc['name']}",
                                     data={"cleared_at": cleared_at, "drain": result})

    async def _release_when_drained(self, req: dict) -> dict:
        """Release the request's VMs once the target's agent says they are drained (or
        knows them no more), or release_after after the clear; else poll again later."""
        rid = req["id"]
        dc, agent = self._target_agent(req)
        deadline = req["data"]["cleared_at"] + self.release_after
        if time.time() < deadline:
            mine = (await agent.call("status")).get("requests", {}).get(str(rid))
            if mine is not None and mine.get("state") != "drained":
                self.polls[rid] = min(time.time() + self.poll_s, deadline)
                if req["attempts"]:      # failures count in a row: an answer ends the row
                    return self.store.transition(rid, "draining", f"{dc['name']} answers: {mine.get('state')}")
                return req
            why = "drained" if mine is not None else "unknown to the agent"
        else:
            why = "release_after"
        result = await agent.call("release", request=rid)
        self.store.hold_vms(dc["name"], rid, 0)
        self.polls.pop(rid, None)
        return self.store.transition(rid, "released", f"released at {dc['name']} ({why})",
                                     data={"release": result, "released_by": why, "released_at": time.time()})

    def waiting(self, req: dict, now: float) -> bool:
        """Nothing to do for `req` before a later `now`: active and not clearing, backing
        off after a failure, or draining until its next status poll."""
        return ((req["state"] == "active" and not req["clear_requested"]) or req["next_try_at"] > now
                or self.polls.get(req["id"], 0) > now)

    async def drive(self, rid: int) -> None:
        """Run `rid` forward until it waits (active, terminal) or a step fails (then schedule a retry)."""
        try:
            for _ in range(len(STATES) + 1):        # bounded: one pass through the states
                req = self.store.request(rid)
                if req is None or req["state"] in TERMINAL or self.waiting(req, time.time()) or not self.may_act():
                    return
                t0 = time.perf_counter()
                try:
                    after = await self.step(req)
                    self.events.steps.observe(time.perf_counter() - t0, req["state"], "ok")
                except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried
                    self.events.steps.observe(time.perf_counter() - t0, req["state"], "error")
                    attempts = req["attempts"] + 1
                    msg = f"{req['state']}: {exc}"
                    if attempts >= self.max_attempts:
                        self.store.record_failure(rid, msg, 0)
                        self.store.transition(rid, "failed", msg, error=msg, data={"failed_in": req["state"]})
                    else:
                        delay = min(10.0, self.retry_s * 2 ** (attempts - 1))
                        self.store.record_failure(rid, msg, time.time() + delay)
                    log.warning("request %s: %s (attempt %d)", rid, msg, attempts)
                    return
                if after["state"] == req["state"]:
                    return
        finally:
            self.inflight.discard(rid)

    def retry(self, rid: int) -> dict:
        """A failed request goes back to the state it failed in."""
        req = self.store.request(rid)
        back = req["data"].get("failed_in", "requested")
        out = self.store.transition(rid, back, "retry asked for")
        self.wakeup.set()
        return out

    def kick(self) -> None:
        """Drive every open request that is due and not already being driven (one task each)."""
        now = time.time()
        for req in self.store.requests(open_only=True):
            rid = req["id"]
            if rid in self.inflight or self.waiting(req, now):
                continue
            self.inflight.add(rid)
            task = asyncio.get_running_loop().create_task(self.drive(rid))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def run(self, stop: asyncio.Event, tick: float = 0.2) -> None:
        """Until `stop`: drive what is due; wake at once on news (a new request, a clear)."""
        try:
            while not stop.is_set():
                self.kick()
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), tick)
                except asyncio.TimeoutError:
                    pass
        finally:
            # a deposed leader must not finish a step its successor is taking over
            tasks = [t for t in self.tasks if not t.done()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def resume(self) -> int:
        """At start, or when this replica becomes the leader: every open request is due now
        (backoffs and status polls of a previous run are forgotten)."""
        self.polls.clear()
        return self.store.reset_backoffs()

    async def settle(self, timeout: float = 10.0) -> None:
        """For tests: drive until every open request waits for a clear (active, not clearing)
        or the time is up (a draining request is driven to released)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.kick()
            await asyncio.sleep(0.01)
            if not self.inflight and all(r["state"] == "active" and not r["clear_requested"]
                                         for r in self.store.requests(open_only=True)):
                return

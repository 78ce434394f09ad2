"""One center replica's part in the leader election (with a [store]: several replicas on
one etcd). The replica campaigns for `/xdpgw/center/leader` (a key under its lease,
control/store's `campaign`); while it leads it drives the workflow; when its lease is
lost it stops driving at once (in-flight steps are cancelled, no new write is made)
and campaigns again. A standby serves the whole API from the store (its writes are
compare-and-swaps there) and drives nothing. A new leader first makes every open
request due, so the requests its predecessor left half-way go on from their recorded
state; the agents key `prepare` by request id, so a repeated prepare creates nothing."""
from __future__ import annotations

import asyncio
import logging
import threading

from control.center.kvstore import LEADER_KEY
from control.center.workflow import Workflow
from control.logs import event
from control.store import Store as KeyValue

log = logging.getLogger(__name__)
RETRY_S = 1.0           # after a failed campaign (the store unreachable)
LOST_POLL_S = 0.05      # how often a leader looks at its lease's `lost` flag


class Replica:
    def __init__(self, kv: KeyValue, name: str, ttl_s: float, workflow: Workflow) -> None:
        self.kv = kv
        self.name = name
        self.ttl_s = ttl_s
        self.workflow = workflow
        self.role = "standby"
        self.terms = 0
        workflow.may_act = lambda: False

    def _campaign(self, loop: asyncio.AbstractEventLoop, won: asyncio.Future, give_up: threading.Event) -> None:
        """In a thread (campaign blocks until this replica leads, or `give_up`): hand the
        leadership to the loop, or give it back when nobody waits for it any more."""
        try:
            leadership = self.kv.campaign(LEADER_KEY, self.name, self.ttl_s, stop=give_up)
        except Exception as exc:  # noqa: BLE001 - reported to the loop, which retries (or has stopped)
            error = exc
            try:
                loop.call_soon_threadsafe(lambda: won.done() or won.set_exception(error))
            except RuntimeError:     # the loop is closed: the replica has stopped
                pass
            return

        def deliver() -> None:
            if won.done():
                threading.Thread(target=leadership.resign, daemon=True).start()
            else:
                won.set_result(leadership)
        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:         # the loop is closed: the replica has stopped
            leadership.resign()

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, lead, and campaign again, until `stop`."""
        loop = asyncio.get_running_loop()
        stopped = loop.create_task(stop.wait())
        give_up = threading.Event()
        try:
            while not stop.is_set():
                won: asyncio.Future = loop.create_future()
                threading.Thread(target=self._campaign, args=(loop, won, give_up), daemon=True,
                                 name="center-campaign").start()
                await asyncio.wait({won, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    give_up.set()
                    won.cancel()
                    return
                try:
                    leadership = won.result()
                except Exception as exc:  # noqa: BLE001 - the store is unreachable: try again
                    log.warning("center %s: campaign failed: %s", self.name, exc)
                    await asyncio.wait({stopped}, timeout=RETRY_S)
                    continue
                await self._lead(leadership, stop)
        finally:
            stopped.cancel()

    async def _lead(self, leadership, stop: asyncio.Event) -> None:
        self.role, self.terms = "leader", self.terms + 1
        self.workflow.may_act = lambda: not leadership.lost.is_set()
        due = self.workflow.resume()
        event(log, "center.leader", replica=self.name, open_requests=due)
        term = asyncio.Event()

        async def until_lost() -> None:
            while not (leadership.lost.is_set() or stop.is_set()):
                await asyncio.sleep(LOST_POLL_S)
            term.set()
            self.workflow.wakeup.set()
        watch = asyncio.get_running_loop().create_task(until_lost())
        try:
            await self.workflow.run(term)
        finally:
            watch.cancel()
            self.workflow.may_act = lambda: False
            self.role = "standby"
        if leadership.lost.is_set():
            event(log, "center.leadership_lost", replica=self.name)
        else:
            await asyncio.to_thread(leadership.resign)

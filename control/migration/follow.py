"""A gateway's watch of the VM records in the store: how every move, this
gateway's own included, reaches its forwarding.

It lists /xdpgw/vms/ once (a snapshot at a revision) and watches from the next
revision. A watch resumes by itself after a lost connection (from the last
revision it delivered); when that revision was compacted away meanwhile, the
follower lists again and applies the difference as one batch, so the gateway
never forwards on part of a snapshot. While the store cannot be reached the
gateway keeps forwarding with what it has and reports itself degraded
(`status()`: the store's URL, ok | degraded, the revision applied, since when).
That includes a gateway that starts while the store is unreachable: it comes up
on its config's locations, and its first list (and whatever must precede it,
`prepare`) happens when the store first answers, as after a reconnect.

What it delivered is also the gateway's copy of the VM records (`record`,
`by_mac`), which a migration reads instead of the store: a stale copy can only
make the migration's compare-and-swap fail, never write over a newer record."""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any, Callable

from control.logs import event
from control.migration.registry import VMS, Registry, VmRecord
from control.store.base import Compacted, Entry, Event, StoreError, Watch
from control.vms import Location

log = logging.getLogger(__name__)

# Applies records to the gateway as one batch; returns the names it could not apply here.
Apply = Callable[[list[VmRecord]], set[str]]
START_WAIT_S = 2.0   # a starting gateway's wait for the store before it comes up degraded on what it has


class Follower:
    """Keeps `apply` fed with every change of a VM's location. `known`: where the
    gateway has each VM now (default: where the registry says, i.e. nothing to
    apply at start). Every `probe_s` it checks the store and the watch, and
    renews the gateway's `membership` when its lease was lost."""

    def __init__(self, registry: Registry, apply: Apply, known: dict[str, Location] | None = None,
                 url: str = "", probe_s: float = 1.0, membership: "Membership | None" = None,
                 prepare: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.prepare = prepare
        self.membership = membership
        self.apply = apply
        self.url = url
        self.probe_s = probe_s
        self.known: dict[str, Location] = dict(known) if known is not None else \
            {r.name: r.where() for r in registry.vms()}
        self.revision = 0                    # the store revision this gateway has applied
        self.records: dict[str, VmRecord] = {}   # every VM's latest record seen here
        self.macs: dict[str, str] = {}           # MAC -> VM name, for announcements (checked against records)
        self.state = "ok"
        self.since = time.time()
        self.relists = 0
        self.lock = threading.RLock()        # one apply at a time: an event never interleaves a batch
        self.applied = threading.Condition(self.lock)
        self.watch: Watch | None = None
        self._listed = threading.Event()     # the first list is applied
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, wait_s: float = START_WAIT_S) -> bool:
        """Follow from a thread of its own: `prepare`, list and apply (the first batch),
        then watch. Waits up to `wait_s` for the first batch: True once it is applied;
        False if the store did not answer by then: the follower is degraded and the
        thread lists when the store answers."""
        self._thread = threading.Thread(target=self._run, name="xdpgw-follow", daemon=True)
        self._thread.start()
        if self._listed.wait(wait_s):
            return True
        self._set_state("degraded", f"no answer from the store within {wait_s:g} s of starting")
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
        if self.watch is not None:
            self.watch.cancel()

    def wait_applied(self, revision: int, timeout: float) -> bool:
        """Wait until the gateway has applied the store up to `revision`."""
        deadline = time.monotonic() + timeout
        with self.applied:
            while self.revision < revision:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.applied.wait(left)
        return True

    def record(self, name: str) -> VmRecord | None:
        with self.lock:
            return self.records.get(name)

    def by_mac(self, mac: str) -> VmRecord | None:
        mac = mac.lower()
        with self.lock:
            rec = self.records.get(self.macs.get(mac, ""))
            return rec if rec is not None and rec.mac == mac else None

    def by_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> VmRecord | None:
        """The VM one of whose addresses is `ip`, as this gateway's copy has it."""
        with self.lock:
            return next((r for r in self.records.values() if r.has_address(ip)), None)

    def apply_own(self, rec: VmRecord) -> bool:
        """Apply this gateway's own write now, without waiting for its watch event (which
        then finds it applied); False if it could not be applied here."""
        return rec.name not in self._take([rec], None)

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"url": self.url, "state": self.state, "revision": self.revision, "since": self.since,
                    "relists": self.relists}

    # ---- applying
    def _take(self, records: list[VmRecord], revision: int | None) -> set[str]:
        """Apply the records whose location differs from the gateway's, as one batch; those
        older than the copy's (already applied) are skipped. `revision`: the store revision
        the batch completes (None: one record, not the store up to it). Returns the failed names."""
        with self.applied:
            records = [r for r in records if r.name not in self.records or r.revision > self.records[r.name].revision]
            self.records.update((r.name, r) for r in records)
            self.macs.update((r.mac, r.name) for r in records if r.mac)
            changed = [r for r in records if self.known.get(r.name) != r.where()]
            failed: set[str] = set()
            if changed:
                try:
                    failed = self.apply(changed)
                except Exception:   # noqa: BLE001 - the watch must go on; a bug is logged with its traceback
                    log.exception("applying VM locations failed")
                    failed = {r.name for r in changed}
            for r in changed:
                if r.name not in failed:
                    self.known[r.name] = r.where()
            if revision is not None:
                self.revision = max(self.revision, revision)
                self.applied.notify_all()
            return failed

    def _relist(self) -> None:
        records, revision = self.registry.snapshot()
        with self.lock:
            if self.watch is not None:
                self.watch.cancel()
            listed = {r.name for r in records}
            self.records = {n: r for n, r in self.records.items() if n in listed}
            self.macs = {r.mac: n for n, r in self.records.items() if r.mac}
            self._take(records, revision)
            self.watch = self.registry.store.watch(VMS, revision + 1, self._on_event)

    def _on_event(self, ev: Event) -> None:
        if ev.kind == "put" and ev.value is not None:
            self._take([VmRecord.from_entry(Entry(ev.key, ev.value, ev.revision))], ev.revision)
        else:
            with self.applied:
                self.records.pop(ev.key[len(VMS):], None)
                self.revision = max(self.revision, ev.revision)
                self.applied.notify_all()

    # ---- the store's health and the watch's
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._listed.is_set():
                    self._check()
                else:
                    self.prepare()
                    self._relist()
                    self._listed.set()
                self._set_state("ok")
            except StoreError as exc:
                self._set_state("degraded", str(exc))
            except Exception:   # noqa: BLE001 - the loop must go on
                log.exception("store follower check failed")
            self._stop.wait(self.probe_s)

    def _check(self) -> None:
        watch = self.watch
        if watch is not None and not watch.stopped.is_set() and not watch.connected.is_set():
            # a request would take the store client's whole retry window to say so
            raise StoreError("the watch lost its connection to the store and is reconnecting")
        self.registry.store.revision()           # raises while the store is unreachable
        if self.membership is not None:
            self.membership.renew()
            self.membership.members()
        if watch is None or not watch.stopped.is_set():
            return
        if isinstance(watch.error, Compacted):
            # the history this gateway missed is gone: the whole state, in one batch
            with self.lock:
                self.relists += 1
            event(log, "store.relist", revision=self.revision, reason=str(watch.error))
            self._relist()
        else:
            with self.lock:
                self.watch = self.registry.store.watch(VMS, watch.revision, self._on_event)

    def _set_state(self, state: str, reason: str = "") -> None:
        with self.lock:
            if state == self.state:
                return
            self.state, self.since = state, time.time()
        event(log, f"store.{state}", logging.WARNING if state == "degraded" else logging.INFO, url=self.url,
              revision=self.revision, **({"reason": reason} if reason else {}))


GATEWAYS = "/xdpgw/gateways/"


class Membership:
    """This gateway's key /xdpgw/gateways/<name>, under a lease: present while the
    gateway is alive and reaches the store; `members()` lists the live gateways,
    `last_seen()` the list as the last look found it (the follower looks every probe)."""

    def __init__(self, store: Any, name: str, ttl_s: float = 5.0, info: dict[str, Any] | None = None) -> None:
        self.store = store
        self.name = name
        self.ttl_s = ttl_s
        self.info = dict(info or {})
        self.lease = None
        self.seen: list[str] | None = None

    def renew(self) -> None:
        """Join, or join again after the lease was lost (the store expired it while unreachable)."""
        if self.lease is not None and not self.lease.lost.is_set():
            return
        lease = self.store.lease(self.ttl_s)
        self.store.put(GATEWAYS + self.name, {"name": self.name, "since": time.time(), **self.info}, lease=lease.id)
        self.lease = lease

    def members(self) -> list[str]:
        try:
            self.seen = sorted(e.key[len(GATEWAYS):] for e in self.store.range(GATEWAYS)[0])
            return self.seen
        except StoreError:
            return [self.name]

    def last_seen(self) -> list[str]:
        return self.seen if self.seen is not None else self.members()

    def leave(self) -> None:
        if self.lease is not None:
            self.lease.revoke()
            self.lease = None

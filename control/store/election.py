"""Leader election on any store: the leader is whoever created the election key,
under its lease. Both backends use this; it needs only put_if, get, watch and lease."""
from __future__ import annotations

import logging
import threading

from control.store.base import Cancelled, Conflict, Event, Lease, Store, Unavailable

log = logging.getLogger(__name__)

_RECHECK_S = 0.5  # how often a waiting candidate looks at its stop event and lease


class Leadership:
    """Held while the election key is ours. `lost` is set when the lease is lost or the
    key is deleted or overwritten by someone else: stop acting as the leader then."""

    def __init__(self, store: Store, key: str, name: str, lease: Lease, revision: int) -> None:
        self.key = key
        self.name = name
        self.lease = lease
        self.revision = revision  # the revision at which this leadership began
        self.lost = lease.lost
        self._watch = store.watch(key, revision + 1, self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.key == self.key:
            log.warning("leadership of %s lost: the key was %sd", self.key, event.kind)
            self.lost.set()

    def resign(self) -> None:
        """Step down: the key goes with the lease, which wakes the other candidates."""
        self._watch.cancel()
        self.lease.revoke()


def campaign(store: Store, key: str, name: str, ttl_s: float, stop: threading.Event | None = None) -> Leadership:
    """Block until `name` leads the election `key`; raises Cancelled when `stop` is set
    first. While the store is unreachable it keeps trying."""
    lease = store.lease(ttl_s)
    try:
        while True:
            if stop is not None and stop.is_set():
                raise Cancelled(f"campaign for {key} stopped")
            if lease.lost.is_set():
                lease = store.lease(ttl_s)
            try:
                revision = store.put_if(key, {"name": name, "lease": lease.id}, 0, lease=lease.id)
                return Leadership(store, key, name, lease, revision)
            except Conflict:
                pass
            except Unavailable as exc:
                log.info("campaign for %s: %s", key, exc)
                _pause(stop, _RECHECK_S)
                continue
            _wait_for_delete(store, key, lease, stop)
    except BaseException:
        lease.revoke()
        raise


def _wait_for_delete(store: Store, key: str, lease: Lease, stop: threading.Event | None) -> None:
    """Return when the current holder's key is gone (or something else needs a look)."""
    try:
        holder = store.get(key)
    except Unavailable:
        _pause(stop, _RECHECK_S)
        return
    if holder is None:
        return
    gone = threading.Event()
    watch = store.watch(key, holder.mod_revision + 1,
                        lambda e: gone.set() if e.key == key and e.kind == "delete" else None)
    try:
        while not gone.wait(_RECHECK_S):
            if watch.stopped.is_set() or lease.lost.is_set() or (stop is not None and stop.is_set()):
                return
    finally:
        watch.cancel()


def _pause(stop: threading.Event | None, seconds: float) -> None:
    (stop or threading.Event()).wait(seconds)

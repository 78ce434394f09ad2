"""What both store backends share: the records, the errors, and the background
threads of a watch and a lease (the backends supply only how to talk to their engine)."""
from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from control.store.election import Leadership

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(RuntimeError):
    """The store refused or failed an operation; the message says why."""


class Compacted(StoreError):
    """A watch's start revision was compacted away: re-list (range) and watch from the list's revision."""

    def __init__(self, revision: int, compact_revision: int) -> None:
        super().__init__(f"revision {revision} was compacted (history starts at {compact_revision}): re-list")
        self.revision = revision
        self.compact_revision = compact_revision


class Unavailable(StoreError):
    """The store cannot be reached now (retryable)."""


class Conflict(StoreError):
    """A compare-and-swap lost: the key's mod_revision was not the expected one."""


class Cancelled(StoreError):
    """A campaign gave up because its caller's stop event was set."""


def within(seconds: float, call: Callable[[], T]) -> T:
    """call()'s result, if the store answers it within `seconds`; Unavailable if not (the
    call goes on in a thread of its own and its late answer is dropped). For a start-up
    that must not wait a whole request window for a store that is down."""
    answer: list = []

    def run() -> None:
        try:
            answer.append((True, call()))
        except BaseException as exc:   # noqa: BLE001 - handed to the caller below
            answer.append((False, exc))

    thread = threading.Thread(target=run, name="store-first-answer", daemon=True)
    thread.start()
    thread.join(seconds)
    if not answer:
        raise Unavailable(f"no answer from the store within {seconds:g} s")
    ok, value = answer[0]
    if not ok:
        raise value
    return value


@dataclass(frozen=True)
class StoreTLS:
    """TLS to the store (etcd): the CA that signed the members' certificates, and
    optionally a client certificate and key (mutual TLS)."""
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict
    mod_revision: int  # the store revision of the last write of this key


@dataclass(frozen=True)
class Event:
    kind: str  # "put" | "delete"
    key: str
    value: dict | None  # None for delete
    revision: int


def encode(value: dict) -> str:
    """A value as the JSON text both backends store."""
    if not isinstance(value, dict):
        raise TypeError(f"a store value is a JSON object (dict), got {type(value).__name__}")
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key above every key starting with `prefix` (etcd's range_end for a
    prefix); b"\\0" for the empty prefix, which etcd reads as "to the end"."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class Watch:
    """Events under a prefix, delivered in revision order to `on_event` from one
    background thread. `revision` is the next revision it will deliver: a backend
    resumes from it after a lost connection, so nothing is lost or delivered twice.
    It stops on cancel(), on Compacted (then `error` holds it), or when `on_event`
    raises (then `error` holds that exception). `connected` is set while it is
    receiving from the store (cleared while it reconnects)."""

    def __init__(self, prefix: str, start_revision: int, on_event: Callable[[Event], None],
                 run: Callable[[Watch], None]) -> None:
        if start_revision < 1:
            raise ValueError(f"start_revision must be >= 1, got {start_revision}")
        self.prefix = prefix
        self.revision = start_revision
        self.error: BaseException | None = None
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self._on_event = on_event
        self._cancel = threading.Event()
        self._cancel_hooks: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._main, args=(run,), name=f"store-watch {prefix}", daemon=True)
        self._thread.start()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait_cancel(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if the watch was cancelled meanwhile."""
        return self._cancel.wait(seconds)

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Call `hook` on cancel(), e.g. to close the socket a backend is blocked reading."""
        self._cancel_hooks.append(hook)

    def deliver(self, events: list[Event]) -> None:
        """Hand `events` (those of whole revisions, in order) to on_event, skipping
        what was already delivered, and advance `revision` past them."""
        for event in events:
            if event.revision >= self.revision and not self._cancel.is_set():
                self._on_event(event)
        if events:
            self.revision = max(self.revision, events[-1].revision + 1)

    def cancel(self) -> None:
        """Stop; returns when the thread has ended (at once when called from on_event)."""
        self._cancel.set()
        for hook in list(self._cancel_hooks):
            try:
                hook()
            except OSError:
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(10.0)

    def _main(self, run: Callable[[Watch], None]) -> None:
        try:
            run(self)
        except BaseException as exc:  # reported through `error`, the thread has no caller
            if not self._cancel.is_set():
                self.error = exc
                if not isinstance(exc, Compacted):
                    log.warning("store watch of %s stopped: %s", self.prefix, exc)
        finally:
            self.connected.clear()
            self.stopped.set()


class Lease:
    """A lease granted by the store, kept alive by a background thread every third of
    its TTL until revoke(). `lost` is set when the store says the lease is gone, or
    when no keep-alive got through for a whole TTL (the store has expired it by then):
    a lost lease stays lost; grant a new one."""

    def __init__(self, lease_id: int, ttl_s: float, keep_alive: Callable[[], bool],
                 revoke: Callable[[], None]) -> None:
        self.id = lease_id
        self.ttl_s = ttl_s
        self.lost = threading.Event()
        self._keep_alive = keep_alive  # False: the lease no longer exists; raises Unavailable if it can't tell
        self._revoke = revoke
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"store-lease {lease_id}", daemon=True)
        self._thread.start()

    def revoke(self) -> None:
        """Stop keeping it alive and revoke it (deleting its keys); best effort when the
        store is unreachable. Once is enough: later calls do nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(10.0)
        try:
            self._revoke()
        except StoreError as exc:
            log.info("lease %d not revoked (it expires by itself): %s", self.id, exc)

    def _run(self) -> None:
        last_ok = time.monotonic()
        pause = self.ttl_s / 3
        while not self._stop.wait(pause):
            try:
                alive = self._keep_alive()
            except StoreError as exc:
                if time.monotonic() - last_ok >= self.ttl_s:
                    log.warning("lease %d lost: no keep-alive for %.1f s: %s", self.id, self.ttl_s, exc)
                    self.lost.set()
                    return
                pause = self.ttl_s / 10  # retry sooner: the TTL is running out
                continue
            pause = self.ttl_s / 3
            if not alive:
                log.warning("lease %d lost: the store expired it", self.id)
                self.lost.set()
                return
            last_ok = time.monotonic()


class Held:
    """The watches and leases a store object handed out, ended when it closes."""

    def __init__(self) -> None:
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._leases: weakref.WeakSet[Lease] = weakref.WeakSet()

    def watch(self, watch: Watch) -> Watch:
        self._watches.add(watch)
        return watch

    def lease(self, lease: Lease) -> Lease:
        self._leases.add(lease)
        return lease

    def release(self) -> None:
        for watch in list(self._watches):
            watch.cancel()
        for lease in list(self._leases):
            if not lease.lost.is_set():
                lease.revoke()


class Store(Protocol):
    """See control/store/__init__.py."""

    def get(self, key: str) -> Entry | None: ...
    def range(self, prefix: str) -> tuple[list[Entry], int]: ...
    def put(self, key: str, value: dict, lease: int | None = None) -> int: ...
    def put_if(self, key: str, value: dict, mod_revision: int, lease: int | None = None) -> int: ...
    def delete(self, key: str, mod_revision: int | None = None) -> bool: ...
    def delete_range(self, start: str, end: str) -> int: ...
    def keys(self, prefix: str, limit: int) -> tuple[list[str], int]: ...
    def watch(self, prefix: str, start_revision: int, on_event: Callable[[Event], None]) -> Watch: ...
    def lease(self, ttl_s: float) -> Lease: ...
    def campaign(self, election: str, name: str, ttl_s: float,
                 stop: threading.Event | None = None) -> Leadership: ...
    def revision(self) -> int: ...
    def compact(self, revision: int) -> None: ...
    def close(self) -> None: ...

"""The store on one machine: a SQLite file (WAL), nothing else to run.

It keeps etcd's model so that callers cannot tell the backends apart: one revision
counter bumped by every write, each key's mod_revision, a `changes` table holding
the history that watches read (trimmed to the last HISTORY revisions, which is
this backend's compaction), and leases whose expiry is checked on access: every
operation, every watch poll and every keep-alive first deletes the keys of expired
leases, as one revision. Watchers in this process are woken at each write; those in
other processes (sharing the file) find new revisions by polling."""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable

from control.storage import open_db, transaction
from control.store import election
from control.store.base import (Compacted, Conflict, Entry, Event, Held, Lease, StoreError, Watch, encode,
                                prefix_end)

HISTORY = 10000  # revisions a watch can resume from
_POLL_S = 0.05  # a watcher's look for writes by other processes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, mod_revision INTEGER NOT NULL, lease INTEGER);
CREATE TABLE IF NOT EXISTS store_changes (
    revision INTEGER NOT NULL, key TEXT NOT NULL, value TEXT, PRIMARY KEY (revision, key));
CREATE TABLE IF NOT EXISTS store_leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS store_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO store_meta VALUES ('revision', 0), ('compacted', 0);
"""


class _Signal:
    """Wakes this process's watchers of one database file at each write. A generation
    count, not a held lock, so a write never waits for a watcher's read."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0

    def notify(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Return at the next write after generation `seen` was read, or after `timeout`."""
        with self._cond:
            if self.generation == seen:
                self._cond.wait(timeout)


# One signal per database file, shared by the stores of this process that open it.
_signals: weakref.WeakValueDictionary[str, _Signal] = weakref.WeakValueDictionary()
_signals_lock = threading.Lock()


def _signal(path: str) -> _Signal:
    with _signals_lock:
        signal = _signals.get(path)
        if signal is None:
            signal = _signals[path] = _Signal()
        return signal


class SqliteStore:
    """The Store of control/store/__init__.py on a SQLite file at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = open_db(path, _SCHEMA)
        self._lock = threading.RLock()
        self._changed = _signal(path if path == ":memory:" else os.path.realpath(path))
        self._held = Held()

    # ------------------------------------------------------------ reads

    def get(self, key: str) -> Entry | None:
        with self._lock:
            self._expire()
            row = self._db.execute("SELECT key, value, mod_revision FROM store_kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else _entry(row)

    def range(self, prefix: str) -> tuple[list[Entry], int]:
        with self._lock:
            self._expire()
            with transaction(self._db):  # one snapshot for the rows and the revision
                rows = self._db.execute(
                    "SELECT key, value, mod_revision FROM store_kv WHERE substr(key, 1, ?) = ? ORDER BY key",
                    (len(prefix), prefix)).fetchall()
                revision = self._meta("revision")
        return [_entry(r) for r in rows], revision

    def keys(self, prefix: str, limit: int) -> tuple[list[str], int]:
        end = _end(prefix)
        with self._lock:
            self._expire()
            with transaction(self._db):
                keys = [r[0] for r in self._db.execute(
                    "SELECT key FROM store_kv WHERE key >= ? AND key < ? ORDER BY key LIMIT ?",
                    (prefix, end, max(0, limit)))]
                count = self._db.execute("SELECT COUNT(*) FROM store_kv WHERE key >= ? AND key < ?",
                                         (prefix, end)).fetchone()[0]
        return keys, int(count)

    def revision(self) -> int:
        with self._lock:
            self._expire()
            return self._meta("revision")

    # ------------------------------------------------------------ writes

    def put(self, key: str, value: dict, lease: int | None = None) -> int:
        return self._write(key, encode(value), None, lease)

    def put_if(self, key: str, value: dict, mod_revision: int, lease: int | None = None) -> int:
        return self._write(key, encode(value), mod_revision, lease)

    def delete(self, key: str, mod_revision: int | None = None) -> bool:
        with self._lock:
            self._expire()
            with transaction(self._db, immediate=True):
                current = self._mod_revision(key)
                if mod_revision is not None and current != mod_revision:
                    raise Conflict(f"{key}: mod_revision is {current}, not {mod_revision}")
                if current == 0:
                    return False
                revision = self._bump()
                self._remove(key, revision)
        self._notify()
        return True

    def delete_range(self, start: str, end: str) -> int:
        with self._lock:
            self._expire()
            with transaction(self._db, immediate=True):
                revision = self._meta("revision") + 1
                # the watches' record of the deletes, then the one DELETE (both by the primary key's index)
                deleted = self._db.execute("INSERT INTO store_changes SELECT ?, key, NULL FROM store_kv"
                                           " WHERE key >= ? AND key < ?", (revision, start, end)).rowcount
                if deleted == 0:
                    return 0
                self._bump()
                self._db.execute("DELETE FROM store_kv WHERE key >= ? AND key < ?", (start, end))
        self._notify()
        return deleted

    def _write(self, key: str, text: str, mod_revision: int | None, lease: int | None) -> int:
        with self._lock:
            self._expire()
            with transaction(self._db, immediate=True):
                if mod_revision is not None and (current := self._mod_revision(key)) != mod_revision:
                    raise Conflict(f"{key}: mod_revision is {current}, not {mod_revision}")
                if lease is not None and self._db.execute(
                        "SELECT 1 FROM store_leases WHERE id = ?", (lease,)).fetchone() is None:
                    raise StoreError(f"lease {lease} not found (expired or revoked)")
                revision = self._bump()
                self._db.execute("INSERT OR REPLACE INTO store_kv VALUES (?, ?, ?, ?)", (key, text, revision, lease))
                self._db.execute("INSERT INTO store_changes VALUES (?, ?, ?)", (revision, key, text))
                if revision % 1000 == 0:
                    self._compact(revision - HISTORY)
        self._notify()
        return revision

    def compact(self, revision: int) -> None:
        """Drop the history before `revision`: watches from earlier revisions get Compacted."""
        with self._lock, transaction(self._db, immediate=True):
            self._compact(revision)

    # ------------------------------------------------------------ watch

    def watch(self, prefix: str, start_revision: int, on_event: Callable[[Event], None]) -> Watch:
        return self._held.watch(Watch(prefix, start_revision, on_event, self._run_watch))

    def _run_watch(self, watch: Watch) -> None:
        watch.on_cancel(self._notify)
        watch.connected.set()
        while not watch.cancelled:
            seen = self._changed.generation  # read before the changes, so no write slips in between
            events = self._changes_since(watch.prefix, watch.revision)
            if events:
                watch.deliver(events)
            else:
                self._changed.wait(seen, _POLL_S)

    def _changes_since(self, prefix: str, revision: int) -> list[Event]:
        with self._lock:
            self._expire()
            with transaction(self._db):
                compacted = self._meta("compacted")
                if revision < compacted:
                    raise Compacted(revision, compacted)
                rows = self._db.execute(
                    "SELECT revision, key, value FROM store_changes WHERE revision >= ? AND substr(key, 1, ?) = ?"
                    " ORDER BY revision, key", (revision, len(prefix), prefix)).fetchall()
        return [Event("delete" if r["value"] is None else "put", r["key"],
                      None if r["value"] is None else json.loads(r["value"]), r["revision"]) for r in rows]

    # ------------------------------------------------------------ leases and election

    def lease(self, ttl_s: float) -> Lease:
        if not ttl_s > 0:
            raise ValueError(f"a lease TTL must be > 0, got {ttl_s}")
        ttl_s = float(ttl_s)
        with self._lock:
            lease_id = self._db.execute("INSERT INTO store_leases (ttl, expires) VALUES (?, ?)",
                                        (ttl_s, time.time() + ttl_s)).lastrowid
        return self._held.lease(Lease(lease_id, ttl_s, lambda: self._keep_alive(lease_id),
                                      lambda: self._revoke(lease_id)))

    def _keep_alive(self, lease_id: int) -> bool:
        with self._lock:
            self._expire()
            return self._db.execute("UPDATE store_leases SET expires = ? + ttl WHERE id = ?",
                                    (time.time(), lease_id)).rowcount == 1

    def _revoke(self, lease_id: int) -> None:
        with self._lock:
            with transaction(self._db, immediate=True):
                self._drop_leases([lease_id])
        self._notify()

    def campaign(self, election_key: str, name: str, ttl_s: float,
                 stop: threading.Event | None = None) -> election.Leadership:
        return election.campaign(self, election_key, name, ttl_s, stop)

    def close(self) -> None:
        """Cancel the watches, revoke the leases still held, close the file."""
        self._held.release()
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ inside a transaction

    def _expire(self) -> None:
        """Delete the expired leases and their keys (one revision), if there are any."""
        now = time.time()
        soonest = self._db.execute("SELECT MIN(expires) FROM store_leases").fetchone()[0]
        if soonest is None or soonest > now:
            return
        with transaction(self._db, immediate=True):
            expired = [r[0] for r in self._db.execute("SELECT id FROM store_leases WHERE expires <= ?", (now,))]
            self._drop_leases(expired)
        self._notify()

    def _drop_leases(self, lease_ids: list[int]) -> None:
        keys = [r[0] for lease_id in lease_ids
                for r in self._db.execute("SELECT key FROM store_kv WHERE lease = ? ORDER BY key", (lease_id,))]
        self._db.executemany("DELETE FROM store_leases WHERE id = ?", [(i,) for i in lease_ids])
        if keys:
            revision = self._bump()
            for key in keys:
                self._remove(key, revision)

    def _remove(self, key: str, revision: int) -> None:
        self._db.execute("DELETE FROM store_kv WHERE key = ?", (key,))
        self._db.execute("INSERT INTO store_changes VALUES (?, ?, NULL)", (revision, key))

    def _bump(self) -> int:
        revision = self._meta("revision") + 1
        self._db.execute("UPDATE store_meta SET value = ? WHERE name = 'revision'", (revision,))
        return revision

    def _compact(self, revision: int) -> None:
        if revision > self._meta("compacted"):
            self._db.execute("DELETE FROM store_changes WHERE revision < ?", (revision,))
            self._db.execute("UPDATE store_meta SET value = ? WHERE name = 'compacted'", (revision,))

    def _meta(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM store_meta WHERE name = ?", (name,)).fetchone()[0])

    def _mod_revision(self, key: str) -> int:
        row = self._db.execute("SELECT mod_revision FROM store_kv WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def _notify(self) -> None:
        self._changed.notify()


def _end(prefix: str) -> str:
    """The smallest text above every key starting with `prefix` (keys compare as UTF-8 bytes)."""
    if not prefix:
        raise ValueError("a key prefix must not be empty")
    return prefix_end(prefix.encode()).decode("utf-8", "surrogateescape")


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(row["key"], json.loads(row["value"]), int(row["mod_revision"]))

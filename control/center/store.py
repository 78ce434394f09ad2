"""The center's state in SQLite (WAL): data centers, gateways, regions, master images,
distribution requests and each request's history. Every state change is one
committed transaction, so a restarted center finds every request where it was.

A data center's record keeps its running `load` (VMs in use) and `held` ({request id:
VMs}): the VMs prepared for each open request, so that counting them in and returning
them are idempotent per request (a step repeated after a restart changes the load once)."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from typing import Any

from control.storage import open_db, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS datacenters (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gateways (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS regions (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    service TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    content BLOB NOT NULL, PRIMARY KEY (service, name));
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway TEXT NOT NULL, region TEXT NOT NULL, service TEXT NOT NULL,
    state TEXT NOT NULL, target TEXT, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    clear_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, next_try_at REAL NOT NULL DEFAULT 0,
    data TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS requests_open ON requests (state);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request INTEGER NOT NULL, at REAL NOT NULL,
    state TEXT NOT NULL, note TEXT);
"""

TERMINAL = ("cleared", "released", "failed")


def restarted(dc: dict, old: dict | None) -> dict:
    """The config's record of a data center over the stored one: the running load and the
    VMs held for requests survive a restart."""
    if old is None or "load" not in old:
        return dc
    return {**dc, "load": max(dc.get("load", 0), old["load"]), "held": old.get("held", {})}


def holding(dc: dict, request: int, vms: int) -> dict | None:
    """`dc` with `vms` VMs held for `request` (0: none) and its load changed by the
    difference; None when that is already so."""
    held = dict(dc.get("held", {}))
    before = held.pop(str(request), 0)
    if before == vms:
        return None
    if vms:
        held[str(request)] = vms
    return {**dc, "held": held, "load": max(0, dc["load"] + vms - before)}


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self.db = open_db(path, SCHEMA)
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # ---- catalogue -------------------------------------------------------
    def _put(self, table: str, name: str, data: dict) -> None:
        with self.lock:
            self.db.execute(f"INSERT INTO {table} (name, data) VALUES (?, ?) "
                            "ON CONFLICT(name) DO UPDATE SET data = excluded.data", (name, json.dumps(data)))

    def _get(self, table: str, name: str) -> dict | None:
        with self.lock:
            row = self.db.execute(f"SELECT data FROM {table} WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row["data"])

    def _all(self, table: str) -> list[dict]:
        with self.lock:
            return [json.loads(r["data"]) for r in self.db.execute(f"SELECT data FROM {table} ORDER BY name")]

    def put_datacenter(self, dc: dict) -> None:
        with self.lock:
            self._put("datacenters", dc["name"], restarted(dc, self.datacenter(dc["name"])))

    def datacenter(self, name: str) -> dict | None:
        return self._get("datacenters", name)

    def datacenters(self) -> list[dict]:
        return self._all("datacenters")

    def set_datacenter(self, dc: dict) -> None:
        """Replace a data center's record as given (an operator's load)."""
        self._put("datacenters", dc["name"], dc)

    def hold_vms(self, name: str, request: int, vms: int) -> None:
        """The data center's load counts `vms` VMs for `request` (0: gives them back); idempotent."""
        with self.lock:
            dc = self.datacenter(name)
            new = None if dc is None else holding(dc, request, vms)
            if new is not None:
                self._put("datacenters", name, new)

    def put_gateway(self, gw: dict) -> None:
        self._put("gateways", gw["name"], gw)

    def gateway(self, name: str) -> dict | None:
        return self._get("gateways", name)

    def put_region(self, region: dict) -> None:
        self._put("regions", region["name"], region)

    def region(self, name: str) -> dict | None:
        return self._get("regions", name)

    def put_image(self, service: str, name: str, content: bytes) -> dict:
        digest = hashlib.sha256(content).hexdigest()
        with self.lock:
            self.db.execute("INSERT INTO images (service, name, sha256, size, content) VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT(service, name) DO UPDATE SET sha256 = excluded.sha256, "
                            "size = excluded.size, content = excluded.content",
                            (service, name, digest, len(content), content))
        return {"service": service, "name": name, "sha256": digest, "size": len(content)}

    def image(self, service: str, with_content: bool = False) -> dict | None:
        """The service's master image (the last one put)."""
        with self.lock:
            row = self.db.execute("SELECT * FROM images WHERE service = ? ORDER BY rowid DESC LIMIT 1",
                                  (service,)).fetchone()
        if row is None:
            return None
        out = {"service": row["service"], "name": row["name"], "sha256": row["sha256"], "size": row["size"]}
        if with_content:
            out["content"] = bytes(row["content"])
        return out

    def images(self) -> list[dict]:
        with self.lock:
            return [{"service": r["service"], "name": r["name"], "sha256": r["sha256"], "size": r["size"]}
                    for r in self.db.execute("SELECT service, name, sha256, size FROM images ORDER BY service")]

    # ---- requests --------------------------------------------------------
    @staticmethod
    def _request(row: sqlite3.Row) -> dict[str, Any]:
        out = dict(row)
        out["data"] = json.loads(out["data"])
        out["clear_requested"] = bool(out["clear_requested"])
        return out

    def create_request(self, gateway: str, region: str, service: str, data: dict) -> tuple[dict, bool]:
        """A new request, or the open one of the same (gateway, region, service): (request, created)."""
        now = time.time()
        with self.lock, transaction(self.db, immediate=True):
            row = self.db.execute(
                "SELECT * FROM requests WHERE gateway = ? AND region = ? AND service = ? "
                f"AND state NOT IN ({','.join('?' * len(TERMINAL))}) ORDER BY id LIMIT 1",
                (gateway, region, service, *TERMINAL)).fetchone()
            if row is not None and not row["clear_requested"]:
                return self._request(row), False
            cur = self.db.execute(
                "INSERT INTO requests (gateway, region, service, state, created_at, updated_at, data) "
                "VALUES (?, ?, ?, 'requested', ?, ?, ?)", (gateway, region, service, now, now, json.dumps(data)))
            rid = cur.lastrowid
            self.db.execute("INSERT INTO history (request, at, state, note) VALUES (?, ?, 'requested', ?)",
                            (rid, now, json.dumps(data)))
        return self.request(rid), True

    def request(self, rid: int) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM requests WHERE id = ?", (rid,)).fetchone()
        return None if row is None else self._request(row)

    def requests(self, open_only: bool = False) -> list[dict]:
        q = "SELECT * FROM requests"
        args: tuple = ()
        if open_only:
            q += f" WHERE state NOT IN ({','.join('?' * len(TERMINAL))})"
            args = TERMINAL
        with self.lock:
            return [self._request(r) for r in self.db.execute(q + " ORDER BY id", args)]

    def state_counts(self) -> dict[str, int]:
        """Requests per state (only states some request is in)."""
        with self.lock:
            return {r["state"]: r["n"] for r in
                    self.db.execute("SELECT state, COUNT(*) AS n FROM requests GROUP BY state ORDER BY state")}

    def transition(self, rid: int, state: str, note: str | None = None, **fields: Any) -> dict:
        """Move a request to `state` (resetting attempts and error), with other columns
        (target, data: merged) set in the same transaction, and log it."""
        now = time.time()
        with self.lock, transaction(self.db, immediate=True):
            row = self.db.execute("SELECT data FROM requests WHERE id = ?", (rid,)).fetchone()
            data = json.loads(row["data"])
            data.update(fields.pop("data", {}))
            sets = ["state = ?", "attempts = 0", "error = NULL", "next_try_at = 0", "updated_at = ?", "data = ?"]
            args: list[Any] = [state, now, json.dumps(data)]
            for key, value in fields.items():
                sets.append(f"{key} = ?")
                args.append(value)
            self.db.execute(f"UPDATE requests SET {', '.join(sets)} WHERE id = ?", (*args, rid))
            self.db.execute("INSERT INTO history (request, at, state, note) VALUES (?, ?, ?, ?)",
                            (rid, now, state, note))
        return self.request(rid)

    def record_failure(self, rid: int, error: str, next_try_at: float) -> dict:
        now = time.time()
        with self.lock:
            self.db.execute("UPDATE requests SET attempts = attempts + 1, error = ?, next_try_at = ?, updated_at = ? "
                            "WHERE id = ?", (error, next_try_at, now, rid))
            state = self.db.execute("SELECT state FROM requests WHERE id = ?", (rid,)).fetchone()["state"]
            self.db.execute("INSERT INTO history (request, at, state, note) VALUES (?, ?, ?, ?)",
                            (rid, now, state, f"error: {error}"))
        return self.request(rid)

    def request_clear(self, rid: int) -> dict:
        with self.lock:
            self.db.execute("UPDATE requests SET clear_requested = 1, next_try_at = 0, updated_at = ? WHERE id = ?",
                            (time.time(), rid))
            self.db.execute("INSERT INTO history (request, at, state, note) VALUES "
                            "(?, ?, (SELECT state FROM requests WHERE id = ?), 'clear requested')",
                            (rid, time.time(), rid))
        return self.request(rid)

    def reset_backoffs(self) -> int:
        """Every open request is due now (a new center forgets the backoffs of the last one)."""
        with self.lock:
            return self.db.execute(f"UPDATE requests SET next_try_at = 0 WHERE state NOT IN "
                                   f"({','.join('?' * len(TERMINAL))})", TERMINAL).rowcount

    def history(self, rid: int) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.db.execute(
                "SELECT at, state, note FROM history WHERE request = ? ORDER BY id", (rid,))]

"""The VM registry: what the gateway knows of every VM that survives a restart.

SQLite (control/storage.py). Per VM: id, IP, MAC, tenant, location (a host port or a
remote endpoint), state, and which gateways hold entries for it; a history of
every migration (when, from, to, how detected, convergence time) and of every
announcement that was refused (spoofed, conflicting, flapping), which is how
those are "reported".

VM states move only along TRANSITIONS; anything else raises InvalidTransition
and changes nothing."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from control.storage import journal_mode, open_db, transaction

STATES = ("running", "migrating", "stopped", "lost")
TRANSITIONS: frozenset[tuple[str, str]] = frozenset({
    ("running", "migrating"), ("migrating", "running"),     # a live migration, and its end
    ("migrating", "lost"),                                  # the move failed and the old place is gone
    ("running", "stopped"), ("stopped", "running"),
    ("running", "lost"), ("lost", "running"),               # its port vanished / it showed up again
    ("lost", "migrating"), ("stopped", "migrating"),
})

SCHEMA = """
CREATE TABLE IF NOT EXISTS vm (
    name TEXT PRIMARY KEY, vm_id INTEGER, ip TEXT, mac TEXT, tenant TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('port', 'tunnel')), location TEXT NOT NULL,
    state TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vm_holder (
    vm TEXT NOT NULL REFERENCES vm(name), gateway TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (vm, gateway));
CREATE TABLE IF NOT EXISTS migration (
    id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, at REAL NOT NULL,
    from_kind TEXT, from_location TEXT, to_kind TEXT NOT NULL, to_location TEXT NOT NULL,
    detected_by TEXT NOT NULL, convergence_ms REAL, gateways TEXT NOT NULL, status TEXT NOT NULL,
    detail TEXT);
CREATE TABLE IF NOT EXISTS event (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, vm TEXT, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out."""


class InvalidTransition(RegistryError):
    pass


class UnknownVm(RegistryError, LookupError):
    """The registry holds no VM of that name."""


@dataclass(frozen=True)
class VmRecord:
    name: str
    vm_id: int | None
    ip: str | None
    mac: str | None
    tenant: str | None
    kind: str            # "port" | "tunnel"
    location: str        # ifname or endpoint address
    state: str
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Registry:
    """Thread-safe (one connection, one lock: writes are a few per migration)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.db = open_db(path, SCHEMA)
        self.journal_mode = journal_mode(self.db)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # ---- VMs
    def sync_vm(self, name: str, vm_id: int | None, ip: str | None, mac: str | None, tenant: str | None,
                kind: str, location: str) -> VmRecord:
        """Register a configured VM. A VM already known keeps its location and state
        (it may have moved before a restart); identity fields follow the config."""
        now = time.time()
        with self.lock:
            self.db.execute(
                "INSERT INTO vm (name, vm_id, ip, mac, tenant, kind, location, state, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?) ON CONFLICT(name) DO UPDATE SET "
                "vm_id = excluded.vm_id, ip = excluded.ip, mac = excluded.mac, tenant = excluded.tenant",
                (name, vm_id, ip, mac, tenant, kind, location, now))
            return self.vm(name)

    def vm(self, name: str) -> VmRecord:
        with self.lock:
            row = self.db.execute("SELECT * FROM vm WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownVm(f"unknown VM {name!r}")
        return VmRecord(**dict(row))

    def vms(self) -> list[VmRecord]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM vm ORDER BY name").fetchall()
        return [VmRecord(**dict(r)) for r in rows]

    def by_mac(self, mac: str) -> VmRecord | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM vm WHERE mac = ?", (mac.lower(),)).fetchone()
        return VmRecord(**dict(row)) if row else None

    def at_location(self, kind: str, location: str) -> list[VmRecord]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM vm WHERE kind = ? AND location = ?", (kind, location)).fetchall()
        return [VmRecord(**dict(r)) for r in rows]

    def transition(self, name: str, state: str) -> VmRecord:
        """Move a VM to `state`; InvalidTransition if the step is not in TRANSITIONS."""
        if state not in STATES:
            raise InvalidTransition(f"VM {name!r}: unknown state {state!r}; states: {list(STATES)}")
        with self.lock:
            old = self.vm(name).state
            if (old, state) not in TRANSITIONS:
                raise InvalidTransition(f"VM {name!r}: {old} -> {state} is not a valid transition")
            self.db.execute("UPDATE vm SET state = ?, updated_at = ? WHERE name = ?", (state, time.time(), name))
            return self.vm(name)

    def set_location(self, name: str, kind: str, location: str, mac: str | None = None) -> VmRecord:
        if kind not in ("port", "tunnel"):
            raise RegistryError(f"location kind {kind!r} must be port or tunnel")
        with self.lock:
            self.vm(name)
            self.db.execute("UPDATE vm SET kind = ?, location = ?, mac = COALESCE(?, mac), updated_at = ? "
                            "WHERE name = ?", (kind, location, mac.lower() if mac else None, time.time(), name))
            return self.vm(name)

    # ---- which gateways hold entries for a VM
    def set_holders(self, name: str, gateways: list[str]) -> None:
        now = time.time()
        with self.lock, transaction(self.db):
            self.db.execute("DELETE FROM vm_holder WHERE vm = ? AND gateway NOT IN (%s)"
                            % ",".join("?" * len(gateways)), (name, *gateways))
            for g in gateways:
                self.db.execute("INSERT OR IGNORE INTO vm_holder (vm, gateway, since) VALUES (?, ?, ?)",
                                (name, g, now))

    def holders(self, name: str) -> list[str]:
        with self.lock:
            rows = self.db.execute("SELECT gateway FROM vm_holder WHERE vm = ? ORDER BY gateway", (name,)).fetchall()
        return [r[0] for r in rows]

    # ---- history
    def record_migration(self, vm: str, from_loc: tuple[str, str] | None, to_loc: tuple[str, str],
                         detected_by: str, convergence_ms: float | None, gateways: dict[str, Any],
                         status: str = "ok", detail: str = "", at: float | None = None) -> int:
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO migration (vm, at, from_kind, from_location, to_kind, to_location, detected_by, "
                "convergence_ms, gateways, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (vm, at or time.time(), *(from_loc or (None, None)), *to_loc, detected_by, convergence_ms,
                 json.dumps(gateways), status, detail))
            return int(cur.lastrowid)

    def history(self, vm: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        q = "SELECT * FROM migration" + (" WHERE vm = ?" if vm else "") + " ORDER BY id DESC LIMIT ?"
        with self.lock:
            rows = self.db.execute(q, ((vm,) if vm else ()) + (int(limit),)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["gateways"] = json.loads(d["gateways"])
            out.append(d)
        return out[::-1]

    def record_event(self, kind: str, detail: dict[str, Any], vm: str | None = None) -> int:
        with self.lock:
            cur = self.db.execute("INSERT INTO event (at, vm, kind, detail) VALUES (?, ?, ?, ?)",
                                  (time.time(), vm, kind, json.dumps(detail, default=str)))
            return int(cur.lastrowid)

    def events(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        q = "SELECT * FROM event" + (" WHERE kind = ?" if kind else "") + " ORDER BY id DESC LIMIT ?"
        with self.lock:
            rows = self.db.execute(q, ((kind,) if kind else ()) + (int(limit),)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["detail"] = json.loads(d["detail"])
            out.append(d)
        return out[::-1]

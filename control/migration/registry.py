"""The VM registry: what the gateways know of every VM, kept in the store
(control/store: SQLite on one machine, etcd for a fleet), so it survives a
restart and every gateway reads the same.

Per VM, one key (/xdpgw/vms/<name>): its addresses (both families), MAC, tenant, location (a port on a host,
or a tunnel endpoint), state, the gateways that held it at its last write, and
the last move (by whom, how detected, when): a migration is one compare-and-swap
write of that key, which every gateway applies from its watch. Beside it, a
history of every migration (when, from, to, how detected, convergence time) and
of every announcement that was refused (spoofed, conflicting, flapping), which is
how those are "reported". Both are bounded by a Retention, enforced as each row is
written.

VM states move only along TRANSITIONS; anything else raises InvalidTransition
and changes nothing."""
from __future__ import annotations

import ipaddress
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from control.config.schema import GatewayConfig
from control.storage import journal_mode
from control.store.base import Conflict, Entry, Store, StoreError
from control.vms import Location

log = logging.getLogger(__name__)

VMS = "/xdpgw/vms/"
SYNC_WRITERS = 8      # registrations in flight at once when a gateway starts
MIGRATIONS = "/xdpgw/migrations/"
EVENTS = "/xdpgw/events/"

STATES = ("running", "migrating", "stopped", "lost")
TRANSITIONS: frozenset[tuple[str, str]] = frozenset({
    ("running", "migrating"), ("migrating", "running"),     # a live migration, and its end
    ("migrating", "lost"),                                  # the move failed and the old place is gone
    ("running", "stopped"), ("stopped", "running"),
    ("running", "lost"), ("lost", "running"),               # its port vanished / it showed up again
    ("lost", "migrating"), ("stopped", "migrating"),
})


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
    ips: tuple[str, ...]  # the VM's own addresses, both families: what its announcements may claim
    mac: str | None
    tenant: str | None
    kind: str            # "port" | "tunnel"
    location: str        # ifname or endpoint address
    state: str
    updated_at: float
    host: str | None = None
    revision: int = 0                    # the store revision of the record's last write
    holders: tuple[str, ...] = ()
    move: dict[str, Any] | None = field(default=None, compare=False)   # the last move: by, detected_by, t0_ns

    @classmethod
    def from_entry(cls, entry: Entry) -> "VmRecord":
        v = entry.value
        loc = Location.from_dict(v)
        kind, where = ("tunnel", str(loc.tunnel)) if loc.tunnel is not None else ("port", loc.port)
        # a record written before VMs had several addresses holds one, as "ip"
        ips = tuple(v["ips"]) if "ips" in v else (v["ip"],) if v.get("ip") else ()
        return cls(v["name"], v.get("vm_id"), ips, loc.mac, v.get("tenant"), kind, where, v["state"],
                   v["updated_at"], loc.host, entry.mod_revision, tuple(v.get("holders", ())), v.get("move"))

    def has_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether `ip` is one of the VM's addresses."""
        return any(ipaddress.ip_address(a) == ip for a in self.ips)

    def where(self) -> Location:
        return Location.from_dict({"host": self.host, "mac": self.mac, self.kind: self.location})

    def value(self, **changes: Any) -> dict[str, Any]:
        """The record as stored, with `changes` (location fields, state, holders, move)."""
        v = {"name": self.name, "vm_id": self.vm_id, "ips": list(self.ips), "tenant": self.tenant, "state": self.state,
             "holders": list(self.holders), "move": self.move, **self.where().as_dict()}
        v.update(changes)
        v["updated_at"] = time.time()
        return v

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("holders", "move")}


@dataclass(frozen=True)
class VmIdentity:
    """A configured VM as the registry registers it (Registry.sync_vm's arguments)."""
    name: str
    vm_id: int | None
    ips: tuple[str, ...]
    mac: str | None
    tenant: str | None
    kind: str            # "port" | "tunnel"
    location: str
    host: str | None = None


def _location_value(kind: str, location: str, mac: str | None, host: str | None) -> dict[str, Any]:
    if kind not in ("port", "tunnel"):
        raise RegistryError(f"location kind {kind!r} must be port or tunnel")
    return {"host": host if kind == "port" else None, "port": location if kind == "port" else None,
            "tunnel": location if kind == "tunnel" else None, "mac": mac.lower() if mac else None}


@dataclass(frozen=True)
class Retention:
    """What the store keeps of each history (migrations; refused announcements), fleet-wide:
    the newest `rows` rows, none older than `max_age_s` (0: no age limit)."""
    rows: int = GatewayConfig.history_rows
    max_age_s: float = GatewayConfig.history_max_age

    @property
    def trim_to(self) -> int:
        """How many rows a trim leaves: a tenth below the bound, so that the writes after
        it find room and a trim (two requests) happens once in rows/10 writes, not at each."""
        return self.rows - self.rows // 10


class Registry:
    """The VMs, history and refusals in `store` (a Store, or the path of a SQLite file
    that becomes one); `gateway` names the writer in history and event keys; the
    histories are kept within `retention`.
    Thread-safe: every write is one store operation (VM records by compare-and-swap)."""

    def __init__(self, store: Store | str, gateway: str = "", retention: Retention = Retention()) -> None:
        if isinstance(store, str):
            from control.store.sqlite import SqliteStore

            store = SqliteStore(store)
            self._owned = True
        else:
            self._owned = False
        self.store = store
        self.gateway = gateway
        self.retention = retention
        path = getattr(store, "path", None)
        self.path = path or ""
        self.journal_mode = _journal_mode(path) if path else None
        self._seq = itertools.count()
        self.lock = threading.RLock()

    def close(self) -> None:
        if self._owned:
            self.store.close()

    # ---- VMs
    def sync_vm(self, name: str, vm_id: int | None, ips: Sequence[str], mac: str | None, tenant: str | None,
                kind: str, location: str, host: str | None = None) -> VmRecord:
        """Register a configured VM. A VM already known keeps its location and state
        (it may have moved before a restart); identity fields follow the config."""
        return self.register(VmIdentity(name, vm_id, tuple(ips), mac, tenant, kind, location, host))

    def register(self, vm: VmIdentity) -> VmRecord:
        """sync_vm of a VmIdentity."""
        return self._sync(vm, self.store.get(VMS + vm.name))

    def sync_vms(self, vms: Sequence[VmIdentity]) -> list[VmRecord]:
        """Register configured VMs as sync_vm does, from one read of every record: a
        gateway starting with many VMs writes only those the store lacks or has
        with another identity, instead of a round trip per VM; in the order given."""
        entries = {e.key[len(VMS):]: e for e in self.store.range(VMS)[0]}
        # the writes in parallel: each waits for the store's commit, which the store shares between them
        with ThreadPoolExecutor(SYNC_WRITERS) as pool:
            return list(pool.map(lambda vm: self._sync(vm, entries.get(vm.name)), vms))

    def _sync(self, vm: VmIdentity, entry: Entry | None) -> VmRecord:
        """sync_vm with the VM's record as last read (`entry`; None: not in the store)."""
        where = _location_value(vm.kind, vm.location, vm.mac, vm.host)
        key = VMS + vm.name
        for _ in range(8):            # another gateway may register the same VM at the same moment
            try:
                if entry is None:
                    value = {"name": vm.name, "vm_id": vm.vm_id, "ips": list(vm.ips), "tenant": vm.tenant,
                             "state": "running", "holders": [], "move": None, **where, "updated_at": time.time()}
                    return VmRecord.from_entry(Entry(key, value, self.store.put_if(key, value, 0)))
                rec = VmRecord.from_entry(entry)
                mac = vm.mac.lower() if vm.mac else rec.mac
                if (rec.ips, rec.tenant, rec.mac) == (vm.ips, vm.tenant, mac):
                    return rec
                value = rec.value(ips=list(vm.ips), tenant=vm.tenant, mac=mac)
                return VmRecord.from_entry(Entry(key, value, self.store.put_if(key, value, entry.mod_revision)))
            except Conflict:
                entry = self.store.get(key)
        raise RegistryError(f"VM {vm.name!r}: could not register it (the record kept changing)")

    def vm(self, name: str) -> VmRecord:
        entry = self.store.get(VMS + name)
        if entry is None:
            raise UnknownVm(f"unknown VM {name!r}")
        return VmRecord.from_entry(entry)

    def snapshot(self) -> tuple[list[VmRecord], int]:
        """Every VM and the store revision they were read at."""
        entries, revision = self.store.range(VMS)
        return [VmRecord.from_entry(e) for e in entries], revision

    def vms(self) -> list[VmRecord]:
        return self.snapshot()[0]

    def by_mac(self, mac: str) -> VmRecord | None:
        mac = mac.lower()
        return next((r for r in self.vms() if r.mac == mac), None)

    def at_location(self, kind: str, location: str) -> list[VmRecord]:
        return [r for r in self.vms() if (r.kind, r.location) == (kind, location)]

    def transition(self, name: str, state: str) -> VmRecord:
        """Move a VM to `state`; InvalidTransition if the step is not in TRANSITIONS."""
        if state not in STATES:
            raise InvalidTransition(f"VM {name!r}: unknown state {state!r}; states: {list(STATES)}")
        rec = self.vm(name)
        if (rec.state, state) not in TRANSITIONS:
            raise InvalidTransition(f"VM {name!r}: {rec.state} -> {state} is not a valid transition")
        self.store.put_if(VMS + name, rec.value(state=state), rec.revision)
        return self.vm(name)

    def set_location(self, name: str, kind: str, location: str, mac: str | None = None,
                     host: str | None = None) -> VmRecord:
        rec = self.vm(name)
        self.store.put_if(VMS + name, rec.value(**_location_value(kind, location, mac or rec.mac, host)),
                          rec.revision)
        return self.vm(name)

    def move(self, rec: VmRecord, to: Location, move: dict[str, Any], holders: list[str]) -> VmRecord:
        """The migration: `rec`'s VM is at `to` now, state running; one compare-and-swap
        on the revision `rec` was read at (Conflict if the VM was written since).
        Returns the record as written, with its new revision."""
        value = rec.value(state="running", holders=list(holders), move=move, **to.as_dict())
        return VmRecord.from_entry(Entry(VMS + rec.name, value, self.store.put_if(VMS + rec.name, value,
                                                                                   rec.revision)))

    # ---- which gateways hold entries for a VM
    def set_holders(self, name: str, gateways: list[str]) -> None:
        rec = self.vm(name)
        if list(rec.holders) != sorted(gateways):
            self.store.put_if(VMS + name, rec.value(holders=sorted(gateways)), rec.revision)

    def holders(self, name: str) -> list[str]:
        return list(self.vm(name).holders)

    # ---- history
    def _key(self, prefix: str, at_ns: int) -> str:
        # time first: keys sort in the order they were written, across gateways, and
        # the rows older than a time are one key range
        return f"{prefix}{at_ns:020d}-{self.gateway}-{next(self._seq)}"

    def _append(self, prefix: str, row: dict[str, Any]) -> int:
        """Write a history row, then hold the history to the retention: the rows older than
        max_age_s are one range delete; past `rows`, the oldest go down to trim_to. The
        check is one request (the oldest key and the count); a failed prune is logged and
        left to the next write, the row stays written."""
        revision = self.store.put(self._key(prefix, time.time_ns()), row)
        try:
            self._prune(prefix)
        except StoreError as exc:
            log.warning("history %s not pruned (the next write tries again): %s", prefix, exc)
        return revision

    def _prune(self, prefix: str) -> None:
        """Hold the history under `prefix` (MIGRATIONS or EVENTS) to the retention."""
        r = self.retention
        oldest, count = self.store.keys(prefix, 1)
        if r.max_age_s and oldest:
            cutoff = f"{prefix}{int((time.time() - r.max_age_s) * 1e9):020d}"   # above older keys only
            if oldest[0] < cutoff:
                count -= self.store.delete_range(prefix, cutoff)
        if count > r.rows:
            old, _ = self.store.keys(prefix, count - r.trim_to)
            if old:
                self.store.delete_range(prefix, old[-1] + "\0")

    def record_migration(self, vm: str, from_loc: tuple[str, str] | None, to_loc: tuple[str, str],
                         detected_by: str, convergence_ms: float | None, gateways: dict[str, Any],
                         status: str = "ok", detail: str = "", at: float | None = None) -> int:
        row = {"vm": vm, "at": at or time.time(), "from_kind": (from_loc or (None, None))[0],
               "from_location": (from_loc or (None, None))[1], "to_kind": to_loc[0], "to_location": to_loc[1],
               "detected_by": detected_by, "convergence_ms": convergence_ms, "gateways": gateways,
               "status": status, "detail": detail, "gateway": self.gateway}
        return self._append(MIGRATIONS, row)

    def history(self, vm: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return _rows(self.store.range(MIGRATIONS)[0], lambda r: vm is None or r["vm"] == vm, limit)

    def record_event(self, kind: str, detail: dict[str, Any], vm: str | None = None) -> int:
        return self._append(EVENTS, {"at": time.time(), "vm": vm, "kind": kind, "detail": _jsonable(detail),
                                     "gateway": self.gateway})

    def events(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return _rows(self.store.range(EVENTS)[0], lambda r: kind is None or r["kind"] == kind, limit)


def _rows(entries: list[Entry], keep: Any, limit: int) -> list[dict[str, Any]]:
    """The last `limit` kept rows, oldest first, each with its id (the revision it was written at)."""
    rows = [{"id": e.mod_revision, **e.value} for e in entries if keep(e.value)]
    return rows[-int(limit):] if limit > 0 else []


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: v if v is None or isinstance(v, (str, int, float, bool, list, dict)) else str(v)
            for k, v in detail.items()}


def _journal_mode(path: str) -> str | None:
    """The SQLite file's journal mode (WAL persists in the file, so a second connection sees it)."""
    try:
        db = sqlite3.connect(path)
        try:
            return journal_mode(db)
        finally:
            db.close()
    except sqlite3.Error:
        return None

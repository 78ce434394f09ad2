"""Migration-aware forwarding: one path from "a VM is somewhere else now" to
"every gateway points at its new place".

Sources (all end in MigrationManager.announce or .move):
  - the dataplane: ebpf/vmport.c sees a gratuitous ARP, RARP or unsolicited NA
    on a host port (control/migration/watcher.py);
  - netlink: the kernel learns the VM's own address with its MAC on a VM port;
  - explicit: `xdpgw vm move` / the local API (`vm.move`).

An announcement is, in this order: rate-limited (per sender MAC, plus a global
bucket); validated against the registry (the MAC must be a VM's, and the IP,
when there is one, one of that VM's addresses, of either family: a GARP or an
unsolicited NA for any of them moves it, one claiming another address is
reported as spoofed and dropped);
ignored if the VM is already there; refused as a flap if it would take the VM
back to the port it left less than `hold_down` seconds ago; refused as a
conflict if another port claimed the same VM within `conflict_window`; refused
(held down) if the VM moved less than `hold_down` ago. Refusals are recorded in
the registry's event table (`xdpgw vm events`), never applied.

Applying: one compare-and-swap write of the VM's record in the store (its new
location, state running, the gateways live now, how and when it was detected),
checked first against this gateway's own forwarding so a location that cannot
be served here is refused before anyone sees it. The record and the live
gateways come from this gateway's watched copy of the store
(control/migration/follow.py), so the write is the announcement's one store
round trip; a copy that is behind only makes the compare-and-swap fail, and the
store is read then. This gateway applies its own write as soon as it succeeds
(its watch event then finds it applied), every other gateway from its watch;
the call returns with the convergence time from the announcement (the kernel's
timestamp of the frame, CLOCK_MONOTONIC) to this gateway's map update. Two
gateways writing one VM at once: the second write loses its compare-and-swap
and is reported as a conflict, like two ports claiming it."""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from control.events import GatewayEvents
from control.logs import event
from control.migration.follow import Follower, Membership
from control.migration.registry import Registry, RegistryError, VmRecord
from control.store.base import Conflict, StoreError
from control.vms import Location

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
KINDS = ("garp", "rarp", "na", "netlink", "explicit", "defrag")


class MigrationError(RuntimeError):
    """A move that could not be carried out (the message says why)."""


@dataclass(frozen=True)
class Announcement:
    kind: str                  # one of KINDS
    mac: str
    ip: IPAddress | None
    port: str                  # the host port (ifname) it arrived on
    ts_ns: int                 # CLOCK_MONOTONIC ns when it was seen


@dataclass
class Outcome:
    result: str                # applied | current | ignored | spoofed | unknown | rate_limited | flap | conflict | held_down | failed
    vm: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, "vm": self.vm, **self.detail}


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _VmTrack:
    claims: dict[str, float] = field(default_factory=dict)     # port -> last claim (s, monotonic)
    moved_at: float | None = None
    left_port: str | None = None


class _Lost(Exception):
    """Another writer changed the VM's location first (the compare-and-swap lost)."""

    def __init__(self, rec: VmRecord) -> None:
        super().__init__(f"{rec.name} was moved to {rec.where()} by {(rec.move or {}).get('by', 'another writer')} "
                         "first; not applied")
        self.rec = rec


class MigrationManager:
    """Thread-safe; one per gateway daemon.

    `move_local(name, port=, mac=, tunnel=, host=, revision=)` re-points the VM on
    this gateway (Gateway.move_vm); its watch of the registry calls it for every
    location change. `check_local` (same arguments, no revision) checks a new
    location against this gateway and returns it as a Location, before the write.
    `known`: where the gateway has each VM now (default: where the registry says).
    `membership`: this gateway's live key; the live gateways are recorded with each move. `host_of(port)`: the
    own host a port is on. Each migration's convergence time goes to `events`. `prepare`: what
    must happen before the first list of the store (Follower), e.g. registering the VMs."""

    def __init__(self, registry: Registry, gateway_name: str, move_local: Callable[..., dict],
                 check_local: Callable[..., Location] | None = None, known: dict[str, Location] | None = None,
                 hold_down: float = 2.0, conflict_window: float = 0.5, rate: float = 20.0, burst: float = 10.0,
                 global_rate: float = 1000.0,
                 clock: Callable[[], int] = time.monotonic_ns, max_tracked: int = 4096,
                 events: GatewayEvents | None = None, membership: Membership | None = None,
                 host_of: Callable[[str], str | None] = lambda port: None, store_url: str = "",
                 prepare: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.gateway_name = gateway_name
        self.move_local = move_local
        self.check_local = check_local
        self.hold_down = hold_down
        self.conflict_window = conflict_window
        self.rate, self.burst = rate, burst
        self.clock = clock
        self.max_tracked = max_tracked
        self.events = events
        self.members = membership.last_seen if membership is not None else lambda: [gateway_name]
        self.host_of = host_of
        self.lock = threading.RLock()
        self.buckets: dict[str, TokenBucket] = {}
        self.global_bucket = TokenBucket(global_rate, global_rate, self._now())
        self.track: dict[str, _VmTrack] = {}
        self.counts: dict[str, int] = {}
        self.follower = Follower(registry, self._apply_records, known, url=store_url, membership=membership,
                                 prepare=prepare)
        self.follower.start()

    def _now(self) -> float:
        return self.clock() / 1e9

    def close(self) -> None:
        self.follower.stop()

    # ---- announcements -------------------------------------------------
    def announce(self, a: Announcement) -> Outcome:
        with self.lock:
            out = self._decide(a)
            self.counts[out.result] = self.counts.get(out.result, 0) + 1
            if out.result in ("spoofed", "flap", "conflict", "held_down"):
                self.registry.record_event(out.result, {"port": a.port, "mac": a.mac, "ip": str(a.ip) if a.ip else None,
                                                        "kind": a.kind, **out.detail}, vm=out.vm)
            elif out.result == "rate_limited" and self.counts[out.result] % 100 == 1:
                self.registry.record_event("rate_limited", {"port": a.port, "mac": a.mac, "kind": a.kind,
                                                            "total": self.counts[out.result]})
            return out

    def _decide(self, a: Announcement) -> Outcome:
        now = a.ts_ns / 1e9
        wall = self._now()
        mac = a.mac.lower()
        if not self.global_bucket.take(wall):
            return Outcome("rate_limited", detail={"scope": "global"})
        bucket = self.buckets.get(mac)
        if bucket is None:
            if len(self.buckets) >= self.max_tracked:
                self.buckets.clear()
            bucket = self.buckets[mac] = TokenBucket(self.rate, self.burst, wall)
        if not bucket.take(wall):
            return Outcome("rate_limited", detail={"scope": "mac"})
        rec = self.follower.by_mac(mac) or self.registry.by_mac(mac)
        if rec is None:
            return Outcome("unknown", detail={"reason": f"no VM has MAC {mac}"})
        if a.ip is not None and not rec.has_address(a.ip):
            if a.kind == "netlink":     # the kernel learnt another address of the VM: no claim
                return Outcome("ignored", rec.name, {"reason": f"neighbour {a.ip} is not {rec.name}'s address"})
            owner = self.follower.by_address(a.ip)
            claim = f"{a.ip} is the address of {owner.name}" if owner else f"{a.ip} is no VM's address"
            return Outcome("spoofed", rec.name, {"reason": f"{claim}, not one of {rec.name}'s "
                                                           f"({', '.join(rec.ips) or 'none'}) whose MAC is {mac}",
                                                 "owner": owner.name if owner else None})
        track = self.track.setdefault(rec.name, _VmTrack())
        others = {p: t for p, t in track.claims.items() if p != a.port and now - t <= self.conflict_window}
        track.claims[a.port] = now
        if rec.kind == "port" and rec.location == a.port and rec.host == self.host_of(a.port):
            return Outcome("current", rec.name)
        # hold_down 0 holds nothing down, also when another gateway's move was applied here
        # after this announcement was seen (a moved_at later than `now`)
        recently_moved = self.hold_down > 0 and track.moved_at is not None and now - track.moved_at < self.hold_down
        if recently_moved and a.port == track.left_port:
            return Outcome("flap", rec.name, {"reason": f"{rec.name} left {a.port} "
                                                        f"{(now - track.moved_at) * 1000:.0f} ms ago; held down "
                                                        f"for {self.hold_down:g} s", "at": rec.location})
        if others:
            return Outcome("conflict", rec.name, {"reason": f"ports {sorted(others)} and {a.port} both claim "
                                                            f"{rec.name}; not applied", "at": rec.location,
                                                  "claims": sorted([*others, a.port])})
        if recently_moved:
            return Outcome("held_down", rec.name, {"reason": f"{rec.name} moved "
                                                             f"{(now - track.moved_at) * 1000:.0f} ms ago",
                                                   "at": rec.location})
        try:
            result = self._apply(rec.name, port=a.port, mac=mac, tunnel=None, detected_by=a.kind, t0_ns=a.ts_ns,
                                 host=self.host_of(a.port))
        except _Lost as lost:
            return Outcome("conflict", rec.name, {"reason": str(lost), "at": lost.rec.location,
                                                  "claims": sorted({lost.rec.location, a.port})})
        except (MigrationError, RegistryError, StoreError) as exc:
            return Outcome("failed", rec.name, {"reason": str(exc)})
        return Outcome("applied", rec.name, result)

    # ---- explicit moves (CLI / API / defrag) ---------------------------
    def move(self, name: str, port: str | None = None, mac: str | None = None, tunnel: str | None = None,
             source: str = "explicit", host: str | None = None) -> dict[str, Any]:
        if (port is None) == (tunnel is None):
            raise MigrationError("vm move: give exactly one of port or tunnel")
        if host is not None and port is None:
            raise MigrationError("vm move: host goes with port (a tunnel is an endpoint, on no host)")
        with self.lock:
            try:
                return self._apply(name, port=port, mac=mac, tunnel=tunnel, detected_by=source, t0_ns=self.clock(),
                                   host=host if host is not None or port is None else self.host_of(port))
            except _Lost as lost:
                raise MigrationError(str(lost)) from None
            except StoreError as exc:
                raise MigrationError(f"the store: {exc}") from None

    # ---- the one apply path --------------------------------------------
    def _apply(self, name: str, port: str | None, mac: str | None, tunnel: str | None, detected_by: str,
               t0_ns: int, host: str | None = None) -> dict[str, Any]:
        reg = self.registry
        before = self.follower.record(name) or reg.vm(name)
        old = (before.kind, before.location)
        new = ("port", port) if port is not None else ("tunnel", str(tunnel))
        try:
            to = self._check(name, port, mac or before.mac, tunnel, host)
        except Exception as exc:   # noqa: BLE001 - reported, the VM stays where it was
            reg.record_migration(name, old, new, detected_by, None, {self.gateway_name: f"error: {exc}"},
                                 status="failed", detail=str(exc))
            raise MigrationError(f"{self.gateway_name}: {exc}") from None
        move = {"by": self.gateway_name, "detected_by": detected_by, "t0_ns": t0_ns, "at": time.time(),
                "from": before.where().as_dict()}
        members = sorted(set(self.members()) | {self.gateway_name})
        write_ns = self.clock()
        for _ in range(3):
            try:
                written = reg.move(before, to, move, members)
                break
            except Conflict:
                latest = reg.vm(name)
                if latest.where() != before.where():
                    raise _Lost(latest) from None
                before = latest          # a write that did not move it (identity, state): try again
        else:
            raise MigrationError(f"{name}: its record kept changing; not applied")
        revision = written.revision
        written_ns = self.clock()
        applied = self.follower.apply_own(written)
        t1_ns = self.clock()
        convergence_ms = round((t1_ns - t0_ns) / 1e6, 3)
        if self.events is not None:
            self.events.convergence.observe((t1_ns - t0_ns) / 1e9)
        gateways = {g: ("ok" if applied else "pending") if g == self.gateway_name else "watching" for g in members}
        status = "ok" if applied else "partial"
        mid_ = reg.record_migration(name, old, new, detected_by, convergence_ms, gateways, status=status)
        # where the time went: announcement -> the write, the write (the store's round trip), -> applied here
        event(log, "vm.moved", vm=name, **{"from": old[1], "to": new[1]}, by=detected_by, ms=convergence_ms,
              before_write_ms=round((write_ns - t0_ns) / 1e6, 3), write_ms=round((written_ns - write_ns) / 1e6, 3),
              apply_ms=round((t1_ns - written_ns) / 1e6, 3), status=status, revision=revision)
        track = self.track.setdefault(name, _VmTrack())
        track.moved_at, track.left_port = t0_ns / 1e9, old[1] if old[0] == "port" else None
        return {"vm": name, "from": old[1], "to": new[1], "detected_by": detected_by,
                "convergence_ms": convergence_ms, "gateways": gateways, "status": status, "migration": mid_,
                "revision": revision, "applied_at": t1_ns / 1e9}

    def _check(self, name: str, port: str | None, mac: str | None, tunnel: str | None,
               host: str | None) -> Location:
        if self.check_local is not None:
            return self.check_local(name, port=port, mac=mac, tunnel=tunnel, host=host)
        return Location(host, port, mac.lower() if mac else None,
                        ipaddress.ip_address(tunnel) if tunnel is not None else None)

    def _apply_records(self, records: list[VmRecord]) -> set[str]:
        """The watch's batch: re-point each VM here; the names that could not be."""
        failed = set()
        now = self._now()
        for rec in records:
            where = rec.where()
            try:
                self.move_local(rec.name, port=where.port, mac=where.mac,
                                tunnel=str(where.tunnel) if where.tunnel is not None else None,
                                host=where.host, revision=rec.revision)
            except Exception as exc:   # noqa: BLE001 - one VM's failure must not stop the others
                failed.add(rec.name)
                event(log, "vm.apply_failed", logging.WARNING, vm=rec.name, to=str(where), revision=rec.revision,
                      error=str(exc))
                continue
            if (rec.move or {}).get("by") != self.gateway_name:
                # another gateway's move holds announcements down here too (attribute stores only:
                # this runs in the watch's thread while an announcement may hold self.lock)
                track = self.track.setdefault(rec.name, _VmTrack())
                frm = (rec.move or {}).get("from") or {}
                track.moved_at, track.left_port = now, frm.get("port") if frm.get("tunnel") is None else None
        return failed

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"outcomes": dict(self.counts), "store": self.follower.status(), "hold_down_s": self.hold_down,
                    "conflict_window_s": self.conflict_window}


def convergence_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and p90 of the convergence times of successful migrations."""
    values = sorted(h["convergence_ms"] for h in history if h.get("convergence_ms") is not None
                    and h.get("status") in ("ok", "partial"))
    if not values:
        return {"count": 0}

    def pct(q: float) -> float:
        k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
        return values[k]

    return {"count": len(values), "median_ms": pct(0.5), "p90_ms": pct(0.9), "max_ms": values[-1]}

"""Migration-aware forwarding: one path from "a VM is somewhere else now" to
"every gateway points at its new place".

Sources (all end in MigrationManager.announce or .move):
  - the dataplane: ebpf/vmport.c sees a gratuitous ARP, RARP or unsolicited NA
    on a host port (control/migration/watcher.py);
  - netlink: the kernel learns the VM's own address with its MAC on a VM port;
  - explicit: `xdpgw vm move` / the local API (`vm.move`).

An announcement is, in this order: rate-limited (per sender MAC, plus a global
bucket); validated against the registry (the MAC must be a VM's, and the IP,
when there is one, that VM's: else it is reported as spoofed and dropped);
ignored if the VM is already there; refused as a flap if it would take the VM
back to the port it left less than `hold_down` seconds ago; refused as a
conflict if another port claimed the same VM within `conflict_window`; refused
(held down) if the VM moved less than `hold_down` ago. Refusals are recorded in
the registry's event table (`xdpgw vm events`), never applied.

Applying: registry running -> migrating, the local gateway re-points the VM
(Gateway.move_vm: only the location entry changes, so flows pinned to the VM id
follow it), every peer gateway gets `migration.peer_apply` over its control
socket, in parallel; then the registry gets the new location, holders, state
running, and a history row with the convergence time: from the announcement
(the kernel's timestamp of the frame, CLOCK_MONOTONIC) to the last gateway's
acknowledgement."""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from control.events import GatewayEvents
from control.logs import event
from control.migration.registry import InvalidTransition, Registry, RegistryError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
KINDS = ("garp", "rarp", "na", "netlink", "explicit", "peer", "defrag")


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


PeerCall = Callable[..., Any]


def _default_peer_call(path: str, cmd: str, timeout: float, **args: Any) -> Any:
    from control.api import unix as api

    return api.call(path, cmd, timeout=timeout, **args)


class MigrationManager:
    """Thread-safe; one per gateway daemon.

    `move_local(name, port=, mac=, tunnel=)` re-points the VM on this gateway
    (Gateway.move_vm). `peers`: control sockets of the other gateways. Each
    applied migration's convergence time goes to `events` (the metrics), if given."""

    def __init__(self, registry: Registry, gateway_name: str, move_local: Callable[..., dict],
                 peers: tuple[str, ...] | list[str] = (), hold_down: float = 2.0, conflict_window: float = 0.5,
                 rate: float = 20.0, burst: float = 10.0, global_rate: float = 1000.0,
                 peer_timeout: float = 2.0, clock: Callable[[], int] = time.monotonic_ns,
                 peer_call: PeerCall = _default_peer_call, max_tracked: int = 4096,
                 events: GatewayEvents | None = None) -> None:
        self.registry = registry
        self.gateway_name = gateway_name
        self.move_local = move_local
        self.peers = tuple(peers)
        self.hold_down = hold_down
        self.conflict_window = conflict_window
        self.rate, self.burst = rate, burst
        self.peer_timeout = peer_timeout
        self.clock = clock
        self.peer_call = peer_call
        self.max_tracked = max_tracked
        self.events = events
        self.lock = threading.RLock()
        self.buckets: dict[str, TokenBucket] = {}
        self.global_bucket = TokenBucket(global_rate, global_rate, self._now())
        self.track: dict[str, _VmTrack] = {}
        self.counts: dict[str, int] = {}
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.peers)), thread_name_prefix="xdpgw-peer") \
            if self.peers else None

    def _now(self) -> float:
        return self.clock() / 1e9

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)

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
        rec = self.registry.by_mac(mac)
        if rec is None:
            return Outcome("unknown", detail={"reason": f"no VM has MAC {mac}"})
        if a.ip is not None and (rec.ip is None or ipaddress.ip_address(rec.ip) != a.ip):
            if a.kind == "netlink":     # the kernel learnt another address of the VM: no claim
                return Outcome("ignored", rec.name, {"reason": f"neighbour {a.ip} is not {rec.name}'s address"})
            return Outcome("spoofed", rec.name, {"reason": f"{a.ip} is not the address of {rec.name} "
                                                           f"({rec.ip}) whose MAC is {mac}"})
        track = self.track.setdefault(rec.name, _VmTrack())
        others = {p: t for p, t in track.claims.items() if p != a.port and now - t <= self.conflict_window}
        track.claims[a.port] = now
        if rec.kind == "port" and rec.location == a.port:
            return Outcome("current", rec.name)
        recently_moved = track.moved_at is not None and now - track.moved_at < self.hold_down
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
            result = self._apply(rec.name, port=a.port, mac=mac, tunnel=None, detected_by=a.kind, t0_ns=a.ts_ns)
        except (MigrationError, RegistryError) as exc:
            return Outcome("failed", rec.name, {"reason": str(exc)})
        return Outcome("applied", rec.name, result)

    # ---- explicit moves (CLI / API / defrag) ---------------------------
    def move(self, name: str, port: str | None = None, mac: str | None = None, tunnel: str | None = None,
             source: str = "explicit") -> dict[str, Any]:
        if (port is None) == (tunnel is None):
            raise MigrationError("vm move: give exactly one of port or tunnel")
        with self.lock:
            return self._apply(name, port=port, mac=mac, tunnel=tunnel, detected_by=source, t0_ns=self.clock())

    # ---- the one apply path --------------------------------------------
    def _apply(self, name: str, port: str | None, mac: str | None, tunnel: str | None, detected_by: str,
               t0_ns: int) -> dict[str, Any]:
        reg = self.registry
        before = reg.vm(name)
        old = (before.kind, before.location)
        new = ("port", port) if port is not None else ("tunnel", str(tunnel))
        reg.transition(name, "migrating")
        gateways: dict[str, Any] = {}
        try:
            try:
                self.move_local(name, port=port, mac=mac, tunnel=tunnel)
            except Exception as exc:   # noqa: BLE001 - reported, the VM stays where it was
                raise MigrationError(f"{self.gateway_name}: {exc}") from None
            gateways[self.gateway_name] = "ok"
            gateways.update(self._notify_peers(name, port, mac or before.mac, tunnel, detected_by))
        except BaseException as exc:
            reg.transition(name, "running")
            reg.record_migration(name, old, new, detected_by, None, gateways, status="failed", detail=str(exc))
            raise
        t1_ns = self.clock()
        convergence_ms = round((t1_ns - t0_ns) / 1e6, 3)
        if self.events is not None:
            self.events.convergence.observe((t1_ns - t0_ns) / 1e9)
        reg.set_location(name, *new, mac=mac)
        reg.set_holders(name, [g for g, r in gateways.items() if r == "ok"])
        reg.transition(name, "running")
        status = "ok" if all(r == "ok" for r in gateways.values()) else "partial"
        mid = reg.record_migration(name, old, new, detected_by, convergence_ms, gateways, status=status)
        event(log, "vm.moved", vm=name, **{"from": old[1], "to": new[1]}, by=detected_by, ms=convergence_ms,
              status=status)
        now = t1_ns / 1e9
        track = self.track.setdefault(name, _VmTrack())
        track.moved_at, track.left_port = t0_ns / 1e9, old[1] if old[0] == "port" else None
        return {"vm": name, "from": old[1], "to": new[1], "detected_by": detected_by,
                "convergence_ms": convergence_ms, "gateways": gateways, "status": status, "migration": mid,
                "applied_at": now}

    def _notify_peers(self, name: str, port: str | None, mac: str | None, tunnel: str | None,
                      detected_by: str) -> dict[str, Any]:
        if not self.peers or self.pool is None:
            return {}
        args = {"name": name, "port": port, "mac": mac, "tunnel": tunnel, "origin": self.gateway_name,
                "detected_by": detected_by}
        futures = {p: self.pool.submit(self.peer_call, p, "migration.peer_apply", self.peer_timeout, **args)
                   for p in self.peers}
        out: dict[str, Any] = {}
        for p, f in futures.items():
            try:
                reply = f.result(timeout=self.peer_timeout + 1.0)
                out[reply.get("gateway", p) if isinstance(reply, dict) else p] = "ok"
            except Exception as exc:   # noqa: BLE001 - one peer's failure is reported, not fatal
                out[p] = f"error: {exc}"
        return out

    def peer_apply(self, name: str, port: str | None, mac: str | None, tunnel: str | None, origin: str,
                   detected_by: str) -> dict[str, Any]:
        """Another gateway moved `name`: re-point it here (no peers are called from here)."""
        t0 = self.clock()
        with self.lock:
            before = self.registry.vm(name)
            self.move_local(name, port=port, mac=mac, tunnel=tunnel)
            new = ("port", port) if port is not None else ("tunnel", str(tunnel))
            try:
                self.registry.transition(name, "migrating")
                self.registry.set_location(name, *new, mac=mac)
                self.registry.transition(name, "running")
            except InvalidTransition:
                self.registry.set_location(name, *new, mac=mac)
            ms = round((self.clock() - t0) / 1e6, 3)
            self.registry.record_migration(name, (before.kind, before.location), new, f"peer:{origin}/{detected_by}",
                                           ms, {self.gateway_name: "ok"})
            track = self.track.setdefault(name, _VmTrack())
            track.moved_at = t0 / 1e9
            track.left_port = before.location if before.kind == "port" else None
        return {"gateway": self.gateway_name, "vm": name, "took_ms": ms}

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"outcomes": dict(self.counts), "peers": list(self.peers), "hold_down_s": self.hold_down,
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

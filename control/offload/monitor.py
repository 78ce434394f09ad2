"""Heavy-region detection (issue 7, step 1) and the gateway's side of region offload.

Every `monitor.interval` the daemon folds the per-CPU region counters (XDP) and
hands the cumulative (packets, bytes) of each region to `Monitor.update`, which
computes pps and bps over the interval, smooths them (EWMA), and runs a small
hysteresis state machine per region:

    normal --(over heavy_pps or heavy_bps for K intervals in a row)--> heavy
    heavy  --(under clear_pps and clear_bps for K intervals in a row)--> normal

A change is an event; `OffloadLink` turns events into calls to the control
center (a distribution request for a heavy region, its clearing when calm) on a
thread of its own, so a slow center never delays sampling. The center then
calls the gateway's agent API (control/agent.py) to install or clear the offload.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from control.config import Config

log = logging.getLogger(__name__)


@dataclass
class Thresholds:
    heavy_pps: float | None
    heavy_bps: float | None
    clear_pps: float | None
    clear_bps: float | None

    def over(self, pps: float, bps: float) -> bool:
        return (self.heavy_pps is not None and pps > self.heavy_pps) or \
            (self.heavy_bps is not None and bps > self.heavy_bps)

    def under(self, pps: float, bps: float) -> bool:
        return (self.clear_pps is None or pps < self.clear_pps) and (self.clear_bps is None or bps < self.clear_bps)

    def as_dict(self) -> dict[str, float | None]:
        return dict(self.__dict__)


def thresholds_of(config: Config) -> dict[str, Thresholds]:
    """Each region's effective thresholds: its own, else [monitor]'s; clear defaults to half of heavy."""
    m = config.monitor
    out = {}
    for r in config.regions:
        values = {}
        for unit in ("pps", "bps"):
            heavy = getattr(r, f"heavy_{unit}") or getattr(m, f"heavy_{unit}")
            clear = getattr(r, f"clear_{unit}") or getattr(m, f"clear_{unit}")
            if heavy is not None and clear is None:
                clear = heavy / 2
            values[f"heavy_{unit}"] = None if heavy is None else float(heavy)
            values[f"clear_{unit}"] = None if clear is None else float(clear)
        out[r.name] = Thresholds(**values)
    return out


@dataclass
class RegionState:
    name: str
    thresholds: Thresholds
    state: str = "normal"            # normal | heavy
    pps: float = 0.0                 # smoothed
    bps: float = 0.0
    raw_pps: float = 0.0             # over the last interval
    raw_bps: float = 0.0
    streak: int = 0                  # intervals in a row towards the other state
    since: float = field(default_factory=time.time)
    crossed_at: float | None = None  # wall time of the first interval of the current streak over the threshold
    heavy_at: float | None = None    # wall time the region last turned heavy
    intervals: int = 0               # samples taken

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "pps": round(self.pps, 3), "bps": round(self.bps, 3),
                "raw_pps": round(self.raw_pps, 3), "raw_bps": round(self.raw_bps, 3), "streak": self.streak,
                "since": self.since, "crossed_at": self.crossed_at, "heavy_at": self.heavy_at,
                "thresholds": self.thresholds.as_dict()}


@dataclass(frozen=True)
class Event:
    kind: str                        # "heavy" | "calm"
    region: str
    pps: float
    bps: float
    crossed_at: float | None
    at: float


class Monitor:
    """Rates and heavy/normal state per region from cumulative counters. Not thread-safe
    by itself: `update` runs on the daemon's sampling thread; `snapshot` copies under a lock."""

    def __init__(self, config: Config) -> None:
        m = config.monitor
        if m is None:
            raise ValueError("Monitor needs a [monitor] table in the config")
        self.k = m.intervals
        self.alpha = m.smoothing
        self.interval = m.interval
        self.regions = {name: RegionState(name, t) for name, t in thresholds_of(config).items()}
        self._prev: tuple[float, dict[str, tuple[int, int]]] | None = None
        self._lock = threading.Lock()

    def update(self, counters: dict[str, dict[str, int]], now: float | None = None,
               wall: float | None = None) -> list[Event]:
        """One interval: `counters` is {region: {"packets", "bytes"}} (cumulative). Returns the events."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        current = {name: (int(c["packets"]), int(c["bytes"])) for name, c in counters.items()}
        events: list[Event] = []
        with self._lock:
            prev, self._prev = self._prev, (now, current)
            if prev is None:
                return events
            dt = max(now - prev[0], 1e-6)
            for name, r in self.regions.items():
                if name not in current:
                    continue
                p0, b0 = prev[1].get(name, current[name])
                p1, b1 = current[name]
                # counters only grow; a smaller value means they were reset (gateway restart)
                r.raw_pps = max(0, p1 - p0) / dt
                r.raw_bps = 8 * max(0, b1 - b0) / dt
                if r.intervals == 0:
                    r.pps, r.bps = r.raw_pps, r.raw_bps
                else:
                    r.pps = self.alpha * r.raw_pps + (1 - self.alpha) * r.pps
                    r.bps = self.alpha * r.raw_bps + (1 - self.alpha) * r.bps
                r.intervals += 1
                event = self._step(r, wall)
                if event:
                    events.append(event)
        return events

    def _step(self, r: RegionState, wall: float) -> Event | None:
        t = r.thresholds
        if r.state == "normal":
            if t.over(r.pps, r.bps):
                if r.streak == 0:
                    r.crossed_at = wall
                r.streak += 1
            else:
                r.streak, r.crossed_at = 0, None
            if r.streak >= self.k:
                r.state, r.streak, r.since, r.heavy_at = "heavy", 0, wall, wall
                return Event("heavy", r.name, r.pps, r.bps, r.crossed_at, wall)
        else:
            r.streak = r.streak + 1 if t.under(r.pps, r.bps) else 0
            if r.streak >= self.k:
                r.state, r.streak, r.since, r.crossed_at = "normal", 0, wall, None
                return Event("calm", r.name, r.pps, r.bps, None, wall)
        return None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: r.as_dict() for name, r in self.regions.items()}


# ------------------------------------------------------------------ center link

class OffloadLink:
    """Sends the monitor's events to the control center, in order, on its own thread.

    heavy -> POST /v1/requests {gateway, region, service, pps, bps, crossed_at} (one per service)
    calm  -> POST /v1/requests/clear {gateway, region}
    A failed call is retried (bounded: `max_attempts`, `retry_s` apart); the last result
    of each region is kept for `xdpgw stats`."""

    def __init__(self, config: Config, services: list[str], call: Callable[[str, str, dict | None], Any] | None = None,
                 max_attempts: int = 20, retry_s: float = 0.5) -> None:
        from control.center.client import CenterClient

        self.gateway = config.gateway.name
        self.services = services
        link = config.center
        self.call = call or CenterClient(link.url, link.token, timeout=link.timeout, cafile=link.cafile).call
        self.max_attempts = max_attempts
        self.retry_s = retry_s
        self.queue: queue.Queue[Event | None] = queue.Queue()
        self.status: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="xdpgw-offload-link", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.put(None)
        self.thread.join(timeout=5)

    def submit(self, event: Event) -> None:
        self.queue.put(event)

    def _run(self) -> None:
        while not self._stop.is_set():
            event = self.queue.get()
            if event is None:
                return
            self._deliver(event)

    def _deliver(self, event: Event) -> None:
        if event.kind == "heavy":
            calls = [("POST", "/v1/requests", {"gateway": self.gateway, "region": event.region, "service": s,
                                               "pps": event.pps, "bps": event.bps, "crossed_at": event.crossed_at,
                                               "heavy_at": event.at}) for s in self.services]
        else:
            calls = [("POST", "/v1/requests/clear", {"gateway": self.gateway, "region": event.region})]
        results, error = [], None
        for method, path, body in calls:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    results.append(self.call(method, path, body))
                    error = None
                    break
                except Exception as exc:  # noqa: BLE001 - reported in stats, retried
                    error = f"{method} {path}: {exc}"
                    status = getattr(exc, "status", None)
                    if status is not None and 400 <= status < 500:
                        break          # the center refused it: retrying will not help
                    log.warning("center call failed (attempt %d): %s", attempt, error)
                    if self._stop.wait(self.retry_s):
                        return
        with self._lock:
            self.status[event.region] = {"event": event.kind, "at": event.at, "ok": error is None,
                                         "error": error, "results": results}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self.status.items()}

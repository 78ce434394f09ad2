"""Heavy-region detection: rates per region from cumulative counters, smoothed,
and a hysteresis state machine per region.

The daemon's sampler hands the cumulative (packets, bytes) of each region to
`Monitor.update` every `monitor.interval`; it computes pps and bps over the
interval, smooths them (EWMA), and steps each region's state:

    normal --(over heavy_pps or heavy_bps for K intervals in a row)--> heavy
    heavy  --(under clear_pps and clear_bps for K intervals in a row)--> normal

A change is an event, which the daemon hands to the link to the center
(control/offload/link.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from control.config import Config
from control.rates import per_second


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
    """Rates and heavy/normal state per region from cumulative counters: `update` runs
    on the daemon's sampling thread, `snapshot` (the API) copies under a lock."""

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
                r.raw_pps, r.raw_bps = per_second(prev[1].get(name, current[name]), current[name], dt)
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

    def reconfigure(self, config: Config) -> None:
        """A reloaded config's regions: kept regions keep their rates and state (with
        their thresholds as the config now says), new ones start normal, removed ones go."""
        with self._lock:
            old, self.regions = self.regions, {}
            for name, t in thresholds_of(config).items():
                self.regions[name] = old.get(name) or RegionState(name, t)
                self.regions[name].thresholds = t

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: r.as_dict() for name, r in self.regions.items()}

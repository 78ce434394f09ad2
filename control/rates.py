"""Turns successive cumulative counter samples into per-second rates."""
from __future__ import annotations

import threading
import time
from typing import Any

RATE_SECTIONS = ("regions", "services", "vms")


class RateTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prev: tuple[float, dict] | None = None
        self._last: tuple[float, dict] | None = None

    def sample(self, counters: dict[str, Any], now: float | None = None) -> None:
        with self._lock:
            self._prev, self._last = self._last, (time.monotonic() if now is None else now, counters)

    def rates(self) -> dict[str, dict[str, dict[str, float]]]:
        """{section: {name: {"pps", "bps"}}} over the last sampling interval (empty before two samples)."""
        with self._lock:
            if not self._prev or not self._last:
                return {}
            (t0, a), (t1, b) = self._prev, self._last
        dt = max(t1 - t0, 1e-9)
        out: dict[str, dict[str, dict[str, float]]] = {}
        for section in RATE_SECTIONS:
            out[section] = {}
            for name, now in b.get(section, {}).items():
                before = a.get(section, {}).get(name, {"packets": 0, "bytes": 0})
                out[section][name] = {"pps": (now["packets"] - before["packets"]) / dt,
                                      "bps": 8 * (now["bytes"] - before["bytes"]) / dt}
        return out

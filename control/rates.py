"""Per-second rates from cumulative counters, and the sampler that reads the
counters once per tick for every consumer of them."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from control.logs import event

log = logging.getLogger(__name__)

RATE_SECTIONS = ("regions", "services", "vms")


def per_second(before: tuple[int, int], after: tuple[int, int], dt: float) -> tuple[float, float]:
    """(pps, bps) between two cumulative (packets, bytes) readings `dt` s apart. Counters
    only grow: a smaller value means they were reset (a gateway restart), read as no traffic."""
    return max(0, after[0] - before[0]) / dt, 8 * max(0, after[1] - before[1]) / dt


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
                pps, bps = per_second((before["packets"], before["bytes"]), (now["packets"], now["bytes"]), dt)
                out[section][name] = {"pps": pps, "bps": bps}
        return out


class IdleTracker:
    """Per entry of a counters section (a VM): since when its packet count has not
    grown, from the sampler's readings, so the resolution is the sampling interval.
    An entry first seen with packets counts as grown then (they came before this
    process saw them); one that never had a packet is not idle-since-anything (None)."""

    def __init__(self, section: str = "vms") -> None:
        self.section = section
        self._lock = threading.Lock()
        self._packets: dict[str, int] = {}
        self._grew: dict[str, float] = {}

    def sample(self, counters: dict[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        seen = {name: c["packets"] for name, c in counters.get(self.section, {}).items()}
        with self._lock:
            for name, packets in seen.items():
                # any change but to zero is new packets: a smaller count means the counter was reset
                if packets != self._packets.get(name) and packets > 0:
                    self._grew[name] = now
            self._packets = seen
            self._grew = {name: t for name, t in self._grew.items() if name in seen}   # a removed VM is forgotten

    def idle_s(self, name: str, now: float | None = None) -> float | None:
        """Seconds since `name`'s packet count last grew; None if it never had a packet."""
        with self._lock:
            grew = self._grew.get(name)
        if grew is None:
            return None
        return round(max(0.0, (time.monotonic() if now is None else now) - grew), 3)


Consumer = Callable[[dict[str, Any], float], None]


@dataclass
class _Subscription:
    interval: float
    consume: Consumer
    due: float = 0.0


class Sampler:
    """Reads the counters when a consumer's interval has elapsed and hands the same
    reading (and its CLOCK_MONOTONIC time) to every consumer due then: consumers with
    equal intervals (or multiples) share one read. Runs on the caller's thread."""

    # consumers due within this many seconds of each other share a read
    SHARE_S = 0.005

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read
        self.subscriptions: list[_Subscription] = []

    def every(self, interval: float, consume: Consumer) -> None:
        """Call `consume(counters, now)` every `interval` seconds once `run` runs."""
        self.subscriptions.append(_Subscription(interval, consume))

    def run(self, stop: threading.Event) -> None:
        """Sample until `stop` is set. A failed read is reported and skipped."""
        if not self.subscriptions:
            stop.wait()
            return
        start = time.monotonic()
        for s in self.subscriptions:
            s.due = start + s.interval
        while not stop.wait(max(0.0, min(s.due for s in self.subscriptions) - time.monotonic())):
            now = time.monotonic()
            due = [s for s in self.subscriptions if s.due <= now + self.SHARE_S]
            if not due:
                continue
            for s in due:
                while s.due <= now + self.SHARE_S:      # a slow read skips ticks, keeping the schedule
                    s.due += s.interval
            try:
                counters = self.read()
            except Exception as exc:  # noqa: BLE001 - a failed sample is skipped, not fatal
                event(log, "counters.sample_failed", logging.WARNING, error=str(exc))
                continue
            at = time.monotonic()
            for s in due:
                s.consume(counters, at)

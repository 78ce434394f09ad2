"""Events counted when they happen, for the metrics: health probe results and round
trips, migration convergence, Maglev rebuilds and swaps, the center's step latencies.

The modules where the events happen (control/health.py, control/migration/manager.py,
control/gateway.py, control/center/workflow.py) record into these plain objects;
control/metrics.py turns them into Prometheus metric families at scrape time. So only
control/metrics.py imports prometheus_client, and recording costs a lock and an add."""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field

# Bucket upper bounds in seconds (the +Inf bucket is implied).
PROBE_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONVERGENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[str, ...]


class Counter:
    """Monotonic counts per label values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount

    def values(self) -> dict[Labels, float]:
        with self._lock:
            return dict(self._values)


@dataclass
class HistogramValue:
    """One label set's observations: cumulative count per bucket bound (the last is +Inf), and the sum."""
    buckets: list[tuple[float, int]]
    sum: float


@dataclass
class Histogram:
    """Observations per label values in fixed buckets, as a Prometheus histogram keeps them."""
    bounds: tuple[float, ...]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _counts: dict[Labels, list[int]] = field(default_factory=dict, repr=False)
    _sums: dict[Labels, float] = field(default_factory=dict, repr=False)

    def observe(self, value: float, *labels: str) -> None:
        i = bisect.bisect_left(self.bounds, value)       # a value equal to a bound falls in that bucket
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * (len(self.bounds) + 1))
            counts[i] += 1
            self._sums[labels] = self._sums.get(labels, 0.0) + value

    def values(self) -> dict[Labels, HistogramValue]:
        with self._lock:
            snapshot = {labels: (list(counts), self._sums[labels]) for labels, counts in self._counts.items()}
        out = {}
        for labels, (counts, total) in snapshot.items():
            running, buckets = 0, []
            for bound, n in zip((*self.bounds, math.inf), counts):
                running += n
                buckets.append((bound, running))
            out[labels] = HistogramValue(buckets, total)
        return out


class GatewayEvents:
    """What a gateway daemon records as it happens (one per Gateway)."""

    def __init__(self) -> None:
        self.probes = Counter()                             # (vm, result: ok | failed)
        self.probe_rtt = Histogram(PROBE_RTT_BUCKETS)       # (kind,): probes that got an answer
        self.convergence = Histogram(CONVERGENCE_BUCKETS)   # (): announcement -> every gateway re-pointed
        self.maglev_rebuilds = Counter()                    # (service,): a new table swapped in
        self.maglev_swap = Histogram(SWAP_BUCKETS)          # (): one rebuild: build + write + swap

    def probe(self, vm: str, kind: str, ok: bool, rtt_s: float | None) -> None:
        self.probes.inc(vm, "ok" if ok else "failed")
        if rtt_s is not None:
            self.probe_rtt.observe(rtt_s, kind)

    def maglev_swapped(self, services: list[str], seconds: float) -> None:
        for name in services:
            self.maglev_rebuilds.inc(name)
        self.maglev_swap.observe(seconds)


class CenterEvents:
    """What the control center records as it happens."""

    def __init__(self) -> None:
        self.steps = Histogram(STEP_BUCKETS)                # (state, outcome: ok | error): one workflow step

"""What every benchmark module shares: the measurement record, the run context
(options, progress line, CPU pinning, name prefix) and small timing helpers.

Every figure is a `Measurement`: a value, the baseline it is compared with
(measured in the same run, interleaved where possible) and their ratio
(value / baseline). Absolute numbers drift between machines and with the load
colleagues put on the same two cores; ratios measured side by side drift much
less, and ratios of pairs measured back to back (the median of the per-pair
ratios: `paired_ratio`) least."""
from __future__ import annotations

import math
import os
import secrets
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

# Name prefix of every namespace a run creates: "xgb" + 3 hex digits, unique
# per run, so a crashed run can be cleaned up (`python -m bench --cleanup xgbNNN`)
# without touching anyone else's namespaces.
PREFIX_STEM = "xgb"


def new_prefix() -> str:
    return PREFIX_STEM + secrets.token_hex(2)[:3]


@dataclass
class Measurement:
    """One reported figure and its same-run baseline."""
    section: str
    key: str                      # machine name, e.g. "hit_v4"
    name: str                     # human name, e.g. "flow-table hit (IPv4)"
    value: float
    unit: str                     # "ns/pkt", "Mpps", "ms", "s"
    baseline: str                 # what it is compared with
    baseline_value: float
    method: str = ""              # how it was measured (see README)
    params: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # the median of value / baseline over pairs measured back to back (a round,
    # a pair of trials); when set it is the ratio reported, as load that comes
    # and goes during a run moves both halves of a pair alike
    paired_ratio: float | None = None

    @property
    def ratio(self) -> float:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if not self.baseline_value or math.isnan(self.baseline_value) or math.isnan(self.value):
            return float("nan")
        return self.value / self.baseline_value

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = _finite(self.ratio)
        d["value"] = _finite(self.value)
        d["baseline_value"] = _finite(self.baseline_value)
        return d


def paired_ratio(values: Iterable[float], baselines: Iterable[float]) -> float | None:
    """The median of the ratios of pairs measured back to back; None without a
    pair that has a positive baseline."""
    ratios = [v / b for v, b in zip(values, baselines) if b > 0]
    return median(ratios) if ratios else None


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


@dataclass
class Target:
    """A goal from the issue, evaluated on this run's figures."""
    name: str
    goal: str                     # human statement, e.g. "xdpgw >= 0.85 x minimal redirect"
    measured: float | None
    limit: float
    comparison: str               # "<=" or ">="
    unit: str = ""
    detail: str = ""
    extra_ok: bool = True         # a second condition (e.g. "lossless")
    applicable: bool = True       # False in --quick runs: the sizes are not the target's

    @property
    def met(self) -> bool | None:
        if not self.applicable or self.measured is None or not math.isfinite(self.measured):
            return None
        ok = self.measured <= self.limit if self.comparison == "<=" else self.measured >= self.limit
        return bool(ok and self.extra_ok)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["met"] = self.met
        d["measured"] = _finite(self.measured) if self.measured is not None else None
        return d


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line
    per update otherwise (logs, pytest)."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.section = ""
        self._last_len = 0

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        elapsed = int(time.monotonic() - self.t0)
        line = f"[bench {elapsed // 60}:{elapsed % 60:02d}] {self.section}: {message}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(self._last_len))
            self._last_len = min(len(line), 150)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
            self._last_len = 0


@dataclass
class Context:
    """Options and shared state of one run."""
    quick: bool = False
    out_dir: str = "bench/results"
    prefix: str = field(default_factory=new_prefix)
    progress: Progress = field(default_factory=Progress)
    cpu: int = -1                 # CPU the measurements run on (-1: the last one)
    vms: int = 2                  # VM namespaces of the end-to-end topology
    perf: bool = True             # sample a profile with perf when it is installed
    katran_src: str | None = None # a Katran checkout to build and time beside xdpgw
    ab_ebpf: str | None = None    # another build's ebpf/ directory, timed beside this tree's
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cpu < 0:
            self.cpu = sorted(os.sched_getaffinity(0))[-1]

    def size(self, full, quick):
        return quick if self.quick else full


@contextmanager
def pinned(cpu: int):
    """Run the block on one CPU (BPF_PROG_RUN runs where the caller runs; new
    flows go to that CPU's LRU list). The previous affinity is restored."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def median(values: Iterable[float]) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def trimmed_mean(values, upper: float = 0.99) -> float:
    """Mean without the slowest (1 - upper) of the samples: a run that an
    interrupt or a colleague's process landed on is not a cost of the program."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float("nan")
    cut = np.quantile(a, upper)
    return float(a[a <= cut].mean())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(fn: Callable[[], Any], runs: int, budget_s: float = 30.0) -> list[float]:
    """Seconds of up to `runs` calls of fn, stopping early after `budget_s`."""
    times = []
    t_end = time.monotonic() + budget_s
    for _ in range(max(1, runs)):
        dt, _ = timed(fn)
        times.append(dt)
        if time.monotonic() > t_end:
            break
    return times

"""Timing XDP programs with BPF_PROG_RUN (BPF_PROG_TEST_RUN), two ways.

What the kernel does (net/bpf/test_run.c, checked on this kernel): without
BPF_F_TEST_XDP_LIVE_FRAMES, `repeat = R` runs the program R times on *one*
xdp_buff that is never reset: bytes a run writes and head/tail moves it makes
are what the next run sees. (Live-frames mode resets the data pointers of a
recycled page but not its bytes.) So:

* "repeat" method -- one call, R repetitions, the kernel's average. Valid only
  for a frame every repetition treats exactly like the first: we check that
  (`probe_repeat`) by comparing verdict, output bytes and counter deltas of
  repeat=1 and repeat=8. It holds for flow hits (the MAC rewrite is
  idempotent), XDP_PASS and drops. It fails for new flows (repetition 2 finds
  the flow that repetition 1 recorded) and for IP-in-IP (each repetition
  wraps the previous output again: 1 encap, then R-1 non-VIP passes).

* "single-shot" method -- K distinct frames, each its own call with repeat=1.
  The kernel still times the run itself (ktime around the run, not the
  syscall), so the figure is the run plus a fixed harness cost (two ktime
  reads, bh disable/enable, the non-dispatcher call path). That harness cost
  is measured in the same way on the XDP_DROP baseline and removed:
      net(P) = single(P) - (single(XDP_DROP) - repeat(XDP_DROP)).
  Every program and class runs chunk by chunk, interleaved, so drift and
  colleagues' load hit them alike. This is the only honest way to time new
  flows (every measured frame is a flow never seen before) and tunnels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dataplane import libbpf

from .common import median, trimmed_mean

VERDICTS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}

Counters = Callable[[], dict[str, int]]


def run_once(fd: int, frame: bytes) -> tuple[str, bytes, int]:
    retval, out, ns = libbpf.prog_test_run(fd, frame, repeat=1)
    return VERDICTS.get(retval, str(retval)), out, ns


def run_repeat(fd: int, frame: bytes, repeat: int) -> int:
    """Kernel-measured ns per repetition."""
    return libbpf.prog_test_run(fd, frame, repeat=repeat)[2]


def plain_drop_ns(drop_fd: int, repeat: int) -> float:
    """XDP_DROP timed with plain repeat (no rotator), median of 3: a rotated
    run's overhead is the rotated XDP_DROP's time minus this."""
    from . import frames as F

    frame = F.flows4("tcp4", F.SRC["hit"], 0, 1)[0]
    return float(median(run_repeat(drop_fd, frame, repeat) for _ in range(3)))


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def counter_check(expect: dict[str, int], runs: int, seen: dict[str, int]) -> dict:
    """Did `runs` packets move the counters by `expect` each (zero included)?"""
    expected = {k: v * runs for k, v in expect.items()}
    got = {k: seen.get(k, 0) for k in expected}
    return {"counters_expected": expected, "counters_seen": got, "ok": got == expected}


def probe_repeat(fd: int, frame_a: bytes, frame_b: bytes, counters: Counters | None, reps: int = 8) -> dict:
    """Does repeat=R treat every repetition like the first? frame_a and frame_b
    are two different frames of the same class (fresh flows for a new-flow class)."""
    c0 = counters() if counters else {}
    v1, o1, _ = run_once(fd, frame_a)
    c1 = counters() if counters else {}
    retval, o8, _ = libbpf.prog_test_run(fd, frame_b, repeat=reps)
    v8 = VERDICTS.get(retval, str(retval))
    c8 = counters() if counters else {}
    d1, d8 = delta(c1, c0), delta(c8, c1)
    same_counters = d8 == {k: v * reps for k, v in d1.items()}
    same_len = len(o1) == len(o8)
    stable = v1 == v8 and same_len and same_counters
    return {"repeat_stable": stable, "verdict_repeat1": v1, f"verdict_repeat{reps}": v8,
            "out_len_repeat1": len(o1), f"out_len_repeat{reps}": len(o8),
            "counters_repeat1": d1, f"counters_repeat{reps}": d8}


@dataclass
class Entry:
    name: str
    fd: int
    frames: list[bytes]
    consume: bool = False            # new flows: every trial takes fresh frames
    counters: Counters | None = None
    samples: list[np.ndarray] = field(default_factory=list)
    counter_delta: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)


class SingleShot:
    """Interleaved single-shot timing of several programs / packet classes."""

    def __init__(self, per_trial: int, chunk: int = 250, progress: Callable[[str], None] | None = None) -> None:
        self.per_trial = per_trial
        self.chunk = max(1, min(chunk, per_trial))
        self.entries: list[Entry] = []
        self.progress = progress or (lambda m: None)

    def add(self, name: str, fd: int, frames: list[bytes], consume: bool = False,
            counters: Counters | None = None) -> None:
        self.entries.append(Entry(name, fd, frames, consume, counters))

    def run(self, trials: int, label: str = "") -> None:
        for e in self.entries:
            need = self.per_trial * (trials if e.consume else 1)
            if len(e.frames) < need:
                raise ValueError(f"{e.name}: {len(e.frames)} frames, need {need}")
        n = len(self.entries)
        for t in range(trials):
            bufs = {e.name: np.empty(self.per_trial, dtype=np.int64) for e in self.entries}
            for ci, start in enumerate(range(0, self.per_trial, self.chunk)):
                stop = min(self.per_trial, start + self.chunk)
                if ci % 20 == 0:
                    self.progress(f"{label}single-shot trial {t + 1}/{trials}, frame {start}/{self.per_trial}")
                for k in range(n):
                    e = self.entries[(ci + k) % n]      # rotate the order every chunk
                    base = t * self.per_trial if e.consume else 0
                    before = e.counters() if e.counters else None
                    out = bufs[e.name]
                    for i in range(start, stop):
                        retval, _, ns = libbpf.prog_test_run(e.fd, e.frames[base + i], repeat=1)
                        out[i] = ns
                        v = VERDICTS.get(retval, str(retval))
                        e.verdicts[v] = e.verdicts.get(v, 0) + 1
                    e.runs += stop - start
                    if before is not None:
                        for key, val in delta(e.counters(), before).items():
                            e.counter_delta[key] = e.counter_delta.get(key, 0) + val
            for e in self.entries:
                e.samples.append(bufs[e.name])

    def mean(self, name: str) -> float:
        e = self._entry(name)
        return trimmed_mean(np.concatenate(e.samples))

    def trial_means(self, name: str) -> list[float]:
        return [trimmed_mean(s) for s in self._entry(name).samples]

    def entry(self, name: str) -> Entry:
        return self._entry(name)

    def _entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)


class Repeat:
    """Interleaved repeat-method timing: trials round-robin over the programs."""

    def __init__(self, repeat: int, progress: Callable[[str], None] | None = None) -> None:
        self.repeat = repeat
        self.items: list[tuple[str, int, bytes, Counters | None]] = []
        self.results: dict[str, list[int]] = {}
        self.counter_delta: dict[str, dict[str, int]] = {}
        self.progress = progress or (lambda m: None)

    def add(self, name: str, fd: int, frame: bytes, counters: Counters | None = None) -> None:
        self.items.append((name, fd, frame, counters))
        self.results[name] = []
        self.counter_delta[name] = {}

    def run(self, trials: int, label: str = "") -> None:
        for t in range(trials):
            self.progress(f"{label}repeat={self.repeat} trial {t + 1}/{trials}")
            order = self.items[t % len(self.items):] + self.items[:t % len(self.items)]
            for name, fd, frame, counters in order:
                before = counters() if counters else None
                self.results[name].append(run_repeat(fd, frame, self.repeat))
                if before is not None:
                    for key, val in delta(counters(), before).items():
                        self.counter_delta[name][key] = self.counter_delta[name].get(key, 0) + val

    def value(self, name: str) -> float:
        return float(median(self.results[name]))

    def runs(self, name: str) -> int:
        return self.repeat * len(self.results[name])


WARM_CHUNK = 1 << 16


@dataclass
class RotEntry:
    name: str
    rot: object                      # programs.Rotation
    target_fd: int
    counters: Counters | None = None
    next_index: int = 0
    prepare: Callable[[], None] | None = None     # run before every run of this entry, untimed
    results: list[int] = field(default_factory=list)
    counter_delta: dict[str, int] = field(default_factory=dict)
    runs: int = 0


class Rotated:
    """Interleaved repeat-method timing through the flow rotator (bench/rotator.c):
    every repetition is a different flow, restored to the original frame first.
    Trials go round-robin over the entries, starting one further each trial."""

    def __init__(self, rotator, repeat: int, progress: Callable[[str], None] | None = None) -> None:
        self.rotator = rotator
        self.repeat = repeat
        self.entries: list[RotEntry] = []
        self.progress = progress or (lambda m: None)

    def add(self, name: str, rot, target_fd: int, counters: Counters | None = None, start: int = 0,
            prepare: Callable[[], None] | None = None) -> RotEntry:
        """`start`: the rotation's first flow (a new-flow class continues where it
        stopped in an earlier phase, so that its flows stay never seen)."""
        e = RotEntry(name, rot, target_fd, counters, next_index=start, prepare=prepare)
        self.entries.append(e)
        return e

    def _run(self, e: RotEntry, repeat: int, record: bool) -> int:
        if e.prepare is not None:
            e.prepare()
        before = e.counters() if (e.counters and record) else None
        ns = self.rotator.run(e.rot, e.target_fd, repeat, e.next_index)
        e.next_index = (e.next_index + repeat) % max(1, e.rot.flows)
        if before is not None:
            for key, val in delta(e.counters(), before).items():
                e.counter_delta[key] = e.counter_delta.get(key, 0) + val
        return ns

    def warm(self, name: str, repeat: int | None = None) -> None:
        """Run an entry, untimed: e.g. one full period records every flow of a hit
        class. Long warm-ups go in chunks, each after the entry's `prepare`."""
        e = self.entry(name)
        left = repeat or max(1, e.rot.flows)
        while left > 0:
            n = min(left, WARM_CHUNK)
            self._run(e, n, record=False)
            left -= n

    def run(self, trials: int, label: str = "") -> None:
        n = len(self.entries)
        for t in range(trials):
            for k in range(n):
                e = self.entries[(t + k) % n]
                self.progress(f"{label}rotated repeat={self.repeat} trial {t + 1}/{trials}: {e.name}")
                e.results.append(self._run(e, self.repeat, record=True))
                e.runs += self.repeat

    def entry(self, name: str) -> RotEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def value(self, name: str) -> float:
        return float(median(self.entry(name).results))


# ---- fresh and steady-state flow tables ------------------------------------------

STATES = ("fresh", "steady")


@dataclass
class FlowTables:
    """The flow tables of one program under test, as the steady-state procedure sees them."""
    name: str
    capacity: int                    # new flows from one CPU that fill them (at least)
    empty: Callable[[], None]        # delete every entry


@dataclass
class Timed:
    """One rotated entry of a fresh/steady comparison."""
    key: str
    rot: object                      # programs.Rotation
    fd: int
    tables: FlowTables | None = None # None: a program without flow state (baselines)
    new_flows: bool = False          # every repetition a never-seen flow (phase B)
    prerecord: bool = False          # its flows are recorded before timing (hits)
    counters: Counters | None = None
    prepare: Callable[[], None] | None = None


def fresh_and_steady(rotator, repeat: int, trials: int, baselines: list[Timed], timed: list[Timed],
                     progress: Callable[[str], None] | None = None) -> dict[str, list[Rotated]]:
    """Time `timed` next to `baselines` with the rotated method, on fresh tables and
    then in steady state. Per state: phase A (everything but new flows; hit flows
    recorded first), then phase B (new flows into full tables, evicting; a phase of
    their own so that they cannot evict A's hit flows while those are timed).

    fresh:  never-used tables; before phase B each is filled to its capacity
            with new flows, so the LRU order still follows memory order.
    steady: then every table is emptied and filled to twice its capacity, so
            its LRU order no longer follows memory order: a busy gateway's table.

    Returns {state: [phase A, phase B]}; new-flow entries continue their rotation
    across phases, so every timed new flow is one never seen."""
    progress = progress or (lambda m: None)
    next_index: dict[str, int] = {}
    fillers = {}
    for t in timed:
        if t.new_flows and t.tables is not None:
            fillers.setdefault(t.tables.name, t)

    def fill(label: str, factor: int) -> None:
        rt = Rotated(rotator, repeat, progress=progress)
        for t in fillers.values():
            rt.add(t.key, t.rot, t.fd, start=next_index.get(t.key, 0), prepare=t.prepare)
            progress(f"{label}filling {t.tables.name}'s flow tables with {factor * t.tables.capacity} new flows")
            rt.warm(t.key, factor * t.tables.capacity)
            next_index[t.key] = rt.entry(t.key).next_index

    out: dict[str, list[Rotated]] = {}
    for state in STATES:
        if state == "steady":
            for t in fillers.values():
                progress(f"steady: emptying {t.tables.name}'s flow tables")
                t.tables.empty()
            fill("steady: ", 2)
        phases = []
        for phase in ("A", "B"):
            if phase == "B" and state == "fresh":
                fill("fresh: ", 1)
            rt = Rotated(rotator, repeat, progress=progress)
            for b in baselines:
                rt.add(b.key, b.rot, b.fd)
            for t in timed:
                if t.new_flows != (phase == "B"):
                    continue
                rt.add(t.key, t.rot, t.fd, t.counters, start=next_index.get(t.key, 0), prepare=t.prepare)
                if t.prerecord:
                    rt.warm(t.key)              # one period: records every flow
            rt.run(trials, label=f"{state} phase {phase}: ")
            for t in timed:
                if t.new_flows == (phase == "B"):
                    next_index[t.key] = rt.entry(t.key).next_index
            phases.append(rt)
        out[state] = phases
    return out


def rotated_value(phases: list[Rotated], name: str) -> float:
    """Median over every phase that timed `name` (the baselines run in each)."""
    return float(median([x for rt in phases for e in rt.entries if e.name == name for x in e.results]))


def rotated_entry(phases: list[Rotated], name: str) -> RotEntry:
    return next(e for rt in phases for e in rt.entries if e.name == name)

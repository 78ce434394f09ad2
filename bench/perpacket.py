"""Section per_packet: ns per packet of each packet class through xdpgw, with
BPF_PROG_RUN, next to the minimal XDP_DROP and MAC-rewrite + devmap-redirect
programs (bench/baselines.c) timed the same way in the same run.

Three methods (bench/testrun.py explains the kernel's repeat semantics):

* rotated (the figure the targets use): repeat=R through bench/rotator.c, which
  restores the original frame and makes every repetition a different flow,
  then tail-calls the program under test; its own cost, measured by rotating
  into XDP_DROP, is subtracted. Valid for every class: new flows are new in
  every repetition, an encap of one repetition is undone before the next.
  Timed twice: on a fresh flow table (`@fresh`) and in steady state (the
  table filled, emptied and filled to twice its capacity, so that its LRU
  order no longer follows memory order; the figures the targets use).
* repeat (same frame): the classic figure, only for classes a probe shows
  repeat-stable (hits, pass, drop); one flow, everything in cache.
* single-shot (cold): one syscall per distinct frame, kernel-timed, net of the
  harness cost measured on XDP_DROP. Between two runs the syscall path and the
  Python interpreter evict the program's code, branch history and map data, so
  this overstates a large program against a tiny one; shown, not used for
  targets."""
from __future__ import annotations

from dataclasses import dataclass

from . import frames as F
from .common import Context, Measurement, median, pinned
from .programs import Rotation, load_baselines, load_rotator, load_xdpgw, xlated_calls
from .testrun import (STATES, FlowTables, Repeat, Rotated, SingleShot, Timed, counter_check, fresh_and_steady,
                      probe_repeat, rotated_entry, rotated_value, run_once)

SECTION = "per_packet"
BASELINE = "minimal redirect"
NEW_PERIOD = 1 << 30              # rotation period of new flows: never wraps within a run
SINGLE_NEW_START = F.PORT_SPAN * 2048   # single-shot new flows: 198.18.72.0 on, apart from rotated ones
PROBE_START = F.PORT_SPAN * 200         # repeat probe flows: base + 200 (inside every class's /24)
FLOW_ENTRIES = 65536                    # the configuration's default flow table size
BASELINES = ("xdp_drop_min", "xdp_redirect_min")
STATE_NAMES = {"steady": "steady state", "fresh": "fresh table"}


@dataclass(frozen=True)
class PacketClass:
    key: str
    name: str
    verdict: str
    expect: dict                    # counter increments per packet
    kind: str                       # frames.template kind
    base: str = F.SRC["misc"]
    new_flows: bool = False         # every measured frame is a flow never seen
    prerecord: bool = False         # flows recorded before timing (hits)

    def rotation(self, flows: int) -> Rotation:
        if self.kind == "tcp6":
            return Rotation.v6(flows)
        return Rotation.v4(self.kind, self.base, NEW_PERIOD if self.new_flows else flows)

    def frames(self, start: int, count: int) -> list[bytes]:
        if self.kind == "tcp6":
            return F.flows6(start, count)
        if self.kind == "bad_ihl":
            return [F.template("bad_ihl")] * count
        return F.flows4(self.kind, self.base, start, count)


CLASSES = [
    PacketClass("new_flow", "new flow (Maglev, recorded)", "REDIRECT", {"flow_misses": 1, "local_fwd": 1},
                "tcp4", F.SRC["new"], new_flows=True),
    PacketClass("hit_v4", "flow-table hit, IPv4", "REDIRECT", {"flow_hits": 1, "local_fwd": 1},
                "tcp4", F.SRC["hit"], prerecord=True),
    PacketClass("hit_v6", "flow-table hit, IPv6", "REDIRECT", {"flow_hits": 1, "local_fwd": 1},
                "tcp6", prerecord=True),
    PacketClass("tunnel_vm", "tunnel VM (IP-in-IP), flow hit", "TX", {"flow_hits": 1, "tunnel_fwd": 1},
                "tcp4_remote", F.SRC["tunnel"], prerecord=True),
    # whether an offloaded flow is recorded (and later hits) is the dataplane's
    # business: only the offload itself is checked, the hit/miss split is reported
    PacketClass("offloaded", "region-offloaded flow (IP-in-IP)", "TX", {"offload_fwd": 1},
                "tcp4", F.SRC["offload"], prerecord=True),
    PacketClass("tunnel_vm_gue", "tunnel VM (GUE over IPv4), flow hit", "TX", {"flow_hits": 1, "tunnel_fwd": 1},
                "tcp4_gue_remote", F.SRC["tunnel"], prerecord=True),
    PacketClass("tunnel_vm_gue6", "tunnel VM (GUE over IPv6, UDP checksum), flow hit", "TX",
                {"flow_hits": 1, "tunnel_fwd": 1}, "tcp4_gue6_remote", F.SRC["tunnel"], prerecord=True),
    # a target gateway's packet: a tunnel packet decapsulated, then a flow hit to a local VM
    PacketClass("decap_ipip", "decap hit: IP-in-IP in, flow hit, local VM", "REDIRECT",
                {"decap": 1, "flow_hits": 1, "local_fwd": 1}, "decap_ipip", F.SRC["decap"], prerecord=True),
    PacketClass("decap_gue", "decap hit: GUE in, flow hit, local VM", "REDIRECT",
                {"decap": 1, "flow_hits": 1, "local_fwd": 1}, "decap_gue", F.SRC["decap"], prerecord=True),
    PacketClass("non_vip", "non-VIP (XDP_PASS)", "PASS", {"pass": 1}, "non_vip"),
    PacketClass("malformed", "malformed, bad IHL (XDP_DROP)", "DROP", {"drop_ip4_bad_ihl": 1}, "bad_ihl"),
]


def _check(expect: dict, runs: int, seen: dict) -> dict:
    return {**counter_check(expect, runs, seen), "flow_hits": seen.get("flow_hits", 0),
            "flow_misses": seen.get("flow_misses", 0)}


def run(ctx: Context) -> dict:
    p = ctx.progress
    # working set of each class that records flows: 7 sets (the decap classes
    # share one) x 4k, all recorded on the one CPU the run is pinned to, fit its
    # 32k share of the default 64k-entry table (per-CPU LRU lists), so no timed
    # hit is evicted
    hit_flows = ctx.size(4000, 400)
    repeat = ctx.size(100_000, 2_000)
    trials = ctx.size(5, 1)
    single_per_trial = ctx.size(5000, 200)
    single_trials = ctx.size(2, 1)

    p("compiling the baselines, the rotator and xdpgw")
    base = load_baselines(1)
    rotator = gw = None
    try:
        base.set_target(0, "02:00:00:0c:00:01", "02:00:00:0b:00:01", 1)   # slot 0 -> lo
        rotator = load_rotator()
        gw = load_xdpgw(flow_entries=FLOW_ENTRIES)
        info: dict = {"hit_working_set_flows": hit_flows, "repeat": repeat, "trials": trials, "cpu": ctx.cpu,
                      "flow_table_entries": FLOW_ENTRIES, "xlated_calls": xlated_calls(gw.fd)}
        with pinned(ctx.cpu):
            stable = _probe_repeat_stable(gw, info, p)
            states = _time_rotated(base, rotator, gw, repeat, trials, hit_flows, p)
            rp = _time_repeat(base, gw, stable, repeat, trials, p)
            ss = _time_single_shot(base, gw, single_per_trial, single_trials, p)
    finally:
        for obj in (gw, rotator, base):
            if obj is not None:
                obj.close()
    results = _measurements(states, rp, ss, stable, info, repeat, trials, hit_flows)
    return {"results": results, "info": info}


def _probe_repeat_stable(gw, info: dict, p) -> list[PacketClass]:
    """Which classes survive repeat=R on one frame? Check it (recorded in `info`)."""
    p("probing repeat semantics")
    probes = {}
    for pc in CLASSES:
        a, b = pc.frames(PROBE_START, 2)
        if pc.prerecord:
            run_once(gw.fd, a)
            run_once(gw.fd, b)
        probes[pc.key] = probe_repeat(gw.fd, a, b, gw.counters)
    info["repeat_probe"] = probes
    stable = [pc for pc in CLASSES if probes[pc.key]["repeat_stable"]]
    info["repeat_stable"] = [pc.key for pc in stable]
    return stable


def _time_rotated(base, rotator, gw, repeat: int, trials: int, hit_flows: int, p) -> dict[str, list[Rotated]]:
    """Rotated: every class, every repetition a different flow, on a fresh flow
    table and in steady state (testrun.fresh_and_steady)."""
    base_rot = Rotation.v4("tcp4", F.SRC["hit"], hit_flows)
    baselines = [Timed(name, base_rot, base.fd(name)) for name in BASELINES]
    tables = FlowTables("xdpgw", FLOW_ENTRIES, gw.dp.clear_flows)
    timed = [Timed(pc.key, pc.rotation(hit_flows), gw.fd, tables, pc.new_flows, pc.prerecord, gw.counters)
             for pc in CLASSES]
    return fresh_and_steady(rotator, repeat, trials, baselines, timed, p)


def _time_repeat(base, gw, stable: list[PacketClass], repeat: int, trials: int, p) -> Repeat:
    """Repeat on one frame: the repeat-stable classes."""
    rp = Repeat(repeat, progress=p)
    f0 = F.flows4("tcp4", F.SRC["hit"], 0, 1)[0]
    rp.add("xdp_drop_min", base.fd("xdp_drop_min"), f0)
    rp.add("xdp_redirect_min", base.fd("xdp_redirect_min"), f0)
    rp.add("xdp_redirect_spread", base.fd("xdp_redirect_spread"), f0)
    for pc in stable:
        frame = pc.frames(0, 1)[0]
        if pc.prerecord:
            run_once(gw.fd, frame)      # phase B's new flows may have evicted it
        rp.add(pc.key, gw.fd, frame, gw.counters)
    rp.run(trials)
    return rp


def _time_single_shot(base, gw, per_trial: int, trials: int, p) -> SingleShot:
    """Single-shot (cold), interleaved."""
    gw.dp.clear_flows()                 # room for its flows: nothing evicted while timed
    ss = SingleShot(per_trial, progress=p)
    hit_frames = F.flows4("tcp4", F.SRC["hit"], 0, per_trial)
    ss.add("xdp_drop_min", base.fd("xdp_drop_min"), hit_frames)
    ss.add("xdp_redirect_min", base.fd("xdp_redirect_min"), hit_frames)
    for pc in CLASSES:
        if pc.new_flows:
            frames = pc.frames(SINGLE_NEW_START, per_trial * trials)
        else:
            frames = pc.frames(0, per_trial)
        if pc.prerecord:
            for f in frames:
                run_once(gw.fd, f)
        ss.add(pc.key, gw.fd, frames, consume=pc.new_flows, counters=gw.counters)
    ss.run(trials)
    return ss


def _measurements(states: dict[str, list[Rotated]], rp: Repeat, ss: SingleShot, stable: list[PacketClass],
                  info: dict, repeat: int, trials: int, hit_flows: int) -> list[Measurement]:
    """The figures of the three methods, each net of its own harness cost and next to
    the redirect baseline timed the same way (the harness costs go into `info`).
    Rotated figures come for a steady-state table (keys without suffix: the
    targets') and a fresh one (`@fresh`), each against its own state's baselines."""
    drop_repeat = rp.value("xdp_drop_min")
    ss_overhead = ss.mean("xdp_drop_min") - drop_repeat
    info["single_shot_harness_ns"] = ss_overhead
    info["rotator_overhead_ns"] = {}
    net = {}
    for state, phases in states.items():
        overhead = rotated_value(phases, "xdp_drop_min") - drop_repeat
        info["rotator_overhead_ns"][state] = overhead
        net[state] = {name: rotated_value(phases, name) - overhead
                      for name in (*BASELINES, *(pc.key for pc in CLASSES))}

    def ss_net(name: str) -> float:
        return ss.mean(name) - ss_overhead

    redirect = {"repeat": rp.value("xdp_redirect_min"), "single": ss_net("xdp_redirect_min"),
                **{f"rotated, {STATE_NAMES[s]}": net[s]["xdp_redirect_min"] for s in STATES}}
    methods = {
        "repeat": f"repeat={repeat} on one frame (median of {trials})",
        "single": "single-shot: repeat=1 per distinct frame, kernel-timed, net of the harness (cold)",
        **{f"rotated, {STATE_NAMES[s]}": f"rotated: repeat={repeat}, a different flow every repetition, net of the "
                                        f"rotator (median of {trials}), {STATE_NAMES[s]}" for s in STATES},
    }
    suffix = {"repeat": "@repeat", "single": "@single", "rotated, steady state": "", "rotated, fresh table": "@fresh"}
    results: list[Measurement] = []

    def add(key: str, name: str, value: float, method: str, params=None, checks=None) -> None:
        results.append(Measurement(SECTION, key + suffix[method], name, value, "ns/pkt", f"{BASELINE} ({method})",
                                   redirect[method], methods[method], params=params or {}, checks=checks or {}))

    for state in ("steady", "fresh"):
        method = f"rotated, {STATE_NAMES[state]}"
        drop = net[state]["xdp_drop_min"]
        phases = states[state]
        for name, label in (("xdp_drop_min", "baseline: XDP_DROP"),
                            ("xdp_redirect_min", "baseline: MAC rewrite + redirect")):
            add(name, f"{label} ({STATE_NAMES[state]})", net[state][name], method,
                {"raw_ns": [x for rt in phases for x in rt.entry(name).results]})
        for pc in CLASSES:
            e = rotated_entry(phases, pc.key)
            value = net[state][pc.key]
            add(pc.key, f"{pc.name} ({STATE_NAMES[state]})", value, method,
                {"raw_ns": e.results, "flows": "new every repetition" if pc.new_flows else hit_flows,
                 "repetitions": e.runs, "state": state, "xdp_drop_ns": drop,
                 "ratio_to_xdp_drop": value / drop if drop > 0 else None},
                _check(pc.expect, e.runs, e.counter_delta))
    add("xdp_drop_min", "baseline: XDP_DROP", drop_repeat, "repeat", {"trials_ns": rp.results["xdp_drop_min"]})
    add("xdp_redirect_min", "baseline: MAC rewrite + redirect", rp.value("xdp_redirect_min"), "repeat",
        {"trials_ns": rp.results["xdp_redirect_min"]})
    add("xdp_redirect_spread", "baseline: redirect, spread by port", rp.value("xdp_redirect_spread"), "repeat",
        {"trials_ns": rp.results["xdp_redirect_spread"]})
    for pc in stable:
        add(pc.key, pc.name, rp.value(pc.key), "repeat", {"trials_ns": rp.results[pc.key]},
            _check(pc.expect, rp.runs(pc.key), rp.counter_delta[pc.key]))
    add("xdp_redirect_min", "baseline: MAC rewrite + redirect", ss_net("xdp_redirect_min"), "single",
        {"raw_mean_ns": ss.mean("xdp_redirect_min")})
    for pc in CLASSES:
        e = ss.entry(pc.key)
        chk = _check(pc.expect, e.runs, e.counter_delta)
        chk["verdicts"] = e.verdicts
        chk["ok"] = chk["ok"] and e.verdicts.get(pc.verdict, 0) == e.runs
        add(pc.key, pc.name, ss_net(pc.key), "single", {"raw_mean_ns": ss.mean(pc.key), "frames": e.runs}, chk)
    return results

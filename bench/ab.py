"""Section ab: this tree's XDP program beside another build of it, timed in the same rounds.

`--ab-ebpf DIR` names the other build's ebpf/ directory (for a commit:
`git archive <commit> ebpf | tar -x -C DIR`); it must have this tree's map
layouts, since this tree's control plane programs both. Both programs are
loaded side by side in one process, each with its own maps, and every class of
the katran section (flow hits and new flows, tunnel and local VM) runs for
both in the same rotated rounds, fresh and steady state. The ratio is this
tree's figure over the other build's, the median of the rounds' ratios.
Without DIR, the other build is this tree again (A/A): the ratios then show
the method's noise floor on this machine."""
from __future__ import annotations

import os
from pathlib import Path

from dataplane import libbpf
from dataplane.program import ENTRY_FILE, program_source

from . import frames as F
from .common import Context, Measurement, median, paired_ratio, pinned
from .katran import FLOW_ENTRIES, STATE_NAMES, XDPGW_CLASSES, class_rotation
from .programs import Rotation, load_baselines, load_rotator, load_xdpgw
from .testrun import STATES, FlowTables, Timed, counter_check, fresh_and_steady, plain_drop_ns, rotated_entry, \
    rotated_value

SECTION = "ab"
ARMS = ("this", "other")


def ebpf_dir_problem(path: str) -> str | None:
    """Why `path` cannot be the other build's ebpf/ directory, or None."""
    if not (Path(path) / ENTRY_FILE).is_file():
        return f"--ab-ebpf {path}: no {ENTRY_FILE} there (give the ebpf/ directory of a build)"
    return None


def _layouts(prog_fd: int) -> dict[str, tuple[int, int, int, int]]:
    """name -> (type, key size, value size, entries) of every map the program uses."""
    out = {}
    for map_id in libbpf.prog_map_ids(prog_fd):
        fd = libbpf.map_fd_by_id(map_id)
        try:
            i = libbpf.map_info(fd)
            out[i.name.decode()] = (i.type, i.key_size, i.value_size, i.max_entries)
        finally:
            os.close(fd)
    return out


def _layout_difference(this_fd: int, other_fd: int) -> str | None:
    """The first map whose layout differs between the two programs, said in words."""
    this, other = _layouts(this_fd), _layouts(other_fd)
    for name in sorted(this.keys() | other.keys()):
        if this.get(name) != other.get(name):
            return (f"map {name} differs (type, key, value, entries: this tree {this.get(name)}, "
                    f"that build {other.get(name)})")
    return None


def run(ctx: Context) -> dict:
    p = ctx.progress
    hit_flows = ctx.size(4000, 500)
    repeat = ctx.size(20_000, 2_000)
    trials = ctx.size(30, 1)
    other = Path(ctx.ab_ebpf).resolve() if ctx.ab_ebpf else None
    info: dict = {"repeat": repeat, "trials": trials, "hit_flows_per_class": hit_flows, "cpu": ctx.cpu,
                  "flow_entries": FLOW_ENTRIES,
                  "other": str(other) if other else "this tree again (A/A: no --ab-ebpf DIR given)"}
    p("compiling the baselines, the rotator and both builds of xdpgw")
    base = load_baselines(1)
    rotator = None
    arms: dict = {}
    try:
        rotator = load_rotator()
        arms["this"] = load_xdpgw(flow_entries=FLOW_ENTRIES)
        try:
            arms["other"] = load_xdpgw(flow_entries=FLOW_ENTRIES,
                                       **({"source": program_source(ebpf_dir=other)} if other else {}))
        except Exception as exc:  # noqa: BLE001 - compile or programming errors of any kind
            raise RuntimeError(f"--ab-ebpf {other}: this tree's control plane cannot load and program that "
                               f"build ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                               "compare builds with the same map layouts") from None
        differ = _layout_difference(arms["this"].fd, arms["other"].fd)
        if differ:
            raise RuntimeError(f"--ab-ebpf {other}: {differ}; compare builds with the same map layouts")
        base_rot = Rotation.v4("tcp4", F.SRC["hit"], hit_flows)
        baselines = [Timed("xdp_drop_min", base_rot, base.fd("xdp_drop_min"))]
        timed = []
        for arm, gw in arms.items():
            tables = FlowTables(arm, FLOW_ENTRIES, gw.dp.clear_flows)
            timed += [Timed(f"{arm}:{c.key}", class_rotation(c, hit_flows), gw.fd, tables, c.new_flows,
                            not c.new_flows, gw.counters) for c in XDPGW_CLASSES]
        with pinned(ctx.cpu):
            drop_repeat = plain_drop_ns(base.fd("xdp_drop_min"), repeat)
            states = fresh_and_steady(rotator, repeat, trials, baselines, timed, p)
    finally:
        for obj in (*arms.values(), rotator, base):
            if obj is not None:
                obj.close()
    results = []
    for state in STATES:
        phases = states[state]
        overhead = rotated_value(phases, "xdp_drop_min") - drop_repeat
        for c in XDPGW_CLASSES:
            net = {arm: [x - overhead for x in rotated_entry(phases, f"{arm}:{c.key}").results] for arm in ARMS}
            checks = {arm: counter_check(c.expect, e.runs, e.counter_delta)
                      for arm in ARMS for e in [rotated_entry(phases, f"{arm}:{c.key}")]}
            checks["ok"] = all(checks[arm]["ok"] for arm in ARMS)
            results.append(Measurement(
                SECTION, f"{c.key}@{state}", f"{c.name}, this tree ({STATE_NAMES[state]})", median(net["this"]),
                "ns/pkt", f"the other build, same class ({STATE_NAMES[state]})", median(net["other"]),
                f"rotated: repeat={repeat}, net of the rotator, median of {trials} rounds; ratio: median of the "
                f"rounds' ratios",
                params={"state": state, "this_ns": net["this"], "other_ns": net["other"]}, checks=checks,
                paired_ratio=paired_ratio(net["this"], net["other"])))
    return {"results": results, "info": info}

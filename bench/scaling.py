"""Section scaling: flow-hit and new-flow cost (rotated method, see
bench/perpacket.py) as the flow table grows (1k, 100k, 1M entries) and as a
service's VM set grows (1, 100, 1000 VMs), each next to the minimal redirect
baseline timed in the same phase.

Flow-table sizes: xdpgw is loaded with Sizes(flow_entries=N) and filled to N
entries with batch updates of synthetic IPv4 flow keys (struct flow_key4 of
flow_table4, built with numpy), in random order, an equal share from each CPU: the table's LRU lists
are per CPU (BPF_F_NO_COMMON_LRU), each CPU owns N / ncpus entries and evicts
only from its own list. Hits then rotate over all N resident flows; new flows
(timed in a second phase, so their evictions cannot turn the timed hits into
misses) go into the full table and each evicts one entry: the steady state of
a busy gateway."""
from __future__ import annotations

import ipaddress

import numpy as np

from . import frames as F
from .common import Context, Measurement, pinned
from .programs import WEB, Rotation, count_entries, fill_flows, load_baselines, load_rotator, load_xdpgw, possible_cpus
from .testrun import Rotated, counter_check, plain_drop_ns

SECTION = "scaling"
NEW_PERIOD = 1 << 30
HIT_EXPECT = {"flow_hits": 1, "local_fwd": 1}
NEW_EXPECT = {"flow_misses": 1, "local_fwd": 1}


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n))


def _phase(rotator, base, repeat: int, trials: int, entries: list, progress, label: str,
           warm: dict | None = None) -> Rotated:
    """One interleaved phase: the two baselines + `entries` [(name, rotation, fd, counters)]."""
    rt = Rotated(rotator, repeat, progress=progress)
    base_rot = Rotation.v4("tcp4", F.SRC["hit"], 1000)
    rt.add("xdp_drop_min", base_rot, base.fd("xdp_drop_min"))
    rt.add("xdp_redirect_min", base_rot, base.fd("xdp_redirect_min"))
    for name, rot, fd, counters in entries:
        rt.add(name, rot, fd, counters)
        if warm and name in warm:
            progress(f"{label}warming {name}")
            rt.warm(name, warm[name])
    rt.run(trials, label=label)
    return rt


def _net(rt: Rotated, name: str, drop_repeat_ns: float) -> float:
    """ns of `name` minus the rotator's own cost (rotated XDP_DROP - plain XDP_DROP)."""
    return rt.value(name) - (rt.value("xdp_drop_min") - drop_repeat_ns)


def _measurements(hits: Rotated, news: Rotated, key: str, names: tuple[str, str], what: str,
                  params: dict, drop_repeat: float, repeat: int, trials: int) -> list[Measurement]:
    """The hit and new-flow figures of one scaling point, each against the minimal redirect."""
    out = []
    for kind, rt, expect, name in (("hit", hits, HIT_EXPECT, names[0]), ("new", news, NEW_EXPECT, names[1])):
        e = rt.entry(kind)
        out.append(Measurement(
            SECTION, f"{kind}@{key}", f"{name}, {what}",
            _net(rt, kind, drop_repeat), "ns/pkt", "minimal redirect (rotated)",
            _net(rt, "xdp_redirect_min", drop_repeat),
            f"rotated repeat={repeat}, median of {trials}, net of the rotator",
            params={**params, "raw_ns": e.results}, checks=counter_check(expect, e.runs, e.counter_delta)))
    return out


def run(ctx: Context) -> dict:
    p = ctx.progress
    flow_sizes = ctx.size([1000, 100_000, 1_000_000], [1000, 8192])
    vm_counts = ctx.size([1, 100, 1000], [1, 10])
    repeat = ctx.size(200_000, 2000)
    trials = ctx.size(5, 1)
    hit_flows_vms = ctx.size(10000, 500)
    cpus = possible_cpus()
    rng = np.random.default_rng(7)

    results: list[Measurement] = []
    info: dict = {"repeat": repeat, "trials": trials, "cpus": len(cpus), "flow_tables": {}}
    p("compiling the baselines and the rotator")
    base = load_baselines(1)
    rotator = None
    try:
        base.set_target(0, "02:00:00:0c:00:01", "02:00:00:0b:00:01", 1)
        rotator = load_rotator()
        with pinned(ctx.cpu):
            drop_repeat = plain_drop_ns(base.fd("xdp_drop_min"), repeat)
            info["drop_repeat_ns"] = drop_repeat

            # ---- flow-table size --------------------------------------------------
            for n in flow_sizes:
                label = f"{_label(n)} flows: "
                p(f"{label}loading xdpgw with flow_entries={n}")
                gw = load_xdpgw(flow_entries=n)
                try:
                    p(f"{label}filling the flow table")
                    keys = F.flow_keys4(F.SRC["fill"], 0, n)
                    order = rng.permutation(n)
                    vm_ids = (1 + np.arange(n) % gw.n_vms).astype(np.uint32)
                    fill_flows(gw.flow_fd(), keys[order], vm_ids[order], WEB, cpus)
                    resident = count_entries(gw.flow_fd(), F.FLOW_KEY4_DTYPE.itemsize, F.FLOW_ENTRY_DTYPE.itemsize, n)
                    info["flow_tables"][n] = {"capacity": n, "resident_after_fill": resident}
                    hit_rot = Rotation.v4("tcp4", F.SRC["fill"], n)
                    new_rot = Rotation.v4("tcp4", F.SRC["new"], NEW_PERIOD)
                    hits = _phase(rotator, base, repeat, trials, [("hit", hit_rot, gw.fd, gw.counters)], p,
                                  f"{label}hits: ")
                    news = _phase(rotator, base, repeat, trials, [("new", new_rot, gw.fd, gw.counters)], p,
                                  f"{label}new flows: ")
                    results += _measurements(
                        hits, news, f"flows={n}", ("flow-table hit", "new flow (full table)"),
                        f"{_label(n)} entries", {"flows": n, "table_entries": n, "resident": resident},
                        drop_repeat, repeat, trials)
                finally:
                    gw.close()

            # ---- VMs per service --------------------------------------------------
            p("VMs per service: loading xdpgw")
            gw = load_xdpgw(flow_entries=65536, max_vms=max(1024, max(vm_counts) + 1))
            try:
                for j, v in enumerate(vm_counts):
                    label = f"{v} VMs: "
                    gw.set_vms(v)
                    # a fresh set of hit flows per VM count, so they spread over these VMs
                    hit_base = str(ipaddress.ip_address(F.SRC["hit"]) + 256 * j)
                    hit_rot = Rotation.v4("tcp4", hit_base, hit_flows_vms)
                    new_rot = Rotation.v4("tcp4", str(ipaddress.ip_address(F.SRC["new"]) + 256 * j), NEW_PERIOD)
                    hits = _phase(rotator, base, repeat, trials, [("hit", hit_rot, gw.fd, gw.counters)], p,
                                  f"{label}hits: ", warm={"hit": hit_flows_vms})
                    news = _phase(rotator, base, repeat, trials, [("new", new_rot, gw.fd, gw.counters)], p,
                                  f"{label}new flows: ", warm={"new": 65536})
                    results += _measurements(
                        hits, news, f"vms={v}", ("flow-table hit", "new flow"), f"{v} VMs per service",
                        {"vms": v, "table_entries": 65536}, drop_repeat, repeat, trials)
            finally:
                gw.close()
    finally:
        if rotator is not None:
            rotator.close()
        base.close()
    return {"results": results, "info": info}

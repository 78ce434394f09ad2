"""Section control: control-plane costs, each next to a baseline timed in the
same run (interleaved):

* Maglev table build, M = 65537, N = 10 / 100 / 1000 VMs: the Cython builder
  (control.maglev.build_table) against the pure-Python spec
  (build_table_reference). The NSDI'16 paper reports ~1.8 ms for M = 65537.
* Atomic Maglev table swap (Dataplane.set_maglev_table: new inner map, batch
  fill, one outer-map update) against writing the same M slots in place into
  an existing array map with one batch update (not atomic).
* Folding per-CPU counters of 1k regions: Cython fold_percpu against the
  numpy reference, for this machine's CPUs and for 64 CPUs.
* Reading 1M flow entries: Dataplane.flows() (batch lookups, then one ctypes
  object per key and value), Dataplane.flows_array() when present (batch
  lookups into numpy, no per-entry objects) and raw libbpf.lookup_batch,
  against bcc's per-key iteration (get_next_key + lookup per entry), which is
  time-bounded and extrapolated if it does not finish.
* Daemon startup: control.gateway.Gateway(config).start() (compile + load +
  program + attach) in a namespace that has the interfaces, against compiling,
  loading and attaching the minimal redirect baseline the same way."""
from __future__ import annotations

import os
import time

import numpy as np

from . import frames as F
from . import topology as T
from .common import Context, Measurement, best_of, median, timed
from .programs import WEB, count_entries, fill_flows, load_xdpgw, possible_cpus

SECTION = "control"
PAPER_MAGLEV_MS = 1.8


def _maglev(ctx: Context, results: list, info: dict) -> None:
    from control.maglev import build_table, build_table_reference

    m = ctx.size(65537, 4099)
    runs = ctx.size(50, 5)
    ref_runs = ctx.size(3, 1)
    for n in ctx.size([10, 100, 1000], [10, 100]):
        ctx.progress(f"Maglev build, N={n}, M={m}")
        backends = [(f"vm{i}", i + 1, 1) for i in range(n)]
        fast, ref = [], []
        build_table(backends, m)                         # import + first-call costs out of the way
        for r in range(max(runs, ref_runs)):
            if r < runs:
                fast.append(timed(lambda: build_table(backends, m))[0])
            if r < ref_runs:
                ref.append(timed(lambda: build_table_reference(backends, m))[0])
        split = {}
        try:                                            # where the time goes: Python checks vs the C loop
            from control.maglev import _ext, _prepare

            active = _prepare(backends, m, 0)
            split = {"prepare_ms": median(timed(lambda: _prepare(backends, m, 0))[0] for _ in range(runs)) * 1e3,
                     "populate_ms": median(timed(lambda: _ext().build_table(active, m, 0))[0]
                                           for _ in range(runs)) * 1e3}
        except (ImportError, AttributeError, TypeError):
            pass
        same = bool(np.array_equal(build_table(backends, m), build_table_reference(backends, m)))
        results.append(Measurement(SECTION, f"maglev_build@N={n}", f"Maglev build, N={n}, M={m} (Cython)",
                                   median(fast) * 1e3, "ms", "pure-Python reference", median(ref) * 1e3,
                                   f"median of {len(fast)} builds vs {len(ref)} reference builds, interleaved",
                                   params={"m": m, "n": n, "min_ms": min(fast) * 1e3,
                                           "paper_ms": PAPER_MAGLEV_MS if m == 65537 else None, **split},
                                   checks={"identical_to_reference": same, "ok": same}))


def _swap(ctx: Context, results: list, info: dict) -> None:
    from control.maglev import build_table
    from dataplane import libbpf

    m = 65537
    runs = ctx.size(50, 5)
    ctx.progress("loading xdpgw for the table swap")
    gw = load_xdpgw(flow_entries=1024)
    inner = libbpf.map_create(libbpf.BPF_MAP_TYPE_ARRAY, "bench_inplace", 4, 4, m)
    try:
        tables = [build_table([(f"vm{i}", i + 1, 1) for i in range(k)], m) for k in (3, 4)]
        keys = np.arange(m, dtype=np.uint32).tobytes()
        swap, inplace = [], []
        for r in range(runs):
            t = tables[r % 2]
            swap.append(timed(lambda: gw.dp.set_maglev_table(WEB, t))[0])
            inplace.append(timed(lambda: libbpf.update_batch(inner, keys, t.tobytes(), m, "in place"))[0])
        ok = bool(np.array_equal(gw.dp.maglev_table(WEB), tables[(runs - 1) % 2]))
        results.append(Measurement(SECTION, "maglev_swap", f"atomic Maglev table swap, M={m}", median(swap) * 1e3,
                                   "ms", "in-place batch write of M slots", median(inplace) * 1e3,
                                   f"median of {runs}, interleaved",
                                   checks={"table_in_dataplane": ok, "ok": ok}))
    finally:
        os.close(inner)
        gw.close()


def _fold(ctx: Context, results: list, info: dict) -> None:
    from dataplane.fold import fold_percpu, fold_percpu_reference

    rng = np.random.default_rng(1)
    loops = ctx.size(2000, 50)
    regions = 1001                                   # 1000 regions + "unknown"
    for ncpu in sorted({len(possible_cpus()), 64}):
        ctx.progress(f"folding per-CPU counters, {regions} keys x {ncpu} CPUs")
        raw = rng.integers(0, 1 << 62, size=(regions, ncpu, 2), dtype=np.uint64)
        fold_percpu(raw)
        fast, ref = [], []
        for _ in range(5):
            fast.append(timed(lambda: [fold_percpu(raw) for _ in range(loops)])[0] / loops)
            ref.append(timed(lambda: [fold_percpu_reference(raw) for _ in range(loops)])[0] / loops)
        same = bool(np.array_equal(fold_percpu(raw), fold_percpu_reference(raw)))
        results.append(Measurement(SECTION, f"fold@cpus={ncpu}", f"fold per-CPU counters, 1k regions x {ncpu} CPUs",
                                   median(fast) * 1e6, "us", "numpy reference", median(ref) * 1e6,
                                   f"mean of {loops} calls, median of 5 rounds",
                                   checks={"identical_to_reference": same, "ok": same}))


def _flows_read(ctx: Context, results: list, info: dict) -> None:
    from dataplane import libbpf

    n = ctx.size(1_000_000, 8000)
    cap = ctx.size(1 << 20, 1 << 13)
    budget = ctx.size(60.0, 10.0)
    ctx.progress(f"loading xdpgw with a {cap}-entry flow table")
    gw = load_xdpgw(flow_entries=cap)
    try:
        ctx.progress(f"filling {n} flow entries")
        keys = F.flow_keys4(F.SRC["fill"], 0, n)
        fill_flows(gw.flow_fd(), keys, np.ones(n, dtype=np.uint32), WEB, possible_cpus())
        fd = gw.flow_fd()
        ks, vs = F.FLOW_KEY4_DTYPE.itemsize, F.FLOW_ENTRY_DTYPE.itemsize
        resident = count_entries(fd, ks, vs, cap)
        info["flows_resident"] = resident

        ctx.progress(f"reading {resident} flows: bcc per-key iteration (bounded {budget:.0f} s)")
        table = gw.dp._table("flow_table4")
        seen = 0
        t0 = time.perf_counter()
        deadline = t0 + budget
        for key in table:                       # get_next_key, lazily
            table[key]                          # one lookup per key
            seen += 1
            if seen % 4096 == 0 and time.perf_counter() > deadline:
                break
        iter_s = time.perf_counter() - t0
        complete = seen >= resident
        iter_full = iter_s if complete else iter_s * resident / max(1, seen)

        ctx.progress(f"reading {resident} flows: batch reads")
        runs = ctx.size(3, 1)
        api = best_of(lambda: gw.dp.flows(), ctx.size(2, 1), budget_s=30)
        raw = best_of(lambda: libbpf.lookup_batch(fd, ks, vs, cap, "flow_table4"), runs)
        got_api = len(gw.dp.flows()) if n <= 100_000 else None
        base_note = "measured" if complete else f"extrapolated from {seen} entries in {iter_s:.1f} s"
        common = {"entries": resident, "bcc_iteration_s": iter_full, "bcc_iteration": base_note}
        results.append(Measurement(SECTION, "flows_read@api", f"read {resident} flows: Dataplane.flows()",
                                   median(api), "s", "bcc per-key iteration", iter_full,
                                   f"median of {len(api)}", params=common,
                                   checks={"entries": got_api} if got_api is not None else {}))
        if hasattr(gw.dp, "flows_array"):
            arr = best_of(lambda: gw.dp.flows_array(), runs)
            k_arr, _ = gw.dp.flows_array()
            results.append(Measurement(SECTION, "flows_read@array", f"read {resident} flows: Dataplane.flows_array()",
                                       median(arr), "s", "bcc per-key iteration", iter_full,
                                       f"median of {len(arr)}", params=common,
                                       checks={"entries": int(k_arr.size), "ok": int(k_arr.size) == resident}))
        results.append(Measurement(SECTION, "flows_read@raw", f"read {resident} flows: libbpf.lookup_batch (bytes)",
                                   median(raw), "s", "bcc per-key iteration", iter_full,
                                   f"median of {len(raw)}", params=common))
    finally:
        gw.close()


# ---- startup, in a namespace that has the interfaces ----------------------------

def _start_gateway(config) -> dict:
    from control.gateway import Gateway
    from dataplane.program import Sizes, load

    gw = Gateway(config)
    seconds = gw.start(reset=True)          # a first start: no pinned state to adopt
    mode = gw.attached_mode
    gw.stop()
    t0 = time.perf_counter()
    bpf, _ = load(Sizes(flow_entries=config.gateway.flow_table_size))   # compile + load alone
    compile_load = time.perf_counter() - t0
    bpf.cleanup()
    return {"seconds": seconds, "mode": mode, "compile_load_s": compile_load}


def _start_baseline() -> dict:
    from bcc import BPF

    from .programs import load_baselines

    t0 = time.perf_counter()
    base = load_baselines(1)
    base.set_target(0, T.vm_mac(1), T.port_mac(1), __import__("socket").if_nametoindex(T.port_name(1)))
    BPF.attach_xdp(T.UPLINK.encode(), base.fns["xdp_redirect_min"], T.XDP_FLAGS_DRV_MODE)
    seconds = time.perf_counter() - t0
    BPF.remove_xdp(T.UPLINK.encode(), T.XDP_FLAGS_DRV_MODE)
    base.close()
    return {"seconds": seconds}


def _startup(ctx: Context, results: list, info: dict) -> None:
    from testbed.netns import run_in_netns

    from dataplane.pinning import remove_pins

    from .e2e import gateway_config, pin_dir

    runs = ctx.size(3, 1)
    topo = T.Topology(ctx.prefix, 2)
    pins = pin_dir(ctx.prefix, "start")
    try:
        ctx.progress(f"startup: building namespaces {ctx.prefix}-*")
        topo.up()
        # the VMs' ends need XDP (or GRO) for redirects; irrelevant to startup, so none here
        config = gateway_config(ctx.prefix, 2, 65536, pins)
        gw_runs, base_runs = [], []
        for r in range(runs):
            ctx.progress(f"startup: run {r + 1}/{runs}")
            gw_runs.append(run_in_netns(topo.gw_ns, _start_gateway, config, timeout=180))
            base_runs.append(run_in_netns(topo.gw_ns, _start_baseline, timeout=180))
    finally:
        topo.down()
        remove_pins(pins)
    results.append(Measurement(
        SECTION, "startup", "daemon startup: Gateway.start() (compile+load+program+attach)",
        median(r["seconds"] for r in gw_runs), "s", "minimal redirect: compile+load+attach",
        median(r["seconds"] for r in base_runs), f"median of {runs}, interleaved, each in a fresh process",
        params={"runs_s": [r["seconds"] for r in gw_runs], "compile_load_s": [r["compile_load_s"] for r in gw_runs],
                "mode": gw_runs[0]["mode"]},
        checks={"native": gw_runs[0]["mode"] == "native", "ok": gw_runs[0]["mode"] == "native"}))


def run(ctx: Context) -> dict:
    results: list[Measurement] = []
    info: dict = {}
    for part in (_maglev, _swap, _fold, _flows_read, _startup):
        part(ctx, results, info)
    return {"results": results, "info": info}

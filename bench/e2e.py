"""Section e2e: delivered packets per second through a gateway namespace over
veth, xdpgw (a real control.gateway.Gateway, native XDP) against the minimal
redirect gateway (bench/baselines.c xdp_redirect_spread attached instead), in
alternating trials of the same run, for 1, 1k, 100k and 1M flows.

Topology (bench/topology.py): client --veth--> gw (up0: the gateway under
test) --veth--> k VMs (eth0: xdp_sink counts per VM MAC and drops).

Generator: /proc/net/pktgen does not exist on this kernel, so frames come from
BPF_PROG_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES) run by a child
that entered the client namespace, with bench/trafficgen.c: each repetition
rewrites the frame into the next of N UDP flows and returns XDP_TX, which the
kernel turns into a transmit on the client's veth. Everything (generator,
gateway, VM sinks) then runs in softirq on the one CPU the generator is pinned
to, so Mpps is the inverse of the whole path's per-packet cost on one core.

Accounting per trial: generated (the generator's XDP_TX counter) must equal
delivered (the sinks' counters for the VM MACs); any difference is explained
by the gateway's drop/pass counters and the veths' XDP drop and error
counters (ethtool -S), all read before and after."""
from __future__ import annotations

import ipaddress
import os
import socket
import time

from dataplane import libbpf

from . import frames as F
from . import topology as T
from .common import Context, Measurement, median, paired_ratio
from .programs import load_baselines, load_trafficgen, possible_cpus
from .worker import NsWorker

SECTION = "e2e"
CLIENTS = "198.18.128.0/17"       # the generator's sources: region "clients"
BATCH = 64
CPU_STRIDE = 256                  # addresses between two CPUs' flows (256 x 50000 flows each)
TWO_CPU_FLOWS = 1000


# ---- functions run by the worker inside the gateway namespace ------------------
_STATE: dict = {}


def _gw_setup_baseline(base, n_vms: int) -> None:
    for i in range(1, n_vms + 1):
        base.set_target(i - 1, T.vm_mac(i), T.port_mac(i), socket.if_nametoindex(T.port_name(i)))
    _STATE["baseline"] = base


def _gw_start(config) -> dict:
    from control.gateway import Gateway

    _gw_stop()
    gw = Gateway(config)
    seconds = gw.start(reset=True)
    _STATE["gateway"] = gw
    return {"seconds": seconds, "mode": gw.attached_mode}


def _gw_attach(which: str) -> str:
    from bcc import BPF

    if which == "xdpgw":
        fn = _STATE["gateway"].fn
    else:
        fn = _STATE["baseline"].fns["xdp_redirect_spread"]
    BPF.attach_xdp(T.UPLINK.encode(), fn, T.XDP_FLAGS_DRV_MODE)
    return which


def _gw_counters() -> dict:
    dp = _STATE["gateway"].dataplane
    out = {f"stat_{k}": v for k, v in dp.stats().items()}
    out.update({f"drop_{k}": v for k, v in dp.drop_counters().items()})
    return out


def _gw_flow_count() -> int:
    return _STATE["gateway"].dataplane.flow_count()


def _gw_stop() -> None:
    gw = _STATE.pop("gateway", None)
    if gw is not None:
        gw.stop()
        gw.dataplane.bpf.cleanup()          # free its maps now, not when the worker exits


GW_FUNCTIONS = {"setup_baseline": _gw_setup_baseline, "start": _gw_start, "attach": _gw_attach,
                "counters": _gw_counters, "flow_count": _gw_flow_count, "stop": _gw_stop}


# ---- the generators: one worker per CPU inside the client namespace ---------------
def _gen_run(fd: int, frame: bytes, repeat: int, batch: int, cpu: int, start_at: float) -> dict:
    """Send `repeat` frames from `cpu`, starting at `start_at` (CLOCK_MONOTONIC is
    system-wide: generators on several CPUs start together)."""
    os.sched_setaffinity(0, {cpu})
    ifindex = socket.if_nametoindex(T.CLIENT_IF)
    time.sleep(max(0.0, start_at - time.monotonic()))
    t0 = time.monotonic()
    retval, _, ns = libbpf.prog_test_run(fd, frame, repeat=repeat, flags=libbpf.BPF_F_TEST_XDP_LIVE_FRAMES,
                                         batch_size=batch, ingress_ifindex=ifindex)
    return {"start": t0, "end": time.monotonic(), "kernel_ns_per_frame": ns, "retval": retval}


GEN_FUNCTIONS = {"generate": _gen_run}


def pin_dir(prefix: str, role: str) -> str:
    """Where a benchmark gateway pins its state maps: per run and role, removed at the end."""
    from dataplane.pinning import PIN_ROOT

    return f"{PIN_ROOT}/{prefix}-{role}"


def gateway_config(prefix: str, n_vms: int, flow_table_size: int, pins: str):
    """The gateway under test. new_flow_rate_limit = 0: the flood guard would stop
    recording flows past 100k new flows/s per CPU, and the warm-up that records
    the 1M flows of a measurement runs far above that (see README)."""
    from control.config import Config, GatewayConfig, RegionConfig, ServiceConfig, VMConfig, validate

    vms = tuple(VMConfig(name=f"vm{i}", port=T.port_name(i), mac=T.vm_mac(i)) for i in range(1, n_vms + 1))
    return validate(Config(
        gateway=GatewayConfig(name=prefix, interface=T.UPLINK, xdp_mode="native", next_hop_mac=T.client_mac(),
                              api_socket=f"/run/xdpgw/{prefix}-bench.sock", pin_dir=pins,
                              flow_table_size=flow_table_size, new_flow_rate_limit=0),
        regions=(RegionConfig(name="clients", prefixes=(ipaddress.ip_network(CLIENTS),)),),
        services=(ServiceConfig(name="bench", vip=ipaddress.ip_address(F.VIP4), port=F.ECHO_PORT, protocol="udp",
                                vms=tuple(v.name for v in vms)),),
        vms=vms))


def _diff(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def _veth_losses(stats_delta: dict[str, dict[str, int]]) -> dict[str, int]:
    """Counters that mean a frame was lost on the way: XDP drops anywhere but at
    the VM sinks (whose drops are deliveries), transmit / redirect errors."""
    lost = {}
    for dev, d in stats_delta.items():
        for k, v in d.items():
            is_sink = dev.startswith("vm")
            if ("err" in k or ("drop" in k and not is_sink)) and v:
                lost[f"{dev}:{k}"] = v
    return lost


class _Run:
    def __init__(self, ctx: Context, topo: T.Topology, gen, base, worker: NsWorker,
                 generators: dict[int, NsWorker]) -> None:
        self.ctx, self.topo, self.gen, self.base, self.worker = ctx, topo, gen, base, worker
        self.generators = generators
        self.frame = F.template("udp4", payload=18)
        self.ncpus = len(possible_cpus())

    def snapshot(self, full: bool) -> dict:
        snap = {"sink": self.base.sink_counts(self.ncpus), "sent": self.gen.sent(),
                "gw": self.worker.call("counters")}
        if full:
            snap["veth"] = self.topo.all_veth_stats()
        return snap

    def generate(self, repeat: int, cpus: tuple[int, ...] | None = None) -> dict:
        """`repeat` frames from each CPU of `cpus` (default: the measuring CPU), side by side."""
        cpus = cpus or (self.ctx.cpu,)
        start_at = time.monotonic() + 0.05
        for c in cpus:
            self.generators[c].submit("generate", self.gen.fd, self.frame, repeat, BATCH, c, start_at)
        res = [self.generators[c].result("generate", timeout=120 + repeat / 1e5) for c in cpus]
        return {"elapsed_s": max(r["end"] for r in res) - min(r["start"] for r in res),
                "kernel_ns_per_frame": res[0]["kernel_ns_per_frame"] if len(res) == 1 else
                [r["kernel_ns_per_frame"] for r in res]}

    def trial(self, repeat: int, which: str, cpus: tuple[int, ...] | None = None) -> dict:
        before = self.snapshot(full=True)
        res = self.generate(repeat, cpus)
        time.sleep(0.05)                      # let any deferred softirq work finish
        after = self.snapshot(full=True)
        k = self.topo.n_vms
        per_vm = [int(after["sink"][i] - before["sink"][i]) for i in range(1, k + 1)]
        delivered = sum(per_vm)
        generated = after["sent"] - before["sent"]
        gw = _diff(after["gw"], before["gw"]) if which == "xdpgw" else {}
        veth = {dev: _diff(after["veth"][dev], before["veth"].get(dev, {})) for dev in after["veth"]}
        lost = generated - delivered
        gw_lost = sum(v for key, v in gw.items() if key.startswith("drop_")) + gw.get("stat_pass", 0)
        veth_lost = _veth_losses(veth)
        explained = gw_lost + sum(veth_lost.values())
        return {"which": which, "generated": generated, "delivered": delivered, "per_vm": per_vm,
                "other_frames_at_vms": int(after["sink"][0] - before["sink"][0]),
                "elapsed_s": res["elapsed_s"], "kernel_ns_per_frame": res["kernel_ns_per_frame"],
                "mpps": delivered / res["elapsed_s"] / 1e6, "lost": lost, "lost_explained": explained,
                "lossless": lost == 0, "accounted": lost == explained, "gateway_counters": gw,
                "veth_losses": veth_lost,
                "gw_rx": veth.get(f"gw/{T.UPLINK}", {}).get("rx_queue_0_xdp_packets")}


def _profile(run_: "_Run", worker: NsWorker, reps: int) -> dict:
    """Where the one CPU's time goes for each gateway (cpu-clock samples of
    everything on it: generator, veths, gateway, sinks)."""
    from .profiling import perf_profile

    out = {}
    for which in ("xdpgw", "baseline"):
        worker.call("attach", which)
        run_.ctx.progress(f"perf profile of the path, {which}")

        def workload(deadline: float) -> None:
            while time.monotonic() < deadline:
                run_.generate(min(reps, 1_000_000))

        out[which] = perf_profile(workload, seconds=2.0, cpu=run_.ctx.cpu)
    worker.call("attach", "xdpgw")
    return out


def _two_cpus(cpu: int) -> tuple[int, int] | None:
    """The measuring CPU and one more it may run on."""
    others = sorted(c for c in os.sched_getaffinity(0) if c != cpu)
    return (others[-1], cpu) if others else None


def _two_cpu(run_: "_Run", n: int, reps: int, trials: int, table: int, info: dict, p) -> list[Measurement]:
    """Both gateways with a generator on each of two CPUs (each its own n flows,
    its own veth queues), each trial paired with a one-CPU trial of the same
    gateway right after it, gateways alternating: the scaling is the median of
    the pairs' ratios."""
    cpus = tuple(info["two_cpus"])
    run_.worker.call("attach", "xdpgw")
    p(f"{n} flows, 2 CPUs: warming up (xdpgw records every CPU's flows)")
    run_.generate(n + 10_000, cpus)
    got: dict[str, list[tuple[dict, dict]]] = {"xdpgw": [], "baseline": []}
    for t in range(trials):
        for which in (("xdpgw", "baseline") if t % 2 == 0 else ("baseline", "xdpgw")):
            run_.worker.call("attach", which)
            pair = []
            for on in (cpus, None):
                p(f"{n} flows, {2 if on else 1} CPU{'s' if on else ''}: trial {t + 1}/{trials}, {which}, "
                  f"{reps} frames per CPU")
                tr = run_.trial(reps, which, on) if on else run_.trial(reps, which)
                tr.update({"flows": n, "trial": t, "cpus": list(on) if on else [run_.ctx.cpu]})
                info["trials_detail"].append(tr)
                pair.append(tr)
            got[which].append((pair[0], pair[1]))
    run_.worker.call("attach", "xdpgw")
    out = []
    for which, label in (("xdpgw", "xdpgw"), ("baseline", "minimal redirect gateway")):
        pairs = got[which]
        trs = [two for two, _ in pairs]
        two, one = median(t["mpps"] for t, _ in pairs), median(o["mpps"] for _, o in pairs)
        checks = {"lossless": all(t["lossless"] for t in trs), "accounted": all(t["accounted"] for t in trs),
                  "generated": sum(t["generated"] for t in trs), "delivered": sum(t["delivered"] for t in trs)}
        checks["ok"] = checks["lossless"] and checks["accounted"]
        if which == "xdpgw":
            checks["new_flows_during_trials"] = sum(t["gateway_counters"].get("stat_flow_misses", 0) for t in trs)
        key = "mpps_2cpu" if which == "xdpgw" else "mpps_2cpu_baseline"
        out.append(Measurement(
            SECTION, f"{key}@flows={n}", f"delivered Mpps, 2 CPUs, {n} flows per CPU, {label}", two, "Mpps",
            f"{label}, one CPU (paired trials)", one,
            f"a live-frames generator per CPU, {reps} frames each per trial, each 2-CPU trial followed by a "
            f"one-CPU trial of the same gateway; median of {trials} pairs' ratios",
            params={"flows_per_cpu": n, "cpus": list(cpus), "flow_table_size": table,
                    "mpps": [t["mpps"] for t, _ in pairs], "one_cpu_mpps": [o["mpps"] for _, o in pairs]},
            checks=checks, paired_ratio=paired_ratio([t["mpps"] for t, _ in pairs], [o["mpps"] for _, o in pairs])))
    x2, b2 = out[0].value, out[1].value
    out[0].params["vs_redirect_2cpu"] = x2 / b2 if b2 else None
    return out


def run(ctx: Context) -> dict:
    p = ctx.progress
    flow_counts = ctx.size([1, 1000, 100_000, 1_000_000], [1, 1000])
    trials = ctx.size(5, 1)
    per_trial = ctx.size(2_000_000, 20_000)
    k = ctx.vms
    ncpus = len(possible_cpus())

    def table_for(n: int) -> int:
        # all flows arrive on the generator's CPU, whose LRU share is 1/ncpus of the table;
        # at least the configuration's default size
        return max(65536, min(1 << 24, (int(ncpus * n * 1.25) // 1024 + 1) * 1024))

    info: dict = {"vms": k, "batch_size": BATCH, "frames_per_trial": per_trial, "trials": trials,
                  "flow_table_sizes": {n: table_for(n) for n in flow_counts}, "gateway_start": {},
                  "generator": "BPF_PROG_RUN live frames (no /proc/net/pktgen)"
                  if not os.path.exists("/proc/net/pktgen") else "BPF_PROG_RUN live frames", "cpu": ctx.cpu,
                  "trials_detail": []}
    results: list[Measurement] = []

    p("compiling the baselines and the generator")
    base = load_baselines(k)
    gen = None
    worker = None
    generators: dict[int, NsWorker] = {}
    gen_cpus = _two_cpus(ctx.cpu)
    info["two_cpus"] = list(gen_cpus) if gen_cpus else "skipped: fewer than 2 CPUs to run on"
    topo = T.Topology(ctx.prefix, k, queues=max(2, len(gen_cpus or ())))
    pins = pin_dir(ctx.prefix, "e2e")
    try:
        gen = load_trafficgen()
        p(f"building namespaces {ctx.prefix}-*")
        topo.up()
        for i in range(1, k + 1):
            topo.attach_xdp(topo.vm_ns(i), T.VM_IF, base.fd("xdp_sink"))
        worker = NsWorker(topo.gw_ns, GW_FUNCTIONS)
        worker.call("setup_baseline", base, k)
        for c in sorted({ctx.cpu, *(gen_cpus or ())}):
            generators[c] = NsWorker(topo.client_ns, GEN_FUNCTIONS)
        run_ = _Run(ctx, topo, gen, base, worker, generators)
        for j, n in enumerate(flow_counts):
            p(f"{n} flows: starting xdpgw with a {table_for(n)}-entry flow table (compile, load, program, attach)")
            info["gateway_start"][n] = worker.call("start", gateway_config(ctx.prefix, k, table_for(n), pins),
                                                   timeout=180)
            if j == 0:
                info["xdp_modes"] = {"gw/up0": topo.xdp_mode(topo.gw_ns, T.UPLINK),
                                     **{f"vm{i}/eth0": topo.xdp_mode(topo.vm_ns(i), T.VM_IF)
                                        for i in range(1, k + 1)}}
            src_base = str(ipaddress.ip_address("198.18.128.0") + CPU_STRIDE * ncpus * j)
            gen.configure(n, src_base, cpu_stride=CPU_STRIDE)
            reps = max(per_trial, 2 * n) if not ctx.quick else per_trial
            worker.call("attach", "xdpgw")
            p(f"{n} flows: warming up (xdpgw records every flow)")
            run_.generate(n + 10_000)
            trials_ = {"xdpgw": [], "baseline": []}
            for t in range(trials):
                order = ("xdpgw", "baseline") if t % 2 == 0 else ("baseline", "xdpgw")
                for which in order:
                    p(f"{n} flows: trial {t + 1}/{trials}, {which}, {reps} frames")
                    worker.call("attach", which)
                    tr = run_.trial(reps, which)
                    tr.update({"flows": n, "trial": t})
                    trials_[which].append(tr)
                    info["trials_detail"].append(tr)
            worker.call("attach", "xdpgw")
            x = median(t["mpps"] for t in trials_["xdpgw"])
            b = median(t["mpps"] for t in trials_["baseline"])
            paired = paired_ratio([t["mpps"] for t in trials_["xdpgw"]], [t["mpps"] for t in trials_["baseline"]])
            all_x = trials_["xdpgw"]
            checks = {
                "lossless": all(t["lossless"] for t in all_x),
                "accounted": all(t["accounted"] for t in all_x),
                "generated": sum(t["generated"] for t in all_x),
                "delivered": sum(t["delivered"] for t in all_x),
                "new_flows_during_trials": sum(t["gateway_counters"].get("stat_flow_misses", 0) for t in all_x),
                "baseline_lossless": all(t["lossless"] for t in trials_["baseline"]),
            }
            checks["ok"] = checks["lossless"] and checks["accounted"]
            checks["flow_table_entries"] = worker.call("flow_count", timeout=60)
            results.append(Measurement(
                SECTION, f"mpps@flows={n}", f"delivered Mpps, {n} flow{'s' if n != 1 else ''}", x, "Mpps",
                "minimal redirect gateway", b,
                f"live-frames generator, {reps} frames/trial, {trials} alternating pairs of trials: medians, and "
                f"the median of the pairs' ratios",
                params={"flows": n, "flow_table_size": table_for(n), "xdpgw_mpps": [t["mpps"] for t in all_x],
                        "baseline_mpps": [t["mpps"] for t in trials_["baseline"]]},
                checks=checks, paired_ratio=paired))
            if n == TWO_CPU_FLOWS and gen_cpus:
                results += _two_cpu(run_, n, reps, trials, table_for(n), info, p)
            if ctx.perf and not ctx.quick and n == 1000:
                info["perf_1k_flows"] = _profile(run_, worker, reps)
    finally:
        for g in generators.values():
            g.close()
        if worker is not None:
            try:
                worker.call("stop", timeout=30)
            except Exception as exc:  # noqa: BLE001 - teardown goes on
                ctx.notes.append(f"e2e: stopping the gateway: {exc}")
            worker.close()
        topo.down()
        from dataplane.pinning import remove_pins

        remove_pins(pins)
        for obj in (gen, base):
            if obj is not None:
                obj.close()
    return {"results": results, "info": info}

"""Section breakdown: where xdpgw's per-packet time goes, to explain the
targets it misses.

* variants: xdpgw compiled from its own sources with one stage stubbed out or
  changed (text edits of the spliced program, dataplane.program.program_source;
  a variant whose anchor text is gone is skipped and said so), timed on
  flow-table hits (10k flows, rotated) next to the program as it is;
* the unarmed capture: xdpgw as it is against the same program with capture
  compiled out (the "no_capture" variant), on hits of a hot set of flows and
  on passed packets (not a VIP), rotated side by side: the ns/packet the
  capture check costs;
* primitives (bench/primitives.c): each map operation of the packet path
  alone, timed the same way, next to XDP_DROP;
* the verified program's calls (bpftool prog dump xlated): a map lookup the
  verifier could not bind to one map goes through the generic
  bpf_map_lookup_elem, an indirect (retpoline) call;
* a perf profile (cpu-clock samples of this process while it runs rotated
  flow hits and new flows) when perf is installed."""
from __future__ import annotations

import ipaddress
import os
import time

import numpy as np

from . import frames as F
from .common import Context, Measurement, median, pinned
from .programs import Rotation, compile_bench, load_baselines, load_rotator, load_xdpgw, xlated_calls
from .profiling import bpf_line_profile, perf_profile
from .testrun import Rotated, plain_drop_ns

SECTION = "breakdown"

# The program as it is, and without capture, timed side by side on a hot set of
# hit flows and on passed packets: with 10k flows, where each program's own flow
# table lands in memory moves a program by tens of ns, far more than the check.
CAPTURE_PAIR = ("as_is", "no_capture")
CAPTURE_HOT_FLOWS = 256


def _stub(src: str | None, signature: str, statement: str) -> str | None:
    """Insert `statement` at the top of the function whose definition starts with `signature`."""
    if src is None or signature not in src:
        return None
    i = src.index(signature)
    j = src.index("{", i)
    return src[:j + 1] + "\n    " + statement + "\n" + src[j + 1:]


def variants() -> dict[str, tuple[str, str | None]]:
    from dataplane.program import TEST_TRACE, program_source

    src = program_source()
    no_region = _stub(src, "static __always_inline __u32 region_account(", "return XDPGW_REGION_UNKNOWN;")
    asm = '        asm volatile("" : "+r"(region));\n'
    unfixed = src.replace(asm, "", 1) if asm in src else None
    return {
        "as_is": ("xdpgw as it is", src),
        "region_generic_call": ("region lookups merged into one call (before the region.h fix)", unfixed),
        "no_region": ("without region accounting (LPM trie + counter)", no_region),
        "test_trace": ("with the forward trace (the tests' build)", f"#define {TEST_TRACE}\n" + src),
        "no_capture": ("without packet capture (capture_armed() compiled to NULL)",
                       _stub(src, "static __always_inline const struct capture_filter *capture_armed(",
                             "return NULL;")),
        "no_stats": ("without the global stats counters",
                     _stub(src, "static __always_inline void stat_inc(", "return;")),
    }


PRIMITIVES = [
    ("prim_lru40_lookup", "LRU hash lookup, 40-byte key (flow_table6 shape: IPv6 flows)"),
    ("prim_lru16_lookup", "LRU hash lookup, 16-byte key (flow_table4 shape: IPv4 flows)"),
    ("prim_lru40_update", "LRU hash insert into a full table (evicts), 40-byte key"),
    ("prim_lru40_insert_free", "LRU hash insert, free entries left, 40-byte key"),
    ("prim_hash20_lookup", "hash lookup, 20-byte key (services shape)"),
    ("prim_trie4_lookup", "LPM trie lookup, IPv4 (region accounting)"),
    ("prim_percpu_inc", "per-CPU array counter increment"),
]


def _raw_frames(flows: int) -> list[bytes]:
    """The frames the rotator makes of the tcp4 template (no checksum update, like the rotator)."""
    import struct

    tmpl = bytearray(F.template("tcp4"))
    out = []
    base = int(ipaddress.ip_address(F.SRC["hit"]))
    for i in range(flows):
        src, port = base + i // F.PORT_SPAN, F.PORT_BASE + i % F.PORT_SPAN
        struct.pack_into("!I", tmpl, F.IP4_SRC_OFF, src)
        struct.pack_into("!H", tmpl, F.L4_OFF4, port)
        out.append(bytes(tmpl))
    return out


def _load_primitives(flows: int):
    import ctypes as ct

    from bcc import BPF

    from dataplane import libbpf

    bpf = compile_bench("primitives.c")
    fns = {name: bpf.load_func(name.encode(), BPF.XDP) for name, _ in PRIMITIVES}
    frames = _raw_frames(flows)
    ones = np.ones(flows, dtype=np.uint64).tobytes()
    k40 = b"".join(f[14:54] for f in frames)
    k16 = b"".join(f[26:42] for f in frames)
    libbpf.update_batch(bpf.get_table(b"lru40").map_fd, k40, ones, flows, "lru40")
    libbpf.update_batch(bpf.get_table(b"lru16").map_fd, k16, ones, flows, "lru16")

    class K20(ct.Structure):
        _fields_ = [("vip", ct.c_uint8 * 16), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]

    from dataplane import structs as S

    k = K20(S.addr16(F.VIP4), F.WEB_PORT, 6)
    k.port = int.from_bytes(F.WEB_PORT.to_bytes(2, "big"), "little")   # as the program copies it: wire order
    libbpf.update_elem(bpf.get_table(b"hash20").map_fd, k, ct.c_uint64(1), "hash20")

    class L4(ct.Structure):
        _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 4)]

    libbpf.update_elem(bpf.get_table(b"trie4").map_fd, L4(18, (ct.c_uint8 * 4)(198, 18, 64, 0)),
                       ct.c_uint32(1), "trie4")
    return bpf, fns


def run(ctx: Context) -> dict:
    p = ctx.progress
    hit_flows = ctx.size(10000, 500)
    repeat = ctx.size(100_000, 2000)
    trials = ctx.size(5, 1)
    info: dict = {"repeat": repeat, "trials": trials, "hit_flows": hit_flows, "skipped_variants": []}

    p("compiling the baselines, the rotator and the primitives")
    base = load_baselines(1)
    rotator = prims = None
    progs: dict = {}
    try:
        base.set_target(0, "02:00:00:0c:00:01", "02:00:00:0b:00:01", 1)
        rotator = load_rotator()
        prims, prim_fns = _load_primitives(hit_flows)
        _load_variants(progs, ("as_is", "no_capture") if ctx.quick else None, info, p)
        info["xlated_calls"] = {key: xlated_calls(g.fd) for key, (_, g) in progs.items() if key == "as_is"}
        with pinned(ctx.cpu):
            drop_repeat = plain_drop_ns(base.fd("xdp_drop_min"), 100_000)
            hit_rot = Rotation.v4("tcp4", F.SRC["hit"], hit_flows)
            new_rot = Rotation.v4("tcp4", F.SRC["new"], 1 << 30)
            capture_rots = {"hot": Rotation.v4("tcp4", F.SRC["hit"], min(hit_flows, CAPTURE_HOT_FLOWS)),
                            "pass": Rotation.v4("non_vip", F.SRC["misc"], hit_flows)}
            rt = _time_rotated(base, rotator, progs, prim_fns, hit_rot, new_rot, capture_rots, repeat, trials, p)
            verdicts = {}
            for name, _ in PRIMITIVES:
                if name not in ("prim_lru40_update", "prim_lru40_insert_free"):
                    rotator.run(hit_rot, prim_fns[name].fd, 64)
                    verdicts[name] = rotator.last_verdict
            info["primitive_hit_verdicts"] = verdicts      # 1 (XDP_DROP) = the lookup found its key
            results = _measurements(rt, progs, verdicts, drop_repeat, info, repeat, trials, hit_flows)
            results += _capture_overhead(rt, progs, info, repeat, trials, hit_flows)
            if ctx.perf and not ctx.quick and "as_is" in progs:
                _perf_profiles(rotator, progs["as_is"][1], hit_rot, new_rot, hit_flows, info, p)
    finally:
        for _, g in progs.values():
            g.close()
        if prims is not None:
            prims.cleanup()
        if rotator is not None:
            rotator.close()
        base.close()
    return {"results": results, "info": info}


def _load_variants(progs: dict, wanted: tuple[str, ...] | None, info: dict, p) -> None:
    """Into `progs`: key -> (label, loaded program) of the variants that build (the
    caller closes them, also if one fails here); the others go to
    info["skipped_variants"] with the reason."""
    for key, (label, text) in variants().items():
        if wanted and key not in wanted:
            continue
        if text is None:
            info["skipped_variants"].append(key)
            continue
        p(f"compiling variant {key}")
        try:
            progs[key] = (label, load_xdpgw(flow_entries=65536, source=text))
        except Exception as exc:  # noqa: BLE001 - a variant that does not build is reported, not fatal
            info["skipped_variants"].append(f"{key}: {type(exc).__name__}: {str(exc)[:200]}")


def _time_rotated(base, rotator, progs: dict, prim_fns: dict, hit_rot: Rotation, new_rot: Rotation,
                  capture_rots: dict[str, Rotation], repeat: int, trials: int, p) -> Rotated:
    """The baselines, every variant (flow hits; the capture pair also on
    `capture_rots`) and every primitive, rotated in one run."""
    rt = Rotated(rotator, repeat, progress=p)
    rt.add("xdp_drop_min", hit_rot, base.fd("xdp_drop_min"))
    rt.add("xdp_redirect_min", hit_rot, base.fd("xdp_redirect_min"))
    for key, (_, g) in progs.items():
        rt.add(key, hit_rot, g.fd, g.counters)
        rt.warm(key)
        if key in CAPTURE_PAIR:
            for case, rot in capture_rots.items():
                rt.add(f"{key}:{case}", rot, g.fd, g.counters)
    for name, _ in PRIMITIVES:
        inserts = name in ("prim_lru40_update", "prim_lru40_insert_free")
        rt.add(name, new_rot if inserts else hit_rot, prim_fns[name].fd)
    p("filling the primitives' full LRU table")
    rt.warm("prim_lru40_update", 65536)
    rt.run(trials, label="variants and primitives: ")
    return rt


def _measurements(rt: Rotated, progs: dict, verdicts: dict, drop_repeat: float, info: dict,
                  repeat: int, trials: int, hit_flows: int) -> list[Measurement]:
    """Each figure net of the rotator's own cost (measured on XDP_DROP, into `info`)."""
    results: list[Measurement] = []
    overhead = rt.value("xdp_drop_min") - drop_repeat
    info["rotator_overhead_ns"] = overhead
    as_is = rt.value("as_is") - overhead if "as_is" in progs else float("nan")
    for key, (label, g) in progs.items():
        e = rt.entry(key)
        hits = e.counter_delta.get("flow_hits", 0)
        checks = {} if key == "no_stats" else {"flow_hits": hits, "ok": hits == e.runs}
        results.append(Measurement(SECTION, f"variant:{key}", label + " -- flow hit", rt.value(key) - overhead,
                                   "ns/pkt", "xdpgw as it is", as_is,
                                   f"rotated repeat={repeat} over {hit_flows} flows, median of {trials}",
                                   checks=checks))
    drop_net = rt.value("xdp_drop_min") - overhead
    for name, label in PRIMITIVES:
        results.append(Measurement(SECTION, f"primitive:{name}", label, rt.value(name) - overhead, "ns/pkt",
                                   "XDP_DROP", drop_net,
                                   f"rotated repeat={repeat}, median of {trials}; the operation costs "
                                   "value - baseline",
                                   params={"op_ns": rt.value(name) - overhead - drop_net},
                                   checks={"found": verdicts.get(name) == 1} if name in verdicts else {}))
    results.append(Measurement(SECTION, "baseline:redirect", "minimal MAC rewrite + redirect", rt.value(
        "xdp_redirect_min") - overhead, "ns/pkt", "XDP_DROP", drop_net, f"rotated repeat={repeat}"))
    return results


def _capture_overhead(rt: Rotated, progs: dict, info: dict, repeat: int, trials: int,
                      hit_flows: int) -> list[Measurement]:
    """xdpgw as it is against its build without capture: what the unarmed check
    costs, as the median of the per-trial differences (trials interleave the two,
    so drift cancels; a mean over trials resolves below the kernel's 1 ns)."""
    if not all(key in progs for key in CAPTURE_PAIR):
        return []
    out = []
    overhead = info["rotator_overhead_ns"]
    for case, stat, label in (("hot", "flow_hits", f"flow hit ({min(hit_flows, CAPTURE_HOT_FLOWS)} hot flows)"),
                              ("pass", "pass", "passed packet (not a VIP)")):
        with_, without = (rt.entry(f"{key}:{case}") for key in CAPTURE_PAIR)
        diff = median(a - b for a, b in zip(with_.results, without.results))
        value, base = (float(np.mean(e.results)) - overhead for e in (with_, without))
        info[f"capture_unarmed_{case}_ns"] = diff
        info[f"capture_unarmed_{case}_trials"] = {"with": with_.results, "without": without.results}
        done = with_.counter_delta.get(stat, 0)
        out.append(Measurement(SECTION, f"capture_unarmed:{case}", f"unarmed packet capture -- {label}", value,
                               "ns/pkt", "xdpgw without capture", base,
                               f"rotated repeat={repeat}, mean of {trials} trials; overhead_ns = median of the "
                               "per-trial differences",
                               params={"overhead_ns": diff}, checks={stat: done, "ok": done == with_.runs}))
    return out


def _perf_profiles(rotator, g, hit_rot: Rotation, new_rot: Rotation, hit_flows: int, info: dict, p) -> None:
    """perf profiles of xdpgw as it is: flow hits, then new flows into a full table."""
    def hits_workload(deadline: float) -> None:
        nxt = 0
        while time.monotonic() < deadline:
            rotator.run(hit_rot, g.fd, 50_000, nxt)
            nxt = (nxt + 50_000) % hit_flows

    def new_workload(deadline: float) -> None:
        nxt = 1 << 20
        while time.monotonic() < deadline:
            rotator.run(new_rot, g.fd, 20_000, nxt)
            nxt += 20_000

    p("perf profile: flow hits")
    info["perf_flow_hit"] = perf_profile(hits_workload, pid=os.getpid())
    p("perf profile: flow hits, by source line")
    info["perf_flow_hit_lines"] = bpf_line_profile(hits_workload, g.fd, pid=os.getpid())
    p("perf profile: new flows (full table)")
    rotator.run(new_rot, g.fd, 65536, 1 << 19)       # fill: the steady state evicts
    info["perf_new_flow"] = perf_profile(new_workload, pid=os.getpid())
    p("perf profile: new flows, by source line")
    info["perf_new_flow_lines"] = bpf_line_profile(new_workload, g.fd, pid=os.getpid())

"""Section katran: xdpgw beside Katran's balancer (facebookincubator/katran), per
packet class, with the same rotated method (bench/rotator.c), interleaved, on
fresh flow tables and in steady state (bench/testrun.py `fresh_and_steady`).

Classes (UDP unless said): flow hit to a tunnel VM (IP-in-IP, like Katran's
encap) and to a local VM (devmap redirect), flow hit of a TCP ACK, and a new
flow into a full table; Katran's hit, TCP-ACK hit and new flow beside them.

Katran is optional: `--katran-src DIR` (make bench KATRAN_SRC=DIR) names a
Katran checkout. Its balancer is built in a temporary directory by its own
katran/lib/Makefile-bpf (its flags, its includes; nothing of it is kept) with
clang and llc, loaded with libbpf (ctypes) and configured as Katran's
user-space library would: one UDP VIP and one TCP VIP, 3 reals, a 65537-slot
consistent-hashing ring each (Maglev), the next hop's MAC in ctl_array, and a
per-CPU LRU map in lru_mapping for every CPU, each holding the same share of
flows as one CPU's share of xdpgw's table. The map layouts are
balancer_structs.h's; their sizes are checked against the object's maps and
the constants (ring size, VIP count, counter positions) are read from the
checkout's balancer_consts.h. Katran stops recording new flows past
MAX_CONN_RATE new flows per second and CPU; its one-second window (a counter
in its stats map) is restarted before each run so that every timed new flow
is recorded, as xdpgw's are (its flood guard is off in the benchmark).

Without a checkout, xdpgw's side is measured alone (against the minimal
redirect) and the section says Katran was skipped."""
from __future__ import annotations

import ctypes as ct
import hashlib
import ipaddress
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataplane import libbpf

from . import frames as F
from .common import Context, Measurement, paired_ratio, pinned
from .programs import Rotation, load_baselines, load_rotator, load_xdpgw, possible_cpus
from .testrun import (STATES, FlowTables, Timed, counter_check, fresh_and_steady, plain_drop_ns, rotated_entry,
                      rotated_value)

SECTION = "katran"
BALANCER_SOURCE = "katran/lib/bpf/balancer.bpf.c"
MAKEFILE = "katran/lib/Makefile-bpf"
PROGRAM = "balancer_ingress"
TOOLS_HINT = "apt-get install clang llvm (Katran's Makefile-bpf runs clang and llc)"
FLOW_ENTRIES = 65536              # xdpgw's default table; Katran gets the same share per CPU
NEW_PERIOD = 1 << 30
REALS = ("198.18.210.1", "198.18.210.2", "198.18.210.3")
STATE_NAMES = {"steady": "steady state", "fresh": "fresh table"}

BPF_MAP_TYPE_LRU_HASH = 9
# balancer_structs.h: struct flow_key, vip_definition, vip_meta, real_pos_lru,
# real_definition, ctl_value, lb_stats (x86-64 sizes, checked against the object)
SIZES = {"flow_key": 40, "vip_definition": 20, "vip_meta": 8, "real_pos_lru": 16, "real_definition": 20,
         "ctl_value": 8, "lb_stats": 16}
CONSTS = ("RING_SIZE", "MAX_VIPS", "LRU_CNTRS", "NEW_CONN_RATE_CNTR", "FALLBACK_LRU_CNTR", "MAX_CONN_RATE")


@dataclass(frozen=True)
class Cls:
    key: str
    name: str
    kind: str                     # frames.template kind
    expect: dict                  # counter increments per packet
    new_flows: bool = False


XDPGW_CLASSES = [
    Cls("hit_udp_tunnel", "xdpgw flow hit, tunnel VM", "udp4_remote", {"flow_hits": 1, "tunnel_fwd": 1}),
    Cls("hit_udp_local", "xdpgw flow hit, local VM", "udp4", {"flow_hits": 1, "local_fwd": 1}),
    Cls("hit_tcp_ack_tunnel", "xdpgw flow hit, TCP ACK, tunnel VM", "tcp4_ack_remote",
        {"flow_hits": 1, "tunnel_fwd": 1}),
    Cls("hit_tcp_ack_local", "xdpgw flow hit, TCP ACK, local VM", "tcp4_ack", {"flow_hits": 1, "local_fwd": 1}),
    Cls("new_udp_tunnel", "xdpgw new flow, full table, tunnel VM", "udp4_remote",
        {"flow_misses": 1, "tunnel_fwd": 1}, new_flows=True),
    Cls("new_udp_local", "xdpgw new flow, full table, local VM", "udp4", {"flow_misses": 1, "local_fwd": 1},
        new_flows=True),
]
# every Katran packet is counted in LRU_CNTRS (v1), a miss also in v2; the VIP's
# own counter shows it was forwarded (encapsulated and sent back out, XDP_TX)
KATRAN_CLASSES = [
    Cls("katran_hit_udp", "Katran flow hit", "udp4", {"lru_packets": 1, "lru_misses": 0, "vip_packets": 1,
                                                      "fallback_lru": 0}),
    Cls("katran_hit_tcp_ack", "Katran flow hit, TCP ACK", "tcp4_ack",
        {"lru_packets": 1, "lru_misses": 0, "vip_packets": 1, "fallback_lru": 0}),
    Cls("katran_new_udp", "Katran new flow, full table", "udp4",
        {"lru_packets": 1, "lru_misses": 1, "vip_packets": 1, "fallback_lru": 0}, new_flows=True),
]
# the xdpgw class each Katran class is compared with (tunnel: both encapsulate)
COMPARED = {"hit_udp_tunnel": "katran_hit_udp", "hit_udp_local": "katran_hit_udp",
            "hit_tcp_ack_tunnel": "katran_hit_tcp_ack", "hit_tcp_ack_local": "katran_hit_tcp_ack",
            "new_udp_tunnel": "katran_new_udp", "new_udp_local": "katran_new_udp"}


def checkout_problem(src: str) -> str | None:
    """Why `src` cannot be built here (one line), or None."""
    root = Path(src)
    for rel in (BALANCER_SOURCE, MAKEFILE):
        if not (root / rel).is_file():
            return f"--katran-src {src}: no {rel} (expected a facebookincubator/katran checkout)"
    missing = [tool for tool in ("clang", "llc", "make") if shutil.which(tool) is None]
    if missing:
        return f"--katran-src {src}: {', '.join(missing)} not found; {TOOLS_HINT}"
    return None


def _consts(root: Path) -> dict[str, int]:
    text = (root / "katran/lib/bpf/balancer_consts.h").read_text()
    found = {}
    for name in CONSTS:
        m = re.search(rf"^#define {name} (\d+)", text, re.M)
        if not m:
            raise RuntimeError(f"katran/lib/bpf/balancer_consts.h: no numeric #define {name}")
        found[name] = int(m.group(1))
    return found


def build_balancer(src: str, workdir: Path) -> tuple[Path, dict]:
    """Build balancer.bpf.o with the checkout's own Makefile-bpf, in `workdir`.

    Makefile-bpf builds bpf/NAME.o from katran/lib/bpf/NAME.c with includes
    relative to its directory, laid out as Katran's build_bpf_modules_opensource.sh
    does: the Makefile, katran/lib/{bpf,linux_includes} and include/ (the
    linux_includes headers), with no extra defines."""
    root = Path(src)
    shutil.copy(root / MAKEFILE, workdir / "Makefile")
    for rel in ("katran/lib/bpf", "katran/lib/linux_includes"):
        shutil.copytree(root / rel, workdir / rel)
    shutil.copytree(root / "katran/lib/linux_includes", workdir / "include")
    (workdir / "bpf").mkdir()
    cmd = ["make", "-C", str(workdir), "CLANG=clang", "LLC=llc", "bpf/balancer.bpf.o"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    obj = workdir / "bpf/balancer.bpf.o"
    if proc.returncode != 0 or not obj.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError("building Katran's balancer with its Makefile-bpf failed:\n" + "\n".join(tail))
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10).stdout.strip() or None
    recipe = subprocess.run(["make", "-C", str(workdir), "-n", "-B", "bpf/balancer.bpf.o"], capture_output=True,
                            text=True, timeout=60).stdout
    digest = hashlib.sha256((root / BALANCER_SOURCE).read_bytes()).hexdigest()[:16]
    return obj, {"commit": commit, "balancer_sha256": digest, "make": " ".join(cmd[3:]),
                 "recipe": " ".join(recipe.replace("\\\n", " ").split())}


def _libbpf() -> ct.CDLL:
    """The libbpf object API (open a clang-built object, size its maps, load it)."""
    lib = libbpf.lib()
    vp, cp, u32 = ct.c_void_p, ct.c_char_p, ct.c_uint32
    for name, args, res in (("bpf_object__open_file", [cp, vp], vp), ("bpf_object__load", [vp], ct.c_int),
                            ("bpf_object__close", [vp], None), ("bpf_object__find_map_by_name", [vp, cp], vp),
                            ("bpf_object__find_program_by_name", [vp, cp], vp), ("bpf_map__fd", [vp], ct.c_int),
                            ("bpf_map__key_size", [vp], u32), ("bpf_map__value_size", [vp], u32),
                            ("bpf_map__inner_map", [vp], vp), ("bpf_program__fd", [vp], ct.c_int),
                            ("bpf_program__set_expected_attach_type", [vp, ct.c_int], ct.c_int)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _pack_v4(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed + bytes(12)


class Katran:
    """Katran's balancer loaded (not attached) and configured for the benchmark."""

    def __init__(self, obj_path: Path, consts: dict[str, int], lru_entries: int, ncpus: int) -> None:
        self.consts, self.ncpus, self.lru_entries = consts, ncpus, lru_entries
        self.lru_fds: list[int] = []
        self._lib = _libbpf()
        obj = self._lib.bpf_object__open_file(str(obj_path).encode(), None)
        if not obj:
            raise libbpf.BpfError(ct.get_errno(), f"opening {obj_path}")
        self._obj = obj
        try:
            self._check_layouts()
            prog = self._lib.bpf_object__find_program_by_name(obj, PROGRAM.encode())
            if not prog:
                raise RuntimeError(f"Katran's object has no program {PROGRAM}")
            # the rotator (loaded by bcc) tail-calls it: the kernel lets a program
            # array hold only programs of the same expected attach type, and bcc's
            # XDP programs have none (libbpf gives SEC("xdp") BPF_XDP; it changes
            # nothing in what the program does)
            libbpf._check(self._lib.bpf_program__set_expected_attach_type(prog, 0),
                          "setting the expected attach type of Katran's program")
            libbpf._check(self._lib.bpf_object__load(obj), "loading Katran's balancer (libbpf's log above)")
            self.fd = self._lib.bpf_program__fd(prog)
            self._lrus()
        except BaseException:
            self.close()
            raise

    def _map(self, name: str) -> int:
        m = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise RuntimeError(f"Katran's object has no map {name}")
        return m

    def map_fd(self, name: str) -> int:
        return self._lib.bpf_map__fd(self._map(name))

    def _check_layouts(self) -> None:
        """The structs written here must be the checkout's (balancer_structs.h)."""
        lib = self._lib
        inner = lib.bpf_map__inner_map(self._map("lru_mapping"))
        want = {"vip_map": ("vip_definition", "vip_meta"), "reals": (None, "real_definition"),
                "ctl_array": (None, "ctl_value"), "stats": (None, "lb_stats")}
        got = {name: (lib.bpf_map__key_size(self._map(name)), lib.bpf_map__value_size(self._map(name)))
               for name in want}
        for name, (k, v) in want.items():
            if (k and got[name][0] != SIZES[k]) or got[name][1] != SIZES[v]:
                raise RuntimeError(f"Katran's map {name} has key/value sizes {got[name]}, the benchmark writes "
                                   f"struct {k or 'u32'} / {v} of {SIZES.get(k, 4)} / {SIZES[v]} bytes: "
                                   "balancer_structs.h changed")
        if inner and (lib.bpf_map__key_size(inner), lib.bpf_map__value_size(inner)) != (
                SIZES["flow_key"], SIZES["real_pos_lru"]):
            raise RuntimeError("Katran's LRU maps do not hold struct flow_key -> struct real_pos_lru of "
                               f"{SIZES['flow_key']} / {SIZES['real_pos_lru']} bytes: balancer_structs.h changed")

    def _lrus(self) -> None:
        """One LRU map per CPU in lru_mapping, as Katran's library creates them (no flags:
        one CPU uses each, so its common LRU list is that CPU's)."""
        outer = self.map_fd("lru_mapping")
        for cpu in range(self.ncpus):
            fd = libbpf.map_create(BPF_MAP_TYPE_LRU_HASH, f"katran_lru{cpu}", SIZES["flow_key"],
                                   SIZES["real_pos_lru"], self.lru_entries)
            self.lru_fds.append(fd)
            libbpf.update_elem(outer, ct.c_uint32(cpu), ct.c_uint32(fd), "lru_mapping")

    def configure(self, vips: list[tuple[str, int, int]], mac: str, ring: np.ndarray) -> None:
        """VIPs (address, port, IP protocol) numbered 0.., reals 1..len(REALS) (id 0 is
        no real in Katran's rings), each VIP's ring from `ring` (values 1..)."""
        from dataplane import structs as S

        ring_size = self.consts["RING_SIZE"]
        if ring.size != ring_size:
            raise ValueError(f"ring of {ring.size} slots, Katran's RING_SIZE is {ring_size}")
        for num, (vip, port, proto) in enumerate(vips):
            key = _pack_v4(vip) + struct.pack(">HBx", port, proto)
            _update(self.map_fd("vip_map"), key, struct.pack("=II", 0, num), "vip_map")
            keys = (np.arange(ring_size, dtype=np.uint32) + num * ring_size)
            libbpf.update_batch(self.map_fd("ch_rings"), keys.tobytes(), ring.astype(np.uint32).tobytes(),
                                ring_size, "ch_rings")
        for index, real in enumerate(REALS, start=1):
            _update(self.map_fd("reals"), struct.pack("=I", index), _pack_v4(real) + bytes(4), "reals")
        _update(self.map_fd("ctl_array"), struct.pack("=I", 0), bytes(S.mac_bytes(mac)) + bytes(2), "ctl_array")

    def _stats(self, index: int) -> tuple[int, int]:
        vals = (ct.c_uint64 * (2 * self.ncpus))()
        libbpf.lookup_elem(self.map_fd("stats"), ct.c_uint32(index), vals, "stats")
        a = np.frombuffer(vals, dtype=np.uint64).reshape(self.ncpus, 2).sum(axis=0)
        return int(a[0]), int(a[1])

    def counters(self) -> dict[str, int]:
        base = self.consts["MAX_VIPS"]
        lru_packets, lru_misses = self._stats(base + self.consts["LRU_CNTRS"])
        return {"lru_packets": lru_packets, "lru_misses": lru_misses,
                "fallback_lru": self._stats(base + self.consts["FALLBACK_LRU_CNTR"])[0],
                "vip_packets": self._stats(0)[0] + self._stats(1)[0]}

    def restart_rate_window(self) -> None:
        """Start Katran's new-connection window afresh (its next packet opens a new one)."""
        zeros = (ct.c_uint64 * (2 * self.ncpus))()
        libbpf.update_elem(self.map_fd("stats"), ct.c_uint32(self.consts["MAX_VIPS"] +
                                                             self.consts["NEW_CONN_RATE_CNTR"]), zeros, "stats")

    def resident(self, cpu: int) -> int:
        _, _, n = libbpf.lookup_batch(self.lru_fds[cpu], SIZES["flow_key"], SIZES["real_pos_lru"],
                                      self.lru_entries, "Katran's LRU")
        return n

    def empty(self) -> None:
        for fd in self.lru_fds:
            keys, _, n = libbpf.lookup_batch(fd, SIZES["flow_key"], SIZES["real_pos_lru"], self.lru_entries,
                                             "Katran's LRU")
            order = np.random.default_rng(11).permutation(n)
            size = SIZES["flow_key"]
            for i in order:
                key = (ct.c_uint8 * size).from_buffer_copy(keys[i * size:(i + 1) * size])
                libbpf.delete_elem(fd, key, "Katran's LRU")

    def close(self) -> None:
        for fd in self.lru_fds:
            os.close(fd)
        self.lru_fds = []
        if self._obj:
            self._lib.bpf_object__close(self._obj)
            self._obj = None


def _update(fd: int, key: bytes, value: bytes, what: str) -> None:
    libbpf.update_elem(fd, (ct.c_uint8 * len(key)).from_buffer_copy(key),
                       (ct.c_uint8 * len(value)).from_buffer_copy(value), what)


def _ring(ring_size: int) -> np.ndarray:
    """Katran's ring for 3 reals: a Maglev table over reals 1..3 (Katran fills its
    rings with Maglev too)."""
    from control.maglev import build_table

    return build_table([(f"real{i}", i, 1) for i in range(1, len(REALS) + 1)], ring_size)


def run(ctx: Context) -> dict:
    p = ctx.progress
    hit_flows = ctx.size(5000, 500)
    repeat = ctx.size(100_000, 2_000)
    trials = ctx.size(15, 1)
    cpus = possible_cpus()
    info: dict = {"repeat": repeat, "trials": trials, "hit_flows_per_class": hit_flows, "cpu": ctx.cpu,
                  "xdpgw_flow_entries": FLOW_ENTRIES}
    if ctx.katran_src is None:
        info["katran"] = ("skipped: no Katran checkout given (make bench KATRAN_SRC=DIR, or "
                          "python -m bench --katran-src DIR); xdpgw's side is measured alone")
    p("compiling the baselines, the rotator and xdpgw")
    base = load_baselines(1)
    rotator = gw = katran = None
    workdir = None
    try:
        base.set_target(0, "02:00:00:0c:00:01", "02:00:00:0b:00:01", 1)
        rotator = load_rotator()
        gw = load_xdpgw(flow_entries=FLOW_ENTRIES)
        if ctx.katran_src is not None:
            workdir = Path(tempfile.mkdtemp(prefix=f"{ctx.prefix}-katran-"))
            p(f"building Katran's balancer from {ctx.katran_src} with its Makefile-bpf")
            obj, build = build_balancer(ctx.katran_src, workdir)
            consts = _consts(Path(ctx.katran_src))
            if repeat > consts["MAX_CONN_RATE"]:
                raise RuntimeError(f"repeat {repeat} exceeds Katran's MAX_CONN_RATE {consts['MAX_CONN_RATE']}")
            katran = Katran(obj, consts, FLOW_ENTRIES // len(cpus), len(cpus))
            katran.configure([(F.VIP4, F.ECHO_PORT, 17), (F.VIP4, F.WEB_PORT, 6)], F.CLIENT_MAC,
                             _ring(consts["RING_SIZE"]))
            info["katran"] = {"source": str(ctx.katran_src), **build, "consts": consts,
                              "lru_entries_per_cpu": katran.lru_entries,
                              "vips": ["udp 198.19.0.10:5353 (vip 0)", "tcp 198.19.0.10:8080 (vip 1)"],
                              "reals": list(REALS), "ring_slots": consts["RING_SIZE"]}
        with pinned(ctx.cpu):
            states, drop_repeat = _time(base, rotator, gw, katran, repeat, trials, hit_flows, p)
            if katran is not None:
                info["katran"]["lru_resident_after_run"] = katran.resident(ctx.cpu)
    finally:
        for obj_ in (katran, gw, rotator, base):
            if obj_ is not None:
                obj_.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"results": _measurements(states, drop_repeat, katran is not None, info, repeat, trials, hit_flows),
            "info": info}


def class_rotation(c: Cls, hit_flows: int) -> Rotation:
    """A class's flows: `hit_flows` established ones, or a never-ending run of new ones.
    UDP frames are padded to the TCP ones' 72 bytes (the rotator restores the first 64)."""
    return Rotation.v4(c.kind, F.SRC["new"] if c.new_flows else F.SRC["established"],
                       NEW_PERIOD if c.new_flows else hit_flows, payload=30 if c.kind.startswith("udp") else 18)


def _time(base, rotator, gw, katran, repeat: int, trials: int, hit_flows: int, p):
    """The fresh/steady phases of every class, and plain XDP_DROP (repeat) for the rotator's cost."""
    base_rot = Rotation.v4("tcp4", F.SRC["hit"], hit_flows)
    baselines = [Timed(name, base_rot, base.fd(name)) for name in ("xdp_drop_min", "xdp_redirect_min")]
    gw_tables = FlowTables("xdpgw", FLOW_ENTRIES, gw.dp.clear_flows)

    timed = [Timed(c.key, class_rotation(c, hit_flows), gw.fd, gw_tables, c.new_flows, not c.new_flows,
                   gw.counters) for c in XDPGW_CLASSES]
    if katran is not None:
        k_tables = FlowTables("Katran", FLOW_ENTRIES, katran.empty)
        timed += [Timed(c.key, class_rotation(c, hit_flows), katran.fd, k_tables, c.new_flows, not c.new_flows,
                        katran.counters, katran.restart_rate_window) for c in KATRAN_CLASSES]
    drop_repeat = plain_drop_ns(base.fd("xdp_drop_min"), repeat)
    return fresh_and_steady(rotator, repeat, trials, baselines, timed, p), drop_repeat


def _measurements(states: dict, drop_repeat: float, with_katran: bool, info: dict, repeat: int, trials: int,
                  hit_flows: int) -> list[Measurement]:
    """Per state: the baselines, Katran's classes (against the minimal redirect) and
    xdpgw's (against Katran's same class when it was measured, else the minimal
    redirect); every figure net of the rotator, with its ratios to both baselines."""
    results: list[Measurement] = []
    info["rotator_overhead_ns"] = {}
    classes = XDPGW_CLASSES + (KATRAN_CLASSES if with_katran else [])
    for state in STATES:
        phases = states[state]
        overhead = rotated_value(phases, "xdp_drop_min") - drop_repeat
        info["rotator_overhead_ns"][state] = overhead
        net = {name: rotated_value(phases, name) - overhead
               for name in ("xdp_drop_min", "xdp_redirect_min", *(c.key for c in classes))}
        drop, redirect = net["xdp_drop_min"], net["xdp_redirect_min"]
        method = (f"rotated: repeat={repeat}, a different flow every repetition, net of the rotator, median of "
                  f"{trials} interleaved rounds (against Katran: median of the rounds' ratios), {STATE_NAMES[state]}")
        suffix = f"@{state}"
        for name, label in (("xdp_drop_min", "baseline: XDP_DROP"),
                            ("xdp_redirect_min", "baseline: MAC rewrite + redirect")):
            results.append(Measurement(SECTION, name + suffix, f"{label} ({STATE_NAMES[state]})", net[name],
                                       "ns/pkt", "minimal redirect", redirect, method,
                                       params={"state": state, "raw_ns": rotated_entry(phases, name).results}))
        for c in classes:
            e = rotated_entry(phases, c.key)
            value = net[c.key]
            vs = COMPARED.get(c.key) if with_katran else None
            baseline, baseline_value = (f"Katran, same class ({STATE_NAMES[state]})", net[vs]) if vs else (
                "minimal redirect", redirect)
            # against Katran: the median of the rounds' ratios (both ran in every round, back to back)
            paired = paired_ratio([x - overhead for x in e.results],
                                  [x - overhead for x in rotated_entry(phases, vs).results]) if vs else None
            results.append(Measurement(
                SECTION, c.key + suffix, f"{c.name} ({STATE_NAMES[state]})", value, "ns/pkt", baseline,
                baseline_value, method,
                params={"state": state, "raw_ns": e.results, "repetitions": e.runs,
                        "flows": "new every repetition" if c.new_flows else hit_flows,
                        "xdp_drop_ns": drop, "redirect_ns": redirect,
                        "ratio_to_redirect": value / redirect if redirect > 0 else None,
                        "ratio_to_xdp_drop": value / drop if drop > 0 else None,
                        "ratio_of_medians": value / baseline_value if baseline_value > 0 else None},
                checks=counter_check(c.expect, e.runs, e.counter_delta), paired_ratio=paired))
    return results

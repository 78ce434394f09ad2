"""Loading the programs the benchmarks run: xdpgw itself (through the project's
loader) programmed with a standard setup, and the baseline / generator /
primitive programs of bench/*.c (compiled with bcc)."""
from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataplane import libbpf
from dataplane import structs as S

from . import frames as F

BENCH_DIR = Path(__file__).resolve().parent
LO_IFINDEX = 1

REGIONS = {"198.18.64.0/18": 1, "2001:db8:1::/48": 1, "198.18.2.0/24": 2, "198.18.128.0/17": 3}
WEB, WEB6, REMOTE, ECHO, ECHO_REMOTE, REMOTE_GUE, REMOTE_GUE6 = 0, 1, 2, 3, 4, 5, 6
SERVICES = [(F.VIP4, F.WEB_PORT, "tcp", WEB), (F.VIP6, F.WEB_PORT, "tcp", WEB6),
            (F.VIP4, F.REMOTE_PORT, "tcp", REMOTE), (F.VIP4, F.ECHO_PORT, "udp", ECHO),
            (F.VIP4, F.ECHO_REMOTE_PORT, "udp", ECHO_REMOTE), (F.VIP4, F.GUE_REMOTE_PORT, "tcp", REMOTE_GUE),
            (F.VIP4, F.GUE6_REMOTE_PORT, "tcp", REMOTE_GUE6)]
LOCAL_SERVICES = (WEB, WEB6, ECHO)         # on the local VMs; REMOTE and ECHO_REMOTE on the tunnel VM
TUNNEL_ENDPOINT, TUNNEL_SOURCE = "198.18.200.2", "198.18.0.2"
# tunnel VMs reached by GUE: service -> (endpoint, source); their ids sit below the IP-in-IP one
GUE_TUNNELS = {REMOTE_GUE: ("198.18.200.3", TUNNEL_SOURCE), REMOTE_GUE6: ("2001:db8:200::3", "2001:db8::2")}
DECAP_FROM = "198.18.0.0/24"
OFFLOAD_ENDPOINT = "198.18.201.2"
NEXT_HOP_MAC, UPLINK_MAC = "02:00:00:0d:00:01", "02:00:00:0d:00:02"
PORT_SLOTS = 200


def vm_mac(vm_id: int) -> str:
    return f"02:00:00:0c:{(vm_id >> 8) & 0xff:02x}:{vm_id & 0xff:02x}"


def port_mac(slot: int) -> str:
    return f"02:00:00:0b:00:{slot & 0xff:02x}"


@dataclass
class Xdpgw:
    """xdpgw loaded (not attached) with the standard setup:

    regions  r1 198.18.64.0/18 + 2001:db8:1::/48 (1), r2 198.18.2.0/24 (2), r3 198.18.128.0/17 (3)
    services web tcp 198.19.0.10:8080 (0), web6 tcp [2001:db8:f::10]:8080 (1), echo udp
             198.19.0.10:5353 (3) on the local VMs; remote tcp 198.19.0.10:8081 (2) and
             echo-remote udp 198.19.0.10:5354 (4) on one tunnel VM (IP-in-IP to 198.18.200.2)
             remote-gue tcp 198.19.0.10:8082 and remote-gue6 tcp :8083 on tunnel VMs reached by GUE
             (to 198.18.200.3 and 2001:db8:200::3)
    VMs      1..n local, devmap slot 1 + (id-1) % 200 -> lo (fine for test runs: nothing is sent)
    offload  (r2, web) -> IP-in-IP to 198.18.201.2
    decap    tunnel packets to 198.18.0.2 from 198.18.0.0/24; GUE port 6080
    """
    bpf: object
    fn: object
    sizes: object
    dp: object
    n_vms: int = 3
    tunnel_vm: int = 0
    maglev: dict = field(default_factory=dict)

    @property
    def fd(self) -> int:
        return self.fn.fd

    def stats(self) -> dict[str, int]:
        return self.dp.stats()

    def drops(self) -> dict[str, int]:
        return self.dp.drop_counters()

    def counters(self) -> dict[str, int]:
        out = dict(self.dp.stats())
        out.update({f"drop_{k}": v for k, v in self.dp.drop_counters().items()})
        return out

    def set_vms(self, n_vms: int) -> None:
        """Local VMs 1..n_vms behind the web and web6 services (Maglev tables rebuilt)."""
        from control.maglev import build_table
        from dataplane.maps import LocalPort

        dp = self.dp
        for vm_id in range(1, n_vms + 1):
            slot = 1 + (vm_id - 1) % PORT_SLOTS
            dp.set_vm(vm_id, LocalPort(slot, vm_mac(vm_id), port_mac(slot)))
        for vm_id in range(n_vms + 1, self.n_vms + 1):
            if vm_id < self.tunnel_vm - len(GUE_TUNNELS):      # not a tunnel VM
                dp.clear_vm(vm_id)
        backends = [(f"vm{v}", v, 1) for v in range(1, n_vms + 1)]
        table = build_table(backends, self.sizes.maglev_m, self.sizes.hash_seed)
        for sid in LOCAL_SERVICES:
            dp.set_maglev_table(sid, table)
            self.maglev[sid] = table
        self.n_vms = n_vms

    def flow_fd(self) -> int:
        """flow_table4's: the bench fills IPv4 flows."""
        return self.dp._fd("flow_table4")

    def close(self) -> None:
        self.bpf.cleanup()


def load_xdpgw(flow_entries: int = 65536, n_vms: int = 3, max_vms: int = 1024, source: str | None = None,
               maglev_m: int = 65537) -> Xdpgw:
    """Compile, load and program xdpgw (see Xdpgw). `source` replaces the
    program text (the breakdown section's variants)."""
    from control.maglev import build_table
    from dataplane.maps import Dataplane, Tunnel
    from dataplane.program import ENTRY_FUNCTION, Sizes, load

    sizes = Sizes(flow_entries=flow_entries, max_vms=max_vms, maglev_m=maglev_m)
    if source is None:
        bpf, fn = load(sizes)
    else:
        from bcc import BPF

        bpf = BPF(text=source.encode(), cflags=sizes.cflags() + ["-Wno-unused-function", "-Wno-unreachable-code"])
        fn = bpf.load_func(ENTRY_FUNCTION.encode(), BPF.XDP)
    dp = Dataplane(bpf, sizes)
    g = Xdpgw(bpf, fn, sizes, dp, n_vms=0, tunnel_vm=max_vms)
    try:
        dp.set_region_prefixes({ipaddress.ip_network(n): r for n, r in REGIONS.items()})
        dp.set_services([(ipaddress.ip_address(v), p, proto, sid) for v, p, proto, sid in SERVICES])
        for slot in range(1, PORT_SLOTS + 1):
            dp.set_port(slot, LO_IFINDEX)
        ip = ipaddress.ip_address
        dp.set_vm(g.tunnel_vm, Tunnel(ip(TUNNEL_ENDPOINT), ip(TUNNEL_SOURCE), NEXT_HOP_MAC, UPLINK_MAC))
        tunnel_table = build_table([("vmt", g.tunnel_vm, 1)], sizes.maglev_m, sizes.hash_seed)
        for sid in (REMOTE, ECHO_REMOTE):
            dp.set_maglev_table(sid, tunnel_table)
        for i, (sid, (endpoint, source)) in enumerate(GUE_TUNNELS.items()):
            vm_id = g.tunnel_vm - 1 - i
            dp.set_vm(vm_id, Tunnel(ip(endpoint), ip(source), NEXT_HOP_MAC, UPLINK_MAC, "gue"))
            dp.set_maglev_table(sid, build_table([(f"vmg{i}", vm_id, 1)], sizes.maglev_m, sizes.hash_seed))
        dp.set_offload(2, WEB, Tunnel(ip(OFFLOAD_ENDPOINT), ip(TUNNEL_SOURCE), NEXT_HOP_MAC, UPLINK_MAC))
        dp.set_decap([ip(F.DECAP_ADDRESS)], [ipaddress.ip_network(DECAP_FROM)], F.GUE_PORT)
        g.set_vms(n_vms)
    except BaseException:
        g.close()
        raise
    return g


def fill_flows(fd: int, keys: np.ndarray, vm_ids: np.ndarray, service_id: int, cpus: list[int]) -> None:
    """Batch-insert flow entries, an equal share from each CPU.

    The flow table is an LRU hash with per-CPU LRU lists (BPF_F_NO_COMMON_LRU):
    each CPU owns max_entries / ncpus entries and an insert evicts from the
    inserting CPU's own list, so a table is filled to capacity only if every
    CPU inserts its share."""
    values = np.zeros(keys.size, dtype=F.FLOW_ENTRY_DTYPE)
    values["vm_id"] = vm_ids
    values["service_id"] = service_id
    before = os.sched_getaffinity(0)
    try:
        n = len(cpus)
        for j, cpu in enumerate(cpus):
            os.sched_setaffinity(0, {cpu})
            lo, hi = keys.size * j // n, keys.size * (j + 1) // n
            step = 1 << 16
            for a in range(lo, hi, step):
                b = min(hi, a + step)
                libbpf.update_batch(fd, keys[a:b].tobytes(), values[a:b].tobytes(), b - a, "flow_table4")
    finally:
        os.sched_setaffinity(0, before)


def count_entries(fd: int, key_size: int, value_size: int, max_entries: int) -> int:
    _, _, n = libbpf.lookup_batch(fd, key_size, value_size, max_entries, "count")
    return n


# ---- bench/*.c --------------------------------------------------------------

def compile_bench(name: str, cflags: list[str] | None = None):
    from bcc import BPF

    return BPF(src_file=str(BENCH_DIR / name).encode(), cflags=cflags or [])


class FwdTarget(ct.Structure):
    _fields_ = [("dst_mac", ct.c_uint8 * 6), ("src_mac", ct.c_uint8 * 6)]


class SinkCounter(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class GenConfig(ct.Structure):
    _fields_ = [("flows", ct.c_uint32), ("port_span", ct.c_uint32), ("src_base", ct.c_uint32),
                ("port_base", ct.c_uint32), ("cpu_stride", ct.c_uint32)]


@dataclass
class Baselines:
    """bench/baselines.c loaded: fds of xdp_drop_min, xdp_redirect_min,
    xdp_redirect_spread and xdp_sink."""
    bpf: object
    fns: dict
    targets: int

    def fd(self, name: str) -> int:
        return self.fns[name].fd

    def set_target(self, slot: int, dst_mac: str, src_mac: str, ifindex: int) -> None:
        """Slot -> (MACs, device). The devmap resolves `ifindex` in the caller's namespace."""
        t = FwdTarget(S.mac_bytes(dst_mac), S.mac_bytes(src_mac))
        libbpf.update_elem(self.bpf.get_table(b"fwd_targets").map_fd, ct.c_uint32(slot), t, "fwd_targets")
        libbpf.update_elem(self.bpf.get_table(b"fwd_ports").map_fd, ct.c_uint32(slot), ct.c_uint32(ifindex),
                           "fwd_ports")

    def sink_counts(self, ncpus: int) -> np.ndarray:
        """packets per destination-MAC index (256,), summed over CPUs."""
        fd = self.bpf.get_table(b"sink_counters").map_fd
        _, values, n = libbpf.lookup_batch(fd, 4, 16 * ncpus, 256, "sink_counters")
        raw = np.frombuffer(values, dtype=np.uint64).reshape(n, ncpus, 2)
        return raw[:, :, 0].sum(axis=1)

    def close(self) -> None:
        self.bpf.cleanup()


BASELINE_FUNCTIONS = ("xdp_drop_min", "xdp_redirect_min", "xdp_redirect_spread", "xdp_sink")


def load_baselines(targets: int = 1) -> Baselines:
    from bcc import BPF

    bpf = compile_bench("baselines.c", [f"-DBENCH_TARGETS={targets}"])
    fns = {n: bpf.load_func(n.encode(), BPF.XDP) for n in BASELINE_FUNCTIONS}
    return Baselines(bpf, fns, targets)


@dataclass
class TrafficGen:
    bpf: object
    fn: object

    @property
    def fd(self) -> int:
        return self.fn.fd

    def configure(self, flows: int, src_base: str, port_span: int = F.PORT_SPAN, port_base: int = F.PORT_BASE,
                  cpu_stride: int = 0) -> None:
        """`flows` flows per CPU; CPU c's start `cpu_stride` * c addresses after src_base."""
        cfg = GenConfig(flows=max(1, flows), port_span=max(1, min(port_span, flows)),
                        src_base=int(ipaddress.ip_address(src_base)), port_base=port_base, cpu_stride=cpu_stride)
        libbpf.update_elem(self.bpf.get_table(b"gen_config").map_fd, ct.c_uint32(0), cfg, "gen_config")
        # per-CPU values are exchanged with user space padded to 8 bytes each
        zeros = (ct.c_uint64 * len(_possible_cpus()))()
        libbpf.update_elem(self.bpf.get_table(b"gen_next").map_fd, ct.c_uint32(0), zeros, "gen_next")

    def sent(self) -> int:
        ncpus = len(_possible_cpus())
        vals = (ct.c_uint64 * ncpus)()
        libbpf.lookup_elem(self.bpf.get_table(b"gen_sent").map_fd, ct.c_uint32(0), vals, "gen_sent")
        return int(sum(vals))

    def close(self) -> None:
        self.bpf.cleanup()


def load_trafficgen() -> TrafficGen:
    from bcc import BPF

    bpf = compile_bench("trafficgen.c")
    return TrafficGen(bpf, bpf.load_func(b"xdp_gen_rotate", BPF.XDP))


def _possible_cpus() -> list[int]:
    from bcc.utils import get_possible_cpus

    return get_possible_cpus()


def possible_cpus() -> list[int]:
    return _possible_cpus()


def xlated_calls(prog_fd: int) -> dict[str, int]:
    """Helper/kernel calls in the verified program (bpftool prog dump xlated):
    shows which map lookups were bound to their map (direct calls) and which go
    through the generic bpf_map_lookup_elem (an indirect call)."""
    import re

    info = _prog_info(prog_fd)
    if not info:
        return {}
    try:
        out = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(info["id"])],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    calls: dict[str, int] = {}
    for name in re.findall(r"call ([A-Za-z_0-9]+)", out):
        calls[name] = calls.get(name, 0) + 1
    calls["_insns"] = len(re.findall(r"^\s*\d+: \(", out, re.M))
    return calls


class _BpfProgInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("pad", ct.c_uint8 * 256)]


def _prog_info(prog_fd: int) -> dict | None:
    lib = libbpf.lib()
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    info = _BpfProgInfo()
    n = ct.c_uint32(ct.sizeof(info))
    if lib.bpf_obj_get_info_by_fd(prog_fd, ct.byref(info), ct.byref(n)) != 0:
        return None
    return {"id": info.id, "xlated_len": info.xlated_prog_len, "jited_len": info.jited_prog_len}


# ---- bench/rotator.c ----------------------------------------------------------

ROT_HDR = 64


class RotConfig(ct.Structure):
    _fields_ = [("frame_len", ct.c_uint32), ("flows", ct.c_uint32), ("port_span", ct.c_uint32),
                ("port_base", ct.c_uint32), ("src_base", ct.c_uint32), ("src_off", ct.c_uint32),
                ("port_off", ct.c_uint32), ("pad", ct.c_uint32), ("hdr", ct.c_uint8 * ROT_HDR)]


@dataclass(frozen=True)
class Rotation:
    """Frame template + the flows the rotator makes of it (see bench/rotator.c)."""
    frame: bytes
    flows: int                     # period
    src_base: int                  # IPv4: the address; IPv6: the low word of the address
    ipv6: bool = False
    port_base: int = F.PORT_BASE
    port_span: int = F.PORT_SPAN
    l3_off: int = F.ETH_LEN        # the (inner) IP header the flows are written into

    @classmethod
    def v4(cls, kind: str, base: str, flows: int, payload: int = 18) -> "Rotation":
        return cls(F.template(kind, payload), flows, int(ipaddress.ip_address(base)),
                   l3_off=F.L3_OFF.get(kind, F.ETH_LEN))

    @classmethod
    def v6(cls, flows: int) -> "Rotation":
        return cls(F.template("tcp6"), flows, 1, ipv6=True)


@dataclass
class Rotator:
    bpf: object
    fn: object
    ncpus: int
    last_verdict: int = -1         # the target's verdict in the last repetition of the last run

    @property
    def fd(self) -> int:
        return self.fn.fd

    def set_target(self, prog_fd: int) -> None:
        libbpf.update_elem(self.bpf.get_table(b"rot_target").map_fd, ct.c_uint32(0), ct.c_uint32(prog_fd),
                           "rot_target")

    def configure(self, rot: Rotation, next_index: int = 0) -> None:
        if len(rot.frame) < ROT_HDR:
            raise ValueError(f"rotated frames must be at least {ROT_HDR} bytes")
        cfg = RotConfig(frame_len=len(rot.frame), flows=max(1, rot.flows), port_span=max(1, rot.port_span),
                        port_base=rot.port_base, src_base=rot.src_base & 0xFFFFFFFF,
                        src_off=F.IP6_SRC_OFF + 12 if rot.ipv6 else rot.l3_off + 12,
                        port_off=F.L4_OFF6 if rot.ipv6 else rot.l3_off + 20)
        ct.memmove(cfg.hdr, rot.frame[:ROT_HDR], ROT_HDR)
        libbpf.update_elem(self.bpf.get_table(b"rot_config").map_fd, ct.c_uint32(0), cfg, "rot_config")
        self.set_next(next_index)

    def set_next(self, index: int) -> None:
        # per-CPU values are exchanged with user space padded to 8 bytes each
        vals = (ct.c_uint64 * self.ncpus)(*([index & 0xFFFFFFFF] * self.ncpus))
        libbpf.update_elem(self.bpf.get_table(b"rot_next").map_fd, ct.c_uint32(0), vals, "rot_next")

    def run(self, rot: Rotation, target_fd: int, repeat: int, next_index: int = 0) -> int:
        """ns per repetition of rotator + target over `repeat` flows of `rot`."""
        self.configure(rot, next_index)
        self.set_target(target_fd)
        retval, _, ns = libbpf.prog_test_run(self.fd, rot.frame, repeat=repeat)
        if retval == 0:
            raise RuntimeError("rotator returned XDP_ABORTED (bad configuration or empty target)")
        self.last_verdict = retval
        return ns

    def close(self) -> None:
        self.bpf.cleanup()


def load_rotator() -> Rotator:
    from bcc import BPF

    bpf = compile_bench("rotator.c")
    return Rotator(bpf, bpf.load_func(b"xdp_rotate", BPF.XDP), len(_possible_cpus()))

"""The VM-port program (ebpf/vmport.c), everything of it that touches BPF: load
it, attach it to host ports and detach it, decode its announcements from the
perf buffer, and read its VM-to-VM byte counters. Which ports, and what an
announcement means, is the caller's business (control/migration/watcher.py)."""
from __future__ import annotations

import ctypes as ct
import ipaddress
from dataclasses import dataclass
from typing import Callable

from . import libbpf
from . import structs as S
from .maps import possible_cpus, read_percpu
from .program import attach, detach, load

ENTRY_FILE = "vmport.c"
ENTRY_FUNCTION = "vmport_main"
KIND_NAMES = {S.ANNOUNCE_GARP: "garp", S.ANNOUNCE_RARP: "rarp", S.ANNOUNCE_NA: "na"}
PERF_PAGES = 16


@dataclass(frozen=True)
class PortAnnouncement:
    """A VM announcing itself on a port: a gratuitous ARP, a RARP or an unsolicited NA."""
    kind: str                          # "garp", "rarp", "na"
    mac: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None    # None for RARP
    ifindex: int                       # the port the frame came in on
    ts_ns: int                         # bpf_ktime_get_ns(): CLOCK_MONOTONIC


class VmPortProgram:
    """The loaded program. `on_announcement` runs in the thread that calls poll();
    an exception it raises is the caller's to catch."""

    def __init__(self, on_announcement: Callable[[PortAnnouncement], object]) -> None:
        self.bpf, self.fn = load(entry=ENTRY_FILE, function=ENTRY_FUNCTION)
        self.on_announcement = on_announcement
        self.ncpus = possible_cpus()
        # bpf[...] keeps the table object: the perf buffer closes with it
        self.bpf[b"vm_announcements"].open_perf_buffer(self._on_event, page_cnt=PERF_PAGES)

    def attach(self, interface: str, mode: str = "auto") -> str:
        """Attach to a port; returns the mode used ("native" or "generic")."""
        return attach(self.fn, interface, mode)

    @staticmethod
    def detach(interface: str, mode: str) -> None:
        detach(interface, mode)

    def poll(self, timeout_ms: int) -> None:
        """Hand the announcements waiting in the perf buffer to `on_announcement`."""
        self.bpf.perf_buffer_poll(timeout=timeout_ms)

    def _on_event(self, cpu: int, data, size: int) -> None:
        ev = ct.cast(data, ct.POINTER(S.VmAnnounce)).contents
        ip = S.addr_from16(bytes(ev.ip)) if ev.family in (4, 6) else None
        self.on_announcement(PortAnnouncement(KIND_NAMES.get(ev.kind, f"kind{ev.kind}"), S.mac_str(ev.mac), ip,
                                              int(ev.ifindex), int(ev.ts_ns)))

    def pair_bytes(self) -> dict[tuple[str, str], int]:
        """{(sender MAC, destination IP): bytes}, summed over CPUs."""
        fd = self.bpf.get_table(b"vm_pair_bytes").map_fd
        ks = ct.sizeof(S.VmPairKey)
        keys, counters = read_percpu(fd, ks, S.TrafficCounter, libbpf.map_info(fd).max_entries, self.ncpus,
                                     "vm_pair_bytes")
        out: dict[tuple[str, str], int] = {}
        for i, (_, nbytes) in enumerate(counters):
            key = S.VmPairKey.from_buffer_copy(keys, i * ks)
            out[(S.mac_str(key.src_mac), str(S.addr_from16(bytes(key.dst))))] = int(nbytes)
        return out

    def close(self) -> None:
        self.bpf.cleanup()

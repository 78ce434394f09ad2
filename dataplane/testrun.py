"""BPF_PROG_TEST_RUN harness: run bytes or a scapy packet through the loaded
program and get the verdict, the output bytes and where it was sent."""
from __future__ import annotations

from dataclasses import dataclass

from . import libbpf
from . import structs as S
from .maps import Dataplane

VERDICTS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}


@dataclass(frozen=True)
class RunResult:
    verdict: str
    data: bytes
    forward: S.ForwardTrace | None   # set when the program forwarded the packet

    @property
    def vm_id(self) -> int | None:
        return self.forward.vm_id if self.forward and self.forward.vm_id != S.XDPGW_NO_VM else None

    @property
    def port_slot(self) -> int | None:
        """The devmap slot a REDIRECT went to."""
        return self.forward.port_slot if self.verdict == "REDIRECT" and self.forward else None


class TestRunner:
    __test__ = False  # not a pytest class

    def __init__(self, dataplane: Dataplane, prog_fd: int) -> None:
        self.dataplane = dataplane
        self.prog_fd = prog_fd

    def run(self, packet, ingress_ifindex: int = 0) -> RunResult:
        """`packet` is bytes or anything bytes() accepts (a scapy packet)."""
        self.dataplane.clear_forward_trace()
        retval, out, _ = libbpf.prog_test_run(self.prog_fd, bytes(packet), ingress_ifindex=ingress_ifindex)
        verdict = VERDICTS.get(retval, f"UNKNOWN({retval})")
        return RunResult(verdict, out, self.dataplane.last_forward())

    def time_per_packet(self, packet, repeat: int) -> float:
        """Average ns per run of one frame, as the kernel measures it."""
        _, _, ns = libbpf.prog_test_run(self.prog_fd, bytes(packet), repeat=repeat)
        return float(ns)

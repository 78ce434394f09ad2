"""The VM-port program (dataplane/vmport.py, ebpf/vmport.c) through
BPF_PROG_TEST_RUN: every frame passes unchanged; announcements come out of the
perf buffer decoded; VM-to-VM bytes are read back per (sender MAC, destination IP)."""
from __future__ import annotations

import ipaddress

import pytest
from scapy.all import ARP, ICMPv6ND_NA, IP, UDP, Ether, IPv6

from dataplane.libbpf import prog_test_run
from dataplane.vmport import PortAnnouncement, VmPortProgram

VM_MAC = "02:00:00:00:07:01"
LO_IFINDEX = 1


@pytest.fixture(scope="module")
def vmport():
    events: list[PortAnnouncement] = []
    program = VmPortProgram(events.append)
    yield program, events
    program.close()


def run(program: VmPortProgram, frame) -> None:
    data = bytes(frame)
    verdict, out, _ = prog_test_run(program.fn.fd, data, ingress_ifindex=LO_IFINDEX)
    assert (verdict, out) == (2, data)          # XDP_PASS, unchanged


def announcements(program: VmPortProgram, events: list[PortAnnouncement]) -> list[tuple]:
    program.poll(100)
    got = [(e.kind, e.mac, e.ip, e.ifindex) for e in events]
    assert all(e.ts_ns > 0 for e in events)
    events.clear()
    return got


def test_pair_bytes(vmport):
    program, _ = vmport
    v4 = Ether(src=VM_MAC, dst="02:00:00:00:07:02") / IP(src="198.18.150.1", dst="198.18.150.2") / UDP() / (b"x" * 20)
    v6 = Ether(src=VM_MAC, dst="02:00:00:00:07:02") / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP()
    for frame in (v4, v4, v6):
        run(program, frame)
    assert program.pair_bytes() == {(VM_MAC, "198.18.150.2"): 2 * len(v4), (VM_MAC, "2001:db8::2"): len(v6)}


def test_announcements(vmport):
    program, events = vmport
    ip4, ip6 = "198.18.150.1", "2001:db8::1"
    garp = Ether(src=VM_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=VM_MAC, psrc=ip4, pdst=ip4)
    rarp = Ether(src=VM_MAC, dst="ff:ff:ff:ff:ff:ff", type=0x8035) / ARP(op=3, hwsrc=VM_MAC, hwdst=VM_MAC)
    na = Ether(src=VM_MAC, dst="33:33:00:00:00:01") / IPv6(src=ip6, dst="ff02::1") / ICMPv6ND_NA(tgt=ip6, R=0, S=0, O=1)
    not_gratuitous = Ether(src=VM_MAC) / ARP(op=1, hwsrc=VM_MAC, psrc=ip4, pdst="198.18.150.2")
    for frame in (garp, rarp, na, not_gratuitous):
        run(program, frame)
    assert announcements(program, events) == [
        ("garp", VM_MAC, ipaddress.ip_address(ip4), LO_IFINDEX),
        ("rarp", VM_MAC, None, LO_IFINDEX),
        ("na", VM_MAC, ipaddress.ip_address(ip6), LO_IFINDEX),
    ]

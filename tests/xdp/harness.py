"""The standard gateway setup of the XDP packet tests, and `XdpHarness`: the
loaded program with its Dataplane, a TestRunner and helpers. Counters are cumulative per-CPU maps and
  are never reset: tests compare deltas (`gw.snapshot()` / `gw.delta(before)`).

Standard setup (addresses only from 198.18.0.0/15 and 2001:db8::/32):
  regions  r1 = 198.18.1.0/24 + 2001:db8:1::/48 (id 1)
           r2 = 198.18.2.0/24 + 2001:db8:2::/48 (id 2)
  services web  tcp 198.19.0.10:8080        (id 0)
           dns  udp 198.19.0.10:5353        (id 1)
           web6 tcp [2001:db8:f::10]:8080   (id 2)
           each with a Maglev table over vm1..vm3
  VMs      vm1..vm3 local, port slot N (devmap -> lo), MAC 02:00:00:00:00:0N,
           port MAC 02:00:00:00:01:0N
           vm9  tunnel IPv4 endpoint 198.18.200.2, source 198.18.0.2
           vm10 tunnel IPv6 endpoint 2001:db8:200::2, source 2001:db8::2
           (next hop MAC 02:00:00:00:02:01, uplink MAC 02:00:00:00:02:02)
  decap    tunnel packets to 198.18.0.2 / 2001:db8::2 (the tunnel sources) from
           198.18.200.0/24 / 2001:db8:200::/48; GUE port 6080
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

import numpy as np

LO_IFINDEX = 1
MAGLEV_M = 65537
HASH_SEED = 0

# ingress frame MACs (what the router in front of the gateway would use)
GW_MAC = "02:00:00:00:03:01"
ROUTER_MAC = "02:00:00:00:03:02"

NEXT_HOP_MAC = "02:00:00:00:02:01"
UPLINK_MAC = "02:00:00:00:02:02"

REGION_PREFIXES = {
    "198.18.1.0/24": 1, "2001:db8:1::/48": 1,
    "198.18.2.0/24": 2, "2001:db8:2::/48": 2,
}

VIP4 = "198.19.0.10"
VIP6 = "2001:db8:f::10"
WEB, DNS, WEB6 = 0, 1, 2
SERVICES = [
    (VIP4, 8080, "tcp", WEB),
    (VIP4, 5353, "udp", DNS),
    (VIP6, 8080, "tcp", WEB6),
]

LOCAL_VMS = {n: (n, f"02:00:00:00:00:{n:02x}", f"02:00:00:00:01:{n:02x}") for n in (1, 2, 3)}
TUNNEL4_VM, TUNNEL6_VM = 9, 10
TUNNEL_VMS = {
    TUNNEL4_VM: ("198.18.200.2", "198.18.0.2"),
    TUNNEL6_VM: ("2001:db8:200::2", "2001:db8::2"),
}
DECAP_ADDRESSES = ("198.18.0.2", "2001:db8::2")
DECAP_FROM = ("198.18.200.0/24", "2001:db8:200::/48")
GUE_PORT = 6080


@dataclass
class Snapshot:
    regions: np.ndarray
    services: np.ndarray
    vms: np.ndarray
    drops: dict
    stats: dict


@dataclass
class Delta:
    regions: np.ndarray
    services: np.ndarray
    vms: np.ndarray
    drops: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def nonzero_drops(self) -> dict:
        return {k: v for k, v in self.drops.items() if v}

    def nonzero_stats(self) -> dict:
        return {k: v for k, v in self.stats.items() if v}


class XdpHarness:
    """The standard setup plus helpers; one per test."""

    def __init__(self, program) -> None:
        from dataplane.maps import Dataplane, LocalPort, Tunnel
        from dataplane.testrun import TestRunner

        self.bpf, self.fn, self.sizes = program
        self.dp = Dataplane(self.bpf, self.sizes)
        self.tr = TestRunner(self.dp, self.fn.fd)
        self.LocalPort, self.Tunnel = LocalPort, Tunnel
        self.m = self.sizes.maglev_m
        self.seed = self.sizes.hash_seed

    # ---- setup -----------------------------------------------------------
    def local_port(self, vm_id: int):
        slot, vm_mac, port_mac = LOCAL_VMS[vm_id]
        return self.LocalPort(slot, vm_mac, port_mac)

    def tunnel(self, vm_id: int):
        endpoint, source = TUNNEL_VMS[vm_id]
        return self.Tunnel(ipaddress.ip_address(endpoint), ipaddress.ip_address(source), NEXT_HOP_MAC, UPLINK_MAC)

    def table(self, vm_ids) -> np.ndarray:
        from control.maglev import build_table

        return build_table([(f"vm{v}", v, 1) for v in vm_ids], self.m, self.seed)

    def set_services(self, extra=()) -> None:
        self.dp.set_services([(ipaddress.ip_address(v), p, proto, sid)
                              for v, p, proto, sid in list(SERVICES) + list(extra)])

    def reset(self) -> None:
        dp = self.dp
        dp.clear_flows()
        dp.clear_offloads()
        for vm_id in range(1, self.sizes.max_vms + 1):
            if dp.vm_location(vm_id).kind:
                dp.clear_vm(vm_id)
        for sid in range(self.sizes.max_services):
            dp.remove_maglev_table(sid)
        dp.set_region_prefixes({ipaddress.ip_network(n): r for n, r in REGION_PREFIXES.items()})
        self.set_services()
        for vm_id, (slot, _, _) in LOCAL_VMS.items():
            dp.set_port(slot, LO_IFINDEX)
            dp.set_vm(vm_id, self.local_port(vm_id))
        for vm_id in TUNNEL_VMS:
            dp.set_vm(vm_id, self.tunnel(vm_id))
        for sid in (WEB, DNS, WEB6):
            dp.set_maglev_table(sid, self.table([1, 2, 3]))
        dp.set_decap([ipaddress.ip_address(a) for a in DECAP_ADDRESSES],
                     [ipaddress.ip_network(n) for n in DECAP_FROM], GUE_PORT)

    # ---- frames ------------------------------------------------------------
    @staticmethod
    def ingress(l3):
        """A frame as it arrives from the router: Ether / `l3` (any scapy layers)."""
        from scapy.all import Ether

        return Ether(dst=GW_MAC, src=ROUTER_MAC) / l3

    @staticmethod
    def expected_local(vm_id: int, l3, vm_mac: str | None = None, port_mac: str | None = None) -> bytes:
        """What a local VM receives: untagged Ether(VM MAC, port MAC) / the same IP packet."""
        from scapy.all import Ether

        _, mac, pmac = LOCAL_VMS[vm_id] if vm_id in LOCAL_VMS else (None, None, None)
        return bytes(Ether(dst=vm_mac or mac, src=port_mac or pmac) / l3)

    @staticmethod
    def expected_tunnel(endpoint: str, source: str, l3) -> bytes:
        """IP-in-IP as the design fixes it, built with scapy from the inner IP packet."""
        from scapy.all import IP, IPv6, Ether

        inner = bytes(l3)
        nh = 4 if inner[0] >> 4 == 4 else 41
        if ipaddress.ip_address(endpoint).version == 4:
            outer = IP(version=4, ihl=5, tos=0, id=0, flags=0, frag=0, ttl=64, proto=nh, src=source, dst=endpoint)
        else:
            outer = IPv6(version=6, tc=0, fl=0, nh=nh, hlim=64, src=source, dst=endpoint)
        return bytes(Ether(dst=NEXT_HOP_MAC, src=UPLINK_MAC) / outer / inner)

    @staticmethod
    def expected_gue(endpoint: str, source: str, l3, seed: int = HASH_SEED) -> bytes:
        """GUE variant 1 as the design fixes it: outer IP / UDP (source port from the
        inner flow's hash, checksum 0 over IPv4, computed by scapy over IPv6) / inner IP."""
        from scapy.all import IP, UDP, IPv6, Ether

        inner = bytes(l3)
        if ipaddress.ip_address(endpoint).version == 4:
            outer = IP(version=4, ihl=5, tos=0, id=0, flags=0, frag=0, ttl=64, proto=17, src=source, dst=endpoint)
            udp = UDP(sport=gue_source_port(inner, seed), dport=GUE_PORT, chksum=0)
        else:
            outer = IPv6(version=6, tc=0, fl=0, nh=17, hlim=64, src=source, dst=endpoint)
            udp = UDP(sport=gue_source_port(inner, seed), dport=GUE_PORT)
        return bytes(Ether(dst=NEXT_HOP_MAC, src=UPLINK_MAC) / outer / udp / inner)

    # ---- running packets ---------------------------------------------------
    def run(self, pkt):
        return self.tr.run(bytes(pkt))

    def maglev_vm(self, service_id: int, src: str, sport: int, dport: int, proto: int) -> int:
        """The VM the control plane predicts: table[maglev_slot(...)]."""
        from dataplane.flowhash import maglev_slot

        return int(self.dp.maglev_table(service_id)[maglev_slot(src, sport, dport, proto, self.seed, self.m)])

    def flow_key(self, src: str, dst: str, sport: int, dport: int, proto: int, fragment: bool = False):
        from dataplane import structs as S

        return S.FlowKey(src=S.addr16(src), dst=S.addr16(dst), sport=sport, dport=dport, proto=proto,
                         flags=S.FLOW_F_FRAGMENT if fragment else 0)

    # ---- counters ----------------------------------------------------------
    def snapshot(self) -> Snapshot:
        dp = self.dp
        return Snapshot(dp.region_counters().astype(np.int64), dp.service_counters().astype(np.int64),
                        dp.vm_counters().astype(np.int64), dp.drop_counters(), dp.stats())

    def delta(self, before: Snapshot) -> Delta:
        after = self.snapshot()
        return Delta(after.regions - before.regions, after.services - before.services, after.vms - before.vms,
                     {k: after.drops[k] - before.drops[k] for k in after.drops},
                     {k: after.stats[k] - before.stats[k] for k in after.stats})


def csum16(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`: 0 when `data` includes a valid one."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def gue_source_port(inner: bytes, seed: int = HASH_SEED) -> int:
    """The outer UDP source port the gateway gives a GUE packet: the flow hash of
    the inner packet's flow key (fragments: ports 0) in the dynamic range."""
    from dataplane import structs as S
    from dataplane.flowhash import flow_hash
    from scapy.all import IP, IPv6

    pkt = IP(inner) if inner[0] >> 4 == 4 else IPv6(inner)
    src = S.addr16(pkt.src)
    if isinstance(pkt, IP):
        proto, fragment, hdr = pkt.proto, bool(pkt.flags.MF or pkt.frag), pkt
    else:
        hdr, fragment = pkt, False
        while hdr.nh in (0, 43, 44, 60):                # extension headers up to the transport
            fragment |= hdr.nh == 44
            hdr = hdr.payload
        proto = hdr.nh
    sport = dport = 0
    if proto in (6, 17) and not fragment:
        l4 = bytes(hdr.payload)
        sport, dport = int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
    return S.GUE_SPORT_BASE | (flow_hash(bytes(src), sport, dport, proto, seed) & S.GUE_SPORT_MASK)

"""Forwarding through BPF_PROG_TEST_RUN: scapy frames in, verdict and exact bytes out.

Local VMs get the same IP packet with only the Ethernet header rewritten (and
VLAN tags removed); tunnel VMs get it wrapped in an outer IPv4/IPv6 header.
The chosen VM must be the one the control plane predicts (maglev_slot + table)."""
import ipaddress
import socket
import struct

import pytest
from scapy.all import (ARP, ICMP, IP, Dot1AD, Dot1Q, Ether, ICMPv6EchoRequest, IPOption_NOP, IPOption_RR,
                       IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, PadN, Raw, TCP, UDP)

from tests.xdp.harness import (DNS, LOCAL_VMS, TUNNEL4_VM, TUNNEL6_VM, TUNNEL_VMS, VIP4, VIP6, WEB, WEB6)

TCP_P, UDP_P = socket.IPPROTO_TCP, socket.IPPROTO_UDP


def ipv4_header_checksum_ok(hdr: bytes) -> bool:
    total = sum(struct.unpack("!10H", hdr[:20]))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def assert_local(gw, r, l3, service_id, src, sport, dport, proto):
    """REDIRECT to the predicted VM's port with exactly the expected frame."""
    vm = gw.maglev_vm(service_id, src, sport, dport, proto)
    assert r.verdict == "REDIRECT", r
    assert r.vm_id == vm
    assert r.port_slot == LOCAL_VMS[vm][0]
    assert r.data == gw.expected_local(vm, l3)
    return vm


# ---- 1. IPv4 TCP / UDP to a local VM ------------------------------------------
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv4_to_local_vm_exact_bytes_and_maglev_agrees(gw, proto):
    chosen = set()
    for i in range(40):
        src = f"198.18.{1 + i % 3}.{10 + i}"
        sport = 20000 + 37 * i
        if proto == "tcp":
            l3 = IP(src=src, dst=VIP4, ttl=50, id=i) / TCP(sport=sport, dport=8080, flags="S", seq=i) / Raw(b"x" * i)
            sid, dport, p = WEB, 8080, TCP_P
        else:
            l3 = IP(src=src, dst=VIP4, id=i) / UDP(sport=sport, dport=5353) / Raw(b"q" * (i + 1))
            sid, dport, p = DNS, 5353, UDP_P
        r = gw.run(gw.ingress(l3))
        chosen.add(assert_local(gw, r, l3, sid, src, sport, dport, p))
        # recorded in the flow table with the same VM
        fe = gw.dp.flow(gw.flow_key(src, VIP4, sport, dport, p))
        assert fe is not None and fe.vm_id == r.vm_id and fe.service_id == sid
    assert chosen == {1, 2, 3}, "40 flows over 3 equal VMs should reach all of them"


# ---- 2. IPv6 TCP -------------------------------------------------------------------
def test_ipv6_tcp_to_local_vm(gw):
    chosen = set()
    for i in range(30):
        src = f"2001:db8:{1 + i % 3}::{i + 5:x}"
        sport = 1024 + 101 * i
        l3 = IPv6(src=src, dst=VIP6, hlim=33, fl=i) / TCP(sport=sport, dport=8080, flags="PA") / Raw(b"y" * (3 * i))
        r = gw.run(gw.ingress(l3))
        chosen.add(assert_local(gw, r, l3, WEB6, src, sport, 8080, TCP_P))
    assert chosen == {1, 2, 3}


# ---- 3. tunnel VMs -------------------------------------------------------------------
TUNNEL_SERVICES = [
    ("198.19.0.20", 8080, "tcp", 3),          # all vm9: IPv4 in IPv4
    ("198.19.0.21", 8080, "tcp", 4),          # all vm10: IPv4 in IPv6
    ("2001:db8:f::20", 8080, "tcp", 5),       # all vm9: IPv6 in IPv4 (proto 41)
    ("2001:db8:f::21", 8080, "tcp", 6),       # all vm10: IPv6 in IPv6
]


@pytest.fixture
def tunnel_gw(gw):
    gw.set_services(TUNNEL_SERVICES)
    for sid, vm in ((3, TUNNEL4_VM), (4, TUNNEL6_VM), (5, TUNNEL4_VM), (6, TUNNEL6_VM)):
        gw.dp.set_maglev_table(sid, gw.table([vm]))
    return gw


@pytest.mark.parametrize("vip,vm", [("198.19.0.20", TUNNEL4_VM), ("198.19.0.21", TUNNEL6_VM),
                                    ("2001:db8:f::20", TUNNEL4_VM), ("2001:db8:f::21", TUNNEL6_VM)])
@pytest.mark.parametrize("payload", [0, 1, 333])
def test_tunnel_vm_exact_outer_header(tunnel_gw, vip, vm, payload):
    gw = tunnel_gw
    v6 = ipaddress.ip_address(vip).version == 6
    src = "2001:db8:1::77" if v6 else "198.18.1.77"
    ip = IPv6(src=src, dst=vip, hlim=17) if v6 else IP(src=src, dst=vip, ttl=17, id=4242, flags="DF")
    l3 = ip / TCP(sport=33333, dport=8080, flags="S") / Raw(b"z" * payload)
    before = gw.snapshot()
    r = gw.run(gw.ingress(l3))
    assert r.verdict == "TX"
    assert r.vm_id == vm
    endpoint, source = TUNNEL_VMS[vm]
    # independent construction: explicit field values, scapy fills length and checksum
    nh = 41 if v6 else 4
    if vm == TUNNEL4_VM:
        outer = IP(version=4, ihl=5, tos=0, id=0, flags=0, frag=0, ttl=64, proto=nh, src=source, dst=endpoint)
        outer_len = 20
    else:
        outer = IPv6(version=6, tc=0, fl=0, nh=nh, hlim=64, src=source, dst=endpoint)
        outer_len = 40
    expected = Ether(dst="02:00:00:00:02:01", src="02:00:00:00:02:02") / outer / l3
    assert r.data == bytes(expected)
    assert len(r.data) == 14 + outer_len + len(l3)
    if vm == TUNNEL4_VM:
        assert ipv4_header_checksum_ok(r.data[14:34])
        assert struct.unpack("!H", r.data[16:18])[0] == 20 + len(l3)
    else:
        assert struct.unpack("!H", r.data[18:20])[0] == len(l3)
    d = gw.delta(before)
    assert d.stats["tunnel_fwd"] == 1 and d.stats["local_fwd"] == 0
    # the flow is recorded like any Maglev choice
    fe = gw.dp.flow(gw.flow_key(src, vip, 33333, 8080, TCP_P))
    assert fe is not None and fe.vm_id == vm


def test_ethernet_padding_is_not_carried_into_the_tunnel(tunnel_gw):
    gw = tunnel_gw
    l3 = IP(src="198.18.1.78", dst="198.19.0.20") / TCP(sport=33334, dport=8080, flags="S")
    frame = bytes(gw.ingress(l3)) + b"\0" * 6           # a 60-byte minimum frame: 6 bytes of padding
    r = gw.run(frame)
    assert r.verdict == "TX"
    assert r.data == gw.expected_tunnel(*TUNNEL_VMS[TUNNEL4_VM], l3)   # exactly: no padding behind it



# ---- 4. VLAN tags ---------------------------------------------------------------------
def vlan_stacks():
    return {
        "dot1q": lambda l3: Ether(dst="02:00:00:00:03:01", src="02:00:00:00:03:02") / Dot1Q(vlan=100, prio=3) / l3,
        "qinq_8021q": lambda l3: Ether(dst="02:00:00:00:03:01", src="02:00:00:00:03:02")
        / Dot1Q(vlan=200) / Dot1Q(vlan=300) / l3,
        "dot1ad": lambda l3: Ether(dst="02:00:00:00:03:01", src="02:00:00:00:03:02") / Dot1AD(vlan=7) / l3,
        "qinq_8021ad": lambda l3: Ether(dst="02:00:00:00:03:01", src="02:00:00:00:03:02")
        / Dot1AD(vlan=10) / Dot1Q(vlan=20) / l3,
    }


@pytest.mark.parametrize("stack", sorted(vlan_stacks()))
@pytest.mark.parametrize("family", [4, 6])
def test_vlan_tags_are_stripped_on_local_forward(gw, stack, family):
    frame_of = vlan_stacks()[stack]
    if family == 4:
        src, l3 = "198.18.2.40", IP(src="198.18.2.40", dst=VIP4) / TCP(sport=4444, dport=8080) / Raw(b"v" * 50)
        sid = WEB
    else:
        src, l3 = "2001:db8:2::40", IPv6(src="2001:db8:2::40", dst=VIP6) / TCP(sport=4444, dport=8080) / Raw(b"v")
        sid = WEB6
    frame = frame_of(l3)
    assert bytes(frame)[12:14] in (b"\x81\x00", b"\x88\xa8")
    r = gw.run(frame)
    assert_local(gw, r, l3, sid, src, 4444, 8080, TCP_P)


@pytest.mark.parametrize("stack", ["dot1q", "qinq_8021ad"])
def test_vlan_tags_are_stripped_on_tunnel_forward(gw, stack):
    gw.set_services([("198.19.0.20", 8080, "tcp", 3), ("198.19.0.21", 8080, "tcp", 4)])
    gw.dp.set_maglev_table(3, gw.table([TUNNEL4_VM]))
    gw.dp.set_maglev_table(4, gw.table([TUNNEL6_VM]))
    for vip, vm in (("198.19.0.20", TUNNEL4_VM), ("198.19.0.21", TUNNEL6_VM)):
        l3 = IP(src="198.18.1.9", dst=vip) / TCP(sport=999, dport=8080) / Raw(b"t" * 9)
        r = gw.run(vlan_stacks()[stack](l3))
        assert r.verdict == "TX"
        assert r.data == gw.expected_tunnel(*TUNNEL_VMS[vm], l3)


@pytest.mark.parametrize("tags", [
    [Dot1Q(vlan=1), Dot1Q(vlan=2), Dot1Q(vlan=3)],
    [Dot1AD(vlan=1), Dot1Q(vlan=2), Dot1Q(vlan=3)],
    [Dot1AD(vlan=1), Dot1AD(vlan=2), Dot1AD(vlan=3)],
])
def test_three_vlan_tags_drop(gw, tags):
    frame = Ether(dst="02:00:00:00:03:01", src="02:00:00:00:03:02")
    for t in tags:
        frame = frame / t
    frame = frame / IP(src="198.18.1.2", dst=VIP4) / TCP(sport=1, dport=8080)
    before = gw.snapshot()
    r = gw.run(frame)
    assert r.verdict == "DROP"
    assert gw.delta(before).nonzero_drops() == {"vlan_too_deep": 1}


def test_vlan_tagged_non_vip_passes_untouched(gw):
    frame = gw.ingress(Dot1Q(vlan=5) / IP(src="198.18.1.2", dst="198.19.0.99") / TCP(sport=1, dport=8080))
    r = gw.run(frame)
    assert r.verdict == "PASS"
    assert r.data == bytes(frame)


# ---- 5. IPv4 options ----------------------------------------------------------------
@pytest.mark.parametrize("ihl", range(6, 16))
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv4_options_forwarded_intact(gw, ihl, proto):
    n = 4 * (ihl - 5)
    opts = [IPOption_RR(routers=["198.18.9.9"])] + [IPOption_NOP()] * (n - 7) if n >= 8 else [IPOption_NOP()] * n
    src = f"198.18.1.{ihl}"
    ip = IP(src=src, dst=VIP4, options=opts)
    l4 = TCP(sport=5000 + ihl, dport=8080, flags="S") if proto == "tcp" else UDP(sport=5000 + ihl, dport=5353)
    l3 = ip / l4 / Raw(b"o" * ihl)
    assert bytes(l3)[0] == 0x40 | ihl
    r = gw.run(gw.ingress(l3))
    sid, dport, p = (WEB, 8080, TCP_P) if proto == "tcp" else (DNS, 5353, UDP_P)
    assert_local(gw, r, l3, sid, src, 5000 + ihl, dport, p)


def test_ipv4_options_through_tunnel(gw):
    gw.set_services([("198.19.0.20", 8080, "tcp", 3)])
    gw.dp.set_maglev_table(3, gw.table([TUNNEL6_VM]))
    l3 = IP(src="198.18.1.3", dst="198.19.0.20", options=[IPOption_NOP()] * 40) / TCP(sport=7, dport=8080)
    r = gw.run(gw.ingress(l3))
    assert r.verdict == "TX"
    assert r.data == gw.expected_tunnel(*TUNNEL_VMS[TUNNEL6_VM], l3)


# ---- 6. IPv6 extension headers ---------------------------------------------------------
EXT_CHAINS = {
    "hbh": lambda: IPv6ExtHdrHopByHop(),
    "dst": lambda: IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 12)]),
    "rt": lambda: IPv6ExtHdrRouting(),
    "hbh_dst": lambda: IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(),
    "hbh_rt_dst": lambda: IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt(),
    "four": lambda: IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 20)])
    / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt(),
}


@pytest.mark.parametrize("chain", sorted(EXT_CHAINS))
def test_ipv6_extension_headers_forwarded(gw, chain):
    src = "2001:db8:1::e"
    l3 = IPv6(src=src, dst=VIP6) / EXT_CHAINS[chain]() / TCP(sport=6006, dport=8080) / Raw(b"e" * 21)
    r = gw.run(gw.ingress(l3))
    assert_local(gw, r, l3, WEB6, src, 6006, 8080, TCP_P)


def test_ipv6_five_extension_headers_drop(gw):
    l3 = (IPv6(src="2001:db8:1::e", dst=VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting()
          / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / TCP(sport=6006, dport=8080))
    before = gw.snapshot()
    r = gw.run(gw.ingress(l3))
    assert r.verdict == "DROP"
    assert gw.delta(before).nonzero_drops() == {"ip6_ext_limit": 1}


# ---- 9. non-VIP traffic passes untouched ----------------------------------------------
NON_VIP = {
    "other_dst": lambda: IP(src="198.18.1.2", dst="198.19.0.11") / TCP(sport=1000, dport=8080),
    "other_port": lambda: IP(src="198.18.1.2", dst=VIP4) / TCP(sport=1000, dport=8081),
    "udp_to_tcp_port": lambda: IP(src="198.18.1.2", dst=VIP4) / UDP(sport=1000, dport=8080),
    "tcp_to_udp_port": lambda: IP(src="198.18.1.2", dst=VIP4) / TCP(sport=1000, dport=5353),
    "arp": lambda: ARP(op=1, psrc="198.18.1.2", pdst=VIP4, hwsrc="02:00:00:00:03:02"),
    "icmp_echo": lambda: IP(src="198.18.1.2", dst=VIP4) / ICMP(type=8, id=1, seq=1) / Raw(b"ping"),
    "v6_other_dst": lambda: IPv6(src="2001:db8:1::2", dst="2001:db8:f::11") / TCP(sport=1000, dport=8080),
    "v6_other_port": lambda: IPv6(src="2001:db8:1::2", dst=VIP6) / TCP(sport=1000, dport=443),
    "v6_v4vip_bytes": lambda: IPv6(src="2001:db8:1::2", dst="::ffff:198.19.0.10") / TCP(sport=1000, dport=8080),
    "icmpv6_echo": lambda: IPv6(src="2001:db8:1::2", dst=VIP6) / ICMPv6EchoRequest(id=1, seq=1),
    "other_ethertype": lambda: Raw(b"\x00" * 46),
}


@pytest.mark.parametrize("kind", sorted(NON_VIP))
def test_non_vip_traffic_passes_untouched(gw, kind):
    frame = gw.ingress(NON_VIP[kind]())
    if kind == "other_ethertype":
        frame.type = 0x88B5
    before = gw.snapshot()
    r = gw.run(frame)
    assert r.verdict == "PASS"
    assert r.data == bytes(frame)
    d = gw.delta(before)
    assert d.stats["pass"] == 1
    assert d.nonzero_drops() == {}
    assert not d.services.any() and not d.vms.any()
    assert gw.dp.flows() == []


# ---- control-plane mirror == dataplane, over random flows ------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

v4_clients = st.integers(0, 2**17 - 1).map(lambda n: str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + n)))
v6_clients = st.integers(0, 2**96 - 1).map(lambda n: str(ipaddress.IPv6Address(0x20010DB8 << 96 | n)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(src=st.one_of(v4_clients, v6_clients), sport=st.integers(1, 65535), udp=st.booleans(),
       payload=st.binary(max_size=64))
def test_random_flows_match_the_control_plane_mirror(gw, src, sport, udp, payload):
    v6 = ":" in src
    if v6:
        l3 = IPv6(src=src, dst=VIP6) / TCP(sport=sport, dport=8080) / Raw(payload)
        sid, dport, p = WEB6, 8080, TCP_P
    elif udp:
        l3 = IP(src=src, dst=VIP4) / UDP(sport=sport, dport=5353) / Raw(payload)
        sid, dport, p = DNS, 5353, UDP_P
    else:
        l3 = IP(src=src, dst=VIP4) / TCP(sport=sport, dport=8080) / Raw(payload)
        sid, dport, p = WEB, 8080, TCP_P
    assert_local(gw, gw.run(gw.ingress(l3)), l3, sid, src, sport, dport, p)

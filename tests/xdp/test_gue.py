"""GUE encapsulation through BPF_PROG_TEST_RUN: exact bytes for both outer
families (UDP checksum 0 over IPv4, a correct one over IPv6, checked here by an
independent RFC 1071 sum), also where the inner packet's own checksum cannot
stand in for its payload (fragments, IPv4 UDP without a checksum, extension
headers, odd lengths); the source port follows the flow."""
import ipaddress
import struct

import pytest
from scapy.all import IP, TCP, UDP, IPv6, IPv6ExtHdrHopByHop, Raw

from dataplane import structs as S
from tests.xdp.harness import (GUE_PORT, NEXT_HOP_MAC, TUNNEL4_VM, TUNNEL6_VM, TUNNEL_VMS, UPLINK_MAC, VIP4, WEB,
                               csum16, gue_source_port)

SERVICES = [("198.19.0.40", 8080, "tcp", 3), ("198.19.0.40", 5353, "udp", 4),
            ("2001:db8:f::40", 8080, "tcp", 5), ("2001:db8:f::40", 5353, "udp", 6)]


def udp6_checksum_ok(frame: bytes) -> bool:
    """The UDP checksum of Ether / IPv6 / UDP / ... summed from the bytes alone."""
    ip6 = frame[14:54]
    plen = struct.unpack_from("!H", ip6, 4)[0]
    udp = frame[54:54 + plen]
    pseudo = ip6[8:40] + struct.pack("!IxxxB", plen, 17)
    return struct.unpack_from("!H", udp, 6)[0] != 0 and csum16(pseudo + udp) == 0


@pytest.fixture(params=[TUNNEL4_VM, TUNNEL6_VM], ids=["outer4", "outer6"])
def gue_gw(gw, request):
    """Services 3..6 served by one tunnel VM whose endpoint is reached by GUE."""
    vm = request.param
    endpoint, source = TUNNEL_VMS[vm]
    gw.dp.set_vm(vm, gw.Tunnel(ipaddress.ip_address(endpoint), ipaddress.ip_address(source), NEXT_HOP_MAC,
                               UPLINK_MAC, encap="gue"))
    gw.set_services(SERVICES)
    for _, _, _, sid in SERVICES:
        gw.dp.set_maglev_table(sid, gw.table([vm]))
    gw.vm = vm
    return gw


def run_gue(gw, l3):
    endpoint, source = TUNNEL_VMS[gw.vm]
    before = gw.snapshot()
    r = gw.run(gw.ingress(l3))
    assert (r.verdict, r.vm_id) == ("TX", gw.vm)
    assert r.data == gw.expected_gue(endpoint, source, l3)
    assert gw.delta(before).stats["tunnel_fwd"] == 1
    if gw.vm == TUNNEL6_VM:
        assert udp6_checksum_ok(r.data)
    else:
        assert struct.unpack_from("!H", r.data, 14 + 20 + 6)[0] == 0     # IPv4: no UDP checksum
        assert csum16(r.data[14:34]) == 0
    return r


@pytest.mark.parametrize("payload", [0, 1, 2, 3, 100, 1001])
def test_gue_exact_bytes_tcp_both_inner_families(gue_gw, payload):
    for l3 in (IP(src="198.18.1.61", dst="198.19.0.40", ttl=9, id=7) / TCP(sport=5000, dport=8080, flags="PA")
               / Raw(b"t" * payload),
               IPv6(src="2001:db8:2::61", dst="2001:db8:f::40", fl=5) / TCP(sport=5000, dport=8080, flags="PA")
               / Raw(b"u" * payload)):
        r = run_gue(gue_gw, l3)
        assert struct.unpack_from("!H", r.data, 14 + (20 if gue_gw.vm == TUNNEL4_VM else 40) + 2)[0] == GUE_PORT


INNER = {
    "udp4": IP(src="198.18.1.62", dst="198.19.0.40") / UDP(sport=53000, dport=5353) / Raw(b"q" * 33),
    "udp4_no_checksum": IP(src="198.18.1.63", dst="198.19.0.40") / UDP(sport=53001, dport=5353, chksum=0)
    / Raw(b"r" * 40),
    "udp4_first_fragment": IP(src="198.18.1.64", dst="198.19.0.40", flags="MF", id=9, proto=17) / Raw(
        bytes(UDP(sport=53002, dport=5353, len=300, chksum=0x1234)) + b"s" * 61),
    "udp4_later_fragment": IP(src="198.18.1.64", dst="198.19.0.40", frag=40, id=9, proto=17) / Raw(b"t" * 77),
    "udp6": IPv6(src="2001:db8:1::62", dst="2001:db8:f::40") / UDP(sport=53003, dport=5353) / Raw(b"v" * 5),
    "tcp6_hop_by_hop": IPv6(src="2001:db8:1::63", dst="2001:db8:f::40") / IPv6ExtHdrHopByHop()
    / TCP(sport=5001, dport=8080) / Raw(b"w" * 11),
    "tcp4_big": IP(src="198.18.1.65", dst="198.19.0.40") / TCP(sport=5002, dport=8080) / Raw(bytes(range(256)) * 11),
}


@pytest.mark.parametrize("case", sorted(INNER))
def test_gue_exact_bytes_where_the_checksum_must_read_the_payload(gue_gw, case):
    run_gue(gue_gw, INNER[case])


def test_gue_source_port_varies_with_the_flow_and_is_stable_per_flow(gue_gw):
    ports = {}
    sport_off = 14 + (20 if gue_gw.vm == TUNNEL4_VM else 40)
    for i in range(64):
        l3 = IP(src=f"198.18.1.{100 + i % 8}", dst="198.19.0.40") / TCP(sport=20000 + i, dport=8080, flags="S")
        r = gue_gw.run(gue_gw.ingress(l3))
        port = struct.unpack_from("!H", r.data, sport_off)[0]
        assert port == gue_source_port(bytes(l3)) and port >= 0xC000
        ports[(l3.src, l3[TCP].sport)] = port
        again = gue_gw.run(gue_gw.ingress(l3 / Raw(b"later packet")))
        assert struct.unpack_from("!H", again.data, sport_off)[0] == port
    assert len(set(ports.values())) >= 60          # 64 flows, 16384 ports: next to no collisions


@pytest.mark.parametrize("endpoint,source", [("198.18.250.9", "198.18.0.2"), ("2001:db8:250::9", "2001:db8::2")])
def test_offload_target_by_gue(gw, endpoint, source):
    gw.dp.set_offload(2, WEB, gw.Tunnel(ipaddress.ip_address(endpoint), ipaddress.ip_address(source),
                                        NEXT_HOP_MAC, UPLINK_MAC, encap="gue"))
    assert gw.dp.offloads()[(2, WEB)].encap == S.ENCAP_GUE
    l3 = IP(src="198.18.2.77", dst=VIP4) / TCP(sport=31000, dport=8080, flags="S") / Raw(b"offloaded")
    before = gw.snapshot()
    r = gw.run(gw.ingress(l3))
    assert r.verdict == "TX" and r.data == gw.expected_gue(endpoint, source, l3)
    assert gw.delta(before).stats["offload_fwd"] == 1
    if ipaddress.ip_address(endpoint).version == 6:
        assert udp6_checksum_ok(r.data)


def test_unknown_encap_is_refused_naming_it(gw):
    with pytest.raises(ValueError, match="encap 'vxlan'"):
        gw.dp.set_vm(TUNNEL4_VM, gw.Tunnel(ipaddress.ip_address("198.18.200.2"), ipaddress.ip_address("198.18.0.2"),
                                           NEXT_HOP_MAC, UPLINK_MAC, encap="vxlan"))


def test_icmp_error_follows_its_flow_into_gue(gue_gw):
    from scapy.all import ICMPv6DestUnreach

    gw = gue_gw
    client = "2001:db8:1::70"
    gw.run(gw.ingress(IPv6(src=client, dst="2001:db8:f::40") / TCP(sport=6000, dport=8080, flags="S")))
    quote = IPv6(src="2001:db8:f::40", dst=client) / TCP(sport=8080, dport=6000, flags="SA")
    l3 = IPv6(src="2001:db8:2::1", dst="2001:db8:f::40") / ICMPv6DestUnreach() / quote
    run_gue(gw, l3)

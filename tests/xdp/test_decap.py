"""Decapsulation through BPF_PROG_TEST_RUN: tunnel packets (IPIP, 6in4, 4in6,
IP6IP6, GUE variant 1 and 0 over IPv4 and IPv6) to a decap address from a trusted
source are served by their inner packet: exact forwarding bytes, the inner
source's region counted; untrusted, nested, fragmented and malformed tunnels
are dropped with their reason and counted nowhere else."""
import ipaddress
import socket

import pytest
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, IPv6, IPv6ExtHdrHopByHop, Raw

from tests.xdp.harness import (DECAP_ADDRESSES, GUE_PORT, LOCAL_VMS, ROUTER_MAC, GW_MAC, TUNNEL4_VM, TUNNEL6_VM,
                               TUNNEL_VMS, VIP4, VIP6, WEB, WEB6)

TCP_P = socket.IPPROTO_TCP
PEER4, PEER6 = "198.18.200.7", "2001:db8:200::7"          # trusted source gateways (harness DECAP_FROM)
STRANGER4, STRANGER6 = "198.18.201.7", "2001:db8:201::7"  # outside decap_from
GW4, GW6 = DECAP_ADDRESSES


def outer_ip(family: int, src: str | None = None, dst: str | None = None, **kw):
    if family == 4:
        return IP(src=src or PEER4, dst=dst or GW4, **kw)
    return IPv6(src=src or PEER6, dst=dst or GW6, **kw)


def wrap(inner, encap: str, family: int, src: str | None = None, dst: str | None = None):
    """`inner` (scapy IP/IPv6 packet) in a tunnel: encap ipip (protocol 4 / 41),
    gue (variant 1: UDP then the inner header) or gue0 (variant 0, 4-byte header)."""
    raw = bytes(inner)
    proto = 4 if raw[0] >> 4 == 4 else 41
    if encap == "ipip":
        kw = {"proto": proto} if family == 4 else {"nh": proto}
        return outer_ip(family, src, dst, **kw) / Raw(raw)
    if encap == "gue":
        return outer_ip(family, src, dst) / UDP(sport=49999, dport=GUE_PORT) / Raw(raw)
    assert encap == "gue0"
    return outer_ip(family, src, dst) / UDP(sport=49999, dport=GUE_PORT) / Raw(bytes([0, proto, 0, 0]) + raw)


def client_packet(family: int, i: int = 0, dport: int = 8080, payload: bytes = b"hello"):
    if family == 4:
        return IP(src=f"198.18.1.{20 + i}", dst=VIP4, ttl=33) / TCP(sport=40000 + i, dport=dport, flags="S") / \
            Raw(payload)
    return IPv6(src=f"2001:db8:1::{20 + i:x}", dst=VIP6, hlim=33) / TCP(sport=40000 + i, dport=dport, flags="S") / \
        Raw(payload)


WRAPPINGS = [("ipip", 4, 4), ("ipip", 4, 6), ("ipip", 6, 4), ("ipip", 6, 6),     # IPIP, 6in4, 4in6, IP6IP6
             ("gue", 4, 4), ("gue", 4, 6), ("gue", 6, 4), ("gue", 6, 6),
             ("gue0", 4, 4), ("gue0", 6, 6)]
IDS = [f"{e}-outer{o}-inner{i}" for e, o, i in WRAPPINGS]


@pytest.mark.parametrize("encap,outer,inner", WRAPPINGS, ids=IDS)
def test_decap_to_local_vm_exact_inner_bytes(gw, encap, outer, inner):
    for i in range(6):
        l3 = client_packet(inner, i, payload=b"x" * (7 * i))
        frame = gw.ingress(wrap(l3, encap, outer))
        before = gw.snapshot()
        r = gw.run(frame)
        sid, src = (WEB, l3.src) if inner == 4 else (WEB6, l3.src)
        vm = gw.maglev_vm(sid, src, l3[TCP].sport, 8080, TCP_P)
        assert (r.verdict, r.vm_id, r.port_slot) == ("REDIRECT", vm, LOCAL_VMS[vm][0])
        assert r.data == gw.expected_local(vm, l3)          # outer headers gone, the inner packet as sent
        d = gw.delta(before)
        assert d.nonzero_stats() == {"decap": 1, "flow_misses": 1, "local_fwd": 1}
        assert not d.nonzero_drops()
        # the inner source's region (r1), the frame as received; nothing for the outer source
        assert d.regions[:, 0].tolist() == [0, 1, 0] + [0] * (len(d.regions) - 3)
        assert d.regions[1, 1] == len(bytes(frame))
        assert d.services[sid, 0] == 1 and d.vms[vm, 0] == 1
        # the flow is the inner flow's, and the next packet of it hits
        assert gw.dp.flow(gw.flow_key(src, l3.dst, l3[TCP].sport, 8080, TCP_P)).vm_id == vm
        before = gw.snapshot()
        assert gw.run(frame).vm_id == vm
        assert gw.delta(before).nonzero_stats() == {"decap": 1, "flow_hits": 1, "local_fwd": 1}


def test_decap_of_a_vlan_tagged_tunnel_drops_tags_and_outer_headers(gw):
    l3 = client_packet(4, 1)
    frame = Ether(dst=GW_MAC, src=ROUTER_MAC) / Dot1Q(vlan=100) / Dot1Q(vlan=200) / wrap(l3, "gue", 6)
    r = gw.run(frame)
    vm = gw.maglev_vm(WEB, l3.src, l3[TCP].sport, 8080, TCP_P)
    assert (r.verdict, r.data) == ("REDIRECT", gw.expected_local(vm, l3))


def test_outer_padding_is_not_delivered(gw):
    l3 = client_packet(4, 2)
    r = gw.run(bytes(gw.ingress(wrap(l3, "ipip", 4))) + b"\0" * 9)
    vm = gw.maglev_vm(WEB, l3.src, l3[TCP].sport, 8080, TCP_P)
    assert r.verdict == "REDIRECT" and r.data[:14 + len(l3)] == gw.expected_local(vm, l3)


@pytest.fixture
def tunnel_vm_gw(gw):
    """web and web6 served by the tunnel VMs only: decapsulated flows leave in a tunnel again."""
    gw.dp.set_maglev_table(WEB, gw.table([TUNNEL4_VM]))
    gw.dp.set_maglev_table(WEB6, gw.table([TUNNEL6_VM]))
    return gw


@pytest.mark.parametrize("encap,outer,inner", WRAPPINGS, ids=IDS)
@pytest.mark.parametrize("reencap", ["ipip", "gue"])
def test_decap_then_tunnel_to_the_vm_exact_bytes(tunnel_vm_gw, encap, outer, inner, reencap):
    gw = tunnel_vm_gw
    vm = TUNNEL4_VM if inner == 4 else TUNNEL6_VM
    endpoint, source = TUNNEL_VMS[vm]
    gw.dp.set_vm(vm, gw.Tunnel(ipaddress.ip_address(endpoint), ipaddress.ip_address(source),
                               "02:00:00:00:02:01", "02:00:00:00:02:02", encap=reencap))
    l3 = client_packet(inner, 3, payload=b"abc")
    before = gw.snapshot()
    r = gw.run(gw.ingress(wrap(l3, encap, outer)))
    assert (r.verdict, r.vm_id) == ("TX", vm)
    want = gw.expected_tunnel(endpoint, source, l3) if reencap == "ipip" else gw.expected_gue(endpoint, source, l3)
    assert r.data == want
    assert gw.delta(before).nonzero_stats() == {"decap": 1, "flow_misses": 1, "tunnel_fwd": 1}


def test_inner_packet_to_no_vip_is_passed_untouched(gw):
    l3 = IP(src="198.18.1.9", dst="198.19.9.9") / TCP(sport=1, dport=80)
    frame = bytes(gw.ingress(wrap(l3, "ipip", 4)))
    before = gw.snapshot()
    r = gw.run(frame)
    assert (r.verdict, r.data) == ("PASS", frame)
    d = gw.delta(before)
    assert d.nonzero_stats() == {"decap": 1, "pass": 1} and d.regions[1, 0] == 1


@pytest.mark.parametrize("frame_of", [
    lambda: wrap(client_packet(4), "ipip", 4, dst="198.18.0.3"),          # IPIP to another address
    lambda: wrap(client_packet(6), "gue", 6, dst="2001:db8::3"),          # GUE to another address
    lambda: IP(src=PEER4, dst=GW4) / UDP(sport=1, dport=GUE_PORT + 1) / Raw(bytes(client_packet(4))),  # not GUE
], ids=["ipip-other-address", "gue-other-address", "other-udp-port"])
def test_not_a_tunnel_to_this_gateway_takes_the_normal_path(gw, frame_of):
    frame = bytes(gw.ingress(frame_of()))
    before = gw.snapshot()
    r = gw.run(frame)
    assert (r.verdict, r.data) == ("PASS", frame)
    d = gw.delta(before)
    assert d.nonzero_stats() == {"pass": 1} and not d.nonzero_drops()
    assert d.regions[0, 0] == 1                 # the outer source (no region): it was not decapsulated


@pytest.mark.parametrize("encap,outer", [("ipip", 4), ("ipip", 6), ("gue", 4), ("gue", 6)])
def test_untrusted_outer_source_is_dropped_not_decapsulated(gw, encap, outer):
    frame = gw.ingress(wrap(client_packet(4), encap, outer, src=STRANGER4 if outer == 4 else STRANGER6))
    before = gw.snapshot()
    r = gw.run(frame)
    assert r.verdict == "DROP"
    d = gw.delta(before)
    assert d.nonzero_drops() == {"decap_untrusted": 1}
    assert not d.nonzero_stats() and not d.regions.any() and not d.services.any()
    assert gw.dp.flows() == []


@pytest.mark.parametrize("encap,outer", [("ipip", 4), ("gue", 6), ("gue0", 4)])
def test_nested_tunnel_is_dropped(gw, encap, outer):
    nested = wrap(wrap(client_packet(4), "ipip", 4), encap, outer)
    before = gw.snapshot()
    assert gw.run(gw.ingress(nested)).verdict == "DROP"
    d = gw.delta(before)
    assert d.nonzero_drops() == {"decap_nested": 1} and not d.regions.any() and not d.nonzero_stats()


def test_nested_tunnel_to_another_address_is_not_decapsulated_twice(gw):
    """An inner tunnel packet to someone else is an ordinary (non-VIP) inner packet."""
    frame = bytes(gw.ingress(wrap(wrap(client_packet(4), "ipip", 4, dst="198.18.0.9"), "ipip", 6)))
    r = gw.run(frame)
    assert (r.verdict, r.data) == ("PASS", frame)


def _gue_raw(family: int, payload: bytes, **udp):
    return gw_frame(outer_ip(family) / UDP(sport=49999, dport=GUE_PORT, **udp) / Raw(payload))


def gw_frame(l3) -> bytes:
    return bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / l3)


INNER4 = bytes(client_packet(4))
INNER6 = bytes(client_packet(6))
UNACCOUNTED = {
    # GUE header faults
    "gue_variant1_version5": ("gue_bad", lambda: _gue_raw(4, bytes([0x55]) + INNER4[1:])),
    "gue_variant2": ("gue_bad", lambda: _gue_raw(4, bytes([0x80]) + INNER4[1:])),
    "gue_variant3": ("gue_bad", lambda: _gue_raw(6, bytes([0xc0]) + INNER6[1:])),
    "gue_v0_options": ("gue_bad", lambda: _gue_raw(4, bytes([0x01, 4, 0, 0]) + INNER4 + b"\0" * 4)),
    "gue_v0_control": ("gue_bad", lambda: _gue_raw(4, bytes([0x20, 4, 0, 0]) + INNER4)),
    "gue_v0_flags": ("gue_bad", lambda: _gue_raw(6, bytes([0, 41, 0x80, 0]) + INNER6)),
    "gue_v0_other_proto": ("gue_bad", lambda: _gue_raw(4, bytes([0, 17, 0, 0]) + INNER4)),
    "gue_v0_cut": ("gue_bad", lambda: _gue_raw(4, bytes([0, 4]))),
    "gue_empty": ("gue_bad", lambda: _gue_raw(4, b"")),
    # inner IP faults: the reasons of the same faults in an outer header
    "ipip_inner_cut": ("ip4_trunc", lambda: gw_frame(outer_ip(4, proto=4) / Raw(INNER4[:12]))),
    "6in4_inner_v4": ("ip6_bad_version", lambda: gw_frame(outer_ip(4, proto=41) / Raw(INNER4 + b"\0" * 20))),
    "4in6_inner_v6": ("ip4_bad_version", lambda: gw_frame(outer_ip(6, nh=4) / Raw(INNER6))),
    "ipip_inner_bad_ihl": ("ip4_bad_ihl", lambda: gw_frame(outer_ip(4, proto=4) / Raw(b"\x44" + INNER4[1:]))),
    "ipip_inner_longer_than_tunnel": (
        "ip4_bad_len", lambda: gw_frame(outer_ip(4, proto=4, len=20 + len(INNER4) - 4) / Raw(INNER4))),
    "gue_inner_longer_than_udp": (
        "ip6_bad_len", lambda: _gue_raw(6, INNER6, len=8 + len(INNER6) - 1)),
    "ip6ip6_inner_ext_cut": ("ip6_ext_trunc", lambda: gw_frame(
        outer_ip(6, nh=41) / Raw(bytes(IPv6(src="2001:db8:1::5", dst=VIP6, nh=0, plen=2)) + b"\x06\x07"))),
    # tunnels this gateway does not reassemble
    "ipip_fragment": ("decap_fragment", lambda: gw_frame(outer_ip(4, proto=4, flags="MF") / Raw(INNER4[:24]))),
}
ACCOUNTED_INNER = {
    "inner_tcp_cut": ("l4_trunc", lambda: gw_frame(outer_ip(4, proto=4) / Raw(
        bytes(IP(src="198.18.1.5", dst=VIP4, proto=6) / Raw(b"\0" * 10))))),
    "inner_udp_bad_len": ("udp_bad_len", lambda: _gue_raw(6, bytes(
        IPv6(src="2001:db8:1::5", dst=VIP6) / UDP(sport=1, dport=5353, len=99) / Raw(b"q"))),),
}


@pytest.mark.parametrize("case", sorted(UNACCOUNTED))
def test_malformed_tunnel_dropped_with_its_reason_before_any_region(gw, case):
    reason, frame_of = UNACCOUNTED[case]
    before = gw.snapshot()
    r = gw.run(frame_of())
    assert r.verdict == "DROP"
    d = gw.delta(before)
    assert d.nonzero_drops() == {reason: 1}
    assert not d.regions.any() and not d.nonzero_stats()


@pytest.mark.parametrize("case", sorted(ACCOUNTED_INNER))
def test_inner_transport_fault_is_dropped_and_accounted_to_the_inner_source(gw, case):
    reason, frame_of = ACCOUNTED_INNER[case]
    before = gw.snapshot()
    assert gw.run(frame_of()).verdict == "DROP"
    d = gw.delta(before)
    assert d.nonzero_drops() == {reason: 1}
    assert d.regions[1, 0] == 1 and d.regions[:, 0].sum() == 1    # 198.18.1.5 / 2001:db8:1::5: r1


def test_outer_udp_fault_is_the_outer_packets(gw):
    """A GUE-port datagram whose UDP length lies is not recognised as a tunnel: udp_bad_len, outer source."""
    before = gw.snapshot()
    assert gw.run(_gue_raw(4, INNER4, len=8 + len(INNER4) + 1)).verdict == "DROP"
    d = gw.delta(before)
    assert d.nonzero_drops() == {"udp_bad_len": 1} and d.regions[0, 0] == 1


def test_inner_ipv6_extension_headers_are_parsed(gw):
    l3 = IPv6(src="2001:db8:1::44", dst=VIP6) / IPv6ExtHdrHopByHop() / TCP(sport=4444, dport=8080, flags="S")
    r = gw.run(gw.ingress(wrap(l3, "gue", 4)))
    vm = gw.maglev_vm(WEB6, "2001:db8:1::44", 4444, 8080, TCP_P)
    assert (r.verdict, r.data) == ("REDIRECT", gw.expected_local(vm, l3))


def test_decap_config_is_read_back_and_replaced_exactly(gw):
    dp = gw.dp
    dp.set_decap([ipaddress.ip_address("198.18.0.5")], [ipaddress.ip_network("198.18.9.0/24")], 7000)
    assert dp.decap() == {"addresses": [ipaddress.ip_address("198.18.0.5")],
                          "trusted": [ipaddress.ip_network("198.18.9.0/24")], "gue_port": 7000}
    # the old address and source no longer decapsulate; the new ones do
    assert gw.run(gw.ingress(wrap(client_packet(4), "ipip", 4))).verdict == "PASS"
    l3 = client_packet(4, 4)
    r = gw.run(gw.ingress(IP(src="198.18.9.1", dst="198.18.0.5") / UDP(sport=5, dport=7000) / Raw(bytes(l3))))
    assert r.verdict == "REDIRECT" and r.data[14:] == bytes(l3)
    with pytest.raises(ValueError, match="decap_addresses"):
        dp.set_decap([ipaddress.ip_address(f"198.18.0.{i}") for i in range(20)], [], 6080)

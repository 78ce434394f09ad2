"""Fragments (all pieces of a datagram reach one VM, chosen on addresses + proto)
and ICMP errors (delivered to the VM that owns the quoted flow)."""
import socket

import pytest
from scapy.all import (ICMP, IP, TCP, UDP, ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment, Raw,
                       fragment, fragment6)

from tests.xdp.harness import DNS, LOCAL_VMS, VIP4, VIP6, WEB, WEB6

TCP_P, UDP_P = socket.IPPROTO_TCP, socket.IPPROTO_UDP
DNS6 = 3


def forwarded_to(gw, r, l3, vm):
    assert r.verdict == "REDIRECT", r
    assert r.vm_id == vm
    assert r.port_slot == LOCAL_VMS[vm][0]
    assert r.data == gw.expected_local(vm, l3)


# ---- 7. fragments --------------------------------------------------------------------
SOURCES4 = ["198.18.1.3", "198.18.1.44", "198.18.2.5", "198.18.2.200", "198.18.3.9", "198.18.7.1", "198.19.5.5",
            "198.18.1.250"]
SOURCES6 = ["2001:db8:1::3", "2001:db8:1::44", "2001:db8:2::5", "2001:db8:2:ff::200", "2001:db8:3::9",
            "2001:db8:77::1", "2001:db8:1:2:3:4:5:6", "2001:db8:2::abcd"]


def check_fragments(gw, frags, src, dst, proto, service_id, family):
    assert len(frags) >= 3
    vm = gw.maglev_vm(service_id, src, 0, 0, proto)
    before = gw.snapshot()
    for f in frags:
        r = gw.run(gw.ingress(f))
        forwarded_to(gw, r, f, vm)
    d = gw.delta(before)
    # one flow entry for the whole datagram: ports 0, FLOW_F_FRAGMENT
    fe = gw.dp.flow(gw.flow_key(src, dst, 0, 0, proto, fragment=True))
    assert fe is not None and fe.vm_id == vm and fe.service_id == service_id
    assert d.stats["flow_misses"] == 1 and d.stats["flow_hits"] == len(frags) - 1
    assert d.services[service_id].tolist() == [len(frags), sum(len(f) + 14 for f in frags), 1]
    return vm


def test_ipv4_udp_fragments_reach_one_vm(gw):
    chosen = set()
    for i, src in enumerate(SOURCES4):
        pkt = IP(src=src, dst=VIP4, id=1000 + i) / UDP(sport=40000 + i, dport=5353) / Raw(bytes(range(256)) * 12)
        frags = fragment(pkt, fragsize=1024)
        assert all(f.flags.MF or f.frag for f in frags)
        # UDP fragments go to the VIP's lowest-id UDP service: dns
        chosen.add(check_fragments(gw, frags, src, VIP4, UDP_P, DNS, 4))
    assert len(chosen) >= 2, "several sources should not all land on one VM"


def test_ipv4_tcp_fragments_use_lowest_id_tcp_service(gw):
    src = "198.18.2.33"
    pkt = IP(src=src, dst=VIP4, id=7) / TCP(sport=1234, dport=8080, flags="PA") / Raw(b"F" * 2500)
    check_fragments(gw, fragment(pkt, fragsize=800), src, VIP4, TCP_P, WEB, 4)


def test_ipv4_fragments_in_reverse_order(gw):
    src = "198.18.1.99"
    pkt = IP(src=src, dst=VIP4, id=77) / UDP(sport=5, dport=5353) / Raw(b"R" * 4000)
    check_fragments(gw, list(reversed(fragment(pkt, fragsize=1400))), src, VIP4, UDP_P, DNS, 4)


def test_ipv6_udp_fragments_reach_one_vm(gw):
    gw.set_services([(VIP6, 5353, "udp", DNS6)])
    gw.dp.set_maglev_table(DNS6, gw.table([1, 2, 3]))
    chosen = set()
    for i, src in enumerate(SOURCES6):
        pkt = (IPv6(src=src, dst=VIP6) / IPv6ExtHdrFragment(id=0x1000 + i) / UDP(sport=41000 + i, dport=5353)
               / Raw(bytes(range(256)) * 12))
        frags = fragment6(pkt, 1280)
        chosen.add(check_fragments(gw, frags, src, VIP6, UDP_P, DNS6, 6))
    assert len(chosen) >= 2


def test_fragment_and_unfragmented_flows_are_distinct_keys(gw):
    src = "198.18.1.5"
    whole = IP(src=src, dst=VIP4) / UDP(sport=999, dport=5353) / Raw(b"a" * 10)
    r = gw.run(gw.ingress(whole))
    assert r.vm_id == gw.maglev_vm(DNS, src, 999, 5353, UDP_P)
    frags = fragment(IP(src=src, dst=VIP4, id=3) / UDP(sport=999, dport=5353) / Raw(b"b" * 3000), fragsize=1000)
    check_fragments(gw, frags, src, VIP4, UDP_P, DNS, 4)
    assert len(gw.dp.flows()) == 2


# ---- 8. ICMP errors --------------------------------------------------------------------
CLIENT4, CPORT = "198.18.1.50", 45678
CLIENT6 = "2001:db8:1::50"
ROUTER4, ROUTER6 = "198.18.2.1", "2001:db8:2::1"


def pin_flow_then_retable(gw, client, vip, service_id, proto):
    """Send the flow's first packet, then swap in a table where Maglev alone picks another VM."""
    l4 = TCP(sport=CPORT, dport=8080, flags="S") if proto == TCP_P else UDP(sport=CPORT, dport=5353)
    ip = IP(src=client, dst=vip) if ":" not in vip else IPv6(src=client, dst=vip)
    r = gw.run(gw.ingress(ip / l4))
    owner = r.vm_id
    assert owner in LOCAL_VMS
    other = next(v for v in LOCAL_VMS if v != owner)
    gw.dp.set_maglev_table(service_id, gw.table([other]))
    return owner, other


@pytest.mark.parametrize("quote_len", [None, 8])  # full quote, and RFC 792's minimum (IP header + 8 bytes)
def test_icmp_frag_needed_goes_to_flow_owner(gw, quote_len):
    owner, other = pin_flow_then_retable(gw, CLIENT4, VIP4, WEB, TCP_P)
    assert gw.maglev_vm(WEB, CLIENT4, CPORT, 8080, TCP_P) == other
    quote = bytes(IP(src=VIP4, dst=CLIENT4, id=9) / TCP(sport=8080, dport=CPORT, flags="SA") / Raw(b"r" * 30))
    if quote_len is not None:
        quote = quote[:20 + quote_len]
    l3 = IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(quote)
    nflows = len(gw.dp.flows())
    before = gw.snapshot()
    r = gw.run(gw.ingress(l3))
    forwarded_to(gw, r, l3, owner)
    d = gw.delta(before)
    assert d.stats["icmp_err_fwd"] == 1 and d.stats["flow_hits"] == 1
    assert len(gw.dp.flows()) == nflows
    assert d.services[WEB].tolist() == [0, 0, 0]   # errors are not service traffic


def test_icmp_port_unreachable_for_udp_flow(gw):
    owner, _ = pin_flow_then_retable(gw, CLIENT4, VIP4, DNS, UDP_P)
    quote = IP(src=VIP4, dst=CLIENT4) / UDP(sport=5353, dport=CPORT) / Raw(b"answer")
    l3 = IP(src=CLIENT4, dst=VIP4) / ICMP(type=3, code=3) / quote
    r = gw.run(gw.ingress(l3))
    forwarded_to(gw, r, l3, owner)


@pytest.mark.parametrize("icmp6", ["ptb", "unreach"])
def test_icmpv6_error_goes_to_flow_owner(gw, icmp6):
    owner, other = pin_flow_then_retable(gw, CLIENT6, VIP6, WEB6, TCP_P)
    err = ICMPv6PacketTooBig(mtu=1280) if icmp6 == "ptb" else ICMPv6DestUnreach(code=1)
    l3 = IPv6(src=ROUTER6, dst=VIP6) / err / IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=8080, dport=CPORT) / Raw(b"d")
    nflows = len(gw.dp.flows())
    before = gw.snapshot()
    r = gw.run(gw.ingress(l3))
    forwarded_to(gw, r, l3, owner)
    assert gw.delta(before).stats["icmp_err_fwd"] == 1
    assert len(gw.dp.flows()) == nflows


def test_icmp_error_for_unknown_vip_flow_uses_maglev_and_records_nothing(gw):
    quote = IP(src=VIP4, dst=CLIENT4) / TCP(sport=8080, dport=CPORT)
    l3 = IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1300) / quote
    r = gw.run(gw.ingress(l3))
    forwarded_to(gw, r, l3, gw.maglev_vm(WEB, CLIENT4, CPORT, 8080, TCP_P))
    assert gw.dp.flows() == []


NON_VIP_ERRORS = {
    "v4_other_host": lambda: IP(src=ROUTER4, dst="198.18.5.5") / ICMP(type=3, code=4)
    / IP(src="198.18.5.5", dst=CLIENT4) / TCP(sport=8080, dport=CPORT),
    "v4_vip_other_port": lambda: IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4)
    / IP(src=VIP4, dst=CLIENT4) / TCP(sport=9999, dport=CPORT),
    "v4_vip_quoting_icmp": lambda: IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=1)
    / IP(src=VIP4, dst=CLIENT4) / ICMP(type=0),
    "v6_other_host": lambda: IPv6(src=ROUTER6, dst="2001:db8:5::5") / ICMPv6PacketTooBig(mtu=1280)
    / IPv6(src="2001:db8:5::5", dst=CLIENT6) / TCP(sport=8080, dport=CPORT),
    "v6_vip_other_port": lambda: IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280)
    / IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=8443, dport=CPORT),
}


@pytest.mark.parametrize("kind", sorted(NON_VIP_ERRORS))
def test_icmp_error_about_non_vip_flow_passes(gw, kind):
    frame = gw.ingress(NON_VIP_ERRORS[kind]())
    before = gw.snapshot()
    r = gw.run(frame)
    assert r.verdict == "PASS"
    assert r.data == bytes(frame)
    d = gw.delta(before)
    assert d.stats["pass"] == 1 and d.stats["icmp_err_fwd"] == 0
    assert gw.dp.flows() == []

"""The flow-table entry count (Dataplane.flow_count): the kernel's element count
read by the bpf_map iterator (dataplane/elemcount.py) equals the flows the
program recorded, and the length of a full walk of the table, also when the
LRU table is full and evicting; it drops to 0 when the table is cleared."""
from __future__ import annotations

from scapy.all import IP, TCP, UDP, IPv6, Raw

from dataplane import elemcount, libbpf
from tests.xdp.harness import VIP4, VIP6


def new_flows(gw, n: int, first_sport: int = 20000) -> None:
    """n new flows to the VIPs (IPv4 and IPv6 alternately), one source port each;
    every third flow sends a second packet, which must not add an entry."""
    for i in range(n):
        sport = first_sport + i
        l3 = (IP(src="198.18.1.90", dst=VIP4) if i % 2 else IPv6(src="2001:db8:1::90", dst=VIP6))
        frame = gw.ingress(l3 / TCP(sport=sport, dport=8080, flags="S") / Raw(b"x"))
        for _ in range(2 if i % 3 == 0 else 1):
            assert gw.run(frame).verdict == "REDIRECT"


def test_iterator_loads_where_the_kernel_has_the_kfunc(gw):
    if libbpf.kernel_has_function(elemcount.KFUNC):
        assert elemcount.elem_counts(gw.dp.flow_map_ids()) is not None


def test_flow_count_is_exact(gw):
    assert gw.dp.flow_count() == 0
    new_flows(gw, 301)
    # traffic that records no flow: not a VIP, and a UDP port no service has
    assert gw.run(gw.ingress(IP(src="198.18.1.90", dst="198.19.0.99") / TCP(sport=1, dport=8080))).verdict == "PASS"
    assert gw.run(gw.ingress(IP(src="198.18.1.90", dst=VIP4) / UDP(sport=1, dport=9))).verdict == "PASS"
    assert gw.dp.flow_count() == gw.dp.flow_count(walk=False) == 301 == len(gw.dp.flows())
    gw.dp.clear_flows()
    assert gw.dp.flow_count() == 0 == len(gw.dp.flows())


def test_flow_count_of_a_full_lru_table(gw):
    """More new flows than the table holds: the count follows the evictions."""
    capacity = gw.sizes.flow_entries
    new_flows(gw, capacity + 500)
    walked = len(gw.dp.flows())
    assert 0 < walked <= capacity
    assert gw.dp.flow_count() == walked

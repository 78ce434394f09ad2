"""The flow-table entry count (Dataplane.flow_count): the kernel's element counts
of both families' tables read by the bpf_map iterator (dataplane/elemcount.py)
sum to the flows the program recorded, and to the length of a full walk of the
tables, also when one LRU table is full and evicting; it drops to 0 when the
tables are cleared."""
from __future__ import annotations

import ctypes as ct
import ipaddress

from scapy.all import IP, TCP, UDP, IPv6, Raw

from dataplane import elemcount, libbpf
from dataplane import structs as S
from tests.xdp.harness import VIP4, VIP6


def new_flows(gw, n: int, first_sport: int = 20000, families: tuple[int, ...] = (6, 4)) -> None:
    """n new flows to the VIPs (of `families` in turn), one source port each;
    every third flow sends a second packet, which must not add an entry."""
    for i in range(n):
        sport = first_sport + i
        l3 = IP(src="198.18.1.90", dst=VIP4) if families[i % len(families)] == 4 else \
            IPv6(src="2001:db8:1::90", dst=VIP6)
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


def test_each_family_has_its_table(gw):
    """An IPv4 flow is recorded in flow_table4 under its 16-byte key, an IPv6 flow
    in flow_table6 under struct flow_key; Dataplane.flow finds each."""
    new_flows(gw, 2)
    (k6, e6), (k4, e4) = sorted(gw.dp.flows(), key=lambda kv: S.flow_family(kv[0]), reverse=True)
    assert (S.addr_from16(k4.src), S.addr_from16(k4.dst), k4.sport) == (ipaddress.ip_address("198.18.1.90"),
                                                                      ipaddress.ip_address(VIP4), 20001)
    assert (S.addr_from16(k6.src), S.addr_from16(k6.dst), k6.sport) == (ipaddress.ip_address("2001:db8:1::90"),
                                                                      ipaddress.ip_address(VIP6), 20000)
    raw4, raw6 = (libbpf.lookup_batch(gw.dp._fd(name), ct.sizeof(key), ct.sizeof(S.FlowEntry), 8, name)
                  for name, key in (("flow_table4", S.FlowKey4), ("flow_table6", S.FlowKey)))
    assert raw4 == (bytes(S.flow_key4(k4)), bytes(e4), 1) and raw6 == (bytes(k6), bytes(e6), 1)
    assert bytes(gw.dp.flow(k4)) == bytes(e4) and bytes(gw.dp.flow(k6)) == bytes(e6)


def test_flow_count_of_a_full_lru_table(gw):
    """More new IPv4 flows than their table holds, and a few IPv6 flows: the count
    follows the evictions of the one table and keeps the other's flows."""
    capacity = gw.sizes.flow_entries
    new_flows(gw, capacity + 500, families=(4,))
    new_flows(gw, 50, families=(6,))
    walked = [S.flow_family(key) == 4 for key, _ in gw.dp.flows()]
    assert 0 < sum(walked) <= capacity and len(walked) - sum(walked) == 50
    assert gw.dp.flow_count() == len(walked)

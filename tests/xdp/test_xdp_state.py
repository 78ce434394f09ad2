"""Stateful behaviour: region counters, flow stickiness across table changes and VM
states, region offload, VM moves, and exact service / VM / flow counters."""
import ipaddress
import socket

import numpy as np
from scapy.all import ARP, IP, TCP, UDP, Dot1Q, IPv6, Raw

from dataplane import structs as S
from dataplane.maps import Tunnel
from tests.xdp.harness import (DNS, LOCAL_VMS, NEXT_HOP_MAC, TUNNEL4_VM, TUNNEL6_VM, TUNNEL_VMS, UPLINK_MAC, VIP4, VIP6,
                            WEB, WEB6)

TCP_P, UDP_P = socket.IPPROTO_TCP, socket.IPPROTO_UDP


def tcp4(src, sport, payload=b"", dst=VIP4, dport=8080, flags="A"):
    return IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / Raw(payload)


def tcp6(src, sport, payload=b"", dst=VIP6, dport=8080):
    return IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport) / Raw(payload)


def sport_for(gw, service_id, src, dport, proto, want_vm, start=10000):
    """A source port whose flow Maglev maps to `want_vm` (searched with the control-plane mirror)."""
    for sport in range(start, start + 5000):
        if gw.maglev_vm(service_id, src, sport, dport, proto) == want_vm:
            return sport
    raise AssertionError(f"no port maps {src} to VM {want_vm}")


# ---- 11. region counters -----------------------------------------------------------
def test_region_counters_exact(gw):
    frames = {1: [], 2: [], 0: []}
    frames[1] += [gw.ingress(tcp4("198.18.1.10", 1000 + i, b"a" * (7 * i))) for i in range(5)]
    frames[1] += [gw.ingress(tcp6("2001:db8:1::10", 2000 + i, b"b" * (11 * i))) for i in range(3)]
    frames[1] += [gw.ingress(IP(src="198.18.1.11", dst="198.19.9.9") / UDP(sport=1, dport=2) / Raw(b"nv"))]  # not a VIP
    frames[1] += [gw.ingress(Dot1Q(vlan=4) / tcp4("198.18.1.12", 3000, b"vlan"))]  # length includes the tag
    frames[1] += [gw.ingress(IP(src="198.18.1.13", dst=VIP4) / TCP(sport=1, dport=8080, dataofs=3))]  # L4 drop
    frames[2] += [gw.ingress(tcp4("198.18.2.77", 4000 + i, b"c" * (100 + i))) for i in range(4)]
    frames[2] += [gw.ingress(tcp6("2001:db8:2:abcd::1", 5000 + i)) for i in range(2)]
    frames[0] += [gw.ingress(tcp4("198.18.3.1", 6000 + i, b"d" * i)) for i in range(3)]
    frames[0] += [gw.ingress(tcp6("2001:db8:3::1", 6100))]
    frames[0] += [gw.ingress(tcp4("198.19.200.1", 6200))]
    not_counted = [
        gw.ingress(ARP(psrc="198.18.1.10", pdst=VIP4)),                       # not IP
        gw.ingress(IP(src="198.18.1.10", dst=VIP4, len=200) / TCP(dport=8080)),  # invalid IP header
        gw.ingress(IP(src="198.18.2.10", dst=VIP4, ihl=4) / TCP(dport=8080)),
        gw.ingress(IPv6(src="2001:db8:1::10", dst=VIP6, plen=500) / TCP(dport=8080)),
    ]
    before = gw.snapshot()
    order = [f for region in (1, 2, 0) for f in frames[region]] + not_counted
    for f in order[::2] + order[1::2]:  # interleave regions
        gw.run(f)
    d = gw.delta(before)
    expected = np.zeros_like(d.regions)
    for region, fs in frames.items():
        expected[region] = [len(fs), sum(len(bytes(f)) for f in fs)]
    assert d.regions.tolist() == expected.tolist()


def test_region_prefixes_longest_match_and_update(gw):
    """A more specific prefix wins; replacing the prefix set takes effect at once."""
    nets = {"198.18.1.0/24": 1, "198.18.1.128/25": 2, "2001:db8:1::/48": 1, "2001:db8:1:8000::/49": 2,
            "198.18.2.0/24": 2}
    gw.dp.set_region_prefixes({ipaddress.ip_network(n): r for n, r in nets.items()})
    cases = [("198.18.1.127", 1), ("198.18.1.128", 2), ("2001:db8:1:7fff::1", 1), ("2001:db8:1:8000::1", 2),
             ("198.18.2.1", 2), ("198.18.3.1", 0)]
    for src, region in cases:
        f = gw.ingress(tcp4(src, 1) if "." in src else tcp6(src, 1))
        before = gw.snapshot()
        gw.run(f)
        d = gw.delta(before)
        assert d.regions[region].tolist() == [1, len(f)], src
        assert d.regions.sum(axis=0).tolist() == [1, len(f)], src
    gw.dp.set_region_prefixes({ipaddress.ip_network("198.18.0.0/15"): 7})
    before = gw.snapshot()
    f = gw.ingress(tcp4("198.18.1.128", 1))
    gw.run(f)
    assert gw.delta(before).regions[7].tolist() == [1, len(f)]


# ---- 12. stickiness ----------------------------------------------------------------
def test_flow_sticks_across_table_change_until_vm_down(gw):
    client = "198.18.1.31"
    a = gw.maglev_vm(WEB, client, 31000, 8080, TCP_P)
    b = next(v for v in LOCAL_VMS if v != a)
    old = tcp4(client, 31000, b"first", flags="S")
    r = gw.run(gw.ingress(old))
    assert r.verdict == "REDIRECT" and r.vm_id == a
    gw.dp.set_maglev_table(WEB, gw.table([b]))
    assert set(np.unique(gw.dp.maglev_table(WEB))) == {b}

    before = gw.snapshot()
    r = gw.run(gw.ingress(old))
    assert r.vm_id == a and r.data == gw.expected_local(a, old)
    assert gw.delta(before).stats["flow_hits"] == 1

    new = tcp4(client, 31001, b"new", flags="S")
    r = gw.run(gw.ingress(new))
    assert r.vm_id == b and r.data == gw.expected_local(b, new)

    gw.dp.set_vm_state(a, "draining")   # draining keeps its flows
    r = gw.run(gw.ingress(old))
    assert r.vm_id == a

    gw.dp.set_vm_state(a, "down")
    before = gw.snapshot()
    r = gw.run(gw.ingress(old))
    assert r.verdict == "REDIRECT" and r.vm_id == b and r.data == gw.expected_local(b, old)
    d = gw.delta(before)
    assert d.stats["flow_reselect"] == 1 and d.stats["flow_hits"] == 0
    assert gw.dp.flow(gw.flow_key(client, VIP4, 31000, 8080, TCP_P)).vm_id == b
    # the re-selected flow now hits normally
    before = gw.snapshot()
    assert gw.run(gw.ingress(old)).vm_id == b
    d = gw.delta(before)
    assert d.stats["flow_hits"] == 1 and d.stats["flow_reselect"] == 0


def test_flow_of_cleared_vm_is_reselected(gw):
    client = "2001:db8:2::31"
    a = gw.maglev_vm(WEB6, client, 555, 8080, TCP_P)
    b = next(v for v in LOCAL_VMS if v != a)
    pkt = tcp6(client, 555, b"x")
    assert gw.run(gw.ingress(pkt)).vm_id == a
    gw.dp.set_maglev_table(WEB6, gw.table([b]))
    gw.dp.clear_vm(a)
    before = gw.snapshot()
    r = gw.run(gw.ingress(pkt))
    assert r.vm_id == b and r.data == gw.expected_local(b, pkt)
    assert gw.delta(before).stats["flow_reselect"] == 1


# ---- 13. region offload ------------------------------------------------------------
OFFLOAD4 = ("198.18.200.2", "198.18.0.2")
OFFLOAD6 = ("2001:db8:200::2", "2001:db8::2")


def tunnel_to(endpoint, source):
    return Tunnel(ipaddress.ip_address(endpoint), ipaddress.ip_address(source), NEXT_HOP_MAC, UPLINK_MAC)


def test_region_offload(gw):
    old = tcp4("198.18.1.40", 4000, b"old", flags="S")
    owner = gw.run(gw.ingress(old)).vm_id
    assert owner in LOCAL_VMS

    gw.dp.set_offload(1, WEB, tunnel_to(*OFFLOAD4))
    assert set(gw.dp.offloads()) == {(1, WEB)}

    # a new r1 flow is tunnelled to the target data center
    new_r1 = tcp4("198.18.1.41", 4001, b"new", flags="S")
    before = gw.snapshot()
    r = gw.run(gw.ingress(new_r1))
    assert r.verdict == "TX"
    assert r.data == gw.expected_tunnel(*OFFLOAD4, new_r1)
    d = gw.delta(before)
    assert d.stats["offload_fwd"] == 1 and d.stats["local_fwd"] == 0 and d.stats["tunnel_fwd"] == 0
    assert not d.vms.any()

    # the existing r1 flow stays on its VM
    r = gw.run(gw.ingress(old))
    assert r.verdict == "REDIRECT" and r.vm_id == owner and r.data == gw.expected_local(owner, old)

    # r2, and other services of r1, are unaffected
    new_r2 = tcp4("198.18.2.41", 4002, b"r2", flags="S")
    r = gw.run(gw.ingress(new_r2))
    assert r.verdict == "REDIRECT" and r.vm_id == gw.maglev_vm(WEB, "198.18.2.41", 4002, 8080, TCP_P)
    dns_r1 = IP(src="198.18.1.42", dst=VIP4) / UDP(sport=4003, dport=5353) / Raw(b"q")
    r = gw.run(gw.ingress(dns_r1))
    assert r.verdict == "REDIRECT" and r.vm_id == gw.maglev_vm(DNS, "198.18.1.42", 4003, 5353, UDP_P)

    # IPv6 offload target for the IPv6 service: IPv6 in IPv6
    gw.dp.set_offload(1, WEB6, tunnel_to(*OFFLOAD6))
    v6 = tcp6("2001:db8:1::41", 4004, b"six")
    r = gw.run(gw.ingress(v6))
    assert r.verdict == "TX" and r.data == gw.expected_tunnel(*OFFLOAD6, v6)

    # cleared: new r1 flows are balanced locally again
    assert gw.dp.clear_offload(1, WEB) is True
    assert gw.dp.clear_offload(1, WEB) is False
    new2 = tcp4("198.18.1.43", 4005, b"again", flags="S")
    r = gw.run(gw.ingress(new2))
    vm = gw.maglev_vm(WEB, "198.18.1.43", 4005, 8080, TCP_P)
    assert r.verdict == "REDIRECT" and r.vm_id == vm and r.data == gw.expected_local(vm, new2)

    # ...while the flow offloaded before finishes at the target
    r = gw.run(gw.ingress(new_r1))
    assert r.verdict == "TX" and r.data == gw.expected_tunnel(*OFFLOAD4, new_r1)


def test_offloaded_flows_finish_remotely_unless_the_target_is_forgotten(gw):
    flow = tcp4("198.18.1.50", 4100, b"away", flags="S")
    endpoint = gw.dp.set_offload(1, WEB, tunnel_to(*OFFLOAD4))
    assert gw.dp.set_offload(2, WEB, tunnel_to(*OFFLOAD4)) == endpoint     # one endpoint, two regions
    assert gw.run(gw.ingress(flow)).verdict == "TX"
    entry = gw.dp.flow(gw.flow_key("198.18.1.50", VIP4, 4100, 8080, TCP_P))
    assert entry.vm_id == S.FLOW_OFFLOADED | endpoint

    # another region still uses the endpoint: forgetting r1's offload keeps it
    assert gw.dp.clear_offload(1, WEB, forget=True)
    assert gw.run(gw.ingress(flow)).verdict == "TX"
    # the last user forgets it: the offloaded flow comes home, re-selected by Maglev
    before = gw.snapshot()
    assert gw.dp.clear_offload(2, WEB, forget=True)
    assert gw.dp.offload_endpoints() == {}
    r = gw.run(gw.ingress(flow))
    vm = gw.maglev_vm(WEB, "198.18.1.50", 4100, 8080, TCP_P)
    assert r.verdict == "REDIRECT" and r.vm_id == vm
    assert gw.delta(before).stats["flow_reselect"] == 1


# ---- 14. VM move ---------------------------------------------------------------------
def test_vm_move_repoints_existing_flows(gw):
    client = "198.18.2.60"
    sport = sport_for(gw, WEB, client, 8080, TCP_P, want_vm=1)
    pkt = tcp4(client, sport, b"move")
    r = gw.run(gw.ingress(pkt))
    assert r.verdict == "REDIRECT" and r.vm_id == 1 and r.port_slot == 1
    assert r.data == gw.expected_local(1, pkt)

    new_mac, new_port_mac = "02:00:00:00:00:aa", "02:00:00:00:01:03"
    gw.dp.set_vm(1, gw.LocalPort(3, new_mac, new_port_mac))
    r = gw.run(gw.ingress(pkt))
    assert r.verdict == "REDIRECT" and r.vm_id == 1 and r.port_slot == 3
    assert r.data == gw.expected_local(1, pkt, vm_mac=new_mac, port_mac=new_port_mac)

    for tvm in (TUNNEL4_VM, TUNNEL6_VM):   # moved to another host behind a tunnel
        gw.dp.set_vm(1, gw.tunnel(tvm))
        before = gw.snapshot()
        r = gw.run(gw.ingress(pkt))
        assert r.verdict == "TX" and r.vm_id == 1
        assert r.data == gw.expected_tunnel(*TUNNEL_VMS[tvm], pkt)
        d = gw.delta(before)
        assert d.stats["tunnel_fwd"] == 1 and d.stats["flow_hits"] == 1
        assert d.vms[1].tolist() == [1, len(gw.ingress(pkt))]

    gw.dp.set_vm(1, gw.local_port(1))        # and back
    r = gw.run(gw.ingress(pkt))
    assert r.port_slot == 1 and r.data == gw.expected_local(1, pkt)
    assert gw.dp.flow(gw.flow_key(client, VIP4, sport, 8080, TCP_P)).vm_id == 1


# ---- 15. service / VM / flow counters -----------------------------------------------
def test_service_vm_and_flow_counters_exact(gw):
    flows = [
        (WEB, [tcp4("198.18.1.70", 7000, b"a" * n) for n in (0, 10, 100)]),
        (WEB, [tcp4("198.18.2.70", 7001, b"b" * n) for n in (5, 6)]),
        (DNS, [IP(src="198.18.1.71", dst=VIP4) / UDP(sport=7002, dport=5353) / Raw(b"c" * n) for n in (1, 2, 3, 4)]),
        (WEB6, [tcp6("2001:db8:1::70", 7003, b"d" * n) for n in (9,)]),
        (WEB6, [tcp6("2001:db8:3::70", 7004, b"e" * n) for n in (1, 300)]),
    ]
    noise = [gw.ingress(tcp4("198.18.1.70", 7000, dst="198.19.0.99")),        # not a VIP
             gw.ingress(IP(src="198.18.1.70", dst=VIP4) / TCP(dport=8080, dataofs=2))]  # dropped before lookup
    exp_services = np.zeros((gw.sizes.max_services, 3), dtype=np.int64)
    exp_vms = np.zeros((gw.sizes.max_vms + 1, 2), dtype=np.int64)
    before = gw.snapshot()
    for sid, pkts in flows:
        for pkt in pkts:
            frame = gw.ingress(pkt)
            r = gw.run(frame)
            assert r.verdict == "REDIRECT"
            exp_services[sid] += [1, len(frame), 0]
            exp_vms[r.vm_id] += [1, len(frame)]
        ip = pkts[0]
        vm = gw.maglev_vm(sid, ip.src, ip.sport, ip.dport, ip.proto if ip.version == 4 else ip.nh)
        assert r.vm_id == vm
        exp_services[sid][2] += 1
    for f in noise:
        gw.run(f)
    d = gw.delta(before)
    npkts = sum(len(p) for _, p in flows)
    assert d.services.tolist() == exp_services.tolist()
    assert d.vms.tolist() == exp_vms.tolist()
    assert d.stats["flow_misses"] == len(flows)
    assert d.stats["flow_hits"] == npkts - len(flows)
    assert d.stats["local_fwd"] == npkts
    assert d.stats["pass"] == 1
    assert d.nonzero_drops() == {"tcp_bad_doff": 1}
    assert len(gw.dp.flows()) == len(flows)
    for sid, pkts in flows:
        ip = pkts[0]
        proto = ip.proto if ip.version == 4 else ip.nh
        fe = gw.dp.flow(gw.flow_key(ip.src, ip.dst, ip.sport, ip.dport, proto))
        assert fe is not None and fe.service_id == sid


def test_service_without_usable_vm_drops(gw):
    gw.dp.set_maglev_table(WEB, gw.table([]))          # every slot NO_VM
    before = gw.snapshot()
    assert gw.run(gw.ingress(tcp4("198.18.1.80", 8000))).verdict == "DROP"
    d = gw.delta(before)
    assert d.nonzero_drops() == {"no_vm": 1}
    assert gw.dp.flows() == []
    gw.dp.set_maglev_table(WEB, gw.table([1]))
    gw.dp.clear_vm(1)                                  # table points at a VM with no location
    before = gw.snapshot()
    assert gw.run(gw.ingress(tcp4("198.18.1.80", 8000))).verdict == "DROP"
    assert gw.delta(before).nonzero_drops() == {"vm_location": 1}
    assert gw.dp.flows() == []


def test_recorded_flow_follows_service_and_region_changes_keeping_its_vm(gw):
    """A flow entry carries its service and region so a hit skips both lookups;
    after the services or region prefixes change, the flow's next packet is
    counted under the new service and region, keeps its VM, and its entry is
    current again."""
    client = "198.18.1.77"
    first = tcp4(client, 32000, b"first", flags="S")
    vm = gw.run(gw.ingress(first)).vm_id
    entry = gw.dp.flow(gw.flow_key(client, VIP4, 32000, 8080, TCP_P))
    assert (entry.vm_id, entry.service_id) == (vm, WEB)

    gw.dp.set_maglev_table(9, gw.table(list(LOCAL_VMS)))
    gw.dp.set_services([(ipaddress.ip_address(VIP4), 8080, "tcp", 9)])
    gw.dp.set_region_prefixes({ipaddress.ip_network("198.18.1.0/24"): 5})
    f = gw.ingress(tcp4(client, 32000, b"again"))
    before = gw.snapshot()
    assert gw.run(f).vm_id == vm
    d = gw.delta(before)
    assert d.stats["flow_hits"] == 1 and d.stats["flow_misses"] == 0
    assert d.services[9].tolist() == [1, len(f), 0] and d.services[WEB].tolist() == [0, 0, 0]
    assert d.regions[5].tolist() == [1, len(f)] and d.regions.sum(axis=0).tolist() == [1, len(f)]
    entry = gw.dp.flow(gw.flow_key(client, VIP4, 32000, 8080, TCP_P))
    assert (entry.vm_id, entry.service_id, entry.region) == (vm, 9, 5)

    gw.dp.set_services([])               # the VIP is gone: its recorded flow is passed, not forwarded
    before = gw.snapshot()
    assert gw.run(f).verdict == "PASS"
    assert gw.delta(before).regions[5].tolist() == [1, len(f)]

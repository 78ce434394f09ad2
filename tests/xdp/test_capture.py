"""Packet capture at the XDP hook: armed through the dataplane API, frames run
through BPF_PROG_TEST_RUN, records read back from the program's ring buffer.
Each record must hold exactly the bytes as received and, for forwarded and
tunnelled packets, exactly the bytes the run returned as sent; filters select
exactly the matching packets; unarmed, nothing is recorded."""
import pytest
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, IPv6, Raw

from dataplane import structs as S
from dataplane.capture import CaptureFilter, CaptureReader, arm, disarm, is_armed
from tests.xdp.harness import DNS, GW_MAC, ROUTER_MAC, TUNNEL4_VM, TUNNEL_VMS, VIP4, VIP6, WEB, WEB6

TUNNEL_VIP = "198.19.0.20"
TUNNEL_SID = 3
INGRESS_IFINDEX = 1


@pytest.fixture
def cap(gw):
    """The standard setup plus a tunnel-only service (vm9), and a reader of the ring;
    the capture is disarmed and the ring emptied before and after."""
    gw.set_services([(TUNNEL_VIP, 8080, "tcp", TUNNEL_SID)])
    gw.dp.set_maglev_table(TUNNEL_SID, gw.table([TUNNEL4_VM]))
    disarm(gw.dp)
    reader = CaptureReader(gw.dp._fd("capture_ring"))
    reader.poll(0)
    yield reader
    disarm(gw.dp)
    reader.poll(0)
    reader.close()


def run(gw, frame):
    return gw.tr.run(bytes(frame), ingress_ifindex=INGRESS_IFINDEX)


def web4(src="198.18.1.10", sport=40000, payload=b"hello"):
    return Ether(dst=GW_MAC, src=ROUTER_MAC) / IP(src=src, dst=VIP4) / TCP(sport=sport, dport=8080) / Raw(payload)


def bad_ihl(src="198.18.1.11"):
    return bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / IP(src=src, dst=VIP4, ihl=4) / TCP(dport=8080))


def test_unarmed_records_nothing(gw, cap):
    assert not is_armed(gw.dp)
    for frame in (web4(), bad_ihl(), Ether(dst=GW_MAC) / IP(src="198.18.1.3", dst="198.19.0.99") / UDP()):
        run(gw, frame)
    assert cap.poll(0) == []


def test_forwarded_packet_exact_bytes_as_received_and_as_sent(gw, cap):
    """A VLAN-tagged frame to a local VM: received with its tag, sent untagged with new MACs."""
    arm(gw.dp, CaptureFilter())
    l3 = IP(src="198.18.1.20", dst=VIP4, ttl=9) / TCP(sport=41000, dport=8080, flags="PA") / Raw(b"payload" * 9)
    frame = bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / Dot1Q(vlan=42) / l3)
    r = run(gw, frame)
    assert r.verdict == "REDIRECT"
    [p] = cap.poll(0)
    assert p.verdict == "forward" and p.reason is None
    assert (p.region, p.service, p.vm, p.ifindex) == (1, WEB, r.vm_id, INGRESS_IFINDEX)
    assert (p.received.direction, p.received.length, p.received.data) == ("rx", len(frame), frame)
    assert (p.sent.direction, p.sent.length, p.sent.data) == ("tx", len(r.data), r.data)
    assert p.sent.data == gw.expected_local(r.vm_id, l3)
    assert p.ts_ns > 0


def test_tunnelled_packet_exact_bytes_with_padding(gw, cap):
    """IP-in-IP to vm9: the record has the frame as received, Ethernet padding
    included, and the encapsulated frame as sent (without the padding)."""
    arm(gw.dp, CaptureFilter())
    l3 = IP(src="198.18.2.21", dst=TUNNEL_VIP) / TCP(sport=41001, dport=8080, flags="S")
    frame = bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / l3) + b"\x00" * 6
    r = run(gw, frame)
    assert r.verdict == "TX"
    [p] = cap.poll(0)
    assert (p.verdict, p.region, p.service, p.vm) == ("tunnel", 2, TUNNEL_SID, TUNNEL4_VM)
    assert p.received.data == frame and p.received.length == len(frame)
    assert p.sent.data == r.data == gw.expected_tunnel(*TUNNEL_VMS[TUNNEL4_VM], l3)
    assert p.sent.length == len(r.data)


def test_offloaded_packet_has_no_vm(gw, cap):
    import ipaddress

    gw.dp.set_offload(1, WEB, gw.Tunnel(ipaddress.ip_address("198.18.201.2"), ipaddress.ip_address("198.18.0.2"),
                                        "02:00:00:00:02:01", "02:00:00:00:02:02"))
    arm(gw.dp, CaptureFilter(verdict="tunnel"))
    frame = bytes(web4(src="198.18.1.40"))
    r = run(gw, frame)
    [p] = cap.poll(0)
    assert (p.verdict, p.service, p.vm) == ("tunnel", WEB, None)
    assert (p.received.data, p.sent.data) == (frame, r.data)


def _mixed(gw):
    """One frame of each kind, with what the program does with it: name -> (frame, verdict)."""
    frames = {
        "web_r1": bytes(web4(src="198.18.1.50", sport=40050)),
        "web_r2": bytes(web4(src="198.18.2.51", sport=40051)),
        "dns_r1": bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / IP(src="198.18.1.52", dst=VIP4)
                        / UDP(sport=40052, dport=5353) / Raw(b"q")),
        "web6_r2": bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / IPv6(src="2001:db8:2::53", dst=VIP6)
                         / TCP(sport=40053, dport=8080)),
        "tunnel_r1": bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / IP(src="198.18.1.54", dst=TUNNEL_VIP)
                           / TCP(sport=40054, dport=8080)),
        "pass_r1": bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / IP(src="198.18.1.55", dst="198.19.0.99")
                         / TCP(sport=40055, dport=80)),
        "bad_ihl": bad_ihl(),
        "udp_bad_len": bytes(Ether(dst=GW_MAC, src=ROUTER_MAC) / IP(src="198.18.2.56", dst=VIP4)
                             / UDP(sport=40056, dport=5353, len=100) / Raw(b"x")),
    }
    out = {}
    for name, frame in frames.items():
        r = run(gw, frame)
        out[name] = (frame, r)
    return out


@pytest.mark.parametrize("flt,expected", [
    (dict(region=2), {"web_r2", "web6_r2", "udp_bad_len"}),
    (dict(service=DNS), {"dns_r1"}),
    (dict(service=WEB6), {"web6_r2"}),
    (dict(vm=TUNNEL4_VM), {"tunnel_r1"}),
    (dict(verdict="pass"), {"pass_r1"}),
    (dict(verdict="tunnel"), {"tunnel_r1"}),
    (dict(verdict="drop"), {"bad_ihl", "udp_bad_len"}),
    (dict(reason="ip4_bad_ihl"), {"bad_ihl"}),
    (dict(region=1, verdict="forward"), {"web_r1", "dns_r1"}),
    (dict(region=0), {"bad_ihl"}),                  # dropped before its source was looked up
    (dict(), {"web_r1", "web_r2", "dns_r1", "web6_r2", "tunnel_r1", "pass_r1", "bad_ihl", "udp_bad_len"}),
])
def test_filters_select_exactly_the_matching_packets(gw, cap, flt, expected):
    arm(gw.dp, CaptureFilter(**flt))
    sent = _mixed(gw)
    got = {p.received.data: p for p in cap.poll(0)}
    names = {name for name, (frame, _) in sent.items() if frame in got}
    assert names == expected and len(got) == len(expected)
    for name in names:
        frame, r = sent[name]
        p = got[frame]
        rewritten = r.verdict in ("REDIRECT", "TX")
        assert (p.sent.data if p.sent else None) == (r.data if rewritten else None), name


def test_vm_filter_follows_the_chosen_vm(gw, cap):
    frames = [bytes(web4(src=f"198.18.1.{60 + i}", sport=41100 + i)) for i in range(12)]
    chosen = {}
    arm(gw.dp, CaptureFilter(vm=2))
    for f in frames:
        chosen[f] = run(gw, f).vm_id
    got = [p.received.data for p in cap.poll(0)]
    assert got == [f for f in frames if chosen[f] == 2] and got


def test_snaplen_truncates_both_directions(gw, cap):
    arm(gw.dp, CaptureFilter(snaplen=40))
    frame = bytes(web4(src="198.18.1.70", payload=b"x" * 300))
    r = run(gw, frame)
    [p] = cap.poll(0)
    assert (p.received.length, p.received.data) == (len(frame), frame[:40])
    assert (p.sent.length, p.sent.data) == (len(r.data), r.data[:40])


def test_malformed_drop_is_captured_with_its_reason(gw, cap):
    arm(gw.dp, CaptureFilter(verdict="drop"))
    before = gw.snapshot()
    frame = bad_ihl("198.18.1.80")
    assert run(gw, frame).verdict == "DROP"
    [p] = cap.poll(0)
    assert (p.verdict, p.reason, p.region, p.service, p.vm) == ("drop", "ip4_bad_ihl", 0, None, None)
    assert p.received.data == frame and p.sent is None
    assert gw.delta(before).nonzero_drops() == {"ip4_bad_ihl": 1}


def test_no_vm_drop_after_choice_has_its_reason(gw, cap):
    gw.dp.remove_maglev_table(WEB)
    arm(gw.dp, CaptureFilter(reason="no_vm"))
    frame = bytes(web4(src="198.18.1.81"))
    assert run(gw, frame).verdict == "DROP"
    [p] = cap.poll(0)
    assert (p.verdict, p.reason, p.service, p.received.data) == ("drop", "no_vm", WEB, frame)


def test_disarm_stops_recording(gw, cap):
    arm(gw.dp, CaptureFilter())
    run(gw, web4(src="198.18.1.90"))
    disarm(gw.dp)
    run(gw, web4(src="198.18.1.91"))
    assert [p.received.data for p in cap.poll(0)] == [bytes(web4(src="198.18.1.90"))]


@pytest.mark.parametrize("bad,field", [
    (dict(snaplen=0), "snaplen"), (dict(snaplen=S.CAPTURE_SNAPLEN_MAX + 1), "snaplen"),
    (dict(verdict="bounce"), "verdict"), (dict(reason="nope"), "reason"), (dict(region=-1), "region"),
])
def test_bad_filter_names_the_field(gw, cap, bad, field):
    with pytest.raises(ValueError, match=field):
        arm(gw.dp, CaptureFilter(**bad))
    assert not is_armed(gw.dp)

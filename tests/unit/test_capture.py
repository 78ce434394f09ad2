"""Packet capture without a kernel: record decoding, the pcap file (read back by
scapy), flag checks against a config, and the one-line summaries."""
import ctypes as ct
import io
import time

import pytest
from scapy.all import IP, UDP, Ether, rdpcap

from control.capture import BadFlag, CaptureRequest, PcapWriter, summary_line
from dataplane import structs as S
from dataplane.capture import XDP_DROP, XDP_REDIRECT, decode
from testbed.config import testbed_config as make_config


def record(verdict: int, rx: bytes, tx: bytes = b"", rx_len: int | None = None, tx_len: int = 0, **meta) -> bytes:
    m = S.CaptureMeta(ts_ns=time.monotonic_ns(), verdict=verdict, rx_len=rx_len or len(rx), rx_caplen=len(rx),
                      tx_len=tx_len or len(tx), tx_caplen=len(tx), **meta)
    return bytes(m) + rx + tx


RX = bytes(Ether(src="02:00:00:00:02:01", dst="02:00:00:00:02:02") / IP(src="198.18.1.2", dst="198.19.0.10")
           / UDP(sport=4000, dport=5353) / b"hello")
TX = bytes(Ether(src="02:00:00:00:01:01", dst="02:00:00:00:00:01")) + RX[14:]


def test_decode_a_forwarded_record():
    p = decode(record(XDP_REDIRECT, RX, TX, ifindex=3, region=1, service=2, vm=7))
    assert (p.verdict, p.reason, p.region, p.service, p.vm, p.ifindex) == ("forward", None, 1, 2, 7, 3)
    assert [(f.direction, f.length, f.data) for f in p.frames] == [("rx", len(RX), RX), ("tx", len(TX), TX)]


def test_decode_a_drop_names_its_reason_and_no_service():
    p = decode(record(XDP_DROP, RX[:20], rx_len=len(RX), reason=S.DROP_IP4_BAD_IHL, service=S.CAPTURE_ANY,
                      vm=S.CAPTURE_ANY))
    assert (p.verdict, p.reason, p.service, p.vm, p.sent) == ("drop", "ip4_bad_ihl", None, None, None)
    assert (p.received.length, p.received.data) == (len(RX), RX[:20])


def test_decode_refuses_a_short_record():
    with pytest.raises(ValueError, match="shorter"):
        decode(record(XDP_REDIRECT, RX, TX)[:-1])


def test_pcap_reads_back_with_scapy(tmp_path):
    out = io.BytesIO()
    w = PcapWriter(out, snaplen=64)
    before = time.time()
    w.write(decode(record(XDP_REDIRECT, RX, TX)))
    w.write(decode(record(XDP_DROP, RX[:30], rx_len=len(RX), reason=S.DROP_UDP_BAD_LEN)))
    path = tmp_path / "x.pcap"
    path.write_bytes(out.getvalue())
    frames = rdpcap(str(path))
    assert [bytes(f) for f in frames] == [RX, TX, RX[:30]]
    assert frames[2].wirelen == len(RX)
    assert all(before - 1 <= float(f.time) <= time.time() + 1 for f in frames)
    assert out.getvalue()[:4] == (0xA1B2C3D4).to_bytes(4, "little")
    assert int.from_bytes(out.getvalue()[16:20], "little") == 64 and ct.sizeof(S.CaptureMeta) == 40


@pytest.fixture(scope="module")
def config():
    return make_config("xgu")


@pytest.mark.parametrize("kw,flag", [
    (dict(region="r7"), "--region"), (dict(service="nope"), "--service"), (dict(vm="vm99"), "--vm"),
    (dict(verdict="bounce"), "--verdict"), (dict(reason="bad_luck"), "--reason"), (dict(snaplen=0), "--snaplen"),
    (dict(snaplen=S.CAPTURE_SNAPLEN_MAX + 1), "--snaplen"), (dict(verdict="pass", reason="no_vm"), "--reason"),
])
def test_bad_flags_name_the_flag(config, kw, flag):
    with pytest.raises(BadFlag, match=flag):
        CaptureRequest(**kw).check(config)


def test_good_flags_pass_and_become_api_arguments(config):
    r = CaptureRequest(snaplen=96, region="unknown", service="echo", vm="vm1", reason="no_vm").check(config)
    assert r.args() == {"snaplen": 96, "region": "unknown", "service": "echo", "vm": "vm1", "reason": "no_vm"}


def test_summary_line_names_what_the_pcap_cannot_say():
    p = decode(record(XDP_REDIRECT, RX, TX, ifindex=3, region=1, service=2, vm=7))
    names = {"regions": {"1": "r1"}, "services": {"2": "echo"}, "vms": {"7": "vm1"}}
    assert summary_line(p, names) == (f"verdict=forward reason=- region=r1 service=echo vm=vm1 ifindex=3 "
                                      f"rx_len={len(RX)} tx_len={len(TX)}")

"""Benchmark frames: one scapy template per packet class, then many flows made
by patching the source address and port into copies of the template (scapy
would take ~100 us a frame; patching takes ~2 us).

Flow i of a class with base address B: source address B + i // PORT_SPAN,
source port PORT_BASE + i % PORT_SPAN. The IPv4 header checksum is kept right;
L4 checksums are not recomputed (no XDP program here checks them).

Addresses (benchmarking ranges only): clients 198.18.64.0/18 (region r1) and
198.18.2.0/24 (region r2, offloaded), 2001:db8:1::/48; VIPs 198.19.0.10 and
2001:db8:f::10. Tunnel packets to the gateway (decap_*): from 198.18.0.7 to
198.18.0.2, the client's packet inside; flows are patched into the inner one."""
from __future__ import annotations

import ipaddress
import struct

import numpy as np

from dataplane.maps import FLOW_ENTRY_DTYPE, FLOW_KEY4_DTYPE

PORT_BASE = 10000
PORT_SPAN = 50000

GW_MAC = "02:00:00:0a:00:01"
CLIENT_MAC = "02:00:00:0a:00:02"

VIP4 = "198.19.0.10"
VIP6 = "2001:db8:f::10"
NON_VIP4 = "198.19.0.99"
WEB_PORT = 8080
REMOTE_PORT = 8081
GUE_REMOTE_PORT = 8082            # served by a tunnel VM reached by GUE over IPv4
GUE6_REMOTE_PORT = 8083           # ... by GUE over IPv6
DECAP_PEER, DECAP_ADDRESS = "198.18.0.7", "198.18.0.2"   # a trusted source gateway, this gateway's tunnel address
GUE_PORT = 6080
ECHO_PORT = 5353
ECHO_REMOTE_PORT = 5354

# Source ranges (inside region r1 = 198.18.64.0/18 unless noted); one per use,
# so flows of different measurements never collide.
SRC = {
    "new": "198.18.64.0",        # 16 x 256 addresses x 50000 ports each
    "hit": "198.18.80.0",
    "tunnel": "198.18.96.0",
    "misc": "198.18.112.0",
    "offload": "198.18.2.0",     # region r2, offloaded
    "fill": "198.18.120.0",      # flow-table fill (scaling)
    "established": "198.18.88.0",  # UDP and TCP-ACK hits beside Katran (katran section)
    "decap": "198.18.104.0",     # inner clients of tunnel packets
}
SRC6 = "2001:db8:1::"

ETH_LEN = 14
IP4_SRC_OFF = ETH_LEN + 12
IP4_CSUM_OFF = ETH_LEN + 10
L4_OFF4 = ETH_LEN + 20
IP6_SRC_OFF = ETH_LEN + 8
L4_OFF6 = ETH_LEN + 40
# where the (inner) IPv4 header starts in a frame of each kind: after the tunnel's headers
L3_OFF = {"decap_ipip": ETH_LEN + 20, "decap_gue": ETH_LEN + 20 + 8}


def flow_tuple(base: str, i: int) -> tuple[int, int]:
    """(source address as int, source port) of flow i from `base`."""
    return int(ipaddress.ip_address(base)) + i // PORT_SPAN, PORT_BASE + i % PORT_SPAN


def _ipv4_csum(header: bytes | bytearray) -> int:
    s = sum(struct.unpack("!10H", bytes(header[:20])))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def template(kind: str, payload: int = 18) -> bytes:
    """One frame of a class, before flow patching.

    kind: tcp4 (a SYN to VIP4:8080), tcp4_remote (VIP4:8081, the tunnel VM's
    service), tcp4_ack / tcp4_ack_remote (the same with ACK: a packet of an
    established connection), tcp6 (VIP6:8080), udp4 (VIP4:5353), udp4_remote
    (VIP4:5354, the tunnel VM's), non_vip (198.19.0.99:80), bad_ihl (IPv4 with
    IHL 4: malformed), tcp4_gue_remote / tcp4_gue6_remote (VIP4:8082 / 8083, the
    tunnel VMs reached by GUE over IPv4 / IPv6), decap_ipip / decap_gue (tcp4 in
    IP-in-IP / GUE from a trusted gateway to this one's tunnel address)."""
    from scapy.all import IP, TCP, UDP, Ether, IPv6

    eth = Ether(dst=GW_MAC, src=CLIENT_MAC)
    body = b"\x00" * payload
    src4 = SRC["misc"]
    if kind == "tcp4":
        pkt = eth / IP(src=src4, dst=VIP4) / TCP(sport=PORT_BASE, dport=WEB_PORT, flags="S") / body
    elif kind == "tcp4_remote":
        pkt = eth / IP(src=src4, dst=VIP4) / TCP(sport=PORT_BASE, dport=REMOTE_PORT, flags="S") / body
    elif kind in ("tcp4_ack", "tcp4_ack_remote"):
        dport = REMOTE_PORT if kind == "tcp4_ack_remote" else WEB_PORT
        pkt = eth / IP(src=src4, dst=VIP4) / TCP(sport=PORT_BASE, dport=dport, flags="A") / body
    elif kind == "tcp6":
        pkt = eth / IPv6(src=SRC6, dst=VIP6) / TCP(sport=PORT_BASE, dport=WEB_PORT, flags="S") / body
    elif kind in ("udp4", "udp4_remote"):
        dport = ECHO_REMOTE_PORT if kind == "udp4_remote" else ECHO_PORT
        pkt = eth / IP(src=src4, dst=VIP4) / UDP(sport=PORT_BASE, dport=dport) / body
    elif kind in ("tcp4_gue_remote", "tcp4_gue6_remote"):
        dport = GUE_REMOTE_PORT if kind == "tcp4_gue_remote" else GUE6_REMOTE_PORT
        pkt = eth / IP(src=src4, dst=VIP4) / TCP(sport=PORT_BASE, dport=dport, flags="S") / body
    elif kind in L3_OFF:
        inner = IP(src=src4, dst=VIP4) / TCP(sport=PORT_BASE, dport=WEB_PORT, flags="S") / body
        outer = IP(src=DECAP_PEER, dst=DECAP_ADDRESS)
        pkt = eth / (outer / inner if kind == "decap_ipip" else outer / UDP(sport=49152, dport=GUE_PORT) / inner)
    elif kind == "non_vip":
        pkt = eth / IP(src=src4, dst=NON_VIP4) / TCP(sport=PORT_BASE, dport=80, flags="S") / body
    elif kind == "bad_ihl":
        raw = bytearray(bytes(eth / IP(src=src4, dst=VIP4) / TCP(sport=PORT_BASE, dport=WEB_PORT) / body))
        raw[ETH_LEN] = 0x44                       # version 4, IHL 4 (16 bytes): malformed
        struct.pack_into("!H", raw, IP4_CSUM_OFF, 0)
        struct.pack_into("!H", raw, IP4_CSUM_OFF, _ipv4_csum(raw[ETH_LEN:]))
        return bytes(raw)
    else:
        raise ValueError(f"unknown frame kind {kind!r}")
    return bytes(pkt)


def patch4(tmpl: bytes, src: int, sport: int, l3_off: int = ETH_LEN) -> bytes:
    """The template with the (inner) IPv4 header at `l3_off` given flow (src, sport)."""
    f = bytearray(tmpl)
    struct.pack_into("!I", f, l3_off + 12, src)
    struct.pack_into("!H", f, l3_off + 10, 0)
    struct.pack_into("!H", f, l3_off + 10, _ipv4_csum(f[l3_off:]))
    struct.pack_into("!H", f, l3_off + 20, sport)
    return bytes(f)


def patch6(tmpl: bytes, index: int, sport: int) -> bytes:
    f = bytearray(tmpl)
    struct.pack_into("!I", f, IP6_SRC_OFF + 12, index)   # low 32 bits of the source
    struct.pack_into("!H", f, L4_OFF6, sport)
    return bytes(f)


def flows4(kind: str, base: str, start: int, count: int) -> list[bytes]:
    """`count` frames of class `kind`, flows start .. start+count-1 from `base`."""
    tmpl = template(kind)
    return [patch4(tmpl, *flow_tuple(base, i), L3_OFF.get(kind, ETH_LEN)) for i in range(start, start + count)]


def flows6(start: int, count: int) -> list[bytes]:
    tmpl = template("tcp6")
    return [patch6(tmpl, 1 + i // PORT_SPAN, PORT_BASE + i % PORT_SPAN) for i in range(start, start + count)]


def flow_keys4(base: str, start: int, count: int, dst: str = VIP4, dport: int = WEB_PORT,
               proto: int = 6) -> np.ndarray:
    """flow_table4 keys (numpy, the layout of struct flow_key4) of flows start.. from
    base: exactly the keys the XDP program records for flows4(...) frames."""
    i = np.arange(start, start + count, dtype=np.int64)
    src = (int(ipaddress.ip_address(base)) + i // PORT_SPAN).astype(">u4")
    keys = np.zeros(count, dtype=FLOW_KEY4_DTYPE)
    keys["src"] = src.view(np.uint8).reshape(count, 4)
    keys["dst"] = np.frombuffer(ipaddress.IPv4Address(dst).packed, dtype=np.uint8)
    keys["sport"] = (PORT_BASE + i % PORT_SPAN).astype(np.uint16)
    keys["dport"] = dport
    keys["proto"] = proto
    return keys

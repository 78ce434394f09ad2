"""Python mirror of ebpf/structs.h.

The structs are ctypes mirrors and the #define constants are restated here;
tests/xdp/test_structs.py compiles the C header and checks every size, offset
and constant against them.
"""
from __future__ import annotations

import ctypes as ct
import ipaddress
from importlib.resources import files
from pathlib import Path

EBPF_DIR = Path(str(files("ebpf")))
STRUCTS_H = EBPF_DIR / "structs.h"

XDPGW_NO_VM = 0xFFFFFFFF              # Maglev slot / flow value with no VM
MAGLEV_LINE_SLOTS = 16                 # Maglev slots per value of a table (struct maglev_line)
XDPGW_REGION_UNKNOWN = 0              # region id of unmatched sources

# vm_location.kind
VM_LOC_LOCAL = 1
VM_LOC_TUNNEL = 2

# vm_location.encap, offload_target.encap
ENCAP_IPIP = 0
ENCAP_GUE = 1
ENCAPS = {"ipip": ENCAP_IPIP, "gue": ENCAP_GUE}   # config and API names
ENCAP_NAMES = {code: name for name, code in ENCAPS.items()}
GUE_SPORT_BASE = 0xC000               # GUE source port: base | (flow hash & mask)
GUE_SPORT_MASK = 0x3FFF

# vm_location.state
VM_STATE_ACTIVE = 0
VM_STATE_DRAINING = 1
VM_STATE_DOWN = 2

FLOW_OFFLOADED = 0x80000000           # flow_entry.vm_id bit: offload_endpoints[low bits]
OFFLOAD_ENDPOINTS = 64                # size of offload_endpoints
OFFLOADS_PER_REGION = 4               # region_offload entries per region

DECAP_ADDRESSES = 16                  # size of decap_addresses
DECAP_PREFIXES = 1024                 # size of decap_from_v4 and of decap_from_v6

VIP_FILTER_BITS = 12                  # vip_filter has 1 << VIP_FILTER_BITS slots
VIP_FILTER_MULT = 0x9E3779B1          # multiplier of the slot hash

FLOW_F_FRAGMENT = 1                   # flow_key.flags

# forward_trace.action (test builds)
FWD_LOCAL = 1
FWD_TUNNEL = 2
FWD_OFFLOAD = 3

# stats indexes
STAT_FLOW_HITS = 0
STAT_FLOW_MISSES = 1
STAT_PASS = 2
STAT_LOCAL_FWD = 3
STAT_TUNNEL_FWD = 4
STAT_OFFLOAD_FWD = 5
STAT_ICMP_ERR_FWD = 6
STAT_FLOW_RESELECT = 7
STAT_FLOOD_UNRECORDED = 8
STAT_CAPTURE_LOST = 9
STAT_DECAP = 10
STAT_MAX = 11
STAT_SLOTS = 32

# drop_counters indexes
DROP_ETH_TRUNC = 0
DROP_VLAN_TRUNC = 1
DROP_VLAN_TOO_DEEP = 2
DROP_IP4_TRUNC = 3
DROP_IP4_BAD_VERSION = 4
DROP_IP4_BAD_IHL = 5
DROP_IP4_BAD_LEN = 6
DROP_IP6_TRUNC = 7
DROP_IP6_BAD_VERSION = 8
DROP_IP6_BAD_LEN = 9
DROP_IP6_EXT_TRUNC = 10
DROP_IP6_EXT_LIMIT = 11
DROP_L4_TRUNC = 12
DROP_TCP_BAD_DOFF = 13
DROP_ICMP_INNER_BAD = 14
DROP_NO_VM = 15
DROP_VM_LOCATION = 16
DROP_ENCAP = 17
DROP_UDP_BAD_LEN = 18
DROP_DECAP_UNTRUSTED = 19
DROP_DECAP_NESTED = 20
DROP_DECAP_FRAGMENT = 21
DROP_GUE_BAD = 22
DROP_MAX = 23
DROP_SLOTS = 64

# packet capture (ebpf/capture.h)
CAPTURE_ANY = 0xFFFFFFFF              # capture_filter: field unset; capture_meta: none
CAPTURE_SNAPLEN_MAX = 4096            # bytes of a frame a record holds per direction
CAPTURE_RING_PAGES = 256              # capture_ring size in pages

# vm_announce.kind (ebpf/vmport.c)
ANNOUNCE_GARP = 1
ANNOUNCE_RARP = 2
ANNOUNCE_NA = 3
VMPORT_PAIR_ENTRIES = 16384           # size of vm_pair_bytes


def _names(prefix: str) -> list[str]:
    """Lower-case names of the PREFIX_* index constants above, in index order
    (DROP_IP4_BAD_IHL -> ip4_bad_ihl)."""
    items = [(v, n[len(prefix):].lower()) for n, v in globals().items()
             if n.startswith(prefix) and n not in (prefix + "MAX", prefix + "SLOTS")]
    return [name for _, name in sorted(items)]


DROP_REASONS: list[str] = _names("DROP_")
STAT_NAMES: list[str] = _names("STAT_")

Addr16 = ct.c_uint8 * 16
Mac = ct.c_uint8 * 6


class ServiceKey(ct.Structure):
    _fields_ = [("vip", Addr16), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("fragment", ct.c_uint8)]


class ServiceInfo(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("flags", ct.c_uint32)]


class MaglevLine(ct.Structure):
    _fields_ = [("vm", ct.c_uint32 * MAGLEV_LINE_SLOTS)]


class FlowKey(ct.Structure):
    _fields_ = [("src", Addr16), ("dst", Addr16), ("sport", ct.c_uint16), ("dport", ct.c_uint16),
                ("proto", ct.c_uint8), ("flags", ct.c_uint8), ("pad", ct.c_uint16)]


class FlowKey4(ct.Structure):
    _fields_ = [("src", ct.c_uint8 * 4), ("dst", ct.c_uint8 * 4), ("sport", ct.c_uint16), ("dport", ct.c_uint16),
                ("proto", ct.c_uint8), ("flags", ct.c_uint8), ("pad", ct.c_uint16)]


class FlowEntry(ct.Structure):
    _fields_ = [("vm_id", ct.c_uint32), ("service_id", ct.c_uint32), ("region", ct.c_uint32),
                ("generation", ct.c_uint32)]


class VmLocation(ct.Structure):
    _fields_ = [("kind", ct.c_uint8), ("state", ct.c_uint8), ("tunnel_family", ct.c_uint8), ("encap", ct.c_uint8),
                ("port_slot", ct.c_uint32), ("dst_mac", Mac), ("src_mac", Mac),
                ("tunnel_dst", Addr16), ("tunnel_src", Addr16)]


class OffloadKey(ct.Structure):
    _fields_ = [("region_id", ct.c_uint32), ("service_id", ct.c_uint32)]


class OffloadRef(ct.Structure):
    _fields_ = [("endpoint_id", ct.c_uint32), ("flags", ct.c_uint32)]


class OffloadTarget(ct.Structure):
    _fields_ = [("family", ct.c_uint8), ("encap", ct.c_uint8), ("pad", ct.c_uint8 * 2), ("endpoint", Addr16),
                ("src", Addr16),
                ("next_hop_mac", Mac), ("src_mac", Mac)]


class DecapKey(ct.Structure):
    _fields_ = [("addr", Addr16)]


class TunnelConfig(ct.Structure):
    _fields_ = [("gue_port", ct.c_uint16), ("pad", ct.c_uint16)]


class LpmV4Key(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 4)]


class LpmV6Key(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", Addr16)]


class TrafficCounter(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class ServiceCounter(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64), ("new_flows", ct.c_uint64)]


class ForwardTrace(ct.Structure):
    _fields_ = [("action", ct.c_uint32), ("vm_id", ct.c_uint32), ("port_slot", ct.c_uint32),
                ("service_id", ct.c_uint32)]


class FloodWindow(ct.Structure):
    _fields_ = [("start_ns", ct.c_uint64), ("new_flows", ct.c_uint64)]


class CaptureFilter(ct.Structure):
    _fields_ = [("armed", ct.c_uint32), ("snaplen", ct.c_uint32), ("region", ct.c_uint32),
                ("service", ct.c_uint32), ("vm", ct.c_uint32), ("verdict", ct.c_uint32), ("reason", ct.c_uint32),
                ("pad", ct.c_uint32)]


class CaptureMeta(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("ifindex", ct.c_uint32), ("region", ct.c_uint32),
                ("service", ct.c_uint32), ("vm", ct.c_uint32), ("verdict", ct.c_uint16), ("reason", ct.c_uint16),
                ("rx_len", ct.c_uint16), ("rx_caplen", ct.c_uint16), ("tx_len", ct.c_uint16),
                ("tx_caplen", ct.c_uint16), ("pad", ct.c_uint32)]


class VmAnnounce(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("ifindex", ct.c_uint32), ("kind", ct.c_uint8), ("family", ct.c_uint8),
                ("mac", Mac), ("ip", Addr16), ("pad", ct.c_uint8 * 4)]


class VmPairKey(ct.Structure):
    _fields_ = [("src_mac", Mac), ("pad", ct.c_uint16), ("dst", Addr16)]


# Every mirrored struct with its C name, for the layout test.
MIRRORS: dict[str, type[ct.Structure]] = {
    "service_key": ServiceKey, "service_info": ServiceInfo, "maglev_line": MaglevLine, "flow_key": FlowKey, "flow_key4": FlowKey4,
    "flow_entry": FlowEntry,
    "vm_location": VmLocation, "offload_key": OffloadKey, "offload_ref": OffloadRef,
    "offload_target": OffloadTarget, "decap_key": DecapKey, "tunnel_config": TunnelConfig,
    "lpm_v4_key": LpmV4Key, "lpm_v6_key": LpmV6Key, "traffic_counter": TrafficCounter,
    "service_counter": ServiceCounter, "forward_trace": ForwardTrace, "flood_window": FloodWindow,
    "capture_filter": CaptureFilter, "capture_meta": CaptureMeta, "vm_announce": VmAnnounce, "vm_pair_key": VmPairKey,
}


IPV4_MAPPED = b"\0" * 10 + b"\xff\xff"  # the prefix of an IPv4-mapped address (ebpf/addr.h)


def addr16(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> Addr16:
    """16-byte form used by every key: IPv4 is stored IPv4-mapped."""
    a = ipaddress.ip_address(ip)
    raw = (IPV4_MAPPED + a.packed) if a.version == 4 else a.packed
    return Addr16.from_buffer_copy(raw)


def flow_family(key: FlowKey) -> int:
    """4 when the flow is IPv4 (its destination IPv4-mapped, as the program decides), else 6."""
    return 4 if bytes(key.dst[:12]) == IPV4_MAPPED else 6


def flow_key4(key: FlowKey) -> FlowKey4:
    """flow_table4's key of an IPv4 flow (ebpf/lb.h flow_key4_of)."""
    raw = bytes(key)
    return FlowKey4.from_buffer_copy(raw[12:16] + raw[28:40])


def addr_from16(raw: bytes | Addr16) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.IPv6Address(bytes(raw))
    return a.ipv4_mapped or a


def mac_bytes(mac: str) -> Mac:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}: expected six colon-separated octets")
    try:
        return Mac(*(int(p, 16) for p in parts))
    except ValueError:
        raise ValueError(f"bad MAC address {mac!r}: octets must be hex") from None


def mac_str(raw: Mac | bytes) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))

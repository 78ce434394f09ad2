"""Typed access to every map of the loaded XDP program. Writes validate their
arguments and raise ValueError naming the field; nothing is half-written."""
from __future__ import annotations

import ctypes as ct
import ipaddress
import mmap
import os
import socket
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import elemcount, libbpf
from . import structs as S
from .fold import fold_bytes, percpu_value_size
from .program import Sizes

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
VM_STATES = {"active": S.VM_STATE_ACTIVE, "draining": S.VM_STATE_DRAINING, "down": S.VM_STATE_DOWN}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FLOW_TABLES = ("flow_table4", "flow_table6")
FLOW_KEY_DTYPE = np.dtype(S.FlowKey)
FLOW_KEY4_DTYPE = np.dtype(S.FlowKey4)
FLOW_ENTRY_DTYPE = np.dtype(S.FlowEntry)


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def read_percpu(map_fd: int, key_size: int, value_type, max_entries: int, ncpus: int,
                what: str) -> tuple[bytes, np.ndarray]:
    """Every entry of a per-CPU map of u64 counters, read in batches: (the keys
    back to back, uint64[entries, fields] summed over CPUs)."""
    vs = ct.sizeof(value_type)
    keys, values, n = libbpf.lookup_batch(map_fd, key_size, percpu_value_size(vs, ncpus), max_entries, what)
    return keys, fold_bytes(values, n, ncpus, vs, vs // 8)


def vip_slot(addr16: bytes) -> int:
    """The vip_filter slot of a 16-byte address: the XDP program's vip_slot()
    (four native-order words xor-folded, multiplied, top bits)."""
    w = struct.unpack("=4I", addr16)
    return ((w[0] ^ w[1] ^ w[2] ^ w[3]) * S.VIP_FILTER_MULT & 0xFFFFFFFF) >> (32 - S.VIP_FILTER_BITS)


@dataclass(frozen=True)
class LocalPort:
    """A VM behind a host port of this gateway."""
    slot: int
    vm_mac: str
    port_mac: str


@dataclass(frozen=True)
class Tunnel:
    """A VM (or a whole data center) behind a remote tunnel endpoint, reached by
    IP-in-IP or GUE (`encap`, a key of structs.ENCAPS)."""
    endpoint: IPAddress
    source: IPAddress
    next_hop_mac: str
    uplink_mac: str
    encap: str = "ipip"


def _family_check(field: str, endpoint: IPAddress, source: IPAddress) -> int:
    if endpoint.version != source.version:
        raise ValueError(f"{field}: tunnel endpoint {endpoint} and source {source} are of different IP families")
    return endpoint.version


def _delete_others(table, keep: set[bytes]) -> None:
    """Delete every entry of a bcc table whose key's bytes are not in `keep`
    (the second half of "make the map hold exactly these": write, then delete)."""
    for key in list(table.keys()):
        if bytes(key) not in keep:
            table.__delitem__(key)


def _encap(field: str, tunnel: Tunnel) -> int:
    if tunnel.encap not in S.ENCAPS:
        raise ValueError(f"{field}: encap {tunnel.encap!r} must be one of {sorted(S.ENCAPS)}")
    return S.ENCAPS[tunnel.encap]


class Dataplane:
    """The loaded program's maps. `bpf` is the bcc.BPF object that owns them."""

    def __init__(self, bpf, sizes: Sizes) -> None:
        self.bpf = bpf
        self.sizes = sizes
        self.ncpus = possible_cpus()
        self.port_slots = PortSlots(self)

    def _table(self, name: str):
        # bcc's own cache (bpf[name]): get_table decodes the map's type description on every call;
        # bytes, as bcc warns on str names
        return self.bpf[name.encode()]

    def _fd(self, name: str) -> int:
        return self._table(name).map_fd

    # ---- regions -------------------------------------------------------
    def set_region_prefixes(self, prefixes: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int]) -> None:
        """Make the LPM tries hold exactly `prefixes` (network -> region id)."""
        for net, region in prefixes.items():
            if not 1 <= region <= self.sizes.max_regions:
                raise ValueError(f"region id {region} for {net} out of range 1..{self.sizes.max_regions}")
        wanted = {(net.version, bytes(self._lpm_key(net))): region for net, region in prefixes.items()}
        have = {(version, bytes(k)): v.value for version in (4, 6)
                for k, v in self._table(f"region_prefixes_v{version}").items()}
        if have == wanted:
            return
        for net, region in prefixes.items():
            libbpf.update_elem(self._fd(f"region_prefixes_v{net.version}"), self._lpm_key(net),
                               ct.c_uint32(region), f"region prefix {net}")
        for version in (4, 6):
            _delete_others(self._table(f"region_prefixes_v{version}"),
                           {raw for v, raw in wanted if v == version})
        self._next_flow_generation()

    def _lpm_type(self, version: int):
        return S.LpmV4Key if version == 4 else S.LpmV6Key

    def _lpm_key(self, net):
        key = self._lpm_type(net.version)()
        key.prefixlen = net.prefixlen
        ct.memmove(key.addr, net.network_address.packed, len(net.network_address.packed))
        return key

    # ---- services ------------------------------------------------------
    def set_services(self, services: list[tuple[IPAddress, int, str, int]]) -> None:
        """Make the service map hold exactly (vip, port, protocol, service id) entries.

        Fragments carry no ports, so each (VIP, protocol) also gets a fragment
        entry (port 0) that points at its lowest-numbered service."""
        entries: dict[bytes, S.ServiceInfo] = {}
        for vip, port, proto, sid in sorted(services, key=lambda s: s[3]):
            if proto not in PROTOCOLS:
                raise ValueError(f"service {sid}: protocol {proto!r} must be one of {sorted(PROTOCOLS)}")
            if not 1 <= port <= 65535:
                raise ValueError(f"service {sid}: port {port} out of range 1..65535")
            if not 0 <= sid < self.sizes.max_services:
                raise ValueError(f"service id {sid} out of range 0..{self.sizes.max_services - 1}")
            key = S.ServiceKey(vip=S.addr16(vip), port=port, proto=PROTOCOLS[proto])
            frag = S.ServiceKey(vip=S.addr16(vip), port=0, proto=PROTOCOLS[proto], fragment=1)
            entries[bytes(key)] = S.ServiceInfo(id=sid)
            entries.setdefault(bytes(frag), S.ServiceInfo(id=sid))
        table = self._table("services")
        have = {bytes(k): bytes(v) for k, v in table.items()}
        if have == {k: bytes(v) for k, v in entries.items()}:
            return
        # a VIP's filter slot is set before its services and cleared after them
        slots = {vip_slot(raw[:16]) for raw in entries}
        filter_fd = self._fd("vip_filter")
        for slot in slots:
            libbpf.update_elem(filter_fd, ct.c_uint32(slot), ct.c_uint32(1), f"vip_filter[{slot}]")
        for raw, info in entries.items():
            table[S.ServiceKey.from_buffer_copy(raw)] = info
        _delete_others(table, set(entries))
        for slot in {vip_slot(raw[:16]) for raw in have} - slots:
            libbpf.update_elem(filter_fd, ct.c_uint32(slot), ct.c_uint32(0), f"vip_filter[{slot}]")
        self._next_flow_generation()

    def _next_flow_generation(self) -> None:
        """After a change of services or region prefixes (written before this):
        every flow entry looks its service and region up again on its next packet
        (and keeps its VM); see struct flow_entry."""
        fd, gen = self._fd("flow_generation"), ct.c_uint32()
        libbpf.lookup_elem(fd, ct.c_uint32(0), gen, "flow_generation")
        libbpf.update_elem(fd, ct.c_uint32(0), ct.c_uint32((gen.value + 1) & 0xFFFFFFFF), "flow_generation")

    # ---- Maglev --------------------------------------------------------
    def set_maglev_table(self, service_id: int, table: np.ndarray) -> None:
        """Swap in a whole new table for a service: a packet sees the old or the new one, never a mix."""
        m = self.sizes.maglev_m
        table = np.ascontiguousarray(table, dtype=np.uint32)
        if table.shape != (m,):
            raise ValueError(f"Maglev table for service {service_id} has {table.size} slots, expected {m}")
        if not 0 <= service_id < self.sizes.max_services:
            raise ValueError(f"service id {service_id} out of range 0..{self.sizes.max_services - 1}")
        lines = self._maglev_lines
        inner = libbpf.map_create(libbpf.BPF_MAP_TYPE_ARRAY, f"maglev_{service_id}", 4, ct.sizeof(S.MaglevLine),
                                  lines, libbpf.BPF_F_MMAPABLE)
        try:
            # one copy through a shared mapping instead of a batch syscall per line
            slots = np.full(lines * S.MAGLEV_LINE_SLOTS, S.XDPGW_NO_VM, dtype=np.uint32)
            slots[:m] = table
            raw = slots.tobytes()
            size = (len(raw) + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            with mmap.mmap(inner, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as mem:
                mem[:len(raw)] = raw
            libbpf.update_elem(self._fd("maglev_tables"), ct.c_uint32(service_id), ct.c_uint32(inner),
                               f"maglev_tables[{service_id}]")
        finally:
            os.close(inner)  # the outer map holds its own reference

    @property
    def _maglev_lines(self) -> int:
        """Values of a Maglev table (ebpf/maps.h MAGLEV_LINES)."""
        return -(-self.sizes.maglev_m // S.MAGLEV_LINE_SLOTS)

    def remove_maglev_table(self, service_id: int) -> None:
        """The service then has no table: its new flows drop as no_vm."""
        libbpf.delete_elem(self._fd("maglev_tables"), ct.c_uint32(service_id), f"maglev_tables[{service_id}]")

    def maglev_table(self, service_id: int) -> np.ndarray | None:
        """The table the dataplane uses now for a service (None if it has none)."""
        inner_id = ct.c_uint32()
        if not libbpf.lookup_elem(self._fd("maglev_tables"), ct.c_uint32(service_id), inner_id,
                                  f"maglev_tables[{service_id}]"):
            return None
        fd = libbpf.map_fd_by_id(inner_id.value)
        try:
            m = self.sizes.maglev_m
            _, values, n = libbpf.lookup_batch(fd, 4, ct.sizeof(S.MaglevLine), self._maglev_lines,
                                               f"Maglev table of service {service_id}")
            return np.frombuffer(values, dtype=np.uint32, count=n * S.MAGLEV_LINE_SLOTS)[:m].copy()
        finally:
            os.close(fd)

    # ---- VMs, ports ----------------------------------------------------
    def set_port(self, slot: int, ifindex: int) -> None:
        if not 0 <= slot < self.sizes.max_ports:
            raise ValueError(f"port slot {slot} out of range 0..{self.sizes.max_ports - 1}")
        self._table("tx_ports")[ct.c_int(slot)] = ct.c_int(ifindex)

    def clear_port(self, slot: int) -> None:
        libbpf.delete_elem(self._fd("tx_ports"), ct.c_uint32(slot), f"tx_ports[{slot}]")

    def ports(self) -> dict[int, int]:
        """The filled slots of the port devmap: slot -> ifindex."""
        fd, ifindex = self._fd("tx_ports"), ct.c_uint32()
        return {slot: ifindex.value for slot in range(self.sizes.max_ports)
                if libbpf.lookup_elem(fd, ct.c_uint32(slot), ifindex, f"tx_ports[{slot}]")}

    def set_vm(self, vm_id: int, where: LocalPort | Tunnel, state: str = "active") -> None:
        self._check_vm(vm_id, state)
        self._table("vm_location")[ct.c_uint32(vm_id)] = self._vm_location(vm_id, where, state)

    def set_vms(self, vms: Iterable[tuple[int, LocalPort | Tunnel, str]]) -> None:
        """set_vm of every (vm_id, where, state) with one batch update (a start with
        thousands of VMs): each checked as set_vm checks it, none written unless all pass."""
        ids: list[int] = []
        values: list[bytes] = []
        built: dict[tuple[LocalPort | Tunnel, str], bytes] = {}
        for vm_id, where, state in vms:
            self._check_vm(vm_id, state)
            # many VMs share a location (a host's tunnel): it is checked and encoded once
            if (where, state) not in built:
                built[where, state] = bytes(self._vm_location(vm_id, where, state))
            ids.append(vm_id)
            values.append(built[where, state])
        if ids:
            libbpf.update_batch(self._fd("vm_location"), struct.pack(f"={len(ids)}I", *ids), b"".join(values),
                                len(ids), "vm_location")

    def _vm_location(self, vm_id: int, where: LocalPort | Tunnel, state: str) -> S.VmLocation:
        """The entry of a checked (vm_id, state) at `where`; checks `where`."""
        loc = S.VmLocation(state=VM_STATES[state])
        if isinstance(where, LocalPort):
            if not 0 <= where.slot < self.sizes.max_ports:
                raise ValueError(f"VM {vm_id}: port slot {where.slot} out of range")
            loc.kind, loc.port_slot = S.VM_LOC_LOCAL, where.slot
            loc.dst_mac, loc.src_mac = S.mac_bytes(where.vm_mac), S.mac_bytes(where.port_mac)
        else:
            loc.kind = S.VM_LOC_TUNNEL
            loc.tunnel_family = _family_check(f"VM {vm_id}", where.endpoint, where.source)
            loc.encap = _encap(f"VM {vm_id}", where)
            loc.tunnel_dst, loc.tunnel_src = S.addr16(where.endpoint), S.addr16(where.source)
            loc.dst_mac, loc.src_mac = S.mac_bytes(where.next_hop_mac), S.mac_bytes(where.uplink_mac)
        return loc

    def set_vm_state(self, vm_id: int, state: str) -> None:
        self._check_vm(vm_id, state)
        table = self._table("vm_location")
        loc = table[ct.c_uint32(vm_id)]
        if not loc.kind:
            raise ValueError(f"VM {vm_id} has no location")
        loc.state = VM_STATES[state]
        table[ct.c_uint32(vm_id)] = loc

    def clear_vm(self, vm_id: int) -> None:
        self._check_vm_id(vm_id)
        self._table("vm_location")[ct.c_uint32(vm_id)] = S.VmLocation()

    def vm_location(self, vm_id: int) -> S.VmLocation:
        self._check_vm_id(vm_id)
        return self._table("vm_location")[ct.c_uint32(vm_id)]

    def _check_vm_id(self, vm_id: int) -> None:
        if not 1 <= vm_id <= self.sizes.max_vms:
            raise ValueError(f"VM id {vm_id} out of range 1..{self.sizes.max_vms}")

    def _check_vm(self, vm_id: int, state: str) -> None:
        self._check_vm_id(vm_id)
        if state not in VM_STATES:
            raise ValueError(f"VM {vm_id}: state {state!r} must be one of {sorted(VM_STATES)}")

    # ---- region offload -------------------------------------------------
    def set_offload(self, region_id: int, service_id: int, target: Tunnel) -> int:
        """New flows of the region to the service go to `target`; returns its endpoint id.

        The target is written (or found) first, then the region points at it,
        so a packet never sees a reference to a missing endpoint."""
        if not 1 <= region_id <= self.sizes.max_regions:
            raise ValueError(f"region id {region_id} out of range 1..{self.sizes.max_regions}")
        if not 0 <= service_id < self.sizes.max_services:
            raise ValueError(f"service id {service_id} out of range 0..{self.sizes.max_services - 1}")
        t = S.OffloadTarget(family=_family_check("offload", target.endpoint, target.source),
                            encap=_encap("offload", target), endpoint=S.addr16(target.endpoint), src=S.addr16(target.source),
                            next_hop_mac=S.mac_bytes(target.next_hop_mac), src_mac=S.mac_bytes(target.uplink_mac))
        endpoints = self.offload_endpoints()
        same = [i for i, e in endpoints.items() if bytes(e) == bytes(t)]
        free = [i for i in range(S.OFFLOAD_ENDPOINTS) if i not in endpoints]
        if not same and not free:
            raise ValueError(f"all {S.OFFLOAD_ENDPOINTS} offload endpoints are in use; clear some with --now")
        endpoint_id = same[0] if same else free[0]
        if not same:
            self._table("offload_endpoints")[ct.c_uint32(endpoint_id)] = t
        self._table("region_offload")[S.OffloadKey(region_id, service_id)] = S.OffloadRef(endpoint_id)
        return endpoint_id

    def clear_offload(self, region_id: int, service_id: int, forget: bool = False) -> bool:
        """New flows of the region are served here again. Flows already offloaded
        stay at their target unless `forget`, which also drops the target when no
        other region uses it: its flows then come home on their next packet."""
        refs = self._table("region_offload")
        key = S.OffloadKey(region_id, service_id)
        try:
            endpoint_id = refs[key].endpoint_id
            refs.__delitem__(key)
        except KeyError:
            return False
        if forget and all(r.endpoint_id != endpoint_id for r in refs.values()):
            self._table("offload_endpoints")[ct.c_uint32(endpoint_id)] = S.OffloadTarget()
        return True

    def clear_offloads(self) -> None:
        refs = self._table("region_offload")
        for key in list(refs.keys()):
            refs.__delitem__(key)
        for endpoint_id in self.offload_endpoints():
            self._table("offload_endpoints")[ct.c_uint32(endpoint_id)] = S.OffloadTarget()

    def offload_endpoints(self) -> dict[int, S.OffloadTarget]:
        """Endpoints in use (by a region, or by flows offloaded earlier)."""
        return {k.value: v for k, v in self._table("offload_endpoints").items() if v.family}

    def offloads(self) -> dict[tuple[int, int], S.OffloadTarget]:
        endpoints = self.offload_endpoints()
        return {(k.region_id, k.service_id): endpoints[r.endpoint_id]
                for k, r in self._table("region_offload").items() if r.endpoint_id in endpoints}

    # ---- decapsulation ---------------------------------------------------
    def set_decap(self, addresses: list[IPAddress], trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                  gue_port: int) -> None:
        """Tunnel packets (IP-in-IP, GUE to `gue_port`) to one of `addresses` from a
        source inside `trusted` are served by their inner packet; `gue_port` is also
        the destination port of the GUE this gateway sends (0: no GUE). The maps then
        hold exactly these; the trusted prefixes are written before the addresses
        and removed after them, so a change never opens the tunnel to a source."""
        if len(addresses) > S.DECAP_ADDRESSES:
            raise ValueError(f"decap_addresses: {len(addresses)} addresses, at most {S.DECAP_ADDRESSES}")
        for version in (4, 6):
            n = sum(1 for net in trusted if net.version == version)
            if n > S.DECAP_PREFIXES:
                raise ValueError(f"decap_from: {n} IPv{version} prefixes, at most {S.DECAP_PREFIXES}")
        if not 0 <= gue_port <= 65535:
            raise ValueError(f"gue_port {gue_port} out of range 0..65535")
        libbpf.update_elem(self._fd("tunnel_config"), ct.c_uint32(0), S.TunnelConfig(gue_port=gue_port),
                           "tunnel_config")
        tries = {version: self._table(f"decap_from_v{version}") for version in (4, 6)}
        wanted_nets = {(net.version, bytes(self._lpm_key(net))) for net in trusted}
        for net in trusted:
            libbpf.update_elem(self._fd(f"decap_from_v{net.version}"), self._lpm_key(net), ct.c_uint32(1),
                               f"decap_from {net}")
        table = self._table("decap_addresses")
        wanted = {bytes(S.addr16(a)) for a in addresses}
        for raw in wanted:
            table[S.DecapKey.from_buffer_copy(raw)] = ct.c_uint32(1)
        _delete_others(table, wanted)
        for version, trie in tries.items():
            _delete_others(trie, {raw for v, raw in wanted_nets if v == version})

    def decap(self) -> dict:
        """What set_decap wrote: {"addresses": [...], "trusted": [...], "gue_port": n}."""
        cfg = S.TunnelConfig()
        libbpf.lookup_elem(self._fd("tunnel_config"), ct.c_uint32(0), cfg, "tunnel_config")
        trusted = [ipaddress.ip_network((bytes(k.addr)[:4 if version == 4 else 16], k.prefixlen))
                   for version in (4, 6) for k in self._table(f"decap_from_v{version}").keys()]
        return {"addresses": sorted((S.addr_from16(k.addr) for k in self._table("decap_addresses").keys()),
                                    key=lambda a: (a.version, a)),
                "trusted": sorted(trusted, key=lambda n: (n.version, n)), "gue_port": cfg.gue_port}

    # ---- flows ---------------------------------------------------------
    # One table per family (ebpf/maps.h): IPv4 flows under their compact key
    # (struct flow_key4), IPv6 flows under struct flow_key. The methods below take
    # and return flows as struct flow_key (IPv4-mapped) whatever their table.
    def _flow_slot(self, key: S.FlowKey) -> tuple[str, S.FlowKey4 | S.FlowKey]:
        """The table that holds this flow and the flow's key in it."""
        return ("flow_table4", S.flow_key4(key)) if S.flow_family(key) == 4 else ("flow_table6", key)

    def _read_flows(self) -> tuple[np.ndarray, np.ndarray]:
        """Both flow tables read with batch operations: keys as struct flow_key
        records, entries as struct flow_entry records."""
        vs = ct.sizeof(S.FlowEntry)
        k4, v4, n4 = libbpf.lookup_batch(self._fd("flow_table4"), ct.sizeof(S.FlowKey4), vs,
                                         self.sizes.flow_entries, "flow_table4")
        k6, v6, n6 = libbpf.lookup_batch(self._fd("flow_table6"), ct.sizeof(S.FlowKey), vs,
                                         self.sizes.flow_entries, "flow_table6")
        keys = np.zeros(n4 + n6, dtype=FLOW_KEY_DTYPE)
        compact = np.frombuffer(k4, dtype=FLOW_KEY4_DTYPE, count=n4)
        mapped = np.frombuffer(S.IPV4_MAPPED, dtype=np.uint8)
        keys["src"][:n4, :12] = mapped
        keys["dst"][:n4, :12] = mapped
        keys["src"][:n4, 12:] = compact["src"]
        keys["dst"][:n4, 12:] = compact["dst"]
        for field in ("sport", "dport", "proto", "flags"):
            keys[field][:n4] = compact[field]
        keys[n4:] = np.frombuffer(k6, dtype=FLOW_KEY_DTYPE, count=n6)
        values = np.frombuffer(v4 + v6, dtype=FLOW_ENTRY_DTYPE, count=n4 + n6)
        return keys, values

    def flows(self) -> list[tuple[S.FlowKey, S.FlowEntry]]:
        """Every flow-table entry of both families, read with batch operations."""
        keys, values = self._read_flows()
        kb, vb, ks, vs = keys.tobytes(), values.tobytes(), keys.itemsize, values.itemsize
        return [(S.FlowKey.from_buffer_copy(kb, i * ks), S.FlowEntry.from_buffer_copy(vb, i * vs))
                for i in range(keys.size)]

    def clear_flows(self) -> None:
        for name in FLOW_TABLES:
            self._table(name).clear()

    def flow(self, key: S.FlowKey) -> S.FlowEntry | None:
        name, table_key = self._flow_slot(key)
        value = S.FlowEntry()
        return value if libbpf.lookup_elem(self._fd(name), table_key, value, name) else None

    def put_flow(self, key: S.FlowKey, entry: S.FlowEntry) -> None:
        """Record a flow as the program would (a flow of an earlier daemon, a test's fixture)."""
        name, table_key = self._flow_slot(key)
        libbpf.update_elem(self._fd(name), table_key, entry, name)

    def flows_array(self) -> tuple[np.ndarray, np.ndarray]:
        """Every flow-table entry as numpy structured arrays (keys, entries) with the
        layouts of S.FlowKey and S.FlowEntry: the same batch reads as flows() without
        one Python object per entry."""
        return self._read_flows()

    def flow_map_ids(self) -> list[int]:
        """The kernel ids of the maps that hold flow entries."""
        return [libbpf.map_info(self._fd(name)).id for name in FLOW_TABLES]

    def flow_count(self, walk: bool = True) -> int | None:
        """Entries in the flow table: the sum of the kernel's element counts of the
        flow maps, which costs the same at any size (dataplane/elemcount.py). Where the
        kernel cannot give them, a full walk of the table (batch reads), or None
        with walk=False."""
        counts = elemcount.elem_counts(self.flow_map_ids())
        if counts is not None:
            return sum(counts.values())
        return len(self._read_flows()[0]) if walk else None

    # ---- counters ------------------------------------------------------
    def _percpu(self, name: str, n_keys: int, value_type) -> np.ndarray:
        return read_percpu(self._fd(name), 4, value_type, n_keys, self.ncpus, name)[1]

    def zero_counters(self, kind: str, ids: list[int]) -> None:
        """Zero the per-CPU counters of ids that now belong to someone new."""
        table, value = {"region": ("region_counters", S.TrafficCounter),
                        "service": ("service_counters", S.ServiceCounter),
                        "vm": ("vm_counters", S.TrafficCounter)}[kind]
        zeros = (value * self.ncpus)()
        for i in ids:
            libbpf.update_elem(self._fd(table), ct.c_uint32(i), zeros, f"{table}[{i}]")

    def region_counters(self) -> np.ndarray:
        """(max_regions + 1, 2) packets, bytes; row 0 is the unknown region."""
        return self._percpu("region_counters", self.sizes.max_regions + 1, S.TrafficCounter)

    def service_counters(self) -> np.ndarray:
        return self._percpu("service_counters", self.sizes.max_services, S.ServiceCounter)

    def vm_counters(self) -> np.ndarray:
        return self._percpu("vm_counters", self.sizes.max_vms + 1, S.TrafficCounter)

    def drop_counters(self) -> dict[str, int]:
        raw = self._percpu("drop_counters", S.DROP_MAX, ct.c_uint64)
        return {name: int(raw[i, 0]) for i, name in enumerate(S.DROP_REASONS)}

    def stats(self) -> dict[str, int]:
        raw = self._percpu("stats", S.STAT_MAX, ct.c_uint64)
        return {name: int(raw[i, 0]) for i, name in enumerate(S.STAT_NAMES)}

    @cached_property
    def traced(self) -> bool:
        """Whether the program is the test build, with the forward trace (ebpf/trace.h)."""
        try:
            self._table("forward_traces")
        except KeyError:
            return False
        return True

    def clear_forward_trace(self) -> None:
        if not self.traced:
            return
        zeros = (S.ForwardTrace * self.ncpus)()
        libbpf.update_elem(self._fd("forward_traces"), ct.c_uint32(0), zeros, "forward_traces")

    def last_forward(self) -> S.ForwardTrace | None:
        """What the program did with the last packet it forwarded since clear_forward_trace();
        None also when the program is not the test build."""
        if not self.traced:
            return None
        traces = [t for t in self._table("forward_traces")[ct.c_int(0)] if t.action]
        return traces[0] if traces else None


class PortSlots:
    """Slots of the port devmap, one per host port in use, keyed by interface name.

    A port keeps its slot until released; a re-created port (same name, new
    ifindex) is re-pointed in place. Freed slots are reused oldest-first, so a
    packet that read a slot just before its release is unlikely to find it
    already taken by another port."""

    def __init__(self, dataplane: Dataplane) -> None:
        self.dataplane = dataplane
        self.in_use: dict[str, tuple[int, int]] = {}     # ifname -> (slot, ifindex)
        # slot 0 stays empty: a location whose slot was never set redirects nowhere
        self.free = deque(range(1, dataplane.sizes.max_ports))

    def allocate(self, ifname: str, ifindex: int) -> int:
        """The slot of `ifname`, pointed at `ifindex`: its own, or a free one."""
        slot, known = self.in_use.get(ifname, (None, None))
        if known == ifindex:
            return slot
        if slot is None:
            if not self.free:
                raise ValueError(f"cannot give port {ifname!r} a slot: all {len(self.in_use)} port slots are "
                                 "in use; release the ports no VM uses")
            slot = self.free[0]
        self.dataplane.set_port(slot, ifindex)     # a failed write takes no slot
        if ifname not in self.in_use:
            self.free.popleft()
        self.in_use[ifname] = (slot, ifindex)
        return slot

    def release(self, ifname: str) -> None:
        """Empty the slot of `ifname` (no VM points at it any more) and free it."""
        slot, _ = self.in_use.pop(ifname)
        self.dataplane.clear_port(slot)
        self.free.append(slot)

    def ports(self) -> dict[str, int]:
        """ifname -> slot of the ports that hold a slot."""
        return {name: slot for name, (slot, _) in self.in_use.items()}

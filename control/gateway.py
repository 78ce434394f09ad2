"""The gateway: turns a validated Config into a programmed, attached dataplane,
and carries out run-time changes (VM moves, VM states, offloads) on it.

Every change is validated completely before the first map write, so a bad
request changes nothing."""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import ipaddress
import socket
import struct
import threading
import time
from typing import Mapping

import numpy as np

from control.config import Config, ConfigError, IPAddress
from control.events import GatewayEvents
from control.maglev import build_table
from control.vms import ADMIN_STATES, HEALTH_STATES, Location, LocationError, VmRuntime, forwarding
from dataplane import structs as S
from dataplane.flowhash import maglev_slot
from dataplane.maps import PROTOCOLS, Dataplane, LocalPort, Tunnel
from dataplane.pinning import PinnedState, check_reused_maps, reach
from dataplane.program import AttachError, Sizes, attach, detach, ifindex, load


# struct ifreq: the name (IFNAMSIZ bytes), then a sockaddr whose sa_data holds the MAC
_SIOCGIFHWADDR = 0x8927
_IFHWADDR_OFF = 16 + 2
# How long a resolved next-hop MAC is reused: a start-up or a burst of moves to VMs behind one
# endpoint resolves it once (a netlink round trip each), and a changed neighbour is seen this soon.
NEXT_HOP_TTL_S = 1.0


class GatewayError(RuntimeError):
    """A request the gateway cannot carry out; the message names the culprit."""


class UnknownName(GatewayError, LookupError):
    """The request names a VM, region or service the gateway does not have."""


def _name_diff(old: tuple, new: tuple) -> dict[str, list[str]]:
    """Names of config entries added, removed and changed from `old` to `new`."""
    before, after = {e.name: e for e in old}, {e.name: e for e in new}
    return {"added": sorted(after.keys() - before.keys()), "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(n for n in before.keys() & after.keys() if before[n] != after[n])}


def sizes_of(config: Config) -> Sizes:
    g = config.gateway
    prefixes = sum(len(r.prefixes) for r in config.regions)
    return Sizes(flow_entries=g.flow_table_size, max_services=g.max_services, max_vms=g.max_vms,
                 max_regions=g.max_regions, max_prefixes=max(16, 2 * prefixes),
                 max_ports=max(16, 2 * len(config.vms) + 1), maglev_m=g.maglev_table_size, hash_seed=g.hash_seed,
                 new_flow_limit=g.new_flow_rate_limit, pin_dir=str(reach(g.pin_dir)))


def link_mac(name: str) -> str:
    """MAC address of an interface of this network namespace. An ioctl on a socket,
    not netlink: it runs on every move and every VM written, and opening a netlink
    socket each time costs milliseconds (sysfs would show the mount's namespace)."""
    ifindex(name)  # the one "no such interface" error
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            req = fcntl.ioctl(s.fileno(), _SIOCGIFHWADDR, struct.pack("256s", name.encode()))
        except OSError as exc:
            raise GatewayError(f"interface {name!r}: cannot read its MAC address: {exc.strerror}") from None
    return req[_IFHWADDR_OFF:_IFHWADDR_OFF + 6].hex(":")


def next_hop_mac(endpoint: IPAddress) -> str:
    """MAC of the next hop towards `endpoint`, from the kernel's routes and neighbours."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        routes = ipr.route("get", dst=str(endpoint))
        if not routes:
            raise GatewayError(f"no route to tunnel endpoint {endpoint}; set gateway.next_hop_mac")
        hop = routes[0].get_attr("RTA_GATEWAY") or str(endpoint)
        for neigh in ipr.get_neighbours(dst=hop):
            mac = neigh.get_attr("NDA_LLADDR")
            if mac:
                return mac
    raise GatewayError(f"next hop {hop} towards {endpoint} has no neighbour entry; set gateway.next_hop_mac")


class Gateway:
    """One gateway's dataplane and state. Methods are thread-safe."""

    def __init__(self, config: Config) -> None:
        self.tables: dict[int, np.ndarray] = {}
        self.last_rebuild: dict | None = None   # the last rebuild that swapped a table: when, how long
        self.events = GatewayEvents()            # probes, rebuilds, migrations: for the metrics
        self.offload_targets: dict[tuple[str, str], IPAddress] = {}
        self.next_hops: dict[IPAddress, tuple[str, float]] = {}   # endpoint -> (MAC, when resolved: monotonic s)
        self.lock = threading.RLock()
        self.dataplane: Dataplane | None = None
        self.fn = None
        self.attached_mode: str | None = None
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take `config` in place of the one given at construction; only before start
        (the daemon adds the services and VMs added at run time, which it reads from
        the store once in the gateway's network namespace). After start: reload."""
        if self.dataplane is not None:
            raise GatewayError("the dataplane is loaded: a new config is applied by reload")
        self.config = config
        self.sizes = sizes_of(config)
        self.region_ids = config.region_ids()
        self.service_ids = config.service_ids()
        vm_ids = config.vm_ids()
        self.vms = {v.name: VmRuntime.placed(v, vm_ids[v.name], Location.of(v), config) for v in config.vms}

    # ---- lifecycle -----------------------------------------------------
    def check_environment(self, config: Config | None = None) -> None:
        """Everything about `config` (default: the running one) that can be checked
        before anything is loaded, attached or reprogrammed."""
        config = config or self.config
        try:
            ifindex(config.gateway.interface)
        except AttachError as exc:
            raise ConfigError("gateway.interface", str(exc)) from None
        for i, vm in enumerate(config.vms):
            if forwarding(Location.of(vm), config).port:
                try:
                    ifindex(vm.port)
                except AttachError as exc:
                    raise ConfigError(f"vm[{i}].port", f"VM {vm.name!r}: {exc}") from None

    def start(self, reset: bool = False) -> float:
        """Compile, load, program and attach; returns the seconds it took.

        The state maps pinned by an earlier run of this gateway (flows,
        counters, offloads) are reused unless `reset`; so are the ids they are
        keyed by. Nothing is attached until everything is programmed."""
        t0 = time.monotonic()
        self.check_environment()
        pins = PinnedState(self.config.gateway.pin_dir)
        if reset:
            pins.reset()
        pins.open()
        try:
            pins.check_layout(self.sizes)
            self.region_ids, self.service_ids, vm_ids, fresh = self._assign_ids(pins, self.config)
        finally:
            pins.close()
        for name, vm in self.vms.items():
            vm.vm_id = vm_ids[name]
        bpf, self.fn = load(self.sizes)
        check_reused_maps(bpf, self.sizes)
        self.dataplane = Dataplane(bpf, self.sizes)
        for kind, ids in fresh.items():
            self.dataplane.zero_counters(kind, ids)
        self.program()
        self._adopt_offloads()
        self.attached_mode = attach(self.fn, self.config.gateway.interface, self.config.gateway.xdp_mode)
        return time.monotonic() - t0

    def _assign_ids(self, pins: PinnedState, c: Config) -> tuple[dict[str, int], dict[str, int], dict[str, int],
                                                                 dict[str, list[int]]]:
        """The pinned name -> id assignment for `c`'s regions, services and VMs (a
        known name keeps its id), and per kind the ids given to new names."""
        z = self.sizes
        region_ids, new_regions = pins.assign_ids("region", [r.name for r in c.regions], 1, z.max_regions)
        service_ids, new_services = pins.assign_ids("service", [s.name for s in c.services], 0, z.max_services - 1)
        vm_ids, new_vms = pins.assign_ids("vm", [v.name for v in c.vms], 1, z.max_vms)
        fresh = {"region": [region_ids[n] for n in new_regions], "service": [service_ids[n] for n in new_services],
                 "vm": [vm_ids[n] for n in new_vms]}
        return region_ids, service_ids, vm_ids, fresh

    def _adopt_offloads(self) -> None:
        """Offloads survive a restart; those of regions or services no longer configured go."""
        regions = {v: k for k, v in self.region_ids.items()}
        services = {v: k for k, v in self.service_ids.items()}
        for (rid, sid), target in self._dp().offloads().items():
            if rid in regions and sid in services:
                self.offload_targets[(regions[rid], services[sid])] = S.addr_from16(target.endpoint)
            else:
                self._dp().clear_offload(rid, sid)

    def stop(self) -> None:
        if self.attached_mode:
            detach(self.config.gateway.interface, self.attached_mode)
            self.attached_mode = None

    def program(self) -> None:
        dp = self._dp()
        with self.lock:
            dp.set_region_prefixes({net: self.region_ids[r.name] for r in self.config.regions for net in r.prefixes})
            dp.set_services([(s.vip, s.port, s.protocol, self.service_ids[s.name]) for s in self.config.services])
            for vm in self.vms.values():
                self._write_vm(vm)
            self._rebuild_tables()
            self._program_decap()

    def _program_decap(self) -> None:
        g = self.config.gateway
        self._dp().set_decap(list(g.decap_addresses), list(g.decap_from), g.gue_port)

    def _dp(self) -> Dataplane:
        if self.dataplane is None:
            raise GatewayError("the dataplane is not loaded")
        return self.dataplane

    # ---- reload --------------------------------------------------------
    def reload(self, config: Config, health: Mapping[str, str] | None = None) -> dict:
        """Take `config`'s regions, services and VMs while serving; its [gateway]
        table must be the running one (the daemon refuses other changes first).

        `health`: the health checks' verdict per VM under `config` (a VM left out:
        unknown). Everything is checked before the first map write, so a config
        that cannot be applied changes nothing. The writes are ordered so that no
        packet meets half a change: a VM is in place before a table names it, a
        service's table before its service entry, and a leaving VM or service
        leaves the tables and the service map before its own entries go. Names
        that stay keep their ids, so flows of unchanged VMs keep their VM.
        Returns the names added, removed and changed per kind."""
        health = health or {}
        with self.lock:
            self._check_capacity(config)
            self.check_environment(config)
            old_vms, old_config, old_sids = self.vms, self.config, set(self.service_ids.values())
            now = time.time()
            vms: dict[str, VmRuntime] = {}
            for v in config.vms:
                cur = old_vms.get(v.name)
                if cur is None:
                    rt = VmRuntime.placed(v, 0, Location.of(v), config)
                else:
                    # a VM keeps where moves took it unless the file now says otherwise
                    rt = dataclasses.replace(cur, config=v)
                    if Location.of(v) != Location.of(cur.config):
                        placed_rt = VmRuntime.placed(v, 0, Location.of(v), config)
                        rt.location, rt.port, rt.mac, rt.tunnel, rt.encap = (
                            placed_rt.location, placed_rt.port, placed_rt.mac, placed_rt.tunnel, placed_rt.encap)
                if rt.health != health.get(v.name, "unknown"):
                    rt.health, rt.health_since = health.get(v.name, "unknown"), now
                if cur is not None and rt.state != cur.state:
                    rt.since = now
                vms[v.name] = rt
            placed = {n for n, rt in vms.items() if n not in old_vms
                      or (rt.port, rt.mac, rt.tunnel, rt.encap) != (old_vms[n].port, old_vms[n].mac,
                                                                    old_vms[n].tunnel, old_vms[n].encap)}
            for name in placed:
                if vms[name].tunnel is not None:
                    self._tunnel(vms[name].tunnel)       # resolves the next hop: may refuse
            pins = PinnedState(config.gateway.pin_dir)
            pins.open()
            try:
                region_ids, service_ids, vm_ids, fresh = self._assign_ids(pins, config)
            finally:
                pins.close()
            for name, rt in vms.items():
                rt.vm_id = vm_ids[name]
            dp = self._dp()
            for kind, ids in fresh.items():
                dp.zero_counters(kind, ids)

            def write(group: list[VmRuntime]) -> None:
                # the placed VMs' locations in one batch (a start places every VM)
                locations = []
                for rt in group:
                    if rt.config.name in placed:
                        locations.append((rt.vm_id, self._location(rt), rt.state))
                    elif rt.state != old_vms[rt.config.name].state:
                        dp.set_vm_state(rt.vm_id, rt.state)
                dp.set_vms(locations)

            write([rt for rt in vms.values() if rt.state != "down"])
            self.config, self.vms, self.region_ids, self.service_ids = config, vms, region_ids, service_ids
            dp.set_region_prefixes({net: region_ids[r.name] for r in config.regions for net in r.prefixes})
            self._rebuild_tables()
            dp.set_services([(s.vip, s.port, s.protocol, service_ids[s.name]) for s in config.services])
            for sid in old_sids - set(service_ids.values()):
                dp.remove_maglev_table(sid)
                self.tables.pop(sid, None)
            write([rt for rt in vms.values() if rt.state == "down"])
            for name in old_vms.keys() - vms.keys():
                dp.clear_vm(old_vms[name].vm_id)
            self._release_unused_ports()
            self._program_decap()
            self.offload_targets = {}
            self._adopt_offloads()
            done = time.time()
            for name, rt in vms.items():
                if name in placed or name not in old_vms or rt.state != old_vms[name].state:
                    rt.tables_at = done
            return {kind: _name_diff(getattr(old_config, kind), getattr(config, kind))
                    for kind in ("regions", "services", "vms")}

    def _check_capacity(self, config: Config) -> None:
        """The compiled-in sizes of the running program must hold `config`'s prefixes and ports."""
        z = self.sizes
        for version in (4, 6):
            n = sum(net.version == version for r in config.regions for net in r.prefixes)
            if n > z.max_prefixes:
                raise ConfigError("region", f"{n} IPv{version} prefixes, more than the {z.max_prefixes} the running "
                                  "program holds; this needs a restart, not a reload")
        names = {v.name for v in config.vms}
        ports = {v.port for v in config.vms if v.port} | {vm.port for n, vm in self.vms.items()
                                                          if vm.port and n in names}
        if len(ports) >= z.max_ports:
            raise ConfigError("vm", f"{len(ports)} host ports, more than the {z.max_ports - 1} the running program "
                              "holds; this needs a restart, not a reload")

    # ---- VM locations --------------------------------------------------
    def _slot(self, port: str) -> int:
        """The port's devmap slot, pointing at the port's ifindex now (a re-created port has a new one)."""
        return self._dp().port_slots.allocate(port, ifindex(port))

    def _release_unused_ports(self, ports: set[str] | None = None) -> None:
        """Free the slots of ports no VM is behind any more, of `ports` (None: of every port):
        a move or its check frees only the port it is about, as the walk over every VM grows with the VMs."""
        slots = self._dp().port_slots
        held = set(slots.ports()) if ports is None else ports & set(slots.ports())
        if held:
            for port in held - {vm.port for vm in self.vms.values()}:
                slots.release(port)

    def _tunnel(self, endpoint: IPAddress, encap: str = "ipip") -> Tunnel:
        g = self.config.gateway
        source = g.tunnel_source if endpoint.version == 4 else g.tunnel_source6
        if source is None:
            key = "gateway.tunnel_source" if endpoint.version == 4 else "gateway.tunnel_source6"
            raise GatewayError(f"tunnel endpoint {endpoint} needs {key}")
        return Tunnel(endpoint, source, g.next_hop_mac or self._next_hop(endpoint), link_mac(g.interface), encap)

    def _next_hop(self, endpoint: IPAddress) -> str:
        """next_hop_mac(endpoint), reused for NEXT_HOP_TTL_S."""
        now = time.monotonic()
        mac, at = self.next_hops.get(endpoint, ("", -NEXT_HOP_TTL_S))
        if now - at >= NEXT_HOP_TTL_S:
            mac = next_hop_mac(endpoint)
            self.next_hops[endpoint] = (mac, now)
        return mac

    def _location(self, vm: VmRuntime) -> LocalPort | Tunnel:
        if vm.port:
            return LocalPort(self._slot(vm.port), vm.mac, link_mac(vm.port))
        return self._tunnel(vm.tunnel, vm.encap)

    def _write_vm(self, vm: VmRuntime) -> None:
        self._dp().set_vm(vm.vm_id, self._location(vm), vm.state)

    def _rebuild_tables(self, vms: set[str] | None = None) -> None:
        """Build the Maglev table of each service (of those with one of `vms`; all if None)
        from its active VMs, and swap it in, whole, if it changed. A table depends
        only on the active VMs' names and weights and the seed."""
        g = self.config.gateway
        t0 = time.perf_counter()
        build_s = 0.0
        swapped = []
        for s in self.config.services:
            if vms is not None and vms.isdisjoint(s.vms):
                continue
            sid = self.service_ids[s.name]
            backends = [(n, self.vms[n].vm_id, self.vms[n].config.weight) for n in s.vms
                        if self.vms[n].state == "active"]
            tb = time.perf_counter()
            table = build_table(backends, g.maglev_table_size, g.hash_seed)
            build_s += time.perf_counter() - tb
            if sid not in self.tables or not np.array_equal(self.tables[sid], table):
                self._dp().set_maglev_table(sid, table)
                self.tables[sid] = table
                swapped.append(s.name)
        if swapped:
            total_s = time.perf_counter() - t0
            self.last_rebuild = {"at": time.time(), "services": swapped, "build_ms": round(build_s * 1000, 3),
                                 "total_ms": round(total_s * 1000, 3)}
            self.events.maglev_swapped(swapped, total_s)

    def vm(self, name: str) -> VmRuntime:
        if name not in self.vms:
            raise UnknownName(f"unknown VM {name!r}")
        return self.vms[name]

    def move_vm(self, name: str, port: str | None = None, mac: str | None = None,
                tunnel: str | None = None, host: str | None = None, revision: int | None = None) -> dict:
        """Re-point a VM (live migration): only its location entry changes, so its flows follow it.
        `revision`: the store revision the new location comes from."""
        with self.lock:
            vm = self.vm(name)
            candidate, entry = self._placement(vm, port, mac, tunnel, host)
            self._dp().set_vm(vm.vm_id, entry, vm.state)
            left = {vm.port} if vm.port is not None and vm.port != candidate.port else set()
            vm.location, vm.port, vm.mac, vm.tunnel, vm.encap = candidate.location, candidate.port, candidate.mac, \
                candidate.tunnel, candidate.encap
            vm.revision = revision
            vm.moved_at = time.time()
            self._release_unused_ports(left)
            return vm.describe()

    def check_move(self, name: str, port: str | None = None, mac: str | None = None,
                   tunnel: str | None = None, host: str | None = None) -> Location:
        """The location a move would give the VM, checked as move_vm checks it, without a write."""
        with self.lock:
            candidate = self._placement(self.vm(name), port, mac, tunnel, host)[0]
            # checking gave the port a slot: a move that is then not applied must not keep it
            self._release_unused_ports({candidate.port} if candidate.port is not None else set())
            return candidate.location

    def _placement(self, vm: VmRuntime, port: str | None, mac: str | None, tunnel: str | None,
                   host: str | None) -> tuple[VmRuntime, LocalPort | Tunnel]:
        """The VM at its new location and the dataplane entry for it here; GatewayError if it cannot be."""
        name = vm.config.name
        if (port is None) == (tunnel is None):
            raise GatewayError("vm move: give exactly one of port or tunnel")
        if port is not None:
            new_mac = mac or vm.location.mac or vm.mac
            if new_mac is None:
                raise GatewayError(f"VM {name!r} moves to port {port} but has no MAC; give --mac")
            S.mac_bytes(new_mac)
            location = Location(host=host, port=port, mac=new_mac.lower())
        else:
            try:
                location = Location(tunnel=ipaddress.ip_address(tunnel))
            except ValueError:
                raise GatewayError(f"vm move: bad tunnel address {tunnel!r}") from None
        try:
            candidate = VmRuntime.placed(vm.config, vm.vm_id, location, self.config, admin_state=vm.admin_state)
        except LocationError as exc:
            raise GatewayError(f"VM {name!r}: {exc}") from None
        if candidate.port is not None:
            ifindex(candidate.port)
        return candidate, self._location(candidate)      # validates before the write

    def set_vm_state(self, name: str, state: str) -> dict:
        """The operator's (admin) state: active (`vm up`, clears a drain), draining, or
        down (an override that holds whatever the health checks say)."""
        with self.lock:
            vm = self.vm(name)
            if state not in ADMIN_STATES:
                raise GatewayError(f"VM {name!r}: state {state!r} must be one of {sorted(ADMIN_STATES)}")
            old = vm.state
            vm.admin_state = state
            self._apply([(vm, old)])
            return vm.describe()

    def set_vm_health(self, changes: dict[str, str]) -> list[dict]:
        """Health from the checks ({vm: up|down|unknown}), applied in one batch: one
        rebuild of the affected tables, however many VMs changed."""
        with self.lock:
            for name, health in changes.items():
                self.vm(name)
                if health not in HEALTH_STATES:
                    raise GatewayError(f"VM {name!r}: health {health!r} must be one of {list(HEALTH_STATES)}")
            now = time.time()
            changed = []
            for name, health in changes.items():
                vm = self.vms[name]
                if vm.health != health:
                    changed.append((vm, vm.state))
                    vm.health, vm.health_since = health, now
            self._apply(changed)
            return [vm.describe() for vm, _ in changed]

    def vm_list(self) -> list[dict]:
        """Every VM as `vm list` shows it, with the packets forwarded to it (all CPUs);
        under the lock, so a change is seen whole."""
        counts = self._dp().vm_counters()
        with self.lock:
            return [{**vm.describe(), "packets": int(counts[vm.vm_id, 0])} for vm in self.vms.values()]

    def record_probe(self, name: str, result: dict) -> None:
        """The latest probe result of a VM (for `vm list`); no lock: one attribute store."""
        vm = self.vms.get(name)
        if vm is not None:
            vm.last_probe = result

    def _apply(self, changed: list[tuple[VmRuntime, str]]) -> None:
        """Carry out effective-state changes (VM, its state before). Called with the lock held.

        The writes are ordered so that no new flow is ever given a VM that cannot
        take it: a leaving VM leaves the Maglev tables before it is marked down, a
        returning VM is usable before the tables name it."""
        dp = self._dp()
        now = time.time()
        moved = [(vm, old) for vm, old in changed if vm.state != old]
        for vm, _ in moved:
            vm.since = now
        returning = [vm for vm, old in moved if old == "down"]
        leaving = [vm for vm, old in moved if old != "down"]
        for vm in returning:
            dp.set_vm_state(vm.vm_id, vm.state)
        self._rebuild_tables({vm.config.name for vm, _ in moved})
        for vm in leaving:
            dp.set_vm_state(vm.vm_id, vm.state)
        done = time.time()
        for vm, _ in moved:
            vm.tables_at = done

    def maglev_tables(self) -> dict:
        """Per service: each VM's number of slots in the table the dataplane uses now
        (read back from the map), and a digest of that table written as VM names, so
        gateways that agree on every flow show equal digests even if they numbered
        their VMs differently."""
        by_id = {vm.vm_id: name for name, vm in self.vms.items()}
        names = sorted(by_id.values()) + ["none"]
        rank = {name: i for i, name in enumerate(names)}
        out = {}
        with self.lock:
            for s in self.config.services:
                table = self._dp().maglev_table(self.service_ids[s.name])
                if table is None:
                    out[s.name] = {"sha256": None, "slots": {}}
                    continue
                ids, inverse, counts = np.unique(table, return_inverse=True, return_counts=True)
                labels = [by_id.get(int(i), "none") for i in ids]
                as_names = np.array([rank[n] for n in labels], dtype=np.uint32)[inverse]
                digest = hashlib.sha256("\n".join(names).encode() + as_names.tobytes()).hexdigest()
                out[s.name] = {"sha256": digest, "slots": dict(zip(labels, (int(c) for c in counts)))}
        return out

    # ---- offload -------------------------------------------------------
    def _region_service(self, region: str, service: str) -> tuple[int, int]:
        if region not in self.region_ids:
            raise UnknownName(f"unknown region {region!r}")
        if service not in self.service_ids:
            raise UnknownName(f"unknown service {service!r}")
        return self.region_ids[region], self.service_ids[service]

    def set_offload(self, region: str, service: str, endpoint: str, encap: str = "ipip") -> dict:
        """New flows of the region to the service go to `endpoint` by `encap` ("ipip" or "gue")."""
        with self.lock:
            rid, sid = self._region_service(region, service)
            try:
                target = ipaddress.ip_address(endpoint)
            except ValueError:
                raise GatewayError(f"offload: bad endpoint address {endpoint!r}") from None
            if encap not in S.ENCAPS:
                raise GatewayError(f"offload: encap {encap!r} must be one of {', '.join(S.ENCAPS)}")
            self._dp().set_offload(rid, sid, self._tunnel(target, encap))
            self.offload_targets[(region, service)] = target
            return {"region": region, "service": service, "endpoint": str(target), "encap": encap}

    def clear_offload(self, region: str, service: str, now: bool = False) -> dict:
        """New flows of the region are served here again; flows already offloaded
        finish at the target, unless `now` (they then come home on their next packet)."""
        with self.lock:
            rid, sid = self._region_service(region, service)
            if not self._dp().clear_offload(rid, sid, forget=now):
                raise GatewayError(f"no offload for region {region!r} service {service!r}")
            self.offload_targets.pop((region, service), None)
            return {"region": region, "service": service}

    def offloads(self) -> list[dict]:
        region_names = {v: k for k, v in self.region_ids.items()}
        service_names = {v: k for k, v in self.service_ids.items()}
        return [{"region": region_names[r], "service": service_names[s],
                 "endpoint": str(S.addr_from16(t.endpoint)), "encap": S.ENCAP_NAMES[t.encap]}
                for (r, s), t in sorted(self._dp().offloads().items())]

    # ---- queries -------------------------------------------------------
    def region_of(self, address: IPAddress) -> str | None:
        best = None
        for r in self.config.regions:
            for net in r.prefixes:
                if address in net and (best is None or net.prefixlen > best[0]):
                    best = (net.prefixlen, r.name)
        return best[1] if best else None

    def flow_lookup(self, service: str, src: str, sport: int) -> dict:
        """Which VM this flow goes to, and why: the flow table, an offload, or a Maglev slot."""
        if service not in self.service_ids:
            raise UnknownName(f"unknown service {service!r}")
        try:
            address = ipaddress.ip_address(src)
        except ValueError:
            raise GatewayError(f"flow lookup: bad source address {src!r}") from None
        if not 0 <= sport <= 65535:
            raise GatewayError(f"flow lookup: source port {sport} out of range 0..65535")
        svc = self.config.service(service)
        if address.version != svc.vip.version:
            raise GatewayError(f"flow lookup: source {src} and VIP {svc.vip} are of different IP families")
        sid = self.service_ids[service]
        names = {vm.vm_id: name for name, vm in self.vms.items()}
        key = S.FlowKey(src=S.addr16(address), dst=S.addr16(svc.vip), sport=sport, dport=svc.port,
                        proto=PROTOCOLS[svc.protocol])
        with self.lock:
            entry = self._dp().flow(key)
            result = {"service": service, "src": f"{src}:{sport}", "region": self.region_of(address)}
            if entry is not None and entry.vm_id in names and self.vms[names[entry.vm_id]].state != "down":
                return {**result, "vm": names[entry.vm_id], "reason": "flow table"}
            if entry is not None and entry.vm_id & S.FLOW_OFFLOADED:
                endpoint = self._dp().offload_endpoints().get(entry.vm_id & ~S.FLOW_OFFLOADED)
                if endpoint is not None:
                    return {**result, "vm": None,
                            "reason": f"flow table: offloaded to {S.addr_from16(endpoint.endpoint)}"}
            target = self.offload_targets.get((result["region"], service))
            if target is not None:
                return {**result, "vm": None, "reason": f"region offload to {target}"}
            g = self.config.gateway
            slot = maglev_slot(str(address), sport, svc.port, PROTOCOLS[svc.protocol], g.hash_seed,
                               g.maglev_table_size)
            vm_id = int(self.tables[sid][slot])
            return {**result, "vm": names.get(vm_id), "reason": f"maglev slot {slot}"}

    def counters(self, count_flows: bool = True) -> dict:
        """Raw cumulative counters in the shape of `xdpgw stats --json`.

        The flow entries are the kernel's count, which costs the same at any
        table size; where the kernel keeps none, counting means walking the
        whole table, done only with count_flows (else the entries are None)."""
        dp = self._dp()
        regions = dp.region_counters()
        services = dp.service_counters()
        vms = dp.vm_counters()
        stats = dp.stats()
        with self.lock:
            out = {
                "regions": {"unknown": {"packets": int(regions[0, 0]), "bytes": int(regions[0, 1])}},
                "services": {}, "vms": {}, "drops": dp.drop_counters(),
                "flows": {"entries": dp.flow_count(walk=count_flows),
                          "hits": stats["flow_hits"], "misses": stats["flow_misses"]},
                "datapath": stats,
            }
            for name, rid in self.region_ids.items():
                out["regions"][name] = {"packets": int(regions[rid, 0]), "bytes": int(regions[rid, 1])}
            for name, sid in self.service_ids.items():
                p, b, n = (int(x) for x in services[sid])
                out["services"][name] = {"packets": p, "bytes": b, "new_flows": n}
            for name, vm in self.vms.items():
                out["vms"][name] = {"packets": int(vms[vm.vm_id, 0]), "bytes": int(vms[vm.vm_id, 1]),
                                    "state": vm.state, **vm.status()}
        return out


"""The rules of a gateway config: `validate` checks every value and the relations
between entries and returns the config normalized (MACs lowercase, sequences as
tuples, seconds as float); and the value checks and parsers that the TOML layer
(control/config/toml.py) and the center's config share."""

import dataclasses
import ipaddress
import json
import math
import os
import re
from typing import Any, TypeVar

from control.config.schema import (ENCAPS, ENTRY_NAME, GATEWAY_NAME, HEALTH_KINDS, PROTOCOLS, XDP_MODES,
                                   AgentConfig, CenterLinkConfig, Config, ConfigError, GatewayConfig, HealthConfig,
                                   HostConfig, IPAddress, IPNetwork, MetricsConfig, MonitorConfig, RegionConfig, ServiceConfig,
                                   StoreConfig, VMConfig)
from control.maglev import is_prime
from dataplane.structs import DECAP_ADDRESSES, DECAP_PREFIXES

_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_IFNAMSIZ = 16  # including the terminating NUL
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

_T = TypeVar("_T")


# ---------------------------------------------------------------- validation


def validate(config: Config) -> Config:
    """Check every value and cross-reference of `config`; return it normalized.

    Raises ConfigError for the first problem found.
    """
    gateway = _check_gateway(_instance(config.gateway, "gateway", GatewayConfig))
    regions = tuple(
        _check_region(r, f"region[{i}]") for i, r in enumerate(_entries(config.regions, "region", RegionConfig))
    )
    services = tuple(
        _check_service(s, f"service[{i}]")
        for i, s in enumerate(_entries(config.services, "service", ServiceConfig))
    )
    vms = tuple(_check_vm(v, f"vm[{i}]") for i, v in enumerate(_entries(config.vms, "vm", VMConfig)))
    for entries, section in ((regions, "region"), (services, "service"), (vms, "vm")):
        check_unique_names(entries, section)
    _check_region_prefixes(regions)
    _check_service_relations(services, vms)
    _check_vm_relations(gateway, vms)
    _check_capacity(gateway, regions, services, vms)
    monitor = None if config.monitor is None else \
        _check_monitor(_instance(config.monitor, "monitor", MonitorConfig), regions, services)
    if monitor is None:
        for i, r in enumerate(regions):
            for key in _THRESHOLDS:
                if getattr(r, key) is not None:
                    raise ConfigError(f"{_named('region', i, r)}.{key}", "needs a [monitor] table")
    center = None if config.center is None else _check_center(_instance(config.center, "center", CenterLinkConfig))
    agent = None if config.agent is None else _check_agent(_instance(config.agent, "agent", AgentConfig))
    gateway, hosts = _check_hosts(config.hosts, gateway, vms)
    metrics = None if config.metrics is None else check_metrics(_instance(config.metrics, "metrics", MetricsConfig))
    store = None if config.store is None else check_store(_instance(config.store, "store", StoreConfig))
    return Config(gateway, regions, services, vms, monitor, center, agent, hosts=hosts, metrics=metrics, store=store)


def _check_hosts(hosts: Any, gateway: GatewayConfig,
                 vms: tuple[VMConfig, ...]) -> tuple[GatewayConfig, tuple[HostConfig, ...]]:
    """[[host]] entries and the migration keys of [gateway] and [[vm]]."""
    lists = {}
    for key in ("vm_ports", "orchestrator", "hosts"):
        lists[key] = _sequence(getattr(gateway, key), f"gateway.{key}")
        for i, value in enumerate(lists[key]):
            if not check_str(value, f"gateway.{key}[{i}]") or "\0" in value:
                raise ConfigError(f"gateway.{key}[{i}]", "must be a non-empty string")
    check_str(gateway.registry, "gateway.registry")
    for i, v in enumerate(vms):
        if v.tenant is not None:
            check_match(v.tenant, f"{_named('vm', i, v)}.tenant", ENTRY_NAME, "tenant name")
    hosts = _entries(hosts, "host", HostConfig)
    check_unique_names(hosts, "host")
    checked = []
    for i, h in enumerate(hosts):
        here = f"host[{i}]"
        check_match(h.name, f"{here}.name", ENTRY_NAME, "name")
        ports = _sequence(h.ports, f"{here}.ports")
        for j, port in enumerate(ports):
            if not check_str(port, f"{here}.ports[{j}]"):
                raise ConfigError(f"{here}.ports[{j}]", "must be a non-empty string")
        check_int(h.capacity, f"{here}.capacity", 1, 1 << 20)
        for key, version in (("endpoint", 4), ("endpoint6", 6)):
            if getattr(h, key) is not None:
                _address(getattr(h, key), f"{here}.{key}", version)
        _choice(h.encap, f"{here}.encap", ENCAPS)
        checked.append(dataclasses.replace(h, ports=ports))
    _check_locations(gateway, lists["hosts"], tuple(checked), vms)
    hold = _seconds(gateway.migration_hold_down, "gateway.migration_hold_down", 3600.0)
    check_int(gateway.history_rows, "gateway.history_rows", 1, 1 << 24)
    max_age = check_number(gateway.history_max_age, "gateway.history_max_age", "a number of seconds (0: no limit)")
    if max_age != 0:
        max_age = _seconds(max_age, "gateway.history_max_age", 100 * 365 * 86400.0)
    return (dataclasses.replace(gateway, migration_hold_down=hold, history_max_age=float(max_age), **lists),
            tuple(checked))


def _check_locations(gateway: GatewayConfig, own: tuple[str, ...], hosts: tuple[HostConfig, ...],
                     vms: tuple[VMConfig, ...]) -> None:
    """gateway.hosts names [[host]] entries; a VM on a host is at (host, port), and
    a host this gateway does not own is reached through its endpoint."""
    by_name = {h.name: h for h in hosts}
    for i, name in enumerate(own):
        if name not in by_name:
            raise ConfigError(f"gateway.hosts[{i}]", f"{quote(name)} is not the name of a [[host]]")
    for i, vm in enumerate(vms):
        if vm.host is None:
            continue
        here = _named("vm", i, vm)
        if check_str(vm.host, f"{here}.host") not in by_name:
            raise ConfigError(f"{here}.host", f"{quote(vm.host)} is not the name of a [[host]]")
        if vm.port is None:
            raise ConfigError(f"{here}.port", "missing; a VM on a host is at (host, port)")
        h = by_name[vm.host]
        if vm.host not in own:
            j = hosts.index(h)
            if h.endpoint is None and h.endpoint6 is None:
                raise ConfigError(f"host[{j}].endpoint", f"missing; VM {quote(vm.name)} is on host {quote(h.name)}, "
                                  "which this gateway does not own (gateway.hosts), so it needs a tunnel endpoint")
            needed = "tunnel_source" if h.endpoint is not None else "tunnel_source6"
            if getattr(gateway, needed) is None:
                raise ConfigError(f"gateway.{needed}", f"missing; host {quote(h.name)}'s endpoint needs it")


_THRESHOLDS = ("heavy_pps", "heavy_bps", "clear_pps", "clear_bps")


def _rate(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if not (math.isfinite(check_number(value, path)) and value > 0):
        raise ConfigError(path, f"{value} is not a positive rate")
    return float(value)


def _check_thresholds(entry: Any, path: str) -> dict[str, float | None]:
    values = {key: _rate(getattr(entry, key), f"{path}.{key}") for key in _THRESHOLDS}
    for unit in ("pps", "bps"):
        heavy, clear = values[f"heavy_{unit}"], values[f"clear_{unit}"]
        if clear is not None and heavy is not None and clear > heavy:
            raise ConfigError(f"{path}.clear_{unit}", f"{clear:g} is above heavy_{unit} ({heavy:g})")
    return values


def _check_monitor(m: MonitorConfig, regions: tuple[RegionConfig, ...],
                   services: tuple[ServiceConfig, ...]) -> MonitorConfig:
    interval = _seconds(m.interval, "monitor.interval", 3600.0)
    values = _check_thresholds(m, "monitor")
    check_int(m.intervals, "monitor.intervals", 1, 100)
    smoothing = m.smoothing
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 < smoothing <= 1:
        raise ConfigError("monitor.smoothing", f"{smoothing!r} is not a number in (0, 1]")
    names = _sequence(m.services, "monitor.services")
    known = {s.name for s in services}
    for i, name in enumerate(names):
        if check_str(name, f"monitor.services[{i}]") not in known:
            raise ConfigError(f"monitor.services[{i}]", f"unknown service {quote(name)}")
    for i, r in enumerate(regions):
        here = _named("region", i, r)
        own = _check_thresholds(r, here)
        for unit in ("pps", "bps"):
            heavy = own[f"heavy_{unit}"] or values[f"heavy_{unit}"]
            clear = own[f"clear_{unit}"] or values[f"clear_{unit}"]
            if clear is not None and heavy is None:
                raise ConfigError(f"{here}.clear_{unit}" if own[f"clear_{unit}"] else f"monitor.clear_{unit}",
                                  f"set without a heavy_{unit}")
            if clear is not None and heavy is not None and clear > heavy:
                raise ConfigError(f"{here}.clear_{unit}" if own[f"clear_{unit}"] else f"{here}.heavy_{unit}",
                                  f"clear_{unit} {clear:g} is above heavy_{unit} {heavy:g}")
    if values["heavy_pps"] is None and values["heavy_bps"] is None and \
            not any(r.heavy_pps is not None or r.heavy_bps is not None for r in regions):
        raise ConfigError("monitor", "no threshold: set heavy_pps or heavy_bps (here or on a [[region]])")
    return dataclasses.replace(m, interval=interval, smoothing=float(smoothing), services=names, **values)


def _check_center(c: CenterLinkConfig) -> CenterLinkConfig:
    url = check_str(c.url, "center.url")
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise ConfigError("center.url", f"{quote(url)} is not an http:// or https:// URL")
    if not check_str(c.token, "center.token"):
        raise ConfigError("center.token", "must not be empty")
    timeout = _seconds(c.timeout, "center.timeout", 600.0)
    if c.cafile is not None and not os.path.isfile(check_str(c.cafile, "center.cafile")):
        raise ConfigError("center.cafile", f"{quote(c.cafile)} is not a file")
    return dataclasses.replace(c, url=url.rstrip("/"), timeout=timeout)


def _check_agent(a: AgentConfig) -> AgentConfig:
    check_str(a.listen, "agent.listen")
    if not check_str(a.token, "agent.token"):
        raise ConfigError("agent.token", "must not be empty")
    if (a.tls_cert is None) != (a.tls_key is None):
        raise ConfigError("agent.tls_cert" if a.tls_cert is None else "agent.tls_key",
                          "tls_cert and tls_key go together")
    if a.tls_ca is not None and a.tls_cert is None:
        raise ConfigError("agent.tls_ca", "needs tls_cert and tls_key: client certificates are checked over TLS")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(a, key)
        if value is not None and not os.path.isfile(check_str(value, f"agent.{key}")):
            raise ConfigError(f"agent.{key}", f"{quote(value)} is not a file")
    check_listener(a.listen, "agent.listen", a.tls_cert is not None, a.insecure, "agent.insecure",
                   "set agent.tls_cert/tls_key, or insecure = true")
    return a


def check_listener(listen: str, key: str, tls: bool, insecure: Any, insecure_key: str, remedy: str) -> None:
    """A listener that others call with a token (an agent, the center): on a non-loopback
    address it serves TLS, unless `insecure` is true in so many words. `remedy` says how."""
    if not isinstance(insecure, bool):
        raise ConfigError(insecure_key, f"must be true or false, got {describe(insecure)}")
    host, _ = parse_listen(listen, key)
    if not tls and not insecure and not ipaddress.ip_address(host).is_loopback:
        raise ConfigError(key, f"{listen} is not a loopback address: {remedy}")


def check_store(s: StoreConfig, base: str | None = None) -> StoreConfig:
    """[store] of the gateway's config and of the center's; file paths relative to `base`
    (the config file's directory) when given."""
    from control.store import parse_url  # the store package reads its own URLs

    try:
        kind, _ = parse_url(check_str(s.url, "store.url"))
    except ValueError as exc:
        raise ConfigError("store.url", str(exc)) from None
    paths = {}
    for key in ("ca", "cert", "key", "user", "password_file"):
        value = getattr(s, key)
        if value is None:
            continue
        if kind != "etcd":
            raise ConfigError(f"store.{key}", "only for an etcd:// url")
        if not check_str(value, f"store.{key}"):
            raise ConfigError(f"store.{key}", "must not be empty")
        if key != "user":
            paths[key] = os.path.join(base, value) if base is not None else value
            if not os.path.isfile(paths[key]):
                raise ConfigError(f"store.{key}", f"{quote(value)} is not a file")
    for one, other in (("cert", "key"), ("key", "cert"), ("user", "password_file"), ("password_file", "user")):
        if getattr(s, one) is not None and getattr(s, other) is None:
            raise ConfigError(f"store.{other}", f"missing; store.{one} needs it")
    return dataclasses.replace(s, **paths)


def check_metrics(m: MetricsConfig) -> MetricsConfig:
    """[metrics] of the gateway's config and of the center's."""
    parse_listen(check_str(m.listen, "metrics.listen"), "metrics.listen")
    return m


def _check_gateway(g: GatewayConfig) -> GatewayConfig:
    check_match(g.name, "gateway.name", GATEWAY_NAME, "gateway name (1-15 of a-z, 0-9, -)")
    _ifname(g.interface, "gateway.interface")
    netns = check_str(g.netns, "gateway.netns")
    if netns and (netns in (".", "..") or "/" in netns or "\0" in netns):
        raise ConfigError("gateway.netns", f"{quote(netns)} is not a network namespace name")
    _choice(g.xdp_mode, "gateway.xdp_mode", XDP_MODES)
    if g.tunnel_source is not None:
        _address(g.tunnel_source, "gateway.tunnel_source", version=4)
    if g.tunnel_source6 is not None:
        _address(g.tunnel_source6, "gateway.tunnel_source6", version=6)
    next_hop_mac = None if g.next_hop_mac is None else _unicast_mac(g.next_hop_mac, "gateway.next_hop_mac")
    _socket_path(g.api_socket, "gateway.api_socket")
    pin_dir = check_str(g.pin_dir, "gateway.pin_dir")
    if not pin_dir.startswith("/sys/fs/bpf/") or "\0" in pin_dir or "/../" in pin_dir + "/":
        raise ConfigError("gateway.pin_dir", f"{quote(pin_dir)} is not a directory under /sys/fs/bpf/")
    check_int(g.flow_table_size, "gateway.flow_table_size", 1024, 1 << 24)
    # Maglev's permutation (offset + j*skip mod M) visits every slot only when M is prime.
    if not is_prime(check_int(g.maglev_table_size, "gateway.maglev_table_size", 251, 1000003)):
        raise ConfigError("gateway.maglev_table_size", f"{g.maglev_table_size} is not prime")
    check_int(g.hash_seed, "gateway.hash_seed", 0, (1 << 32) - 1)
    check_int(g.new_flow_rate_limit, "gateway.new_flow_rate_limit", 0, 1 << 32)
    check_int(g.max_services, "gateway.max_services", 1, 4096)
    check_int(g.max_vms, "gateway.max_vms", 1, 65535)
    check_int(g.max_regions, "gateway.max_regions", 1, 65535)
    interval = check_number(g.stats_interval, "gateway.stats_interval", "a number of seconds")
    if not (math.isfinite(interval) and interval > 0):
        raise ConfigError("gateway.stats_interval", f"{interval} is not a positive number of seconds")
    check_int(g.gue_port, "gateway.gue_port", 1, 65535)
    return dataclasses.replace(g, next_hop_mac=next_hop_mac, stats_interval=float(interval), **_check_decap(g))


def _check_decap(g: GatewayConfig) -> dict[str, tuple]:
    """gateway.decap_addresses / decap_from as addresses / prefixes (text is parsed:
    TOML gives strings), within the dataplane's map sizes."""
    addresses = tuple(parse_address(a, f"gateway.decap_addresses[{i}]") if isinstance(a, str) else a
                      for i, a in enumerate(_sequence(g.decap_addresses, "gateway.decap_addresses")))
    for i, a in enumerate(addresses):
        _address(a, f"gateway.decap_addresses[{i}]")
    if len(set(addresses)) != len(addresses):
        raise ConfigError("gateway.decap_addresses", "lists an address twice")
    if len(addresses) > DECAP_ADDRESSES:
        raise ConfigError("gateway.decap_addresses", f"{len(addresses)} addresses, at most {DECAP_ADDRESSES}")
    prefixes = tuple(parse_prefix(n, f"gateway.decap_from[{i}]") if isinstance(n, str) else n
                     for i, n in enumerate(_sequence(g.decap_from, "gateway.decap_from")))
    for i, n in enumerate(prefixes):
        if not isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise ConfigError(f"gateway.decap_from[{i}]", f"expected an IP network, got {describe(n)}")
    for version in (4, 6):
        if sum(n.version == version for n in prefixes) > DECAP_PREFIXES:
            raise ConfigError("gateway.decap_from", f"more than {DECAP_PREFIXES} IPv{version} prefixes")
    if addresses and not prefixes:
        raise ConfigError("gateway.decap_from", "missing; gateway.decap_addresses needs the trusted sources "
                          "(a tunnel is not an open relay)")
    return {"decap_addresses": addresses, "decap_from": prefixes}


def _check_region(r: RegionConfig, path: str) -> RegionConfig:
    check_match(r.name, f"{path}.name", ENTRY_NAME, "name")
    prefixes = _sequence(r.prefixes, f"{path}.prefixes")
    if not prefixes:
        raise ConfigError(f"{path}.prefixes", "must not be empty")
    for i, network in enumerate(prefixes):
        if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise ConfigError(f"{path}.prefixes[{i}]", f"expected an IP network, got {describe(network)}")
    return dataclasses.replace(r, prefixes=prefixes)


def _check_service(s: ServiceConfig, path: str) -> ServiceConfig:
    check_match(s.name, f"{path}.name", ENTRY_NAME, "name")
    _address(s.vip, f"{path}.vip")
    check_int(s.port, f"{path}.port", 1, 65535)
    _choice(s.protocol, f"{path}.protocol", PROTOCOLS)
    vms = _sequence(s.vms, f"{path}.vms")
    if not vms:
        raise ConfigError(f"{path}.vms", "must not be empty")
    for i, name in enumerate(vms):
        check_str(name, f"{path}.vms[{i}]")
    health = None if s.health is None else _check_health(_instance(s.health, f"{path}.health", HealthConfig),
                                                          f"{path}.health")
    return dataclasses.replace(s, vms=vms, health=health)


_HTTP_PATH = re.compile(r"/[!-~]*")  # printable ASCII, no spaces: it goes into the request line


def _check_health(h: HealthConfig, path: str) -> HealthConfig:
    _choice(h.kind, f"{path}.kind", HEALTH_KINDS)
    interval = _seconds(h.interval, f"{path}.interval", 3600.0)
    timeout = _seconds(h.timeout, f"{path}.timeout", 3600.0)
    if timeout > interval:
        raise ConfigError(f"{path}.timeout", f"{timeout} is longer than the interval ({interval})")
    check_int(h.rise, f"{path}.rise", 1, 100)
    check_int(h.fall, f"{path}.fall", 1, 100)
    if h.port is not None:
        check_int(h.port, f"{path}.port", 1, 65535)
    if h.path is not None:
        if h.kind != "http":
            raise ConfigError(f"{path}.path", f'only for kind "http", not {quote(h.kind)}')
        if not _HTTP_PATH.fullmatch(check_str(h.path, f"{path}.path")):
            raise ConfigError(f"{path}.path", f"{quote(h.path)} is not a URL path (starts with /, no spaces)")
    if h.payload is not None:
        if h.kind != "udp":
            raise ConfigError(f"{path}.payload", f'only for kind "udp", not {quote(h.kind)}')
        if not 0 < len(check_str(h.payload, f"{path}.payload").encode()) <= 1024:
            raise ConfigError(f"{path}.payload", "must be 1 to 1024 bytes of UTF-8")
    return dataclasses.replace(h, interval=interval, timeout=timeout)


def _seconds(value: Any, path: str, high: float) -> float:
    if not (math.isfinite(check_number(value, path, "a number of seconds")) and 0 < value <= high):
        raise ConfigError(path, f"{value} is not a number of seconds in (0, {high:g}]")
    return float(value)


def _check_vm(v: VMConfig, path: str) -> VMConfig:
    check_match(v.name, f"{path}.name", ENTRY_NAME, "name")
    if v.port is not None:
        _ifname(v.port, f"{path}.port")
    mac = None if v.mac is None else _unicast_mac(v.mac, f"{path}.mac")
    ips = _sequence(v.ips, f"{path}.ips")
    for j, address in enumerate(ips):
        _address(address, f"{path}.ips[{j}]")
        if address in ips[:j]:
            raise ConfigError(f"{path}.ips[{j}]", f"{address} is listed twice")
    if v.tunnel is not None:
        _address(v.tunnel, f"{path}.tunnel")
    # Weights are relative Maglev shares; a u16 bound (as in Cilium) keeps them sane.
    check_int(v.weight, f"{path}.weight", 0, 65535)
    return dataclasses.replace(v, mac=mac, ips=ips)


def check_unique_names(entries: tuple[Any, ...], section: str) -> None:
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.name in first:
            raise ConfigError(
                f"{section}[{i}].name",
                f"duplicate {section} name {quote(entry.name)} (also {section}[{first[entry.name]}])",
            )
        first[entry.name] = i


def _check_region_prefixes(regions: tuple[RegionConfig, ...]) -> None:
    # Equal prefixes would make the LPM answer depend on write order; nested ones are fine.
    owner: dict[IPNetwork, int] = {}
    for i, region in enumerate(regions):
        for network in region.prefixes:
            if network in owner:
                j = owner[network]
                where = "listed twice" if j == i else f"also in {_named('region', j, regions[j])}"
                raise ConfigError(f"{_named('region', i, region)}.prefixes", f"{network} is {where}")
            owner[network] = i


def _check_service_relations(services: tuple[ServiceConfig, ...], vms: tuple[VMConfig, ...]) -> None:
    vm_names = {v.name for v in vms}
    vm_index = {v.name: i for i, v in enumerate(vms)}
    first: dict[tuple[IPAddress, int, str], int] = {}
    for i, service in enumerate(services):
        here = _named("service", i, service)
        j = first.setdefault((service.vip, service.port, service.protocol), i)
        if j != i:
            raise ConfigError(
                here,
                f"same vip, port and protocol ({service.vip}, {service.port}, {service.protocol})"
                f" as {_named('service', j, services[j])}",
            )
        listed: set[str] = set()
        for name in service.vms:
            if name not in vm_names:
                raise ConfigError(f"{here}.vms", f"unknown VM {quote(name)}")
            if name in listed:
                raise ConfigError(f"{here}.vms", f"VM {quote(name)} is listed twice")
            listed.add(name)
            # Health checks probe the VM's own address of the VIP's family, also behind a tunnel.
            version = service.vip.version
            if service.health is not None and vms[vm_index[name]].address(version) is None:
                j = vm_index[name]
                raise ConfigError(f"{_named('vm', j, vms[j])}.ips",
                                  f"no IPv{version} address; the health check of {here} (VIP {service.vip}) "
                                  "probes the VM at one")


def _check_vm_relations(gateway: GatewayConfig, vms: tuple[VMConfig, ...]) -> None:
    # Migration is detected by a VM's MAC showing up on a port: MACs must identify VMs,
    # and an announced address must name one VM.
    mac_owner: dict[str, int] = {}
    ip_owner: dict[IPAddress, int] = {}
    for i, vm in enumerate(vms):
        here = _named("vm", i, vm)
        if vm.port is not None and vm.tunnel is not None:
            raise ConfigError(here, "has both port and tunnel; set exactly one")
        if vm.port is None and vm.tunnel is None:
            raise ConfigError(here, "has neither port nor tunnel; set exactly one")
        if vm.port is not None and vm.mac is None:
            raise ConfigError(f"{here}.mac", "missing; required with port")
        if vm.tunnel is not None:
            needed = "tunnel_source" if vm.tunnel.version == 4 else "tunnel_source6"
            if getattr(gateway, needed) is None:
                raise ConfigError(
                    f"{here}.tunnel",
                    f"IPv{vm.tunnel.version} endpoint {vm.tunnel} needs gateway.{needed}, which is not set",
                )
        if vm.mac is not None:
            j = mac_owner.setdefault(vm.mac, i)
            if j != i:
                raise ConfigError(f"{here}.mac", f"{vm.mac} is also the MAC of {_named('vm', j, vms[j])}")
        for k, address in enumerate(vm.ips):
            j = ip_owner.setdefault(address, i)
            if j != i:
                raise ConfigError(f"{here}.ips[{k}]", f"{address} is also an address of {_named('vm', j, vms[j])}")


def _check_capacity(
    gateway: GatewayConfig,
    regions: tuple[RegionConfig, ...],
    services: tuple[ServiceConfig, ...],
    vms: tuple[VMConfig, ...],
) -> None:
    # The max_* values size BPF maps, which cannot grow once created.
    for key, entries, section in (
        ("max_regions", regions, "region"),
        ("max_services", services, "service"),
        ("max_vms", vms, "vm"),
    ):
        limit = getattr(gateway, key)
        if len(entries) > limit:
            raise ConfigError(f"gateway.{key}", f"{limit} is less than the {len(entries)} [[{section}]] entries")
    for i, service in enumerate(services):
        if len(service.vms) >= gateway.maglev_table_size:
            raise ConfigError(
                "gateway.maglev_table_size",
                f"{gateway.maglev_table_size} is not larger than the {len(service.vms)} VMs"
                f" of {_named('service', i, service)}",
            )


# ---------------------------------------------------------------- value checks


def _instance(value: Any, path: str, cls: type[_T]) -> _T:
    if not isinstance(value, cls):
        raise ConfigError(path, f"expected a {cls.__name__}, got {describe(value)}")
    return value


def _entries(value: Any, section: str, cls: type[_T]) -> tuple[_T, ...]:
    return tuple(_instance(e, f"{section}[{i}]", cls) for i, e in enumerate(_sequence(value, section)))


def _sequence(value: Any, path: str) -> tuple[Any, ...]:
    # Lists are accepted from Python callers and stored as tuples, so configs stay hashable.
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected an array, got {describe(value)}")
    return tuple(value)


def check_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {describe(value)}")
    return value


def check_int(value: Any, path: str, low: int | None = None, high: int | None = None) -> int:
    """An integer, in low..high when those are given."""
    # bool is a subclass of int: `port = true` must not pass as port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {describe(value)}")
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigError(path, f"{value} is out of range {low}..{high}")
    return value


def check_number(value: Any, path: str, what: str = "a number") -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected {what}, got {describe(value)}")
    return value


def check_match(value: Any, path: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(check_str(value, path)):
        raise ConfigError(path, f"{quote(value)} is not a valid {what}")


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> None:
    if check_str(value, path) not in choices:
        raise ConfigError(path, f"{quote(value)} is not one of {', '.join(choices)}")


def _ifname(value: Any, path: str) -> None:
    # The kernel's dev_valid_name(): < IFNAMSIZ bytes, not "." or "..", no '/', ':' or space.
    name = check_str(value, path)
    if (
        not 0 < len(name.encode()) < _IFNAMSIZ
        or name in (".", "..")
        or any(c in "/:\0" or c.isspace() for c in name)
    ):
        raise ConfigError(path, f"{quote(name)} is not a valid interface name")


def _unicast_mac(value: Any, path: str) -> str:
    mac = check_str(value, path)
    if not _MAC.fullmatch(mac):
        raise ConfigError(path, f"{quote(mac)} is not a MAC address (six hex octets separated by ':')")
    mac = mac.lower()
    # The I/G bit (lowest bit of the first octet) marks group addresses, broadcast included.
    if int(mac[:2], 16) & 1:
        raise ConfigError(path, f"{mac} is a multicast or broadcast MAC; a unicast MAC is needed")
    if mac == "00:00:00:00:00:00":
        raise ConfigError(path, f"{mac} is the all-zero MAC; a unicast MAC is needed")
    return mac


def _address(value: Any, path: str, version: int | None = None) -> None:
    expected = f"an IPv{version} address" if version else "an IP address"
    if not isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) or version not in (None, value.version):
        raise ConfigError(path, f"expected {expected}, got {describe(value)}")
    # The dataplane keys IPv4 as IPv4-mapped IPv6, so such an address would alias an IPv4 one.
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        raise ConfigError(path, f"{value} is IPv4-mapped; write it as {value.ipv4_mapped}")


def _socket_path(value: Any, path: str) -> None:
    socket_path = check_str(value, path)
    if not socket_path.startswith("/") or "\0" in socket_path:
        raise ConfigError(path, f"{quote(socket_path)} is not an absolute path")
    if len(socket_path.encode()) > _SUN_PATH_MAX:
        raise ConfigError(path, f"{quote(socket_path)} is longer than the {_SUN_PATH_MAX} bytes of a socket path")




# ---------------------------------------------------------------- parsers


def parse_address(value: Any, path: str) -> IPAddress:
    # ip_address() also takes integers; a config address must be written as text.
    if not isinstance(value, str):
        raise ConfigError(path, f"expected an IP address string, got {describe(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(path, f"{quote(value)} is not an IPv4 or IPv6 address") from None


def parse_prefix(value: Any, path: str) -> IPNetwork:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a CIDR prefix string, got {describe(value)}")
    try:
        return ipaddress.ip_network(value)
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(path, f"{quote(value)} is not an IPv4 or IPv6 CIDR prefix") from None
    raise ConfigError(path, f"{quote(value)} has host bits set (the prefix is {network})")


def split_addr_port(text: str) -> tuple[str, int]:
    """"ADDR:PORT" or "[ADDR6]:PORT" -> (ADDR, PORT) with PORT in 0..65535; ValueError
    otherwise. ADDR is not checked: the caller does, and names the culprit key or flag."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"{text!r} is not ADDR:PORT or [ADDR6]:PORT")
    return host, int(port)


def parse_listen(text: str, path: str) -> tuple[str, int]:
    """"ADDR:PORT" or "[ADDR6]:PORT" -> (address, port); ConfigError naming `path` otherwise."""
    try:
        host, port = split_addr_port(text)
        ipaddress.ip_address(host)
    except ValueError:
        host, port = "", 0
    if port == 0:
        raise ConfigError(path, f"{quote(text)} is not ADDR:PORT or [ADDR6]:PORT (port 1..65535)")
    return host, port


# ---------------------------------------------------------------- text


def quote(text: str) -> str:
    # JSON escaping (ASCII only) keeps any value on one line of an error message.
    return json.dumps(text)


def _named(section: str, index: int, entry: Any) -> str:
    return f"{section}[{index}] {quote(entry.name)}"


def describe(value: Any) -> str:
    """The TOML type of a wrong value, and the value when it is short."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return f"IPv{value.version} address {value}"
    return type(value).__name__



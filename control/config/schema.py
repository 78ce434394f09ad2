"""Gateway configuration: TOML (stdlib tomllib) into frozen dataclasses, validated.

Two layers, so that a config built in Python gets exactly the checks a file gets:

* the TOML layer (`parse_config`, `load_config`) checks the document's shape
  (unknown and missing keys, tables vs arrays) and turns address and prefix
  strings into `ipaddress` objects;
* `validate` checks every value and the relations between entries, and returns
  the config normalized (MACs lowercase, sequences as tuples, seconds as float).

Errors are one line, ``<file>: <key path>: <problem>``. A problem with one value is
located by its position in the file (``service[1].port``); a problem between
values also names the entry (``service[0] "web".vms``), since the name is what a
reader searches for.
"""

import dataclasses
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

XDP_MODES = ("auto", "native", "generic")
PROTOCOLS = ("tcp", "udp")
HEALTH_KINDS = ("tcp", "http", "udp")

# The gateway name becomes part of pinned map and socket names, hence the tight set.
_GATEWAY_NAME = re.compile(r"[a-z0-9-]{1,15}")
# Region, service and VM names are CLI/API arguments: no spaces or shell specials.
_ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"(.*) \(at (line \d+, column \d+|end of document)\)")

_IFNAMSIZ = 16  # including the terminating NUL
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


_T = TypeVar("_T")


class ConfigError(Exception):
    """A configuration problem. str() is one line: ``<file>: <key path>: <problem>``."""

    def __init__(self, key: str | None, problem: str, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        super().__init__(": ".join(part for part in (source, key, problem) if part))


@dataclass(frozen=True)
class GatewayConfig:
    name: str
    interface: str
    xdp_mode: str = "auto"
    netns: str = ""  # network namespace (/run/netns/<netns>) the daemon joins; "" = its own
    tunnel_source: ipaddress.IPv4Address | None = None
    tunnel_source6: ipaddress.IPv6Address | None = None
    next_hop_mac: str | None = None
    api_socket: str = ""  # "" means the default, /run/xdpgw/<name>.sock
    pin_dir: str = ""  # "" means the default, /sys/fs/bpf/xdpgw/<name>: state kept across restarts
    flow_table_size: int = 65536
    maglev_table_size: int = 65537
    hash_seed: int = 0
    new_flow_rate_limit: int = 100000  # new flows per CPU per second before flood mode; 0: none
    max_services: int = 64
    max_vms: int = 1024
    max_regions: int = 256
    stats_interval: float = 1.0
    # migration-aware forwarding (control/migration.py, control/portwatch.py)
    vm_ports: tuple[str, ...] = ()   # glob patterns of the host ports VMs sit behind (watched for announcements)
    peers: tuple[str, ...] = ()      # control sockets of the other gateways to re-program on a move
    registry: str = ""  # "" means the default, /var/lib/xdpgw/<name>.db (the VM registry, SQLite)
    migration_hold_down: float = 2.0  # s after a move in which announcements moving the VM again are refused
    orchestrator: tuple[str, ...] = ()  # argv + [vm, host] live-migrates a VM (defrag apply); prints the new port

    def __post_init__(self) -> None:
        # The default depends on the name, so it cannot be a field default. Note that
        # dataclasses.replace(gw, name=...) keeps the already-filled path.
        if self.api_socket == "":
            object.__setattr__(self, "api_socket", f"/run/xdpgw/{self.name}.sock")
        if self.pin_dir == "":
            object.__setattr__(self, "pin_dir", f"/sys/fs/bpf/xdpgw/{self.name}")
        if self.registry == "":
            object.__setattr__(self, "registry", f"/var/lib/xdpgw/{self.name}.db")


@dataclass(frozen=True)
class RegionConfig:
    name: str
    prefixes: tuple[IPNetwork, ...]
    # per-region overrides of the [monitor] thresholds (None: the global one)
    heavy_pps: float | None = None
    heavy_bps: float | None = None
    clear_pps: float | None = None
    clear_bps: float | None = None


@dataclass(frozen=True)
class MonitorConfig:
    """Heavy-region detection (control/monitor.py). A region is heavy after its
    smoothed rate exceeds heavy_pps or heavy_bps for `intervals` intervals in a
    row, and calm again after it stays below clear_pps and clear_bps (default:
    half the heavy threshold) for as many. `services`: what a heavy region's
    offload request covers (default: every service)."""
    interval: float = 1.0
    heavy_pps: float | None = None
    heavy_bps: float | None = None
    clear_pps: float | None = None
    clear_bps: float | None = None
    intervals: int = 3
    smoothing: float = 0.5        # EWMA weight of the newest interval (1: no smoothing)
    services: tuple[str, ...] = ()


@dataclass(frozen=True)
class CenterLinkConfig:
    """How the gateway reaches the control center (`xdpgw center`)."""
    url: str
    token: str
    timeout: float = 5.0
    cafile: str | None = None     # CA bundle for an https center with a private CA


@dataclass(frozen=True)
class AgentConfig:
    """The gateway's HTTP agent API, which the control center calls."""
    listen: str                   # "ADDR:PORT" or "[ADDR6]:PORT"
    token: str
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True)
class HealthConfig:
    """A service's health check of its VMs, probed at each VM's `ip` (see control/health.py).

    tcp: connect to ip:port; http: GET `path` on ip:port, a 2xx status is healthy;
    udp: send `payload` to ip:port, any reply is healthy. `port` defaults to the
    service's port. A VM goes down after `fall` failed probes in a row and up
    after `rise` good ones; each probe may take `timeout` s, one starts every
    `interval` s."""
    kind: str
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 3
    port: int | None = None
    path: str | None = None       # http only; None means "/"
    payload: str | None = None    # udp only; None means "xdpgw health probe"


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    vip: IPAddress
    port: int
    protocol: str
    vms: tuple[str, ...]
    health: HealthConfig | None = None


@dataclass(frozen=True)
class VMConfig:
    name: str
    port: str | None = None
    mac: str | None = None
    ip: IPAddress | None = None
    tunnel: IPAddress | None = None
    weight: int = 1
    tenant: str | None = None         # for defragmentation (control/defrag.py)


@dataclass(frozen=True)
class HostConfig:
    """A hypervisor host: the gateway ports (glob patterns) of its VMs, and how
    many VMs it takes (the defragmentation planner's capacity)."""
    name: str
    ports: tuple[str, ...]
    capacity: int = 16


@dataclass(frozen=True)
class Config:
    gateway: GatewayConfig
    regions: tuple[RegionConfig, ...] = ()
    services: tuple[ServiceConfig, ...] = ()
    vms: tuple[VMConfig, ...] = ()
    monitor: MonitorConfig | None = None
    center: CenterLinkConfig | None = None
    agent: AgentConfig | None = None
    hosts: tuple[HostConfig, ...] = ()

    def region(self, name: str) -> RegionConfig:
        """The region called `name`; KeyError if there is none."""
        return _find(self.regions, name)

    def service(self, name: str) -> ServiceConfig:
        """The service called `name`; KeyError if there is none."""
        return _find(self.services, name)

    def vm(self, name: str) -> VMConfig:
        """The VM called `name`; KeyError if there is none."""
        return _find(self.vms, name)

    def region_ids(self) -> dict[str, int]:
        """Region name -> id, 1.. in config order (0 is the dataplane's "unknown")."""
        return {r.name: i for i, r in enumerate(self.regions, start=1)}

    def service_ids(self) -> dict[str, int]:
        """Service name -> id, 0.. in config order (index into per-service maps)."""
        return {s.name: i for i, s in enumerate(self.services)}

    def vm_ids(self) -> dict[str, int]:
        """VM name -> id, 1.. in config order (0 marks an unused vm_location slot)."""
        return {v.name: i for i, v in enumerate(self.vms, start=1)}

    def to_toml(self) -> str:
        """The config as TOML that parse_config reads back to an equal Config."""
        tables = [_toml_table("[gateway]", self.gateway)]
        tables += [_toml_table("[[region]]", r) for r in self.regions]
        tables += [_toml_table("[[service]]", s) for s in self.services]
        tables += [_toml_table("[[vm]]", v) for v in self.vms]
        tables += [_toml_table(f"[{name}]", getattr(self, name)) for name in ("monitor", "center", "agent")
                   if getattr(self, name) is not None]
        tables += [_toml_table("[[host]]", h) for h in self.hosts]
        return "\n".join(tables)


_Entry = TypeVar("_Entry", RegionConfig, ServiceConfig, VMConfig)


def _find(entries: tuple[_Entry, ...], name: str) -> _Entry:
    for entry in entries:
        if entry.name == name:
            return entry
    raise KeyError(name)


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the TOML config at `path`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(None, f"cannot read: {e.strerror}", source) from e
    except UnicodeDecodeError as e:
        raise ConfigError(None, f"not UTF-8 (byte {e.start})", source) from e
    return parse_config(text, source)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text; `source` names the file in errors ("<string>": none)."""
    file = None if source == "<string>" else source
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = _TOML_POSITION.fullmatch(str(e))
        where, problem = (match[2], match[1]) if match else (None, str(e))
        raise ConfigError(where, problem, file) from e
    try:
        return validate(_from_document(document))
    except ConfigError as e:
        raise ConfigError(e.key, e.problem, file) from None


_SECTIONS = ("gateway", "region", "service", "vm", "monitor", "center", "agent", "host")


def _from_document(document: dict[str, Any]) -> Config:
    for key in document:
        if key not in _SECTIONS:
            raise ConfigError(_toml_key(key), "unknown key")
    if "gateway" not in document:
        raise ConfigError("gateway", "missing required table [gateway]")
    return Config(
        gateway=_from_table(document["gateway"], "gateway", GatewayConfig),
        regions=_from_array(document, "region", RegionConfig),
        services=_from_array(document, "service", ServiceConfig),
        vms=_from_array(document, "vm", VMConfig),
        monitor=_from_table(document["monitor"], "monitor", MonitorConfig) if "monitor" in document else None,
        center=_from_table(document["center"], "center", CenterLinkConfig) if "center" in document else None,
        agent=_from_table(document["agent"], "agent", AgentConfig) if "agent" in document else None,
        hosts=_from_array(document, "host", HostConfig),
    )


def _from_array(document: dict[str, Any], section: str, cls: type[_T]) -> tuple[_T, ...]:
    tables = document.get(section, [])
    # `[region]` instead of `[[region]]` parses as a table; say which one is meant.
    if not isinstance(tables, list):
        raise ConfigError(section, f"expected an array of tables ([[{section}]]), got {_describe(tables)}")
    return tuple(_from_table(t, f"{section}[{i}]", cls) for i, t in enumerate(tables))


def _from_table(table: Any, path: str, cls: type[_T]) -> _T:
    if not isinstance(table, dict):
        raise ConfigError(path, f"expected a table, got {_describe(table)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in fields:
            raise ConfigError(f"{path}.{_toml_key(key)}", "unknown key")
    for name, f in fields.items():
        if name not in table and f.default is dataclasses.MISSING:
            raise ConfigError(f"{path}.{name}", "missing required key")
    # Plain values go through as they are: validate() checks their types, once for both layers.
    return cls(**{k: _CONVERTERS.get(k, _as_is)(v, f"{path}.{k}") for k, v in table.items()})


def _as_is(value: Any, path: str) -> Any:
    return value


def _parse_address(value: Any, path: str) -> IPAddress:
    # ip_address() also takes integers; a config address must be written as text.
    if not isinstance(value, str):
        raise ConfigError(path, f"expected an IP address string, got {_describe(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(path, f"{_quote(value)} is not an IPv4 or IPv6 address") from None


def _parse_prefix(value: Any, path: str) -> IPNetwork:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a CIDR prefix string, got {_describe(value)}")
    try:
        return ipaddress.ip_network(value)
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(path, f"{_quote(value)} is not an IPv4 or IPv6 CIDR prefix") from None
    raise ConfigError(path, f"{_quote(value)} has host bits set (the prefix is {network})")


def _parse_array(value: Any, path: str) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected an array, got {_describe(value)}")
    return tuple(value)


def _parse_prefixes(value: Any, path: str) -> tuple[IPNetwork, ...]:
    return tuple(_parse_prefix(v, f"{path}[{i}]") for i, v in enumerate(_parse_array(value, path)))


def _parse_health(value: Any, path: str) -> "HealthConfig":
    return _from_table(value, path, HealthConfig)


_CONVERTERS: dict[str, Callable[[Any, str], Any]] = {
    "tunnel_source": _parse_address,
    "tunnel_source6": _parse_address,
    "vip": _parse_address,
    "ip": _parse_address,
    "tunnel": _parse_address,
    "prefixes": _parse_prefixes,
    "vms": _parse_array,
    "health": _parse_health,
    "services": _parse_array,
    "vm_ports": _parse_array,
    "peers": _parse_array,
    "ports": _parse_array,
    "orchestrator": _parse_array,
}


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
        _check_unique_names(entries, section)
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
    return Config(gateway, regions, services, vms, monitor, center, agent, hosts=hosts)


def _check_hosts(hosts: Any, gateway: GatewayConfig,
                 vms: tuple[VMConfig, ...]) -> tuple[GatewayConfig, tuple[HostConfig, ...]]:
    """[[host]] entries and the migration keys of [gateway] and [[vm]]."""
    lists = {}
    for key in ("vm_ports", "peers", "orchestrator"):
        lists[key] = _sequence(getattr(gateway, key), f"gateway.{key}")
        for i, value in enumerate(lists[key]):
            if not _str(value, f"gateway.{key}[{i}]") or "\0" in value:
                raise ConfigError(f"gateway.{key}[{i}]", "must be a non-empty string")
    _str(gateway.registry, "gateway.registry")
    for i, v in enumerate(vms):
        if v.tenant is not None:
            _match(v.tenant, f"{_named('vm', i, v)}.tenant", _ENTRY_NAME, "tenant name")
    hosts = _entries(hosts, "host", HostConfig)
    _check_unique_names(hosts, "host")
    checked = []
    for i, h in enumerate(hosts):
        here = f"host[{i}]"
        _match(h.name, f"{here}.name", _ENTRY_NAME, "name")
        ports = _sequence(h.ports, f"{here}.ports")
        for j, port in enumerate(ports):
            if not _str(port, f"{here}.ports[{j}]"):
                raise ConfigError(f"{here}.ports[{j}]", "must be a non-empty string")
        _int(h.capacity, f"{here}.capacity", 1, 1 << 20)
        checked.append(dataclasses.replace(h, ports=ports))
    hold = _seconds(gateway.migration_hold_down, "gateway.migration_hold_down", 3600.0)
    return dataclasses.replace(gateway, migration_hold_down=hold, **lists), tuple(checked)


_THRESHOLDS = ("heavy_pps", "heavy_bps", "clear_pps", "clear_bps")


def _rate(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number, got {_describe(value)}")
    if not (math.isfinite(value) and value > 0):
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
    _int(m.intervals, "monitor.intervals", 1, 100)
    smoothing = m.smoothing
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 < smoothing <= 1:
        raise ConfigError("monitor.smoothing", f"{smoothing!r} is not a number in (0, 1]")
    names = _sequence(m.services, "monitor.services")
    known = {s.name for s in services}
    for i, name in enumerate(names):
        if _str(name, f"monitor.services[{i}]") not in known:
            raise ConfigError(f"monitor.services[{i}]", f"unknown service {_quote(name)}")
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
    url = _str(c.url, "center.url")
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise ConfigError("center.url", f"{_quote(url)} is not an http:// or https:// URL")
    if not _str(c.token, "center.token"):
        raise ConfigError("center.token", "must not be empty")
    timeout = _seconds(c.timeout, "center.timeout", 600.0)
    if c.cafile is not None and not os.path.isfile(_str(c.cafile, "center.cafile")):
        raise ConfigError("center.cafile", f"{_quote(c.cafile)} is not a file")
    return dataclasses.replace(c, url=url.rstrip("/"), timeout=timeout)


def parse_listen(text: str, path: str) -> tuple[str, int]:
    """"ADDR:PORT" or "[ADDR6]:PORT" -> (address, port); ConfigError naming `path` otherwise."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and port.isdigit() and 0 < int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(path, f"{_quote(text)} is not ADDR:PORT or [ADDR6]:PORT (port 1..65535)")
    return host, int(port)


def _check_agent(a: AgentConfig) -> AgentConfig:
    parse_listen(_str(a.listen, "agent.listen"), "agent.listen")
    if not _str(a.token, "agent.token"):
        raise ConfigError("agent.token", "must not be empty")
    if (a.tls_cert is None) != (a.tls_key is None):
        raise ConfigError("agent.tls_cert" if a.tls_cert is None else "agent.tls_key",
                          "tls_cert and tls_key go together")
    for key in ("tls_cert", "tls_key"):
        value = getattr(a, key)
        if value is not None and not os.path.isfile(_str(value, f"agent.{key}")):
            raise ConfigError(f"agent.{key}", f"{_quote(value)} is not a file")
    return a


def _check_gateway(g: GatewayConfig) -> GatewayConfig:
    _match(g.name, "gateway.name", _GATEWAY_NAME, "gateway name (1-15 of a-z, 0-9, -)")
    _ifname(g.interface, "gateway.interface")
    netns = _str(g.netns, "gateway.netns")
    if netns and (netns in (".", "..") or "/" in netns or "\0" in netns):
        raise ConfigError("gateway.netns", f"{_quote(netns)} is not a network namespace name")
    _choice(g.xdp_mode, "gateway.xdp_mode", XDP_MODES)
    if g.tunnel_source is not None:
        _address(g.tunnel_source, "gateway.tunnel_source", version=4)
    if g.tunnel_source6 is not None:
        _address(g.tunnel_source6, "gateway.tunnel_source6", version=6)
    next_hop_mac = None if g.next_hop_mac is None else _unicast_mac(g.next_hop_mac, "gateway.next_hop_mac")
    _socket_path(g.api_socket, "gateway.api_socket")
    pin_dir = _str(g.pin_dir, "gateway.pin_dir")
    if not pin_dir.startswith("/sys/fs/bpf/") or "\0" in pin_dir or "/../" in pin_dir + "/":
        raise ConfigError("gateway.pin_dir", f"{_quote(pin_dir)} is not a directory under /sys/fs/bpf/")
    _int(g.flow_table_size, "gateway.flow_table_size", 1024, 1 << 24)
    # Maglev's permutation (offset + j*skip mod M) visits every slot only when M is prime.
    if not _is_prime(_int(g.maglev_table_size, "gateway.maglev_table_size", 251, 1000003)):
        raise ConfigError("gateway.maglev_table_size", f"{g.maglev_table_size} is not prime")
    _int(g.hash_seed, "gateway.hash_seed", 0, (1 << 32) - 1)
    _int(g.new_flow_rate_limit, "gateway.new_flow_rate_limit", 0, 1 << 32)
    _int(g.max_services, "gateway.max_services", 1, 4096)
    _int(g.max_vms, "gateway.max_vms", 1, 65535)
    _int(g.max_regions, "gateway.max_regions", 1, 65535)
    interval = g.stats_interval
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise ConfigError("gateway.stats_interval", f"expected a number of seconds, got {_describe(interval)}")
    if not (math.isfinite(interval) and interval > 0):
        raise ConfigError("gateway.stats_interval", f"{interval} is not a positive number of seconds")
    return dataclasses.replace(g, next_hop_mac=next_hop_mac, stats_interval=float(interval))


def _check_region(r: RegionConfig, path: str) -> RegionConfig:
    _match(r.name, f"{path}.name", _ENTRY_NAME, "name")
    prefixes = _sequence(r.prefixes, f"{path}.prefixes")
    if not prefixes:
        raise ConfigError(f"{path}.prefixes", "must not be empty")
    for i, network in enumerate(prefixes):
        if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise ConfigError(f"{path}.prefixes[{i}]", f"expected an IP network, got {_describe(network)}")
    return dataclasses.replace(r, prefixes=prefixes)


def _check_service(s: ServiceConfig, path: str) -> ServiceConfig:
    _match(s.name, f"{path}.name", _ENTRY_NAME, "name")
    _address(s.vip, f"{path}.vip")
    _int(s.port, f"{path}.port", 1, 65535)
    _choice(s.protocol, f"{path}.protocol", PROTOCOLS)
    vms = _sequence(s.vms, f"{path}.vms")
    if not vms:
        raise ConfigError(f"{path}.vms", "must not be empty")
    for i, name in enumerate(vms):
        _str(name, f"{path}.vms[{i}]")
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
    _int(h.rise, f"{path}.rise", 1, 100)
    _int(h.fall, f"{path}.fall", 1, 100)
    if h.port is not None:
        _int(h.port, f"{path}.port", 1, 65535)
    if h.path is not None:
        if h.kind != "http":
            raise ConfigError(f"{path}.path", f'only for kind "http", not {_quote(h.kind)}')
        if not _HTTP_PATH.fullmatch(_str(h.path, f"{path}.path")):
            raise ConfigError(f"{path}.path", f"{_quote(h.path)} is not a URL path (starts with /, no spaces)")
    if h.payload is not None:
        if h.kind != "udp":
            raise ConfigError(f"{path}.payload", f'only for kind "udp", not {_quote(h.kind)}')
        if not 0 < len(_str(h.payload, f"{path}.payload").encode()) <= 1024:
            raise ConfigError(f"{path}.payload", "must be 1 to 1024 bytes of UTF-8")
    return dataclasses.replace(h, interval=interval, timeout=timeout)


def _seconds(value: Any, path: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number of seconds, got {_describe(value)}")
    if not (math.isfinite(value) and 0 < value <= high):
        raise ConfigError(path, f"{value} is not a number of seconds in (0, {high:g}]")
    return float(value)


def _check_vm(v: VMConfig, path: str) -> VMConfig:
    _match(v.name, f"{path}.name", _ENTRY_NAME, "name")
    if v.port is not None:
        _ifname(v.port, f"{path}.port")
    mac = None if v.mac is None else _unicast_mac(v.mac, f"{path}.mac")
    if v.ip is not None:
        _address(v.ip, f"{path}.ip")
    if v.tunnel is not None:
        _address(v.tunnel, f"{path}.tunnel")
    # Weights are relative Maglev shares; a u16 bound (as in Cilium) keeps them sane.
    _int(v.weight, f"{path}.weight", 0, 65535)
    return dataclasses.replace(v, mac=mac)


def _check_unique_names(entries: tuple[Any, ...], section: str) -> None:
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.name in first:
            raise ConfigError(
                f"{section}[{i}].name",
                f"duplicate {section} name {_quote(entry.name)} (also {section}[{first[entry.name]}])",
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
                raise ConfigError(f"{here}.vms", f"unknown VM {_quote(name)}")
            if name in listed:
                raise ConfigError(f"{here}.vms", f"VM {_quote(name)} is listed twice")
            listed.add(name)
            # Health checks probe the VM's own address, also for a VM behind a tunnel.
            if service.health is not None and vms[vm_index[name]].ip is None:
                j = vm_index[name]
                raise ConfigError(f"{_named('vm', j, vms[j])}.ip",
                                  f"missing; required by the health check of {here}")


def _check_vm_relations(gateway: GatewayConfig, vms: tuple[VMConfig, ...]) -> None:
    # Migration is detected by a VM's MAC showing up on a port: MACs must identify VMs.
    mac_owner: dict[str, int] = {}
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
        raise ConfigError(path, f"expected a {cls.__name__}, got {_describe(value)}")
    return value


def _entries(value: Any, section: str, cls: type[_T]) -> tuple[_T, ...]:
    return tuple(_instance(e, f"{section}[{i}]", cls) for i, e in enumerate(_sequence(value, section)))


def _sequence(value: Any, path: str) -> tuple[Any, ...]:
    # Lists are accepted from Python callers and stored as tuples, so configs stay hashable.
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected an array, got {_describe(value)}")
    return tuple(value)


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_describe(value)}")
    return value


def _int(value: Any, path: str, low: int, high: int) -> int:
    # bool is a subclass of int: `port = true` must not pass as port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {_describe(value)}")
    if not low <= value <= high:
        raise ConfigError(path, f"{value} is out of range {low}..{high}")
    return value


def _match(value: Any, path: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(_str(value, path)):
        raise ConfigError(path, f"{_quote(value)} is not a valid {what}")


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> None:
    if _str(value, path) not in choices:
        raise ConfigError(path, f"{_quote(value)} is not one of {', '.join(choices)}")


def _ifname(value: Any, path: str) -> None:
    # The kernel's dev_valid_name(): < IFNAMSIZ bytes, not "." or "..", no '/', ':' or space.
    name = _str(value, path)
    if (
        not 0 < len(name.encode()) < _IFNAMSIZ
        or name in (".", "..")
        or any(c in "/:\0" or c.isspace() for c in name)
    ):
        raise ConfigError(path, f"{_quote(name)} is not a valid interface name")


def _unicast_mac(value: Any, path: str) -> str:
    mac = _str(value, path)
    if not _MAC.fullmatch(mac):
        raise ConfigError(path, f"{_quote(mac)} is not a MAC address (six hex octets separated by ':')")
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
        raise ConfigError(path, f"expected {expected}, got {_describe(value)}")
    # The dataplane keys IPv4 as IPv4-mapped IPv6, so such an address would alias an IPv4 one.
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        raise ConfigError(path, f"{value} is IPv4-mapped; write it as {value.ipv4_mapped}")


def _socket_path(value: Any, path: str) -> None:
    socket_path = _str(value, path)
    if not socket_path.startswith("/") or "\0" in socket_path:
        raise ConfigError(path, f"{_quote(socket_path)} is not an absolute path")
    if len(socket_path.encode()) > _SUN_PATH_MAX:
        raise ConfigError(path, f"{_quote(socket_path)} is longer than the {_SUN_PATH_MAX} bytes of a socket path")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


# ---------------------------------------------------------------- text


def _quote(text: str) -> str:
    # JSON escaping (ASCII only) keeps any value on one line of an error message.
    return json.dumps(text)


def _named(section: str, index: int, entry: Any) -> str:
    return f"{section}[{index}] {_quote(entry.name)}"


def _describe(value: Any) -> str:
    """The TOML type of a wrong value, and the value when it is short."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return f"IPv{value.version} address {value}"
    return type(value).__name__


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _quote(key)


def _toml_table(header: str, entry: Any) -> str:
    lines = [header]
    for f in dataclasses.fields(entry):
        value = getattr(entry, f.name)
        if value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, (int, float)):
        return repr(value)
    if dataclasses.is_dataclass(value):  # a nested table (service.health), written inline
        return "{ " + ", ".join(f"{f.name} = {_toml_value(getattr(value, f.name))}"
                                for f in dataclasses.fields(value) if getattr(value, f.name) is not None) + " }"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))  # strings, addresses, networks


def _toml_string(text: str) -> str:
    # A TOML basic string may not hold '"', '\\' or control characters (DEL included) raw.
    return '"' + "".join(
        f"\\u{ord(c):04x}" if c < " " or c in '"\\\x7f' else c for c in text
    ) + '"'

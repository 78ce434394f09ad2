"""What a gateway config may say: the typed entries (frozen dataclasses), the
allowed values, and ConfigError.

A config reaches these classes two ways, from a TOML file (control/config/toml.py)
or built in Python; either way control/config/validate.py checks it, so both get
the same checks.

Errors are one line, ``<file>: <key path>: <problem>``. A problem with one value is
located by its position in the file (``service[1].port``); a problem between
values also names the entry (``service[0] "web".vms``), since the name is what a
reader searches for.
"""
import ipaddress
import re
from dataclasses import dataclass
from typing import TypeVar

from dataplane.program import Sizes
from dataplane.structs import ENCAPS as _ENCAP_CODES

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ENCAPS = tuple(_ENCAP_CODES)  # tunnel encapsulations ([[host]] encap, offload.set encap)
XDP_MODES = ("auto", "native", "generic")
PROTOCOLS = ("tcp", "udp")
HEALTH_KINDS = ("tcp", "http", "udp")

# The gateway name becomes part of pinned map and socket names, hence the tight set.
GATEWAY_NAME = re.compile(r"[a-z0-9-]{1,15}")
# Region, service, VM, host and data-center names are CLI/API arguments: no spaces or shell specials.
ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# The dataplane's compiled-in sizes are the defaults of the keys that set them.
_SIZES = Sizes()


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
    flow_table_size: int = _SIZES.flow_entries
    maglev_table_size: int = _SIZES.maglev_m
    hash_seed: int = _SIZES.hash_seed
    new_flow_rate_limit: int = 100000  # new flows per CPU per second before flood mode; 0: none
    max_services: int = _SIZES.max_services
    max_vms: int = _SIZES.max_vms
    max_regions: int = _SIZES.max_regions
    stats_interval: float = 1.0
    # migration-aware forwarding (control/migration/)
    vm_ports: tuple[str, ...] = ()   # glob patterns of the host ports VMs sit behind (watched for announcements)
    hosts: tuple[str, ...] = ()      # the [[host]] names whose ports are this gateway's own (local ports)
    registry: str = ""  # "" means the default, /var/lib/xdpgw/<name>.db (the VM registry, SQLite)
    migration_hold_down: float = 2.0  # s after a move in which announcements moving the VM again are refused
    # what the store keeps of migration history and of refused announcements, each: the newest
    # history_rows rows of the fleet, none older than history_max_age s (0: no age limit)
    history_rows: int = 10000
    history_max_age: float = 30 * 86400.0
    orchestrator: tuple[str, ...] = ()  # argv + [vm, host] live-migrates a VM (defrag apply); prints the new port
    # decapsulation (ebpf/decap.h): IP-in-IP and GUE packets to one of decap_addresses from a source in
    # decap_from are served by their inner packet; gue_port is GUE's UDP port, sending and receiving
    decap_addresses: tuple[IPAddress, ...] = ()
    decap_from: tuple[IPNetwork, ...] = ()
    gue_port: int = 6080

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
    """Heavy-region detection (control/offload/monitor.py). A region is heavy after its
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
    tls_ca: str | None = None     # mutual TLS: the center must present a certificate this CA signed
    insecure: bool = False        # plain HTTP on a non-loopback address: the token and calls in clear


@dataclass(frozen=True)
class StoreConfig:
    """[store]: where the shared state lives (control/store/); the center's config has one too.
    Without it, a gateway keeps it in the SQLite file gateway.registry (one machine)."""
    url: str                      # "sqlite:///PATH" or "etcd://HOST:PORT[,HOST:PORT...]"
    ca: str | None = None         # etcd over TLS: the CA of the members' certificates
    cert: str | None = None       # mutual TLS: this client's certificate and key
    key: str | None = None
    user: str | None = None       # etcd auth: the user, and a file holding its password
    password_file: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint, GET /metrics (control/metrics.py); the center's config has one too."""
    listen: str                   # "ADDR:PORT" or "[ADDR6]:PORT"


@dataclass(frozen=True)
class HealthConfig:
    """A service's health check of its VMs, probed at each VM's address of the VIP's family
    (see control/health.py).

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
    # The VM's own addresses, both families: what its announcements may claim and what
    # health checks probe. A [[vm]] table may write `ip = "..."` for one (control/config/toml.py).
    ips: tuple[IPAddress, ...] = ()
    tunnel: IPAddress | None = None
    weight: int = 1
    tenant: str | None = None         # for defragmentation (control/defrag/)
    host: str | None = None           # the [[host]] the VM's port is on: (host, port) is its location

    def address(self, version: int) -> IPAddress | None:
        """The VM's first address of IP version `version` (4 or 6); None if it has none."""
        return next((a for a in self.ips if a.version == version), None)


@dataclass(frozen=True)
class HostConfig:
    """A hypervisor host: the gateway ports (glob patterns) of its VMs, how many
    VMs it takes (the defragmentation planner's capacity), and its tunnel
    endpoint, by which gateways that do not own it (gateway.hosts) reach its VMs."""
    name: str
    ports: tuple[str, ...]
    capacity: int = 16
    endpoint: ipaddress.IPv4Address | None = None
    endpoint6: ipaddress.IPv6Address | None = None
    encap: str = "ipip"  # how other gateways reach the endpoint: "ipip" or "gue" (ENCAPS)


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
    metrics: MetricsConfig | None = None
    store: StoreConfig | None = None  # None: the SQLite file gateway.registry

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
        from control.config.toml import to_toml  # toml.py builds Configs, so it imports this module

        return to_toml(self)


_Entry = TypeVar("_Entry", RegionConfig, ServiceConfig, VMConfig)


def _find(entries: tuple[_Entry, ...], name: str) -> _Entry:
    for entry in entries:
        if entry.name == name:
            return entry
    raise KeyError(name)

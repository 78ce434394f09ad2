"""The control center's config (TOML). Errors are one line, ``<file>: <key path>: <problem>``,
like the gateway's (control/config/), and read by the same TOML layer.

    [center]
    listen = "198.18.0.1:7300"        # ADDR:PORT
    token = "secret"                  # every call needs "Authorization: Bearer <token>"
    db = "/var/lib/xdpgw/center.db"   # SQLite (WAL); the default, when there is no [store]
    # name = "center-a"               # this replica's name (default: the host name)
    # leader_ttl_s = 5                # with [store]: the leader's lease; a standby takes over this long after it died
    # tls_cert = "...", tls_key = "..."   # serve https (required on a non-loopback address,
    # insecure = true                     # unless this says plain HTTP in so many words)
    vms = 2                           # VMs to prepare per request
    max_attempts = 5                  # per step, before the request fails
    retry_s = 0.5                     # first retry delay (doubles per attempt, capped at 10 s)
    release_after = 300.0             # after an offload's clear, release the target's VMs once they are
                                      # drained, or at the latest this many seconds after the clear

    [weights]                         # factor -> weight (missing: 1.0; 0 turns a factor off)
    location = 1.0
    timezone = 1.0

    [[region]]                        # where a gateway's region's users are
    name = "r1"
    lat = 50.1
    lon = 8.7

    [[datacenter]]
    name = "dc2"
    lat = 48.1
    lon = 11.6
    timezone = "Europe/Berlin"
    capacity = 16                     # VMs
    load = 4                          # VMs in use
    latency_ms = 5.0
    transmit_mbps = 10000
    tunnel_endpoint = "198.18.200.2"
    encap = "ipip"                    # or "gue": how the source gateway tunnels offloaded flows here
    agent = "https://198.18.200.2:7302"
    agent_token = "..."
    # tls_ca = "...", tls_cert = "...", tls_key = "..."   # https agent: its CA; our client certificate

    [[gateway]]                       # gateways that may ask for offloads, and their agents
    name = "gw1"
    datacenter = "dc1"
    agent = "https://198.18.0.2:7301"
    agent_token = "..."
    # tls_ca, tls_cert, tls_key as for a data center

    [[image]]                         # a service's master image
    service = "web"
    name = "web-1"
    path = "images/web-1.json"        # relative to the config file

    [metrics]                         # optional: Prometheus GET /metrics (control/metrics.py)
    listen = "127.0.0.1:9418"

    [store]                           # optional: the shared store; replicas on it elect a leader
    url = "etcd://198.18.0.1:2379,198.18.0.2:2379,198.18.0.3:2379"
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import zoneinfo
from dataclasses import dataclass, field
from typing import Any, TypeVar

from control.config import ConfigError, MetricsConfig, StoreConfig
from control.config.schema import ENTRY_NAME
from control.config.toml import Converter, from_array, from_table, parse_document, read_text
from control.config.validate import (check_int, check_listener, check_match, check_metrics, check_number,
                                     check_store, check_str, check_unique_names)
from dataplane.structs import ENCAPS

_URL = re.compile(r"https?://[^\s/]+/?")
_E = TypeVar("_E", "DataCenter", "GatewayEntry")


@dataclass(frozen=True)
class DataCenter:
    name: str
    lat: float
    lon: float
    timezone: str
    capacity: int
    tunnel_endpoint: str
    encap: str = "ipip"
    load: int = 0
    latency_ms: float = 10.0
    transmit_mbps: float = 1000.0
    agent: str | None = None
    agent_token: str | None = None
    tls_ca: str | None = None       # verifies an https agent (the system's CAs without)
    tls_cert: str | None = None     # the center's client certificate, for an agent that asks (mutual TLS)
    tls_key: str | None = None


@dataclass(frozen=True)
class GatewayEntry:
    name: str
    datacenter: str
    agent: str
    agent_token: str
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True)
class RegionEntry:
    name: str
    lat: float
    lon: float
    users: int = 1


@dataclass(frozen=True)
class ImageEntry:
    service: str
    name: str
    path: str


@dataclass(frozen=True)
class CenterConfig:
    listen: str
    token: str
    db: str = "/var/lib/xdpgw/center.db"
    name: str = ""
    leader_ttl_s: float = 5.0
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False
    vms: int = 2
    max_attempts: int = 5
    retry_s: float = 0.5
    release_after: float = 300.0
    weights: dict[str, float] = field(default_factory=dict)
    datacenters: tuple[DataCenter, ...] = ()
    gateways: tuple[GatewayEntry, ...] = ()
    regions: tuple[RegionEntry, ...] = ()
    images: tuple[ImageEntry, ...] = ()
    metrics: MetricsConfig | None = None
    store: StoreConfig | None = None    # [store]: the shared store (replicas elect a leader); None: db


def load_center_config(path: str) -> CenterConfig:
    document = parse_document(read_text(path), path)
    try:
        return parse_center_document(document, os.path.dirname(os.path.abspath(path)))
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.problem, path) from None


def _finite(value: Any, path: str) -> float:
    if not math.isfinite(check_number(value, path)):
        raise ConfigError(path, f"{value} is not a finite number")
    return value


_TYPE_CHECKS: dict[str, Converter] = {"float": _finite, "int": check_int, "str": check_str}


def _typed(cls: type) -> dict[str, Converter]:
    """The type check of each plain field of `cls`, from its annotation: the center
    checks types as it reads (TOML has no null, so an `X | None` field only sees X)."""
    return {f.name: _TYPE_CHECKS[base] for f in dataclasses.fields(cls)
            if (base := f.type.partition(" |")[0]) in _TYPE_CHECKS}


def _array(document: dict, section: str, cls: type) -> tuple:
    return from_array(document, section, cls, _typed(cls))


def parse_center_document(document: dict, base: str = ".") -> CenterConfig:
    for key in document:
        if key not in ("center", "weights", "datacenter", "gateway", "region", "image", "metrics", "store"):
            raise ConfigError(key, "unknown key")
    if "center" not in document:
        raise ConfigError("center", "missing required table [center]")
    center = from_table(document["center"], "center", CenterConfig, _typed(CenterConfig),
                        skip=("weights", "datacenters", "gateways", "regions", "images", "metrics", "store"))
    if not center.token:
        raise ConfigError("center.token", "must not be empty")
    if (center.tls_cert is None) != (center.tls_key is None):
        raise ConfigError("center.tls_cert", "tls_cert and tls_key go together")
    check_listener(center.listen, "center.listen", center.tls_cert is not None, center.insecure, "center.insecure",
                   "set center.tls_cert/tls_key, or insecure = true")
    check_match(center.name or socket.gethostname(), "center.name", ENTRY_NAME, "name")
    if not 1 <= center.leader_ttl_s <= 60:
        raise ConfigError("center.leader_ttl_s", f"{center.leader_ttl_s} is not in [1, 60]")
    check_int(center.vms, "center.vms", 1, 64)
    check_int(center.max_attempts, "center.max_attempts", 1, 100)
    if not 0 < center.retry_s <= 60:
        raise ConfigError("center.retry_s", f"{center.retry_s} is not in (0, 60]")
    if not 0 < center.release_after <= 86400:
        raise ConfigError("center.release_after", f"{center.release_after} is not in (0, 86400] seconds")
    weights = document.get("weights", {})
    if not isinstance(weights, dict):
        raise ConfigError("weights", "expected a table")
    from control.center.scoring import FACTORS

    for name, w in weights.items():
        if name not in FACTORS:
            raise ConfigError(f"weights.{name}", f"unknown factor; known: {', '.join(sorted(FACTORS))}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise ConfigError(f"weights.{name}", f"{w!r} is not a non-negative number")
    dcs = _array(document, "datacenter", DataCenter)
    gateways = _array(document, "gateway", GatewayEntry)
    regions = _array(document, "region", RegionEntry)
    images = _array(document, "image", ImageEntry)
    metrics = None if "metrics" not in document else \
        check_metrics(from_table(document["metrics"], "metrics", MetricsConfig, {}))
    store = None if "store" not in document else \
        check_store(from_table(document["store"], "store", StoreConfig, {}), base)
    for entries, section in ((dcs, "datacenter"), (gateways, "gateway"), (regions, "region")):
        for i, e in enumerate(entries):
            check_match(e.name, f"{section}[{i}].name", ENTRY_NAME, "name")
        check_unique_names(entries, section)
    for i, dc in enumerate(dcs):
        here = f"datacenter[{i}]"
        _latlon(dc.lat, dc.lon, here)
        try:
            zoneinfo.ZoneInfo(dc.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"{here}.timezone", f"{dc.timezone!r} is not an IANA time zone") from None
        if dc.capacity < 0 or not 0 <= dc.load:
            raise ConfigError(f"{here}.capacity", "capacity and load must be >= 0")
        try:
            ipaddress.ip_address(dc.tunnel_endpoint)
        except ValueError:
            raise ConfigError(f"{here}.tunnel_endpoint", f"{dc.tunnel_endpoint!r} is not an IP address") from None
        if dc.encap not in ENCAPS:
            raise ConfigError(f"{here}.encap", f"{dc.encap!r} is not one of {', '.join(ENCAPS)}")
        if dc.agent is not None and not _URL.match(dc.agent):
            raise ConfigError(f"{here}.agent", f"{dc.agent!r} is not an http(s) URL")
        if dc.agent is not None and not dc.agent_token:
            raise ConfigError(f"{here}.agent_token", "missing; required with agent")
    dc_names = {dc.name for dc in dcs}
    for i, g in enumerate(gateways):
        if g.datacenter not in dc_names:
            raise ConfigError(f"gateway[{i}].datacenter", f"unknown data center {g.datacenter!r}")
        if not _URL.match(g.agent):
            raise ConfigError(f"gateway[{i}].agent", f"{g.agent!r} is not an http(s) URL")
    for i, r in enumerate(regions):
        _latlon(r.lat, r.lon, f"region[{i}]")
    dcs = tuple(_agent_tls(dc, f"datacenter[{i}]", base) for i, dc in enumerate(dcs))
    gateways = tuple(_agent_tls(g, f"gateway[{i}]", base) for i, g in enumerate(gateways))
    resolved = []
    for i, img in enumerate(images):
        path = img.path if os.path.isabs(img.path) else os.path.join(base, img.path)
        if not os.path.isfile(path):
            raise ConfigError(f"image[{i}].path", f"{img.path!r} is not a file")
        resolved.append(dataclasses.replace(img, path=path))
    return dataclasses.replace(center, name=center.name or socket.gethostname(),
                               weights={k: float(v) for k, v in weights.items()}, datacenters=dcs,
                               gateways=gateways, regions=regions, images=tuple(resolved), metrics=metrics,
                               store=store)


def _agent_tls(entry: _E, here: str, base: str) -> _E:
    """`entry` with its tls_ca/tls_cert/tls_key resolved (relative to the config file): files,
    for an https agent; cert and key together."""
    if (entry.tls_cert is None) != (entry.tls_key is None):
        raise ConfigError(f"{here}.tls_cert" if entry.tls_cert is None else f"{here}.tls_key",
                          "tls_cert and tls_key go together")
    paths = {}
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = getattr(entry, key)
        if value is None:
            continue
        if not (entry.agent or "").startswith("https://"):
            raise ConfigError(f"{here}.{key}", f"set, but agent {entry.agent!r} is not an https:// URL")
        paths[key] = os.path.join(base, value)
        if not os.path.isfile(paths[key]):
            raise ConfigError(f"{here}.{key}", f"{value!r} is not a file")
    return dataclasses.replace(entry, **paths)


def _latlon(lat: float, lon: float, here: str) -> None:
    if not -90 <= lat <= 90:
        raise ConfigError(f"{here}.lat", f"{lat} is out of range -90..90")
    if not -180 <= lon <= 180:
        raise ConfigError(f"{here}.lon", f"{lon} is out of range -180..180")

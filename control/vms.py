"""A VM's runtime state on a gateway, the one place a VM's location lives: where it
is now (a port on a host, or a tunnel endpoint; moves change it) and the
forwarding this gateway derives from it (a local port and MAC, or a tunnel),
the operator's admin state, the health checks' verdict, and the effective state
the dataplane and the Maglev tables use."""
from __future__ import annotations

import fnmatch
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from control.config import Config, IPAddress, VMConfig


ADMIN_STATES = ("active", "draining", "down")   # set by the operator (xdpgw vm up|drain|down)
HEALTH_STATES = ("unknown", "up", "down")        # set by the health checks (control/health.py)


def effective_state(admin: str, health: str, weight: int) -> str:
    """The state the dataplane and the Maglev tables use; the one place it is computed.

    down if the health checks say so (or the operator forces it), else the
    operator's state, where weight 0 means draining: only active VMs are in the
    Maglev tables; a draining VM keeps its flows and takes no new ones; a down
    VM's flows are re-selected on their next packet. Unknown health (no check,
    or none decided yet) leaves the admin state alone."""
    if health == "down" or admin == "down":
        return "down"
    if admin == "draining" or weight == 0:
        return "draining"
    return "active"


class LocationError(ValueError):
    """A location this gateway cannot forward to (the message says why)."""


@dataclass(frozen=True)
class Location:
    """Where a VM is, the same for every gateway (the store holds it): a port on a
    [[host]]; a port with no host, which is a port of every gateway that names it
    (a config without hosts: the gateways must name the port the same); or a bare
    tunnel endpoint."""
    host: str | None = None
    port: str | None = None
    mac: str | None = None
    tunnel: IPAddress | None = None

    @classmethod
    def of(cls, vm: VMConfig) -> "Location":
        """The location a VM's config gives it."""
        return cls(vm.host, vm.port, vm.mac, vm.tunnel)

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "mac": self.mac,
                "tunnel": str(self.tunnel) if self.tunnel is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Location":
        tunnel = d.get("tunnel")
        return cls(d.get("host"), d.get("port"), d.get("mac"),
                   ipaddress.ip_address(tunnel) if tunnel is not None else None)

    def __str__(self) -> str:
        if self.tunnel is not None:
            return str(self.tunnel)
        return f"{self.host}:{self.port}" if self.host else str(self.port)


@dataclass(frozen=True)
class Forwarding:
    """What one gateway does for a VM: a local port (MAC rewrite + devmap) or a tunnel,
    by the encapsulation of the host it leads to ([[host]] encap)."""
    port: str | None = None
    mac: str | None = None
    tunnel: IPAddress | None = None
    encap: str = "ipip"


def forwarding(location: Location, config: Config) -> Forwarding:
    """The one derivation of a gateway's forwarding from a VM's location: a local port
    when the host is one of gateway.hosts (or the location names no host), else a
    tunnel to the host's endpoint."""
    if location.tunnel is not None:
        return Forwarding(tunnel=location.tunnel)
    if location.port is None:
        raise LocationError(f"location {location.as_dict()} has neither a port nor a tunnel")
    if location.host is None or location.host in config.gateway.hosts:
        return Forwarding(port=location.port, mac=location.mac)
    host = next((h for h in config.hosts if h.name == location.host), None)
    if host is None:
        raise LocationError(f"host {location.host!r} is not a [[host]] of this gateway's config")
    endpoint = host.endpoint if host.endpoint is not None else host.endpoint6
    if endpoint is None:
        raise LocationError(f"host {host.name!r} has no tunnel endpoint (host.endpoint / host.endpoint6)")
    return Forwarding(tunnel=endpoint, encap=host.encap)


def host_of_port(port: str, config: Config) -> str | None:
    """The own host (gateway.hosts) whose port patterns match `port`; None if none does."""
    for h in config.hosts:
        if h.name in config.gateway.hosts and any(fnmatch.fnmatchcase(port, p) for p in h.ports):
            return h.name
    return None


@dataclass
class VmRuntime:
    """What the gateway knows of a VM now (its location may change by moves)."""
    config: VMConfig
    vm_id: int
    admin_state: str = "active"
    location: Location = field(default_factory=Location)
    port: str | None = None              # port, mac, tunnel: forwarding(location) on this gateway
    mac: str | None = None
    tunnel: IPAddress | None = None
    encap: str = "ipip"                  # the tunnel's encapsulation
    revision: int | None = None          # the store revision of the location applied here
    since: float = field(default_factory=time.time)       # the effective state's start
    health: str = "unknown"
    health_since: float = field(default_factory=time.time)
    last_probe: dict | None = None       # the latest probe result (control/health.py ProbeResult.as_dict)
    tables_at: float | None = None       # when the Maglev tables last took in a change of this VM
    moved_at: float | None = None        # when this gateway last re-pointed it (time.time())

    @property
    def state(self) -> str:
        return effective_state(self.admin_state, self.health, self.config.weight)

    @classmethod
    def placed(cls, config: VMConfig, vm_id: int, location: Location, gateway: Config, **kw: Any) -> "VmRuntime":
        """A VM at `location`, with the forwarding `gateway` derives from it."""
        f = forwarding(location, gateway)
        return cls(config, vm_id, location=location, port=f.port, mac=f.mac, tunnel=f.tunnel, encap=f.encap, **kw)

    def describe(self) -> dict:
        where = {"port": self.port, "mac": self.mac} if self.port else {"tunnel": str(self.tunnel),
                                                                         "encap": self.encap}
        return {"name": self.config.name, "id": self.vm_id, "state": self.state, "weight": self.config.weight,
                "ips": [str(a) for a in self.config.ips], **where, "host": self.location.host,
                "location": self.location.as_dict(), "revision": self.revision, "moved_at": self.moved_at,
                **self.status()}

    def status(self) -> dict:
        """Admin state, health, last probe and time in state (the fields `vm list` and `stats` add)."""
        return {"admin_state": self.admin_state, "health": self.health, "health_since": self.health_since,
                "last_probe": self.last_probe, "since": self.since,
                "in_state_s": round(max(0.0, time.time() - self.since), 3), "tables_at": self.tables_at}

"""A VM's runtime state on a gateway, the one place a VM's location lives: where it
is now (a local port and MAC, or a tunnel endpoint; moves change it), the
operator's admin state, the health checks' verdict, and the effective state the
dataplane and the Maglev tables use."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from control.config import IPAddress, VMConfig


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


@dataclass
class VmRuntime:
    """What the gateway knows of a VM now (its location may change by moves)."""
    config: VMConfig
    vm_id: int
    admin_state: str = "active"
    port: str | None = None
    mac: str | None = None
    tunnel: IPAddress | None = None
    since: float = field(default_factory=time.time)       # the effective state's start
    health: str = "unknown"
    health_since: float = field(default_factory=time.time)
    last_probe: dict | None = None       # the latest probe result (control/health.py ProbeResult.as_dict)
    tables_at: float | None = None       # when the Maglev tables last took in a change of this VM
    moved_at: float | None = None

    @property
    def state(self) -> str:
        return effective_state(self.admin_state, self.health, self.config.weight)

    def describe(self) -> dict:
        where = {"port": self.port, "mac": self.mac} if self.port else {"tunnel": str(self.tunnel)}
        return {"name": self.config.name, "id": self.vm_id, "state": self.state, "weight": self.config.weight,
                "ip": str(self.config.ip) if self.config.ip else None, **where, **self.status()}

    def status(self) -> dict:
        """Admin state, health, last probe and time in state (the fields `vm list` and `stats` add)."""
        return {"admin_state": self.admin_state, "health": self.health, "health_since": self.health_since,
                "last_probe": self.last_probe, "since": self.since,
                "in_state_s": round(max(0.0, time.time() - self.since), 3), "tables_at": self.tables_at}

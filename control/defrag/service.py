"""The defragmentation service of the daemon: measures VM-to-VM traffic from the
VM-port watcher's counters, plans with the planner, and carries out a plan
through the orchestrator and the migration path."""
from __future__ import annotations

import fnmatch
import os
import subprocess
import threading

from control.api.commands import CommandTable, int_arg
from control.api.errors import BadRequest
from control.config import Config
from control.defrag import planner
from control.gateway import GatewayError
from control.migration.service import MigrationService

ORCHESTRATOR_TIMEOUT_S = 60.0
DEFAULT_MAX_MOVES = 16


class DefragService:
    """Reads the migration service's registry and port watcher (both exist once it has started)."""

    def __init__(self, config: Config, migration: MigrationService) -> None:
        self.config = config
        self.migration = migration
        self.baseline: dict[tuple[str, str], int] = {}
        self.apply_lock = threading.Lock()

    def commands(self) -> CommandTable:
        def max_moves(a: dict) -> int:
            return int_arg(a, "max_moves", 0, 1000, default=DEFAULT_MAX_MOVES)

        return CommandTable({
            "defrag.reset": lambda a: self.reset(),
            "defrag.matrix": lambda a: self.state()[0],
            "defrag.plan": lambda a: self.plan(max_moves(a)),
            "defrag.apply": lambda a: self.apply(max_moves(a)),
        })

    def _placement(self) -> dict[str, str]:
        """VM -> the host whose ports (glob patterns) include the VM's port."""
        hosts = self.config.hosts
        out = {}
        for rec in self.migration.registry.vms():
            if rec.kind != "port":
                continue
            for h in hosts:
                if any(fnmatch.fnmatchcase(rec.location, p) for p in h.ports):
                    out[rec.name] = h.name
                    break
        return out

    def _pair_bytes(self) -> dict[tuple[str, str], int]:
        watcher = self.migration.watcher
        if watcher is None:
            raise BadRequest("defrag needs the VM port watcher: set gateway.vm_ports")
        return watcher.pair_bytes()

    def reset(self) -> dict:
        """Measure VM-to-VM traffic from now on (the counters are cumulative)."""
        self.baseline = self._pair_bytes()
        return {"baseline_pairs": len(self.baseline)}

    def state(self) -> tuple[dict, dict, dict, dict]:
        """(the API's view, traffic matrix, placement, tenants) of the traffic since `reset`."""
        recs = self.migration.registry.vms()
        now = self._pair_bytes()
        window = {k: v - self.baseline.get(k, 0) for k, v in now.items() if v - self.baseline.get(k, 0) > 0}
        matrix = planner.traffic_matrix(window, {r.name: r.mac for r in recs}, {r.name: r.ips for r in recs})
        placement = self._placement()
        tenants = {r.name: r.tenant for r in recs}
        frag = planner.fragmentation(matrix, placement, tenants)
        view = {"matrix": [{"src": a, "dst": b, "bytes": w} for (a, b), w in sorted(matrix.items())],
                "placement": placement, "fragmentation": frag}
        return view, matrix, placement, tenants

    def plan(self, max_moves: int) -> dict:
        if not self.config.hosts:
            raise BadRequest("defrag needs [[host]] entries in the config")
        _, matrix, placement, tenants = self.state()
        capacity = {h.name: h.capacity for h in self.config.hosts}
        p = planner.plan(matrix, placement, tenants, capacity, max_moves=max_moves)
        p["moves"] = [m.__dict__ for m in p["moves"]]
        p["text"] = planner.describe(p)
        return p

    def apply(self, max_moves: int) -> dict:
        """Carry out the plan: per move, the orchestrator live-migrates the VM and
        names its new port; the move then goes through the migration path."""
        argv = list(self.config.gateway.orchestrator)
        if not argv:
            raise BadRequest("defrag apply needs gateway.orchestrator (the command that live-migrates a VM)")
        with self.apply_lock:
            p = self.plan(max_moves)
            done = []
            for m in p["moves"]:
                try:
                    out = subprocess.run(argv + [m["vm"], m["dst"]], capture_output=True, text=True,
                                         timeout=ORCHESTRATOR_TIMEOUT_S, check=True, env=dict(os.environ))
                except (subprocess.SubprocessError, OSError) as exc:
                    err = getattr(exc, "stderr", "") or ""
                    done.append({**m, "status": f"orchestrator failed: {exc} {err[-300:]}"})
                    break
                lines = out.stdout.strip().splitlines()
                port = lines[-1].strip() if lines else ""
                rec = self.migration.registry.vm(m["vm"])
                if rec.kind == "port" and rec.location == port:
                    done.append({**m, "port": port, "status": "already detected"})
                    continue
                try:
                    r = self.migration.move(m["vm"], port=port, source="defrag")
                except GatewayError as exc:
                    done.append({**m, "port": port, "status": f"move failed: {exc}"})
                    break
                done.append({**m, "port": port, "status": "ok",
                             "convergence_ms": r["migration"]["convergence_ms"]})
            p["applied"] = done
            p["text"] = planner.describe(p)
            return p

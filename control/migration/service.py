"""Wires the VM registry, the migration manager, the VM-port watcher and the
defragmentation planner into the daemon: `start()` after the gateway is up,
`stop()` before it goes, and `commands()` for the local API."""
from __future__ import annotations

import fnmatch
import logging
import os
import subprocess
import threading
from typing import Any

from control.defrag import planner as defrag
from control.config import Config
from control.gateway import Gateway, GatewayError
from control.migration.manager import MigrationError, MigrationManager, convergence_summary
from control.migration.registry import InvalidTransition, Registry, RegistryError

log = logging.getLogger(__name__)
ORCHESTRATOR_TIMEOUT_S = 60.0


class MigrationService:
    def __init__(self, config: Config, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self.registry: Registry | None = None
        self.manager: MigrationManager | None = None
        self.watcher = None
        self.baseline: dict[tuple[str, str], int] = {}
        self.defrag_lock = threading.Lock()

    # ---- lifecycle
    def start(self) -> None:
        g = self.config.gateway
        self.registry = reg = Registry(g.registry)
        gw = self.gateway
        for name, vm in gw.vms.items():
            kind, where = ("port", vm.port) if vm.port else ("tunnel", str(vm.tunnel))
            rec = reg.sync_vm(name, vm.vm_id, str(vm.config.ip) if vm.config.ip else None, vm.mac,
                              vm.config.tenant, kind, where)
            if (rec.kind, rec.location) != (kind, where):
                self._restore(name, rec.kind, rec.location, rec.mac)
            if rec.state == "migrating":           # a move was cut short by a restart
                reg.transition(name, "running")
            reg.set_holders(name, [g.name])
        # two ports claiming a VM within the conflict window is a conflict; it never outlasts the hold-down
        self.manager = MigrationManager(reg, g.name, self._move_local, peers=g.peers, hold_down=g.migration_hold_down,
                                        conflict_window=min(0.5, g.migration_hold_down))
        if g.vm_ports:
            from control.migration.watcher import PortWatcher

            self.watcher = PortWatcher(g.vm_ports, self.manager.announce, on_link_gone=self._link_gone)
            self.watcher.start()

    def _restore(self, name: str, kind: str, location: str, mac: str | None) -> None:
        """The registry remembers a move from before the restart: point the VM there again."""
        try:
            if kind == "port":
                self.gateway.move_vm(name, port=location, mac=mac)
            else:
                self.gateway.move_vm(name, tunnel=location)
        except Exception as exc:  # noqa: BLE001 - the port may be gone: keep the config's place
            log.warning("VM %s: cannot restore its registered location %s: %s", name, location, exc)
            vm = self.gateway.vm(name)
            self.registry.set_location(name, "port" if vm.port else "tunnel", vm.port or str(vm.tunnel))

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.manager is not None:
            self.manager.close()
        if self.registry is not None:
            self.registry.close()

    def _move_local(self, name: str, port: str | None = None, mac: str | None = None,
                    tunnel: str | None = None) -> dict:
        return self.gateway.move_vm(name, port=port, mac=mac, tunnel=tunnel)

    def _link_gone(self, port: str) -> None:
        for rec in self.registry.at_location("port", port):
            try:
                self.registry.transition(rec.name, "lost")
            except InvalidTransition:
                pass
            self.registry.record_event("port_gone", {"port": port}, vm=rec.name)

    # ---- API
    def commands(self) -> dict[str, Any]:
        def arg(a: dict, name: str, required: bool = True):
            value = a.get(name)
            if value is None and required:
                raise GatewayError(f"missing argument {name!r}")
            if value is not None and not isinstance(value, str):
                raise GatewayError(f"argument {name!r} must be a str")
            return value

        def limit(a: dict) -> int:
            n = a.get("limit", 100)
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10000:
                raise GatewayError("argument 'limit' must be an int in 1..10000")
            return n

        return {
            "vm.move": lambda a: self.move(arg(a, "name"), port=arg(a, "port", False), mac=arg(a, "mac", False),
                                           tunnel=arg(a, "tunnel", False)),
            "vm.history": lambda a: self.history(arg(a, "name", False), limit(a)),
            "vm.events": lambda a: self.registry.events(arg(a, "kind", False), limit(a)),
            "vm.registry": lambda a: [dict(r.as_dict(), holders=self.registry.holders(r.name))
                                      for r in self.registry.vms()],
            "migration.peer_apply": lambda a: self.manager.peer_apply(
                arg(a, "name"), arg(a, "port", False), arg(a, "mac", False), arg(a, "tunnel", False),
                arg(a, "origin"), arg(a, "detected_by")),
            "migration.status": lambda a: {**self.manager.stats(),
                                           "watcher": self.watcher.status() if self.watcher else None,
                                           "registry": self.registry.path,
                                           "journal_mode": self.registry.journal_mode},
            "defrag.reset": lambda a: self.defrag_reset(),
            "defrag.matrix": lambda a: self.defrag_state()[0],
            "defrag.plan": lambda a: self.defrag_plan(a.get("max_moves", 16)),
            "defrag.apply": lambda a: self.defrag_apply(a.get("max_moves", 16)),
        }

    def move(self, name: str, port: str | None = None, mac: str | None = None, tunnel: str | None = None,
             source: str = "explicit") -> dict:
        self.gateway.vm(name)
        try:
            result = self.manager.move(name, port=port, mac=mac, tunnel=tunnel, source=source)
        except (MigrationError, RegistryError) as exc:
            raise GatewayError(str(exc)) from None
        return {**self.gateway.vm(name).describe(), "migration": result}

    def history(self, name: str | None, n: int) -> dict:
        rows = self.registry.history(name, n)
        return {"migrations": rows, "convergence": convergence_summary(rows)}

    # ---- defragmentation
    def _placement(self) -> dict[str, str]:
        hosts = self.config.hosts
        out = {}
        for rec in self.registry.vms():
            if rec.kind != "port":
                continue
            for h in hosts:
                if any(fnmatch.fnmatchcase(rec.location, p) for p in h.ports):
                    out[rec.name] = h.name
                    break
        return out

    def _pair_bytes(self) -> dict[tuple[str, str], int]:
        if self.watcher is None:
            raise GatewayError("defrag needs the VM port watcher: set gateway.vm_ports")
        return self.watcher.pair_bytes()

    def defrag_reset(self) -> dict:
        """Measure VM-to-VM traffic from now on (the counters are cumulative)."""
        self.baseline = self._pair_bytes()
        return {"baseline_pairs": len(self.baseline)}

    def defrag_state(self) -> tuple[dict, dict, dict, dict]:
        recs = self.registry.vms()
        now = self._pair_bytes()
        window = {k: v - self.baseline.get(k, 0) for k, v in now.items() if v - self.baseline.get(k, 0) > 0}
        matrix = defrag.traffic_matrix(window, {r.name: r.mac for r in recs}, {r.name: r.ip for r in recs})
        placement = self._placement()
        tenants = {r.name: r.tenant for r in recs}
        frag = defrag.fragmentation(matrix, placement, tenants)
        view = {"matrix": [{"src": a, "dst": b, "bytes": w} for (a, b), w in sorted(matrix.items())],
                "placement": placement, "fragmentation": frag}
        return view, matrix, placement, tenants

    def defrag_plan(self, max_moves: Any = 16) -> dict:
        if not isinstance(max_moves, int) or isinstance(max_moves, bool) or not 0 <= max_moves <= 1000:
            raise GatewayError("argument 'max_moves' must be an int in 0..1000")
        if not self.config.hosts:
            raise GatewayError("defrag needs [[host]] entries in the config")
        _, matrix, placement, tenants = self.defrag_state()
        capacity = {h.name: h.capacity for h in self.config.hosts}
        p = defrag.plan(matrix, placement, tenants, capacity, max_moves=max_moves)
        p["moves"] = [m.__dict__ for m in p["moves"]]
        p["text"] = defrag.describe(p)
        return p

    def defrag_apply(self, max_moves: Any = 16) -> dict:
        """Carry out the plan: per move, the orchestrator live-migrates the VM and
        names its new port; the move then goes through the migration path."""
        argv = list(self.config.gateway.orchestrator)
        if not argv:
            raise GatewayError("defrag apply needs gateway.orchestrator (the command that live-migrates a VM)")
        with self.defrag_lock:
            p = self.defrag_plan(max_moves)
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
                rec = self.registry.vm(m["vm"])
                if rec.kind == "port" and rec.location == port:
                    done.append({**m, "port": port, "status": "already detected"})
                    continue
                try:
                    r = self.move(m["vm"], port=port, source="defrag")
                except GatewayError as exc:
                    done.append({**m, "port": port, "status": f"move failed: {exc}"})
                    break
                done.append({**m, "port": port, "status": "ok",
                             "convergence_ms": r["migration"]["convergence_ms"]})
            p["applied"] = done
            p["text"] = defrag.describe(p)
            return p

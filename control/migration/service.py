"""Wires the VM registry, the migration manager and the VM-port watcher into the
daemon: `start()` after the gateway is up, `stop()` before it goes, and
`commands()` for the local API."""
from __future__ import annotations

import logging

from control.api.commands import CommandTable, arg, int_arg
from control.config import Config
from control.gateway import Gateway, GatewayError
from control.migration.manager import MigrationError, MigrationManager, convergence_summary
from control.migration.registry import InvalidTransition, Registry, RegistryError, VmRecord

log = logging.getLogger(__name__)


class MigrationService:
    def __init__(self, config: Config, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self.registry: Registry | None = None
        self.manager: MigrationManager | None = None
        self.watcher = None

    # ---- lifecycle
    def start(self) -> None:
        g = self.config.gateway
        self.registry = reg = Registry(g.registry)
        gw = self.gateway
        for name, vm in gw.vms.items():
            rec = self._sync(name)
            if (rec.kind, rec.location) != self._where(name):
                self._restore(name, rec.kind, rec.location, rec.mac)
            if rec.state == "migrating":           # a move was cut short by a restart
                reg.transition(name, "running")
            reg.set_holders(name, [g.name])
        # two ports claiming a VM within the conflict window is a conflict; it never outlasts the hold-down
        self.manager = MigrationManager(reg, g.name, self._move_local, peers=g.peers, hold_down=g.migration_hold_down,
                                        conflict_window=min(0.5, g.migration_hold_down), events=gw.events)
        if g.vm_ports:
            from control.migration.watcher import PortWatcher

            self.watcher = PortWatcher(g.vm_ports, self.manager.announce, on_link_gone=self._link_gone)
            self.watcher.start()

    def _where(self, name: str) -> tuple[str, str]:
        vm = self.gateway.vm(name)
        return ("port", vm.port) if vm.port else ("tunnel", str(vm.tunnel))

    def _sync(self, name: str) -> VmRecord:
        """Register the gateway's VM `name` (identity from its config; a VM the
        registry knows keeps its registered location)."""
        vm = self.gateway.vm(name)
        return self.registry.sync_vm(name, vm.vm_id, str(vm.config.ip) if vm.config.ip else None, vm.mac,
                                     vm.config.tenant, *self._where(name))

    def reloaded(self, config: Config, vms: dict[str, list[str]]) -> None:
        """After a config reload (`vms`: the names added, removed, changed): register
        the new and changed VMs where the gateway now has them."""
        self.config = config
        for name in vms["added"] + vms["changed"]:
            self._sync(name)
            self.registry.set_location(name, *self._where(name), mac=self.gateway.vm(name).mac)
            self.registry.set_holders(name, [config.gateway.name])

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
    def commands(self) -> CommandTable:
        def limit(a: dict) -> int:
            return int_arg(a, "limit", 1, 10000, default=100)

        def where(a: dict) -> dict[str, str | None]:
            return {"port": arg(a, "port", required=False), "mac": arg(a, "mac", required=False),
                    "tunnel": arg(a, "tunnel", required=False)}

        return CommandTable({
            "vm.move": lambda a: self.move(arg(a, "name"), **where(a)),
            "vm.history": lambda a: self.history(arg(a, "name", required=False), limit(a)),
            "vm.events": lambda a: self.registry.events(arg(a, "kind", required=False), limit(a)),
            "vm.registry": lambda a: [dict(r.as_dict(), holders=self.registry.holders(r.name))
                                      for r in self.registry.vms()],
            "migration.peer_apply": lambda a: self.manager.peer_apply(
                arg(a, "name"), **where(a), origin=arg(a, "origin"), detected_by=arg(a, "detected_by")),
            "migration.status": lambda a: {**self.manager.stats(),
                                           "watcher": self.watcher.status() if self.watcher else None,
                                           "registry": self.registry.path,
                                           "journal_mode": self.registry.journal_mode},
        })

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

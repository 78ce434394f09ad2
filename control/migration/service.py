"""Wires the VM registry, the migration manager and the VM-port watcher into the
daemon: `start()` after the gateway is up, `stop()` before it goes, and
`commands()` for the local API."""
from __future__ import annotations

import logging
from collections.abc import Callable

from control.api.commands import CommandTable, arg, int_arg
from control.config import Config
from control.gateway import Gateway, GatewayError, UnknownName
from control.migration.manager import MigrationError, MigrationManager, convergence_summary
from control.migration.follow import Membership
from control.migration.registry import InvalidTransition, Registry, RegistryError, Retention, VmIdentity
from control.store import Store, open_configured, open_store
from control.vms import Location, host_of_port

log = logging.getLogger(__name__)


def open_gateway_store(config: Config) -> tuple[Store, str]:
    """The store the registry lives in and its URL: [store], else the gateway's own SQLite file."""
    if config.store is not None:
        return open_configured(config.store), config.store.url
    url = f"sqlite://{config.gateway.registry}"
    return open_store(url), url


class MigrationService:
    def __init__(self, config: Config, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self.store = None
        self.registry: Registry | None = None
        self.manager: MigrationManager | None = None
        self.membership: Membership | None = None
        self.watcher = None

    # ---- lifecycle
    def start(self, on_store: Callable[[], None] = lambda: None) -> None:
        """Register the configured VMs, join the live gateways and follow the store:
        a VM the store has elsewhere (moved before a restart, or by another gateway)
        is re-pointed there as the watch's first batch. A store that does not answer
        within START_WAIT_S leaves the gateway degraded on the locations it has; all of
        that (after `on_store`, the daemon's own first reads) happens once it answers."""
        g = self.config.gateway
        self.store, url = open_gateway_store(self.config)
        self.registry = Registry(self.store, g.name, Retention(g.history_rows, g.history_max_age))
        gw = self.gateway
        self.membership = Membership(self.store, g.name, info={"hosts": list(g.hosts)})

        def prepare() -> None:
            on_store()
            self._register()
            self.membership.renew()

        # two ports claiming a VM within the conflict window is a conflict; it never outlasts the hold-down
        self.manager = MigrationManager(self.registry, g.name, self._move_local, check_local=gw.check_move,
                                        known={name: vm.location for name, vm in gw.vms.items()},
                                        hold_down=g.migration_hold_down,
                                        conflict_window=min(0.5, g.migration_hold_down), events=gw.events,
                                        membership=self.membership,
                                        host_of=lambda port: host_of_port(port, self.config), store_url=url,
                                        prepare=prepare)
        if g.vm_ports:
            from control.migration.watcher import PortWatcher

            self.watcher = PortWatcher(g.vm_ports, self.manager.announce, on_link_gone=self._link_gone)
            self.watcher.start()

    def _register(self) -> None:
        """The gateway's VMs into the registry; a move cut short by a restart is over."""
        reg = self.registry
        for rec in reg.sync_vms([self._identity(name) for name in self.gateway.vms]):
            if rec.state == "migrating":
                reg.transition(rec.name, "running")

    def _identity(self, name: str) -> VmIdentity:
        """The gateway's VM `name` as the registry registers it (identity from its
        config; a VM the registry knows keeps its registered location)."""
        vm = self.gateway.vm(name)
        where = Location.of(vm.config)
        kind, location = ("tunnel", str(where.tunnel)) if where.tunnel is not None else ("port", where.port)
        return VmIdentity(name, vm.vm_id, tuple(str(a) for a in vm.config.ips), where.mac, vm.config.tenant, kind,
                          location, where.host)

    def reloaded(self, config: Config, vms: dict[str, list[str]]) -> None:
        """After a config reload (`vms`: the names added, removed, changed): register
        the new and changed VMs where the gateway now has them."""
        self.config = config
        for name in vms["added"] + vms["changed"]:
            self.registry.register(self._identity(name))
            where = self.gateway.vm(name).location
            kind, location = ("tunnel", str(where.tunnel)) if where.tunnel is not None else ("port", where.port)
            self.registry.set_location(name, kind, location, mac=where.mac, host=where.host)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.manager is not None:
            self.manager.close()
        if self.membership is not None:
            self.membership.leave()
        if self.store is not None:
            self.store.close()

    def _move_local(self, name: str, port: str | None = None, mac: str | None = None,
                    tunnel: str | None = None, host: str | None = None, revision: int | None = None) -> dict:
        return self.gateway.move_vm(name, port=port, mac=mac, tunnel=tunnel, host=host, revision=revision)

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
                    "tunnel": arg(a, "tunnel", required=False), "host": arg(a, "host", required=False)}

        return CommandTable({
            "vm.move": lambda a: self.move(arg(a, "name"), **where(a)),
            "vm.history": lambda a: self.history(arg(a, "name", required=False), limit(a)),
            "vm.events": lambda a: self.registry.events(arg(a, "kind", required=False), limit(a)),
            "vm.registry": lambda a: [dict(r.as_dict(), holders=list(r.holders)) for r in self.registry.vms()],
            "migration.status": lambda a: {**self.manager.stats(),
                                           "watcher": self.watcher.status() if self.watcher else None,
                                           "registry": self.registry.path,
                                           "journal_mode": self.registry.journal_mode,
                                           "gateways": self.membership.members()},
        })

    def move(self, name: str, port: str | None = None, mac: str | None = None, tunnel: str | None = None,
             source: str = "explicit", host: str | None = None) -> dict:
        self.gateway.vm(name)
        hosts = sorted(h.name for h in self.config.hosts)
        if host is not None and host not in hosts:
            raise UnknownName(f"vm.move: unknown host {host!r} (not a [[host]] of this gateway's config; "
                              f"hosts: {', '.join(hosts) or 'none'})")
        try:
            result = self.manager.move(name, port=port, mac=mac, tunnel=tunnel, source=source, host=host)
        except (MigrationError, RegistryError) as exc:
            raise GatewayError(str(exc)) from None
        return {**self.gateway.vm(name).describe(), "migration": result}

    def store_status(self) -> dict | None:
        """The store as this gateway sees it: url, ok | degraded, the revision applied, since when."""
        return self.manager.follower.status() if self.manager is not None else None

    def history(self, name: str | None, n: int) -> dict:
        rows = self.registry.history(name, n)
        return {"migrations": rows, "convergence": convergence_summary(rows)}

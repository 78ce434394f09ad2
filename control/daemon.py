"""`xdpgw run`: the foreground gateway daemon. Loads, programs and attaches the
dataplane, serves the local API, samples counters into rates, re-reads its
config on SIGHUP (or `config.reload`), and on SIGTERM or SIGINT detaches and
exits 0."""
from __future__ import annotations

import dataclasses
import logging
import resource
import signal
import threading
from collections.abc import Callable

from control.api.commands import CENTER, CommandTable, arg, merge, scoped
from control.api.errors import BadRequest
from control import runtime
from control.api.unix import ApiServer
from control.config import Config, ConfigError, load_config
from control.capture import CaptureService
from control.defrag.service import DefragService
from control.deploy import notify
from control.gateway import Gateway, GatewayError
from control.health import HealthMonitor, checks_from_config
from control.logs import event
from control.migration.follow import START_WAIT_S
from control.migration.service import MigrationService, open_gateway_store
from control.offload.link import OffloadLink
from control.offload.monitor import Monitor
from control.rates import IdleTracker, RateTracker, Sampler
from control.runtime import RuntimeAdditions
from control.store import StoreError
from control.store.base import within
from dataplane.netns import enter_netns
from dataplane.pinning import LayoutError


def enter_gateway_netns(name: str) -> None:
    """Join gateway.netns, if set (see enter_netns: before any thread starts)."""
    if not name:
        return
    try:
        enter_netns(name)
    except OSError as exc:
        raise ConfigError("gateway.netns", f"cannot enter network namespace {name!r}: {exc}") from None


log = logging.getLogger("xdpgw.gateway")

# What a reload applies; every other part of the config (the [gateway] table but
# RELOADABLE_GATEWAY: interface, sizes, hash seed, paths; [monitor], [center],
# [agent], [[host]], and any table added later) takes effect only on a restart.
RELOADABLE = ("regions", "services", "vms")
RELOADABLE_GATEWAY = ("decap_addresses", "decap_from", "gue_port")
_TOML_KEYS = {"regions": "region", "services": "service", "vms": "vm", "hosts": "host"}


def check_reloadable(old: Config, new: Config, source: str | None = None) -> None:
    """ConfigError naming the first key whose change a reload cannot apply."""
    for f in dataclasses.fields(Config):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name == "gateway":
            a = dataclasses.replace(a, **{k: getattr(b, k) for k in RELOADABLE_GATEWAY})
        if f.name in RELOADABLE or a == b:
            continue
        key = _TOML_KEYS.get(f.name, f.name)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            key += "." + next(g.name for g in dataclasses.fields(a) if getattr(a, g.name) != getattr(b, g.name))
        raise ConfigError(key, "changed: this takes a restart (systemctl restart xdpgw@NAME), not a reload; "
                          "nothing was changed", source)


def api_socket_path(config: Config) -> str:
    return config.gateway.api_socket


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.file_config = config               # what the file says
        self.config = config                    # ... and the services and VMs added at run time (run())
        self.config_path = config_path          # what a reload re-reads
        self.additions: RuntimeAdditions | None = None
        self._deferred: RuntimeAdditions | None = None  # additions not read yet: the store did not answer at start
        self._reloading = threading.Lock()      # one change of the config at a time: reloads, additions
        self.gateway = Gateway(config)
        self.rates = RateTracker()
        self.idle = IdleTracker("vms")
        self.sampler = Sampler(lambda: self.gateway.counters(count_flows=False))
        self.sampler.every(config.gateway.stats_interval, self.rates.sample)
        self.sampler.every(config.gateway.stats_interval, self.idle.sample)
        self.stopping = threading.Event()
        self.api: ApiServer | None = None
        self.health: HealthMonitor | None = None
        self.migration = MigrationService(config, self.gateway)
        self.defrag = DefragService(config, self.migration)
        self.capture = CaptureService(self.gateway)
        # region offload: heavy-region monitor, its link to the center, the agent API
        self.monitor: Monitor | None = Monitor(config) if config.monitor else None
        if self.monitor is not None:
            self.sampler.every(self.monitor.interval, self._monitor_sample)
        self.link: OffloadLink | None = None
        self.agent = None
        self.metrics = None                     # control/metrics.py MetricsServer, with [metrics]

    def commands(self) -> CommandTable:
        """The gateway's own commands, the migration service's (vm.move among them:
        registry, history), the defragmentation service's and the capture's:
        all of them on the unix socket; on the HTTP agent only those open to the
        CENTER scope, what the center's workflow calls."""
        gw = self.gateway
        own = {
            "stats": lambda a: {**gw.counters(), "rates": self.rates.rates(), "health": self.health_summary(),
                                "monitor": self.monitor_summary(), "store": self.migration.store_status()},
            "monitor": lambda a: self.monitor_summary(),
            "vm.list": lambda a: [{**vm, "idle_s": self.idle.idle_s(vm["name"])} for vm in gw.vm_list()],
            "vm.state": lambda a: gw.set_vm_state(arg(a, "name"), arg(a, "state")),
            "flow.lookup": lambda a: gw.flow_lookup(arg(a, "service"), arg(a, "src"), arg(a, "sport", int)),
            "offload.set": scoped(lambda a: gw.set_offload(arg(a, "region"), arg(a, "service"), arg(a, "endpoint"),
                                                           arg(a, "encap", required=False) or "ipip"), CENTER),
            "offload.clear": scoped(lambda a: gw.clear_offload(arg(a, "region"), arg(a, "service"),
                                                               now=bool(arg(a, "now", bool, required=False))), CENTER),
            "offload.list": lambda a: gw.offloads(),
            "maglev.tables": lambda a: gw.maglev_tables(),
            "config.reload": lambda a: self._reload_command(),
            "status": scoped(lambda a: {"name": self.config.gateway.name, "interface": self.config.gateway.interface,
                                        "mode": gw.attached_mode, "store": self.migration.store_status()}, CENTER),
            **{command: (lambda a, command=command: self.change_at_run_time(command, a))
               for command in runtime.COMMANDS},
        }
        return merge(own, self.migration.commands(), self.defrag.commands(), self.capture.commands())

    def monitor_summary(self) -> dict:
        """Per region: smoothed rates, state (normal | heavy), thresholds; the center link's last results."""
        if self.monitor is None:
            return {}
        return {"interval": self.monitor.interval, "intervals": self.monitor.k, "regions": self.monitor.snapshot(),
                "center": self.link.snapshot() if self.link else None}

    def start_offload(self) -> None:
        """The agent API (the center calls it) and the monitor's link to the center (it calls the center)."""
        if self.config.agent is not None:
            from control.api.http import AgentServer
            from control.config import parse_listen

            a = self.config.agent
            host, port = parse_listen(a.listen, "agent.listen")
            self.agent = AgentServer(host, port, a.token, self.commands(), a.tls_cert, a.tls_key, a.tls_ca)
            self.agent.start()
        if self.monitor is not None and self.config.center is not None:
            services = list(self.config.monitor.services) or [s.name for s in self.config.services]
            self.link = OffloadLink(self.config, services)
            self.link.start()

    def start_metrics(self) -> None:
        """GET /metrics on [metrics] listen, in the gateway's network namespace, read at scrape time."""
        if self.config.metrics is not None:
            from control.metrics import GatewayCollector, MetricsServer

            self.metrics = MetricsServer(self.config.metrics.listen, GatewayCollector(self.gateway, self.monitor,
                                                                                     self.migration.store_status))

    def _monitor_sample(self, counters: dict, now: float) -> None:
        for change in self.monitor.update(counters["regions"], now=now):
            event(log, f"region.{change.kind}", region=change.region, pps=round(change.pps),
                  mbps=change.bps / 1e6)
            if self.link:
                self.link.submit(change)

    def health_summary(self) -> dict:
        """Probe counts and VMs by health, and the last table rebuild (when, how long)."""
        summary = self.health.summary() if self.health else {"checks": 0}
        return {**summary, "last_rebuild": self.gateway.last_rebuild}

    def start_health(self) -> None:
        """Probe the VMs in a thread of this daemon (in the gateway's network namespace):
        health changes go to the gateway in batches, probe results to `vm list`."""
        self._start_health_monitor(self._health_monitor(checks_from_config(self.config), None))

    def _start_health_monitor(self, health: HealthMonitor | None) -> None:
        self.health = health
        if health is not None:
            health.start()

    def _health_monitor(self, checks: list, carry: HealthMonitor | None) -> HealthMonitor | None:
        """A monitor of `checks`, not started (None if there are none); the checks
        that `carry` (the monitor a reload replaces) ran keep their state."""
        if not checks:
            return None
        # Up to max_concurrent probe sockets besides the maps' and the API's fds.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < 4096:
            resource.setrlimit(resource.RLIMIT_NOFILE, (4096 if hard == resource.RLIM_INFINITY
                                                        else min(4096, hard), hard))
        gw = self.gateway
        health = HealthMonitor(checks, on_change=gw.set_vm_health,
                               on_probe=lambda vm, check, r: gw.record_probe(vm, r.as_dict(check)),
                               events=gw.events)
        if carry is not None:
            health.carry_from(carry)
        return health

    def reload(self) -> dict:
        """Re-read the config file and apply what changed in its regions, services,
        VMs, weights and health checks, as one change of the gateway's maps, keeping
        the services and VMs added at run time. A file that does not parse or
        validate (also with the additions: a name both define is an error naming
        both), or that changes anything else (a restart's business), changes
        nothing: ConfigError naming the key."""
        with self._reloading:
            try:
                if self.api is None or self.additions is None:
                    raise GatewayError(f"the gateway is {self._not_ready()}: reload after that")
                if self.config_path is None:
                    raise ConfigError(None, "the daemon was not started from a config file; nothing to re-read")
                file = load_config(self.config_path)
                check_reloadable(self.config, file, self.config_path)
                tables = self.additions.tables
                changes = self._apply(runtime.merged(file, tables, source=self.config_path),
                                      runtime.locate_errors(file, tables, self.config_path))
            except Exception as exc:
                event(log, "config.reload_refused", logging.ERROR, error=str(exc))
                raise
            self.file_config = file
            event(log, "config.reloaded", file=self.config_path, **_change_fields(changes))
            return changes

    def _not_ready(self) -> str:
        if self._deferred is not None:
            return "waiting for its store to read the services and VMs added at run time (xdpgw stats: store)"
        return "still starting"

    def change_at_run_time(self, command: str, args: dict) -> dict:
        """service.add, service.remove, vm.add, vm.remove (control/runtime.py): the config
        with the change is validated as the file is, applied as a reload is, then kept
        in the store; a change that cannot be kept is undone. Returns what changed,
        as a reload does. A refused change changes nothing: BadRequest naming the key."""
        with self._reloading:
            if self.api is None or self.additions is None:
                raise GatewayError(f"the gateway is {self._not_ready()}: retry after that")
            before = self.additions.tables
            try:
                tables, name = runtime.changed(before, self.file_config, command, args)
                if tables == before:
                    return {kind: {"added": [], "removed": [], "changed": []} for kind in RELOADABLE}
                changes = self._apply(runtime.merged(self.file_config, tables, command=command, subject=name),
                                      runtime.locate_errors(self.file_config, tables, None, command, name))
            except (ConfigError, GatewayError) as exc:
                event(log, "runtime.refused", logging.ERROR, command=command, error=str(exc))
                if isinstance(exc, ConfigError):
                    raise BadRequest(str(exc)) from None
                raise
            try:
                self.additions.save(tables)
            except (StoreError, GatewayError) as exc:
                # what runs must be what a restart finds: back to what the store holds
                self._apply(runtime.merged(self.file_config, before, source=self.config_path),
                            runtime.locate_errors(self.file_config, before, self.config_path))
                event(log, "runtime.refused", logging.ERROR, command=command, error=str(exc))
                raise GatewayError(f"{command}: the store did not take it, so nothing was changed: {exc}") from None
            event(log, "runtime.changed", command=command, entry=name, **_change_fields(changes))
            return changes

    def _apply(self, new: Config, locate: Callable[[ConfigError], ConfigError]) -> dict:
        """Make `new` (validated) the running config: its health checks, the gateway's
        maps, the registry and the monitor. The gateway's own checks of `new` (ports,
        capacity) name entries by their place in it: `locate` says where they are."""
        old_health = health = self.health
        checks = checks_from_config(new)
        if checks != (old_health.checks if old_health else []):
            # stopped first, so that no verdict of the old checks arrives after the new ones take over
            if old_health is not None:
                old_health.stop()
            health = self._health_monitor(checks, old_health)
        try:
            changes = self.gateway.reload(new, {v.name: health.vm_health(v.name) if health else "unknown"
                                                for v in new.vms})
        except Exception as exc:
            if health is not old_health:
                health = self._health_monitor(old_health.checks, old_health) if old_health else None
                self._start_health_monitor(health)
            if isinstance(exc, ConfigError):
                raise locate(exc) from None
            raise
        if health is not old_health:
            self._start_health_monitor(health)
        self.config = new
        self.migration.reloaded(new, changes["vms"])
        if self.monitor is not None:
            self.monitor.reconfigure(new)
        return changes

    def _adopt_additions(self) -> None:
        """Before the gateway starts: read the services and VMs added at run time from
        the store and take them with the file's config. Additions that no longer fit
        the file (it changed while the daemon was down) are logged and not applied,
        but kept: the daemon comes up on the file, and a reload of a file that fits
        them (or their removal) takes them. A store that does not answer within
        START_WAIT_S leaves them for when it answers (_adopt_deferred_additions): the
        gateway comes up on the file, and until then refuses run-time changes and
        reloads (they would be saved over additions it has not read)."""
        store, _ = open_gateway_store(self.config)
        additions = RuntimeAdditions(store, self.config.gateway.name)
        try:
            tables = within(START_WAIT_S, additions.load)
        except StoreError as exc:
            event(log, "runtime.deferred", logging.WARNING, error=str(exc))
            # a new reader: the one that timed out may still be reading, into itself
            self._deferred = RuntimeAdditions(store, self.config.gateway.name)
            return
        self.additions = additions
        new = self._with_additions(tables)
        if new is not None:
            self.config = new
            self.gateway.configure(new)

    def _adopt_deferred_additions(self) -> None:
        """The store answers at last: read the additions _adopt_additions could not and
        apply them as a reload does (StoreError if it cannot be read yet)."""
        additions = self._deferred
        if additions is None:
            return
        tables = additions.load()           # not under the lock: run-time changes are refused at once meanwhile
        with self._reloading:
            self.additions, self._deferred = additions, None
            new = self._with_additions(tables)
            if new is not None:
                changes = self._apply(new, runtime.locate_errors(self.file_config, tables, self.config_path))
                event(log, "runtime.adopted", **_change_fields(changes))

    def _with_additions(self, tables: runtime.Tables) -> Config | None:
        """The file's config with `tables`; None if there are none, or if they do not fit (logged)."""
        if not any(tables.values()):
            return None
        try:
            return runtime.merged(self.file_config, tables, source=self.config_path)
        except ConfigError as exc:
            event(log, "runtime.not_applied", logging.ERROR, error=str(exc))
            return None

    def run(self, reset: bool = False) -> int:
        """Serve until SIGTERM/SIGINT (detach, exit 0) or SIGUSR2 (exit 0 leaving the
        program attached and the state pinned: the upgrade path, where the next
        `xdpgw run` replaces the program in one step and no packet goes unserved)."""
        enter_gateway_netns(self.config.gateway.netns)
        keep_attached = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        signal.signal(signal.SIGUSR2, lambda *_: (keep_attached.set(), self.stopping.set()))
        # the handler only hands over: a reload must not run inside whatever the main thread holds
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self._reload_on_signal, name="xdpgw-reload",
                                                                 daemon=True).start())
        try:
            self._adopt_additions()
            took = self.gateway.start(reset=reset)
            self.start_health()                 # before the store's first answer, which may reload (additions)
            self.migration.start(on_store=self._adopt_deferred_additions)
            self.api = ApiServer(api_socket_path(self.config), self.commands())
            self.api.start()
            self.start_offload()
            self.start_metrics()
            event(log, "gateway.up", gateway=self.config.gateway.name, interface=self.config.gateway.interface,
                  mode=self.gateway.attached_mode, startup_s=round(took, 2), api=self.api.path)
            notify("READY=1")
            self.sampler.run(self.stopping)
        finally:
            notify("STOPPING=1")
            if self.metrics:
                self.metrics.close()
            if self.link:
                self.link.stop()
            if self.agent:
                self.agent.close()
            if self.health:
                self.health.stop()
            if self.api:
                self.api.close()
            self.migration.stop()
            for additions in (self.additions, self._deferred):
                if additions:
                    additions.store.close()
            self.capture.close()                # also before an upgrade: the next program starts unarmed
            if not keep_attached.is_set():
                self.gateway.stop()
        event(log, "gateway.stopped", gateway=self.config.gateway.name,
              xdp="attached" if keep_attached.is_set() else "detached")
        return 0

    def _reload_on_signal(self) -> None:
        """SIGHUP: reload; a refusal is already logged (config.reload_refused)."""
        try:
            self.reload()
        except (ConfigError, GatewayError, LayoutError):
            pass
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback, the daemon serves on
            log.exception("config.reload failed")

    def _reload_command(self) -> dict:
        """`config.reload` over the API: a refused file answers 400 with the reason."""
        try:
            return self.reload()
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None


def _change_fields(changes: dict) -> dict[str, str]:
    """A reload's changes as log fields: services_added=web2,web3 ..."""
    return {f"{kind}_{what}": ",".join(names) for kind, c in changes.items() for what, names in c.items() if names}

"""`xdpgw run`: the foreground gateway daemon. Loads, programs and attaches the
dataplane, serves the local API, samples counters into rates, and on SIGTERM
or SIGINT detaches and exits 0."""
from __future__ import annotations

import resource
import signal
import sys
import threading

from control.api.commands import CommandTable, arg, merge
from control.api.unix import ApiServer
from control.config import Config, ConfigError
from control.defrag.service import DefragService
from control.gateway import Gateway
from control.health import HealthMonitor, checks_from_config
from control.migration.service import MigrationService
from control.offload.link import OffloadLink
from control.offload.monitor import Monitor
from control.rates import RateTracker, Sampler
from dataplane.netns import enter_netns


def enter_gateway_netns(name: str) -> None:
    """Join gateway.netns, if set (see enter_netns: before any thread starts)."""
    if not name:
        return
    try:
        enter_netns(name)
    except OSError as exc:
        raise ConfigError("gateway.netns", f"cannot enter network namespace {name!r}: {exc}") from None


def api_socket_path(config: Config) -> str:
    return config.gateway.api_socket


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.gateway = Gateway(config)
        self.rates = RateTracker()
        self.sampler = Sampler(lambda: self.gateway.counters(count_flows=False))
        self.sampler.every(config.gateway.stats_interval, self.rates.sample)
        self.stopping = threading.Event()
        self.api: ApiServer | None = None
        self.health: HealthMonitor | None = None
        self.migration = MigrationService(config, self.gateway)
        self.defrag = DefragService(config, self.migration)
        # region offload: heavy-region monitor, its link to the center, the agent API
        self.monitor: Monitor | None = Monitor(config) if config.monitor else None
        if self.monitor is not None:
            self.sampler.every(self.monitor.interval, self._monitor_sample)
        self.link: OffloadLink | None = None
        self.agent = None

    def commands(self) -> CommandTable:
        """The gateway's own commands, the migration service's (vm.move among them:
        registry, peers, history) and the defragmentation service's."""
        gw = self.gateway
        own = {
            "stats": lambda a: {**gw.counters(), "rates": self.rates.rates(), "health": self.health_summary(),
                                "monitor": self.monitor_summary()},
            "monitor": lambda a: self.monitor_summary(),
            "vm.list": lambda a: gw.vm_list(),
            "vm.state": lambda a: gw.set_vm_state(arg(a, "name"), arg(a, "state")),
            "flow.lookup": lambda a: gw.flow_lookup(arg(a, "service"), arg(a, "src"), arg(a, "sport", int)),
            "offload.set": lambda a: gw.set_offload(arg(a, "region"), arg(a, "service"), arg(a, "endpoint")),
            "offload.clear": lambda a: gw.clear_offload(arg(a, "region"), arg(a, "service"),
                                                        now=bool(arg(a, "now", bool, required=False))),
            "offload.list": lambda a: gw.offloads(),
            "maglev.tables": lambda a: gw.maglev_tables(),
            "status": lambda a: {"name": self.config.gateway.name, "interface": self.config.gateway.interface,
                                 "mode": gw.attached_mode},
        }
        return merge(own, self.migration.commands(), self.defrag.commands())

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
            self.agent = AgentServer(host, port, a.token, self.commands(), a.tls_cert, a.tls_key)
            self.agent.start()
        if self.monitor is not None and self.config.center is not None:
            services = list(self.config.monitor.services) or [s.name for s in self.config.services]
            self.link = OffloadLink(self.config, services)
            self.link.start()

    def _monitor_sample(self, counters: dict, now: float) -> None:
        for event in self.monitor.update(counters["regions"], now=now):
            print(f"xdpgw: region {event.region} is {event.kind} ({event.pps:.0f} pps, "
                  f"{event.bps / 1e6:.3f} Mbit/s smoothed)", flush=True)
            if self.link:
                self.link.submit(event)

    def health_summary(self) -> dict:
        """Probe counts and VMs by health, and the last table rebuild (when, how long)."""
        summary = self.health.summary() if self.health else {"checks": 0}
        return {**summary, "last_rebuild": self.gateway.last_rebuild}

    def start_health(self) -> None:
        """Probe the VMs in a thread of this daemon (in the gateway's network namespace):
        health changes go to the gateway in batches, probe results to `vm list`."""
        checks = checks_from_config(self.config)
        if checks:
            # Up to max_concurrent probe sockets besides the maps' and the API's fds.
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != resource.RLIM_INFINITY and soft < 4096:
                resource.setrlimit(resource.RLIMIT_NOFILE, (4096 if hard == resource.RLIM_INFINITY
                                                            else min(4096, hard), hard))
            gw = self.gateway
            self.health = HealthMonitor(checks, on_change=gw.set_vm_health,
                                        on_probe=lambda vm, check, r: gw.record_probe(vm, r.as_dict(check)))
            self.health.start()

    def run(self, reset: bool = False) -> int:
        """Serve until SIGTERM/SIGINT (detach, exit 0) or SIGUSR2 (exit 0 leaving the
        program attached and the state pinned: the upgrade path, where the next
        `xdpgw run` replaces the program in one step and no packet goes unserved)."""
        enter_gateway_netns(self.config.gateway.netns)
        keep_attached = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        signal.signal(signal.SIGUSR2, lambda *_: (keep_attached.set(), self.stopping.set()))
        try:
            took = self.gateway.start(reset=reset)
            self.migration.start()
            self.api = ApiServer(api_socket_path(self.config), self.commands())
            self.api.start()
            self.start_health()
            self.start_offload()
            print(f"xdpgw: gateway {self.config.gateway.name} up on {self.config.gateway.interface} "
                  f"({self.gateway.attached_mode} XDP) in {took:.2f} s; API at {self.api.path}", flush=True)
            self.sampler.run(self.stopping)
        finally:
            if self.link:
                self.link.stop()
            if self.agent:
                self.agent.close()
            if self.health:
                self.health.stop()
            if self.api:
                self.api.close()
            self.migration.stop()
            if not keep_attached.is_set():
                self.gateway.stop()
        state = "XDP left attached for the next run" if keep_attached.is_set() else "XDP detached"
        print(f"xdpgw: gateway {self.config.gateway.name} stopped, {state}", file=sys.stderr, flush=True)
        return 0

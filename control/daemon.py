"""`xdpgw run`: the foreground gateway daemon. Loads, programs and attaches the
dataplane, serves the local API, samples counters into rates, and on SIGTERM
or SIGINT detaches and exits 0."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from control.api import ApiServer
from control.config import Config, ConfigError
from control.gateway import Gateway, GatewayError
from control.rates import RateTracker


def enter_netns(name: str) -> None:
    """Join the gateway's network namespace (network only: the mount namespace,
    and with it the host's /sys/fs/bpf, stays). Must run before any thread starts,
    since setns() moves only the calling thread and threads inherit it."""
    if not name:
        return
    from pyroute2 import netns

    try:
        netns.setns(name, flags=0)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError("gateway.netns", f"cannot enter network namespace {name!r}: {exc}") from None


def api_socket_path(config: Config) -> str:
    return config.gateway.api_socket


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.gateway = Gateway(config)
        self.rates = RateTracker()
        self.stopping = threading.Event()
        self.api: ApiServer | None = None

    def commands(self) -> dict[str, Any]:
        gw = self.gateway

        def arg(args: dict, name: str, kind: type = str, required: bool = True):
            value = args.get(name)
            if value is None:
                if required:
                    raise GatewayError(f"missing argument {name!r}")
                return None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise GatewayError(f"argument {name!r} must be a {kind.__name__}")
            return value

        return {
            "stats": lambda a: {**gw.counters(), "rates": self.rates.rates()},
            "vm.list": lambda a: [vm.describe() for vm in gw.vms.values()],
            "vm.move": lambda a: gw.move_vm(arg(a, "name"), port=arg(a, "port", required=False),
                                            mac=arg(a, "mac", required=False),
                                            tunnel=arg(a, "tunnel", required=False)),
            "vm.state": lambda a: gw.set_vm_state(arg(a, "name"), arg(a, "state")),
            "flow.lookup": lambda a: gw.flow_lookup(arg(a, "service"), arg(a, "src"), arg(a, "sport", int)),
            "offload.set": lambda a: gw.set_offload(arg(a, "region"), arg(a, "service"), arg(a, "endpoint")),
            "offload.clear": lambda a: gw.clear_offload(arg(a, "region"), arg(a, "service")),
            "offload.list": lambda a: gw.offloads(),
            "status": lambda a: {"name": self.config.gateway.name, "interface": self.config.gateway.interface,
                                 "mode": gw.attached_mode},
        }

    def run(self, reset: bool = False) -> int:
        enter_netns(self.config.gateway.netns)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            took = self.gateway.start(reset=reset)
            self.api = ApiServer(api_socket_path(self.config), self.commands())
            self.api.start()
            print(f"xdpgw: gateway {self.config.gateway.name} up on {self.config.gateway.interface} "
                  f"({self.gateway.attached_mode} XDP) in {took:.2f} s; API at {self.api.path}", flush=True)
            interval = self.config.gateway.stats_interval
            while not self.stopping.wait(interval):
                self.rates.sample(self.gateway.counters())
        finally:
            if self.api:
                self.api.close()
            self.gateway.stop()
        print(f"xdpgw: gateway {self.config.gateway.name} stopped, XDP detached", file=sys.stderr, flush=True)
        return 0

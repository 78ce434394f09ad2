"""The `xdpgw` command line. Bad input ends in one line on stderr naming the
culprit and a non-zero exit: 2 for configuration and usage errors, 1 when the
daemon refuses a request or cannot be reached."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from control.api import ApiError, call
from control.config import Config, ConfigError, load_config
from dataplane.pinning import LayoutError
from dataplane.program import LoadError

DEFAULT_CONFIG = "/etc/xdpgw/xdpgw.toml"
EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """Bad command-line input; exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdpgw", description="XDP cloud data-center gateway")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=os.environ.get("XDPGW_CONFIG", DEFAULT_CONFIG),
                        help=f"TOML config file (default $XDPGW_CONFIG or {DEFAULT_CONFIG})")
        return sp

    run = with_config(sub.add_parser("run", help="run the gateway daemon in the foreground"))
    run.add_argument("--reset", action="store_true",
                     help="discard the pinned state of an earlier run (flows, counters, offloads)")
    with_config(sub.add_parser("reset", help="remove the gateway's pinned state (the daemon must be stopped)"))
    with_config(sub.add_parser("check", help="validate the config and exit"))
    stats = with_config(sub.add_parser("stats", help="counters and rates"))
    stats.add_argument("--json", action="store_true", help="machine-readable output")

    vm = sub.add_parser("vm", help="VMs").add_subparsers(dest="vm_command", required=True)
    with_config(vm.add_parser("list", help="VMs with location and state"))
    move = with_config(vm.add_parser("move", help="re-point a VM after a live migration"))
    move.add_argument("name")
    where = move.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="local host port (ifname) the VM is now behind")
    where.add_argument("--tunnel", help="remote endpoint address the VM is now behind")
    move.add_argument("--mac", help="the VM's MAC on its new port (default: unchanged)")
    for state, text in (("drain", "keep existing flows, take no new ones"),
                        ("down", "take no traffic, whatever the health checks say (admin override)"),
                        ("up", "take new flows again (clears drain and down; health checks still apply)")):
        sp = with_config(vm.add_parser(state, help=text))
        sp.add_argument("name")

    flow = sub.add_parser("flow", help="flows").add_subparsers(dest="flow_command", required=True)
    lookup = with_config(flow.add_parser("lookup", help="which VM a flow goes to, and why"))
    lookup.add_argument("--service", required=True)
    lookup.add_argument("--src", required=True, help="IP:PORT, or [IPv6]:PORT")

    off = sub.add_parser("offload", help="region offload").add_subparsers(dest="offload_command", required=True)
    oset = with_config(off.add_parser("set", help="send new flows of a region to another data center"))
    oclear = with_config(off.add_parser("clear", help="serve a region locally again"))
    for sp in (oset, oclear):
        sp.add_argument("--region", required=True)
        sp.add_argument("--service", required=True)
    oset.add_argument("--endpoint", required=True, help="tunnel endpoint of the target data center")
    oclear.add_argument("--now", action="store_true",
                        help="also bring flows already offloaded home (default: they finish remotely)")
    with_config(off.add_parser("list", help="active offloads"))

    tb = sub.add_parser("testbed", help="the built-in namespace testbed")
    tb.add_argument("action", choices=["up", "down"])
    tb.add_argument("--prefix", default="xgw", help="namespace name prefix (default xgw)")
    demo = sub.add_parser("demo", help="testbed + daemon + traffic + a live VM move, then teardown")
    demo.add_argument("--prefix", default="xgwd", help="namespace name prefix (default xgwd)")
    demo.add_argument("--seconds", type=float, default=12.0, help="traffic duration (default 12)")
    return p


def split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--src {text!r}: expected IP:PORT or [IPv6]:PORT")
    return host, int(port)


def _socket(config: Config) -> str:
    from control.daemon import api_socket_path

    return api_socket_path(config)


def _print(result: Any) -> None:
    print(json.dumps(result, indent=2))


def _cmd_run(args: argparse.Namespace) -> int:
    from control.daemon import Daemon

    config = load_config(args.config)
    if os.geteuid() != 0:
        raise UsageError("xdpgw run must run as root (it loads BPF programs and attaches XDP)")
    return Daemon(config).run(reset=args.reset)


def _cmd_reset(args: argparse.Namespace) -> int:
    from dataplane.pinning import remove_pins

    config = load_config(args.config)
    try:
        call(_socket(config), "status")
    except ApiError:
        pass
    else:
        raise UsageError(f"gateway {config.gateway.name} is running; stop it before removing its pinned state")
    removed = remove_pins(config.gateway.pin_dir)
    print(f"{config.gateway.pin_dir}: {'removed' if removed else 'nothing pinned'}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from control.stats_view import render

    result = call(_socket(load_config(args.config)), "stats")
    if args.json:
        _print(result)
    else:
        print(render(result))
    return 0


def _cmd_vm(args: argparse.Namespace) -> int:
    path = _socket(load_config(args.config))
    if args.vm_command == "list":
        from control.stats_view import render_vm_line

        for vm in call(path, "vm.list"):
            print(render_vm_line(vm))
    elif args.vm_command == "move":
        _print(call(path, "vm.move", name=args.name, port=args.port, tunnel=args.tunnel, mac=args.mac))
    else:
        state = {"drain": "draining", "down": "down", "up": "active"}[args.vm_command]
        _print(call(path, "vm.state", name=args.name, state=state))
    return 0


def _cmd_flow(args: argparse.Namespace) -> int:
    host, port = split_host_port(args.src)
    r = call(_socket(load_config(args.config)), "flow.lookup", service=args.service, src=host, sport=port)
    print(f"{r['src']} -> service {r['service']} (region {r['region'] or 'unknown'}): "
          f"VM {r['vm'] or '-'} by {r['reason']}")
    return 0


def _cmd_offload(args: argparse.Namespace) -> int:
    path = _socket(load_config(args.config))
    if args.offload_command == "set":
        _print(call(path, "offload.set", region=args.region, service=args.service, endpoint=args.endpoint))
    elif args.offload_command == "clear":
        _print(call(path, "offload.clear", region=args.region, service=args.service, now=args.now))
    else:
        for o in call(path, "offload.list"):
            print(f"region {o['region']} service {o['service']} -> {o['endpoint']}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.regions)} regions, {len(config.services)} services, "
          f"{len(config.vms)} VMs)")
    return 0


def _cmd_testbed(args: argparse.Namespace) -> int:
    from dataplane.testbed import main as testbed_main

    return testbed_main([args.action, "--prefix", args.prefix])


def _cmd_demo(args: argparse.Namespace) -> int:
    from control.demo import run_demo

    return run_demo(prefix=args.prefix, seconds=args.seconds)


COMMANDS = {"run": _cmd_run, "reset": _cmd_reset, "check": _cmd_check, "stats": _cmd_stats, "vm": _cmd_vm, "flow": _cmd_flow,
            "offload": _cmd_offload, "testbed": _cmd_testbed, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError, LayoutError, LoadError) as exc:
        print(f"xdpgw: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ApiError, RuntimeError, OSError, ValueError) as exc:
        print(f"xdpgw: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

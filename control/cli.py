"""The `xdpgw` command line. Bad input ends in one line on stderr naming the
culprit and a non-zero exit: 2 for configuration and usage errors, 1 when the
daemon refuses a request or cannot be reached."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import entry_points
from typing import Any, Sequence

from control.api.unix import ApiError, call
from control.config import Config, ConfigError, load_config, parse_listen, split_addr_port
from control.defrag.planner import DEFAULT_MAX_MOVES
from control.logs import configure as configure_logging
from dataplane.pinning import LayoutError
from dataplane.program import LoadError

DEFAULT_CONFIG = "/etc/xdpgw/xdpgw.toml"
# Packages beside the gateway (the namespace testbed) add subcommands here, so the
# production CLI never imports them: each entry point is called with the subparsers.
PLUGIN_GROUP = "xdpgw.commands"
EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """Bad command-line input; exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdpgw", description="XDP cloud data-center gateway")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_daemon_commands, _add_service_commands, _add_vm_commands, _add_flow_commands,
                _add_offload_commands, _add_center_command, _add_defrag_commands, _add_capture_command):
        add(sub)
    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()(sub)
    return p


def _with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("--config", default=os.environ.get("XDPGW_CONFIG", DEFAULT_CONFIG),
                    help=f"TOML config file (default $XDPGW_CONFIG or {DEFAULT_CONFIG})")
    return sp


def _add_daemon_commands(sub: argparse._SubParsersAction) -> None:
    run = _with_config(sub.add_parser("run", help="run the gateway daemon in the foreground"))
    run.add_argument("--reset", action="store_true",
                     help="discard the pinned state of an earlier run (flows, counters, offloads)")
    _with_config(sub.add_parser("reset", help="remove the gateway's pinned state (the daemon must be stopped)"))
    _with_config(sub.add_parser("check", help="validate the config and exit"))
    _with_config(sub.add_parser("reload", help="make the running daemon re-read its config file (as SIGHUP does)"))
    svc = sub.add_parser("install-service", help="write the systemd unit (xdpgw@.service, or the center's) "
                                                 "and print the systemctl commands to run")
    svc.add_argument("--center", action="store_true", help="the control center's unit (xdpgw-center@.service)")
    svc.add_argument("--name", help="the instance: its config is /etc/xdpgw/NAME.toml "
                                    "(default: xdpgw, or center with --center)")
    svc.add_argument("--root", default="/", help="install under this directory instead of / (packaging, tests)")
    svc.add_argument("--bin", help="the xdpgw executable the unit runs (default: this one)")
    stats = _with_config(sub.add_parser("stats", help="counters and rates"))
    stats.add_argument("--json", action="store_true", help="machine-readable output")


_RUNTIME_NOTE = "kept across restarts and reloads; entries of the config file are changed there"


def _add_service_commands(sub: argparse._SubParsersAction) -> None:
    svc = sub.add_parser("service", help="services added at run time").add_subparsers(dest="service_command",
                                                                                       required=True)
    add = _with_config(svc.add_parser("add", help=f"serve a new service now ({_RUNTIME_NOTE})"))
    add.add_argument("name")
    add.add_argument("--vip", required=True)
    add.add_argument("--port", type=int, required=True)
    add.add_argument("--protocol", required=True, choices=["tcp", "udp"])
    add.add_argument("--vm", dest="vms", action="append", required=True, help="a VM of the service (repeat)")
    add.add_argument("--health", help='its health check as a TOML inline table, e.g. \'{ kind = "tcp" }\'')
    remove = _with_config(svc.add_parser("remove", help="stop serving a service added at run time "
                                                        "(its flows stop)"))
    remove.add_argument("name")


def _add_vm_commands(sub: argparse._SubParsersAction) -> None:
    vm = sub.add_parser("vm", help="VMs").add_subparsers(dest="vm_command", required=True)
    _with_config(vm.add_parser("list", help="VMs with location and state"))
    add = _with_config(vm.add_parser("add", help=f"add a VM now ({_RUNTIME_NOTE})"))
    add.add_argument("name")
    add.add_argument("--port", help="local host port (ifname) the VM is behind (with --mac)")
    add.add_argument("--mac")
    add.add_argument("--tunnel", help="remote endpoint address the VM is behind")
    add.add_argument("--host", help="the [[host]] its port is on")
    add.add_argument("--ip", dest="ips", action="append", help="an address of the VM (repeat for each)")
    add.add_argument("--weight", type=int)
    add.add_argument("--tenant")
    add.add_argument("--service", dest="services", action="append", help="a service it joins (repeat)")
    remove = _with_config(vm.add_parser("remove", help="remove a VM added at run time (it leaves every service)"))
    remove.add_argument("name")
    move = _with_config(vm.add_parser("move", help="re-point a VM after a live migration"))
    move.add_argument("name")
    where = move.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="local host port (ifname) the VM is now behind")
    where.add_argument("--tunnel", help="remote endpoint address the VM is now behind")
    move.add_argument("--mac", help="the VM's MAC on its new port (default: unchanged)")
    move.add_argument("--host", help="the [[host]] the new port is on (default: this gateway's own host whose "
                      "ports match --port); a host it does not own is reached by tunnel")
    hist = _with_config(vm.add_parser("history", help="migrations (from, to, how detected, convergence)"))
    hist.add_argument("name", nargs="?")
    hist.add_argument("--json", action="store_true")
    events = _with_config(vm.add_parser("events", help="refused announcements: spoofed, conflicting, flapping"))
    events.add_argument("--json", action="store_true")
    for state, text in (("drain", "keep existing flows, take no new ones"),
                        ("down", "take no traffic, whatever the health checks say (admin override)"),
                        ("up", "take new flows again (clears drain and down; health checks still apply)")):
        sp = _with_config(vm.add_parser(state, help=text))
        sp.add_argument("name")


def _add_flow_commands(sub: argparse._SubParsersAction) -> None:
    flow = sub.add_parser("flow", help="flows").add_subparsers(dest="flow_command", required=True)
    lookup = _with_config(flow.add_parser("lookup", help="which VM a flow goes to, and why"))
    lookup.add_argument("--service", required=True)
    lookup.add_argument("--src", required=True, help="IP:PORT, or [IPv6]:PORT")


def _add_offload_commands(sub: argparse._SubParsersAction) -> None:
    off = sub.add_parser("offload", help="region offload").add_subparsers(dest="offload_command", required=True)
    oset = _with_config(off.add_parser("set", help="send new flows of a region to another data center"))
    oclear = _with_config(off.add_parser("clear", help="serve a region locally again"))
    for sp in (oset, oclear):
        sp.add_argument("--region", required=True)
        sp.add_argument("--service", required=True)
    oset.add_argument("--endpoint", required=True, help="tunnel endpoint of the target data center")
    oclear.add_argument("--now", action="store_true",
                        help="also bring flows already offloaded home (default: they finish remotely)")
    _with_config(off.add_parser("list", help="active offloads"))


def _add_center_command(sub: argparse._SubParsersAction) -> None:
    center = sub.add_parser("center", help="the control center (region offload); `xdpgw center --config FILE` runs it")
    center.add_argument("action", nargs="?", default="run", choices=["run", "explain", "list", "show"],
                        help="run (default) the center; explain REQUEST: each candidate's score per factor; "
                             "list: the requests; show REQUEST: one request and its history")
    center.add_argument("request", nargs="?", help="request id (explain, show)")
    center.add_argument("--config", default=os.environ.get("XDPGW_CENTER_CONFIG", "/etc/xdpgw/center.toml"),
                        help="the center's TOML config (default $XDPGW_CENTER_CONFIG or /etc/xdpgw/center.toml)")


def _add_defrag_commands(sub: argparse._SubParsersAction) -> None:
    dfg = sub.add_parser("defrag", help="tenant defragmentation").add_subparsers(dest="defrag_command", required=True)
    for action, text in (("plan", "print the migration plan and the expected reduction"),
                         ("apply", "carry out the plan through the migration path"),
                         ("reset", "measure VM-to-VM traffic from now on")):
        sp = _with_config(dfg.add_parser(action, help=text))
        sp.add_argument("--json", action="store_true")
        if action != "reset":
            sp.add_argument("--max-moves", type=int, default=DEFAULT_MAX_MOVES)


def _add_capture_command(sub: argparse._SubParsersAction) -> None:
    from dataplane.structs import CAPTURE_SNAPLEN_MAX

    cap = _with_config(sub.add_parser(
        "capture", help="capture packets at the XDP hook as pcap (stdout: `xdpgw capture | tcpdump -r -`)",
        description="Record the packets the XDP program sees, as received and (forwarded or tunnelled ones) "
                    "as sent, in classic pcap. Stops after COUNT packets or on Ctrl-C."))
    cap.add_argument("--region", help="source region (`unknown`: no prefix matched, or dropped before the lookup)")
    cap.add_argument("--service")
    cap.add_argument("--vm")
    cap.add_argument("--verdict", help="pass, drop, forward or tunnel")
    cap.add_argument("--reason", help="drop reason (as `xdpgw stats` names them); implies --verdict drop")
    cap.add_argument("--snaplen", type=int, default=CAPTURE_SNAPLEN_MAX,
                     help=f"bytes kept of each frame, 1..{CAPTURE_SNAPLEN_MAX} (default {CAPTURE_SNAPLEN_MAX})")
    cap.add_argument("-c", dest="count", type=int, help="stop after COUNT packets")
    cap.add_argument("-w", dest="file", default="-", help="pcap file to write (default -: stdout)")
    cap.add_argument("--summary", action="store_true",
                     help="one key=value line per packet on stderr: verdict, drop reason, region, service, VM")


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
    configure_logging()
    return Daemon(config, args.config).run(reset=args.reset)


def _cmd_reload(args: argparse.Namespace) -> int:
    config = load_config(args.config)      # a file that does not validate is refused here already (exit 2)
    _print_changes(call(_socket(config), "config.reload", timeout=60.0))
    return 0


def _print_changes(changes: dict) -> None:
    """What a reload or a run-time change did, per kind: added, removed, changed names."""
    for kind, change in changes.items():
        done = [f"{what} {', '.join(names)}" for what, names in change.items() if names]
        print(f"{kind}: {'; '.join(done) if done else 'unchanged'}")


def _cmd_service(args: argparse.Namespace) -> int:
    path = _socket(load_config(args.config))
    if args.service_command == "add":
        health = None
        if args.health is not None:
            import tomllib

            try:
                health = tomllib.loads(f"health = {args.health}")["health"]
            except tomllib.TOMLDecodeError as exc:
                raise UsageError(f"--health {args.health!r}: not a TOML inline table: {exc}") from None
        _print_changes(call(path, "service.add", timeout=60.0, name=args.name, vip=args.vip, port=args.port,
                            protocol=args.protocol, vms=args.vms, health=health))
    else:
        _print_changes(call(path, "service.remove", timeout=60.0, name=args.name))
    return 0


def _cmd_install_service(args: argparse.Namespace) -> int:
    from control.deploy import InstallError, install_units

    try:
        lines = install_units(center=args.center, name=args.name, root=args.root, executable=args.bin)
    except InstallError as exc:
        raise UsageError(str(exc)) from None
    for line in lines:
        print(line)
    return 0


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
    elif args.vm_command == "add":
        _print_changes(call(path, "vm.add", timeout=60.0, name=args.name, port=args.port, mac=args.mac,
                            tunnel=args.tunnel, host=args.host, ips=args.ips, weight=args.weight,
                            tenant=args.tenant, services=args.services))
    elif args.vm_command == "remove":
        _print_changes(call(path, "vm.remove", timeout=60.0, name=args.name))
    elif args.vm_command == "move":
        if args.host is not None and args.port is None:
            raise UsageError("vm move: --host goes with --port (a --tunnel is an endpoint, on no host)")
        _print(call(path, "vm.move", name=args.name, port=args.port, tunnel=args.tunnel, mac=args.mac,
                    host=args.host))
    elif args.vm_command == "history":
        r = call(path, "vm.history", name=args.name)
        if args.json:
            _print(r)
        else:
            for m in r["migrations"]:
                ms = "-" if m["convergence_ms"] is None else f"{m['convergence_ms']:.3f} ms"
                print(f"#{m['id']} {m['vm']}: {m['from_location']} -> {m['to_location']} by {m['detected_by']}, "
                      f"converged in {ms} on {', '.join(m['gateways'])} ({m['status']})")
            c = r["convergence"]
            if c["count"]:
                print(f"convergence over {c['count']}: median {c['median_ms']:.3f} ms, p90 {c['p90_ms']:.3f} ms, "
                      f"max {c['max_ms']:.3f} ms")
    elif args.vm_command == "events":
        r = call(path, "vm.events")
        if args.json:
            _print(r)
        else:
            for e in r:
                print(f"{e['kind']:<12} {e['vm'] or '-':<8} {e['detail']}")
    else:
        state = {"drain": "draining", "down": "down", "up": "active"}[args.vm_command]
        _print(call(path, "vm.state", name=args.name, state=state))
    return 0


def _cmd_flow(args: argparse.Namespace) -> int:
    try:
        host, port = split_addr_port(args.src)
    except ValueError:
        raise UsageError(f"--src {args.src!r}: expected IP:PORT or [IPv6]:PORT") from None
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


def _cmd_center(args: argparse.Namespace) -> int:
    from control.center.config import load_center_config

    config = load_center_config(args.config)
    if args.action == "run":
        from control.center.server import serve

        configure_logging()
        return serve(config)
    from control.center.client import CenterClient

    host, port = parse_listen(config.listen, "center.listen")
    host = f"[{host}]" if ":" in host else host
    client = CenterClient(f"{'https' if config.tls_cert else 'http'}://{host}:{port}", config.token,
                          cafile=config.tls_cert)
    if args.action == "list":
        for r in client.call("GET", "/v1/requests"):
            print(f"{r['id']:>5} {r['state']:<14} gateway {r['gateway']} region {r['region']} service {r['service']} "
                  f"-> {r['target'] or '-'}{'  (clear requested)' if r['clear_requested'] else ''}"
                  f"{'  error: ' + r['error'] if r['error'] else ''}")
        return 0
    if not args.request or not args.request.isdigit():
        raise UsageError(f"xdpgw center {args.action}: give a request id")
    if args.action == "show":
        _print(client.call("GET", f"/v1/requests/{args.request}"))
        return 0
    from control.center.scoring import FACTORS

    out = client.call("GET", f"/v1/requests/{args.request}/explain")
    for title, rows in (("as chosen", out["chosen"]), ("now", out["now"])):
        if not rows:
            continue
        print(f"request {out['request']}: candidates {title} (target {out['target'] or '-'})")
        print(f"  {'data center':<14}{'total':>7} " + " ".join(f"{f:>12}" for f in FACTORS))
        for row in rows:
            if not row["eligible"]:
                print(f"  {row['name']:<14}{'-':>7}  excluded: {row['excluded']}")
                continue
            cells = [f"{row['factors'][f]['score']:.3f}x{row['factors'][f]['weight']:g}" if f in row["factors"]
                     else "-" for f in FACTORS]
            print(f"  {row['name']:<14}{row['total']:>7.3f} " + " ".join(f"{c:>12}" for c in cells))
            print(f"  {'':<22}" + "; ".join(f"{f}: {v['value']}" for f, v in row["factors"].items()))
    return 0


def _cmd_defrag(args: argparse.Namespace) -> int:
    path = _socket(load_config(args.config))
    if args.defrag_command == "reset":
        _print(call(path, "defrag.reset"))
        return 0
    r = call(path, f"defrag.{args.defrag_command}", timeout=600.0, max_moves=args.max_moves)
    if args.json:
        _print(r)
    else:
        print(r["text"])
        for m in r.get("applied", []):
            print(f"  applied {m['vm']} -> {m['dst']} ({m.get('port', '-')}): {m['status']}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.regions)} regions, {len(config.services)} services, "
          f"{len(config.vms)} VMs)")
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from control.capture import BadFlag, CaptureRequest, run_capture

    config = load_config(args.config)
    try:
        request = CaptureRequest(snaplen=args.snaplen, region=args.region, service=args.service, vm=args.vm,
                                 verdict=args.verdict, reason=args.reason).check(config)
    except BadFlag as exc:
        raise UsageError(str(exc)) from None
    if args.count is not None and args.count < 1:
        raise UsageError(f"-c {args.count}: the packet count must be at least 1")
    if args.file == "-" and sys.stdout.isatty():
        raise UsageError("-w: not writing pcap to a terminal; give -w FILE or pipe into `tcpdump -r -`")
    try:
        out = sys.stdout.buffer if args.file == "-" else open(args.file, "wb")
    except OSError as exc:
        raise UsageError(f"-w {args.file}: {exc.strerror}") from None
    try:
        n = run_capture(config, request, out, count=args.count, summary=sys.stderr if args.summary else None)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    print(f"xdpgw: {n} packets captured", file=sys.stderr)
    return 0


COMMANDS = {"run": _cmd_run, "reset": _cmd_reset, "check": _cmd_check, "stats": _cmd_stats, "vm": _cmd_vm,
            "service": _cmd_service,
            "flow": _cmd_flow, "offload": _cmd_offload, "defrag": _cmd_defrag, "center": _cmd_center,
            "reload": _cmd_reload, "install-service": _cmd_install_service, "capture": _cmd_capture}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return (args.handler if "handler" in args else COMMANDS[args.command])(args)
    except (ConfigError, UsageError, LayoutError, LoadError) as exc:
        print(f"xdpgw: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ApiError, RuntimeError, OSError, ValueError) as exc:
        print(f"xdpgw: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception:  # noqa: BLE001 - a bug, not an operator error: its traceback, at error level
        logging.getLogger("xdpgw").exception("unexpected error (a bug in xdpgw)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

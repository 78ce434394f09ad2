"""`xdpgw demo` (and `make demo`): the whole gateway on the namespace testbed.

Set-up (testbed up -> gateway daemon in the gw namespace -> servers in the VMs and
in the remote DC) -> traffic (real TCP and UDP from both regions, a live view of
the daemon's counters once a second) -> halfway through, the VM move (the VM that
serves the most connections is "live-migrated" to a new gateway port while its
connections stay open) -> teardown -> summary (plus a PNG plot of the rates, if
matplotlib is installed).

The building blocks (servers, daemon runner, line-protocol client) are in
testbed/kit.py, the VM's new port in testbed/ports.py; the e2e tests use them too.

All traffic stays between the testbed's namespaces, addresses come only from
198.18.0.0/15 and 2001:db8::/32, every loop is bounded in count and time, and
only processes started here are stopped (by pid).
"""
from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from control.api import unix as api
from testbed.config import ECHO_PORT, REMOTE_PORT, WEB_PORT, testbed_config
from testbed.kit import ConnectionLost, GatewayDaemon, LineConn, dc2_binds, link_stats, start_server, udp_exchange, \
    vm_binds
from testbed.ports import add_port, port_for, switch_to
from testbed.addresses import DC2_ENDPOINT, VIP4, VIP6
from testbed.topology import Testbed

TCP_INTERVAL_S = 0.05        # a line every 50 ms on each long-lived connection
UDP_INTERVAL_S = 0.02        # per UDP sender thread
UDP_FLOWS = 4                # sockets (flows) per UDP sender
NEW_PORT_SUFFIX = "b"        # the moved VM's port on "another host": gwvNb
REGIONS = ("r1", "r2")
VIEW_VMS = ("vm1", "vm2", "vm3", "vm9")


@dataclass
class _TcpWorker:
    conn: LineConn
    label: str
    lines: int = 0
    error: str | None = None
    switched_to: str | None = None     # answered by another server than the first

    def run(self, stop: threading.Event, deadline: float) -> None:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline and self.error is None:
            t = time.monotonic()
            try:
                who = self.conn.ask(f"{self.label} line {i}")
            except (ConnectionLost, OSError) as exc:
                self.error = str(exc)
                break
            if who != self.conn.served_by and self.switched_to is None:
                self.switched_to = who
            self.lines += 1
            i += 1
            stop.wait(max(0.0, TCP_INTERVAL_S - (time.monotonic() - t)))


@dataclass
class _UdpWorker:
    socks: list[socket.socket]
    label: str
    sent: int = 0
    answered: int = 0
    wrong: int = 0

    def run(self, stop: threading.Event, deadline: float) -> None:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            t = time.monotonic()
            payload = f"{self.label} {i}".encode()
            try:
                reply = udp_exchange(self.socks[i % len(self.socks)], payload, (VIP4, ECHO_PORT))
            except OSError:
                reply = None
            self.sent += 1
            if reply is not None:
                name, _, echoed = reply.partition(b":")
                if echoed == payload and name.startswith(b"vm"):
                    self.answered += 1
                else:
                    self.wrong += 1
            i += 1
            stop.wait(max(0.0, UDP_INTERVAL_S - (time.monotonic() - t)))


@dataclass
class _Series:
    t: list[float] = field(default_factory=list)
    regions: dict[str, list[float]] = field(default_factory=dict)
    vms: dict[str, list[float]] = field(default_factory=dict)
    move_at: float | None = None
    move_label: str = ""


def _write_plot(series: _Series, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not written: matplotlib is not installed (pip install -e '.[bench]')"
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, ys in series.regions.items():
        ax1.plot(series.t, ys, marker=".", label=f"region {name}")
    for name, ys in series.vms.items():
        ax2.plot(series.t, ys, marker=".", label=name)
    for ax, title in ((ax1, "packets/s by source region"), (ax2, "packets/s by VM")):
        if series.move_at is not None:
            ax.axvline(series.move_at, color="grey", linestyle="--", label=series.move_label)
        ax.set_ylabel("pps")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    ax2.set_xlabel("seconds since traffic start")
    fig.suptitle("xdpgw demo: gateway counters (XDP) per second")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _Demo:
    """One run of the demo: its testbed, daemon and traffic, and what it measured."""

    def __init__(self, prefix: str, seconds: float, out: TextIO) -> None:
        self.prefix, self.seconds, self.out = prefix, seconds, out
        self.tb = Testbed(prefix)
        self.workdir = tempfile.mkdtemp(prefix="xdpgw-demo-")
        self.daemon: GatewayDaemon | None = None
        self.rc_daemon: int | None = None
        self.sock_path = ""
        self.tcp: list[_TcpWorker] = []
        self.udp: list[_UdpWorker] = []
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.series = _Series()
        self.final: dict[str, Any] = {}
        self.moved: dict[str, Any] = {}
        self.failures: list[str] = []
        self.interrupted = False

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ---- set-up
    def set_up(self) -> None:
        """Testbed, daemon, and the servers in the VMs and in the remote DC."""
        tb = self.tb
        self.say(f"xdpgw demo: testbed {self.prefix}, {self.seconds:.0f} s of traffic")
        tb.up()
        self.say(f"  testbed up in {tb.timings['up']:.2f} s: clients c1 (r1 {', '.join(tb.client('c1').ips)}), "
                 f"c2 (r2 {tb.client('c2').ip}); VMs vm1..vm3 behind gwv1..gwv3; vm9 behind dc2 {DC2_ENDPOINT}")
        config = testbed_config(self.prefix)
        self.sock_path = config.gateway.api_socket
        self.daemon = GatewayDaemon.launch(tb, config, os.path.join(self.workdir, "xdpgw.toml"))
        self.say(f"  {self.daemon.ready_line}")
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        start_server(tb, "dc2", "dc2", dc2_binds())
        self.say(f"  servers up: vm1..vm3 (tcp {WEB_PORT} v4+v6, udp {ECHO_PORT}), dc2 (tcp {REMOTE_PORT} as vm9)")

    # ---- traffic
    def open_traffic(self) -> None:
        """The TCP connections and UDP sockets (made by forked helpers, so before any thread)."""
        tb = self.tb
        c1, c2 = tb.client("c1"), tb.client("c2")
        plan = [("c1", c1.ips[0], VIP4, WEB_PORT), ("c1", c1.ips[0], VIP4, WEB_PORT),
                ("c1", c1.ips[1], VIP4, WEB_PORT), ("c1", c1.ips[1], VIP4, WEB_PORT),
                ("c1", c1.ip6, VIP6, WEB_PORT),
                ("c2", c2.ip, VIP4, WEB_PORT), ("c2", c2.ip, VIP4, WEB_PORT), ("c2", c2.ip, VIP4, WEB_PORT),
                ("c2", c2.ip6, VIP6, WEB_PORT),
                ("c2", c2.ip, VIP4, REMOTE_PORT)]
        for i, (role, src, dst, port) in enumerate(plan):
            conn = LineConn(tb, role, src, dst, port)
            conn.ask("hello")
            self.tcp.append(_TcpWorker(conn, f"{role}#{i}"))
        for role, src in (("c1", c1.ips[0]), ("c1", c1.ips[1]), ("c2", c2.ip)):
            socks = []
            for _ in range(UDP_FLOWS):
                s = tb.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(0.5)
                s.bind((src, 0))
                socks.append(s)
            self.udp.append(_UdpWorker(socks, f"{role}/{src}"))
        served = ", ".join(f"{w.label}{'(v6)' if ':' in w.conn.dst else ''}->{w.conn.served_by}" for w in self.tcp)
        self.say(f"  {len(self.tcp)} TCP connections open: {served}")
        self.say(f"  UDP: {len(self.udp)} senders x {UDP_FLOWS} flows, one request every "
                 f"{UDP_INTERVAL_S * 1000:.0f} ms each")

    def run_traffic(self) -> None:
        """Every worker on its thread for `seconds`, a line of counters once a second,
        the VM move halfway; then the final counters."""
        t_start = time.monotonic()
        deadline = t_start + self.seconds
        for w in (*self.tcp, *self.udp):
            th = threading.Thread(target=w.run, args=(self.stop, deadline), daemon=True)
            th.start()
            self.threads.append(th)
        self._live_view(t_start, deadline)
        self._stop_threads()
        self.final = api.call(self.sock_path, "stats")
        if self.moved.get("vm"):
            self.moved["new_if_stats"] = link_stats(self.tb, self.moved["vm"], self.moved["vm_if"])

    def _live_view(self, t_start: float, deadline: float) -> None:
        self.say("")
        self.say("  time |" + "".join(f"{r:>16}" for r in REGIONS) + " |" + "".join(f"{v:>14}" for v in VIEW_VMS)
                 + " |   tcp ok   udp answered")
        self.say("       |" + "".join(f"{'pps/total':>16}" for _ in REGIONS) + " |"
                 + "".join(f"{'pps/total':>14}" for _ in VIEW_VMS) + " |")
        prev = api.call(self.sock_path, "stats")
        prev_t = time.monotonic()
        moved_done = False
        for tick in range(1, math.ceil(self.seconds) + 1):
            time.sleep(max(0.0, min(t_start + tick, deadline) - time.monotonic()))
            now = api.call(self.sock_path, "stats")
            t_now = time.monotonic()
            rel = t_now - t_start
            self._view_line(prev, now, max(t_now - prev_t, 1e-6), rel)
            prev, prev_t = now, t_now
            if not moved_done and rel >= self.seconds / 2:
                moved_done = True
                self.moved = self._move_busiest_vm(rel)
                self.series.move_at, self.series.move_label = rel, f"move {self.moved.get('vm', '?')}"

    def _view_line(self, prev: dict[str, Any], now: dict[str, Any], dt: float, rel: float) -> None:
        """One line of the live view (and one point of the plot's series)."""
        self.series.t.append(rel)
        cells_r, cells_v = [], []
        for r in REGIONS:
            pps = (now["regions"][r]["packets"] - prev["regions"][r]["packets"]) / dt
            self.series.regions.setdefault(r, []).append(pps)
            cells_r.append(f"{pps:>7.0f}/{now['regions'][r]['packets']:<8}")
        for v in VIEW_VMS:
            pps = (now["vms"][v]["packets"] - prev["vms"][v]["packets"]) / dt
            self.series.vms.setdefault(v, []).append(pps)
            cells_v.append(f"{pps:>6.0f}/{now['vms'][v]['packets']:<7}")
        ok = sum(1 for w in self.tcp if w.error is None)
        sent = sum(w.sent for w in self.udp)
        ans = sum(w.answered for w in self.udp)
        self.say(f"{rel:5.1f}s |" + "".join(f"{c:>16}" for c in cells_r) + " |"
                 + "".join(f"{c:>14}" for c in cells_v) + f" | {ok:>3}/{len(self.tcp):<3} {ans:>6}/{sent:<6}")

    def _stop_threads(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=5)

    # ---- the VM move
    def _move_busiest_vm(self, rel: float) -> dict[str, Any]:
        """Live-migrate the local VM serving the most connections to a new gateway port:
        make before break (new port, move, then the VM's routes and old eth0)."""
        tb, tcp = self.tb, self.tcp
        counts: dict[str, int] = {}
        for w in tcp:
            if w.error is None and w.conn.served_by in ("vm1", "vm2", "vm3"):
                counts[w.conn.served_by] = counts.get(w.conn.served_by, 0) + 1
        if not counts:
            self.say(f"{rel:5.1f}s  EVENT: no local VM serves a connection; nothing to move")
            return {}
        vm = max(sorted(counts), key=lambda n: counts[n])
        old_port = tb.vm(vm).port
        lines_before = {w.label: w.lines for w in tcp}
        t0 = time.monotonic()
        p = port_for(tb.prefix, vm, NEW_PORT_SUFFIX)
        add_port(p, gw_ns=tb.ns("gw"))
        t1 = time.monotonic()
        result = api.call(self.sock_path, "vm.move", name=vm, port=p.port)
        t2 = time.monotonic()
        switch_to(p)
        self.say(f"{rel:5.1f}s  EVENT: live-migrating {vm} (serves {counts[vm]} of {len(tcp)} connections) from "
                 f"{old_port} to new port {result['port']} (mac {result['mac']}): port built in "
                 f"{(t1 - t0) * 1000:.0f} ms, gateway re-programmed in {(t2 - t1) * 1000:.1f} ms, "
                 f"old {tb.vm(vm).ifname} down")
        return {"vm": vm, "old_port": old_port, "port": p.port, "vm_if": p.vm_if, "at": rel,
                "api_ms": (t2 - t1) * 1000, "lines_before": lines_before}

    # ---- teardown
    def tear_down(self) -> None:
        """Stop the traffic and the daemon (by pid), remove the testbed; never raises."""
        self._stop_threads()
        for w in self.tcp:
            w.conn.close()
        for w in self.udp:
            for s in w.socks:
                s.close()
        daemon = self.daemon
        if daemon is not None and daemon.running and not self.final:
            try:
                self.final = api.call(self.sock_path, "stats")
            except Exception:  # noqa: BLE001 - the summary just has less in it
                pass
        if daemon is not None:
            try:
                self.rc_daemon = daemon.stop()
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"stopping the daemon: {exc}")
        try:
            self.tb.down()
        except Exception as exc:  # noqa: BLE001
            self.failures.append(f"testbed down: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- summary
    def summary(self, plot_path: str | None) -> int:
        """Print what happened; 0 if everything worked, else 1 (and why)."""
        self.say("")
        self.say(f"summary (prefix {self.prefix}, {self.seconds:.0f} s of traffic)")
        self._report_daemon()
        self._report_counters()
        if self.tcp:
            self._report_tcp()
        if self.udp:
            self._report_udp()
        if plot_path and self.series.t:
            self.say(f"  plot: {_write_plot(self.series, plot_path)}")
        leftover = [n for n in self.tb.namespaces if os.path.exists(f"/var/run/netns/{n}")]
        if leftover:
            self.failures.append(f"namespaces left: {leftover}")
        self.say(f"  testbed down: {'clean' if not leftover else 'LEFTOVERS'}")
        if self.failures:
            self.say("  result: FAILED")
            for f in self.failures:
                self.say(f"    - {f}")
            return 1
        self.say("  result: OK")
        return 0

    def _report_daemon(self) -> None:
        daemon = self.daemon
        if daemon is not None and daemon.startup_s is not None:
            self.say(f"  daemon: up in {daemon.startup_s:.2f} s ({daemon.mode} XDP on {self.tb.UPLINK}), "
                     f"stopped with exit code {self.rc_daemon}")
            if self.rc_daemon != 0:
                self.failures.append(f"daemon exit code {self.rc_daemon}")

    def _report_counters(self) -> None:
        final = self.final
        if not final:
            return
        for section, names in (("regions", ("r1", "r2", "unknown")), ("vms", VIEW_VMS)):
            for name in names:
                c = final[section][name]
                self.say(f"  {section[:-1]:<6} {name:<8} {c['packets']:>8} packets {c['bytes']:>10} bytes")
        drops = {k: v for k, v in final["drops"].items() if v}
        self.say(f"  flows: {final['flows']['entries']} entries; drops: "
                 + (", ".join(f"{k} {v}" for k, v in drops.items()) or "none"))

    def _report_tcp(self) -> None:
        tcp, moved = self.tcp, self.moved
        resets = [w for w in tcp if w.error is not None]
        switched = [w for w in tcp if w.switched_to is not None]
        moved_conns = [w for w in tcp if moved.get("vm") and w.conn.served_by == moved["vm"]]
        survived = [w for w in moved_conns if w.error is None and w.switched_to is None
                    and w.lines > moved.get("lines_before", {}).get(w.label, 0)]
        self.say(f"  TCP: {len(tcp)} connections opened, {len(tcp) - len(resets)} alive at the end, "
                 f"{sum(w.lines for w in tcp)} lines answered; {len(resets)} reset/lost, "
                 f"{len(switched)} answered by another server")
        if moved.get("vm"):
            self.say(f"  move: {moved['vm']} {moved['old_port']} -> {moved['port']} at {moved['at']:.1f} s "
                     f"(re-programmed in {moved['api_ms']:.1f} ms): {len(survived)}/{len(moved_conns)} of its "
                     f"connections survived on the same VM; {moved['vm']}/{moved['vm_if']} received "
                     f"{moved.get('new_if_stats', {}).get('rx_packets', '?')} packets on the new port")
            if len(survived) != len(moved_conns):
                self.failures.append(f"{len(moved_conns) - len(survived)} connections of {moved['vm']} "
                                     "did not survive the move")
        elif not self.interrupted and not self.failures:
            self.failures.append("no VM was moved")
        for w in resets:
            self.failures.append(f"connection {w.label}: {w.error}")
        for w in switched:
            self.failures.append(f"connection {w.label} served by {w.conn.served_by} was answered by {w.switched_to}")

    def _report_udp(self) -> None:
        sent = sum(w.sent for w in self.udp)
        ans = sum(w.answered for w in self.udp)
        wrong = sum(w.wrong for w in self.udp)
        self.say(f"  UDP: {sent} requests sent, {ans} answered, {sent - ans - wrong} lost, {wrong} wrong")
        if wrong or sent - ans > max(1, sent // 100):
            self.failures.append(f"UDP: {sent - ans} of {sent} requests not answered correctly (over 1%)")


def run_demo(prefix: str = "xgwd", seconds: float = 12.0, plot_path: str | None = "demo-rates.png") -> int:
    """Run the demo; 0 if everything worked (no connection reset, every VM kept its
    connections across the move, UDP answered, clean daemon exit), else 1."""
    demo = _Demo(prefix, max(4.0, min(float(seconds), 600.0)), sys.stdout)
    try:
        demo.set_up()
        demo.open_traffic()
        demo.run_traffic()
    except KeyboardInterrupt:
        demo.interrupted = True
        demo.failures.append("interrupted (Ctrl-C)")
    except Exception as exc:  # noqa: BLE001 - the demo reports, then cleans up
        demo.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        demo.tear_down()
    return demo.summary(plot_path)

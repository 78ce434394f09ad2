"""`xdpgw demo` (and `make demo`): the whole gateway on the namespace testbed.

Testbed up -> gateway daemon in the gw namespace -> servers in the VMs and in the
remote DC -> real TCP and UDP traffic from both regions -> a live view of the
daemon's counters once a second -> halfway through, the VM that serves the most
connections is "live-migrated" to a new gateway port while its connections stay
open -> teardown and a summary (plus a PNG plot of the rates, if matplotlib is
installed).

The building blocks (servers, daemon runner, line-protocol client, the VM move
on the testbed) are also what tests/test_integration.py uses.

All traffic stays between the testbed's namespaces, addresses come only from
198.18.0.0/15 and 2001:db8::/32, every loop is bounded in count and time, and
only processes started here are stopped (by pid).
"""
from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from control.api import unix as api
from control.config import Config
from testbed.config import ECHO_PORT, REMOTE_PORT, WEB_PORT, testbed_config
from testbed.topology import DC2_ENDPOINT, VIP4, VIP6, Testbed

SERVER_IDLE_S = 300.0          # servers exit by themselves after this long without traffic
SERVER_MAX_S = 3600.0          # ... and after this long in any case

# A small server: per TCP connection, each received line gets b"<name>:" + line;
# each UDP datagram gets b"<name>:" + datagram.  argv: name idle max bind...
# where bind is tcp:ADDR:PORT, udp:ADDR:PORT (ADDR of IPv6 in brackets).
SERVER_SCRIPT = r"""
import selectors, socket, sys, time
name, idle, hard = sys.argv[1].encode(), float(sys.argv[2]), float(sys.argv[3])
sel = selectors.DefaultSelector()
for spec in sys.argv[4:]:
    proto, rest = spec.split(":", 1)
    addr, port = rest.rsplit(":", 1)
    addr = addr.strip("[]")
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(port)))
    if proto == "tcp":
        s.listen(128)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, proto)
print("ready", flush=True)
bufs = {}
start = last = time.monotonic()
while time.monotonic() - last < idle and time.monotonic() - start < hard:
    for key, _ in sel.select(1.0):
        last = time.monotonic()
        s = key.fileobj
        try:
            if key.data == "tcp":
                c, _ = s.accept()
                c.settimeout(5.0)
                bufs[c] = b""
                sel.register(c, selectors.EVENT_READ, "conn")
            elif key.data == "udp":
                data, peer = s.recvfrom(65535)
                s.sendto(name + b":" + data, peer)
            else:
                data = s.recv(65536)
                if not data:
                    raise ConnectionResetError
                buf = bufs[s] + data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    s.sendall(name + b":" + line + b"\n")
                bufs[s] = buf
        except BlockingIOError:
            pass
        except OSError:
            if key.data == "conn":
                sel.unregister(s)
                bufs.pop(s, None)
                s.close()
"""


def vm_binds() -> list[str]:
    """What every local VM serves: web (TCP, IPv4 and IPv6) and echo (UDP)."""
    return [f"tcp:{VIP4}:{WEB_PORT}", f"tcp:[{VIP6}]:{WEB_PORT}", f"udp:{VIP4}:{ECHO_PORT}"]


def vm_health_binds(tb: Testbed, vm_name: str) -> list[str]:
    """What health checks probe on a local VM: web (TCP) and echo (UDP) on the VM's
    own address, served by the same process as the VIP (its death fails them)."""
    vm = tb.vm(vm_name)
    return [f"tcp:{vm.ip}:{WEB_PORT}", f"udp:{vm.ip}:{ECHO_PORT}"]


def dc2_binds() -> list[str]:
    """What the remote DC serves: remote (vm9) and web (for region offloads)."""
    return [f"tcp:{VIP4}:{REMOTE_PORT}", f"tcp:{VIP4}:{WEB_PORT}", f"tcp:[{VIP6}]:{WEB_PORT}"]


def start_server(tb: Testbed, role: str, name: str, binds: Sequence[str],
                 idle: float = SERVER_IDLE_S, timeout: float = 10.0) -> subprocess.Popen:
    """Start SERVER_SCRIPT in `role`'s namespace and wait (bounded) until it listens."""
    proc = tb.popen(role, [sys.executable, "-c", SERVER_SCRIPT, name, str(idle), str(SERVER_MAX_S), *binds],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        err = b""
        if proc.poll() is not None:
            err = proc.stderr.read()
        tb.stop(proc)
        raise RuntimeError(f"server {name} in {role} did not start: {err.decode(errors='replace')[-500:]}")
    return proc


# --------------------------------------------------------------------------- daemon

READY_RE = re.compile(r"^xdpgw: gateway \S+ up on (\S+) \((\w+) XDP\) in ([0-9.]+) s; API at (\S+)")


class GatewayDaemon:
    """`xdpgw run --config FILE` (which enters the gw namespace itself, `gateway.netns`),
    started and stopped by pid."""

    def __init__(self, tb: Testbed, config_path: str, xdpgw: str | None = None) -> None:
        self.tb = tb
        self.config_path = config_path
        self.xdpgw = xdpgw or xdpgw_executable()
        self.proc: subprocess.Popen | None = None
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ready_line: str | None = None
        self.startup_s: float | None = None     # as the daemon reports it
        self.mode: str | None = None
        self.returncode: int | None = None
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def launch(cls, tb: Testbed, config: Config, path: str | os.PathLike[str],
               timeout: float = 60.0) -> "GatewayDaemon":
        """Write `config` to `path`, start `xdpgw run` on it and wait for its ready line."""
        Path(path).write_text(config.to_toml())
        daemon = cls(tb, str(path))
        daemon.start(timeout=timeout)
        return daemon

    def _drain(self, stream, sink: list[str], watch: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            sink.append(line)
            if watch and self.ready_line is None:
                m = READY_RE.match(line)
                if m:
                    self.ready_line = line
                    self.mode, self.startup_s = m.group(2), float(m.group(3))
                    self._ready.set()
        self._ready.set()            # EOF: the process is gone (start() checks which)

    def start(self, timeout: float = 60.0) -> float:
        """Start the daemon and wait, at most `timeout` s, for its ready line."""
        t0 = time.monotonic()
        self.proc = self.tb.spawn([self.xdpgw, "run", "--config", self.config_path],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for stream, sink, watch in ((self.proc.stdout, self.stdout, True), (self.proc.stderr, self.stderr, False)):
            t = threading.Thread(target=self._drain, args=(stream, sink, watch), daemon=True)
            t.start()
            self._threads.append(t)
        self._ready.wait(timeout)
        if self.ready_line is None:
            rc = self.stop()
            raise RuntimeError(f"xdpgw run did not come up within {timeout:.0f} s (exit {rc}): "
                               + " | ".join((self.stdout + self.stderr)[-5:]))
        return time.monotonic() - t0

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """`sig` (SIGTERM: detach; SIGUSR2: leave XDP attached) by pid, wait; SIGKILL
        only if it overstays. Returns the exit code."""
        if self.proc is None:
            return self.returncode
        proc = self.proc
        if proc.poll() is None:
            try:
                os.kill(proc.pid, sig)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except ProcessLookupError:
                proc.wait(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self.returncode = proc.returncode
        self.tb.stop(proc)           # untrack it and close its pipes
        self.proc = None
        return self.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def xdpgw_executable() -> str:
    """The `xdpgw` console script next to this interpreter (the venv's), else PATH's."""
    here = Path(sys.executable).with_name("xdpgw")
    if here.exists():
        return str(here)
    found = shutil.which("xdpgw")
    if not found:
        raise RuntimeError("cannot find the xdpgw command")
    return found


# ------------------------------------------------------------------- line client

class ConnectionLost(RuntimeError):
    """The connection was reset, closed, or did not answer in time."""


class LineConn:
    """A TCP connection from a client namespace to the VIP speaking the servers'
    line protocol: `ask(text)` sends a line and returns the name of the server
    that answered it."""

    def __init__(self, tb: Testbed, role: str, src: str, dst: str, port: int, timeout: float = 3.0) -> None:
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        self.role, self.src, self.dst, self.port = role, src, dst, port
        self.sock = tb.socket(role, family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.bind((src, 0))
            self.sock.connect((dst, port))
        except OSError:
            self.sock.close()
            raise
        self.sport = self.sock.getsockname()[1]
        self.buf = b""
        self.served_by: str | None = None      # the server that answered the first line
        self.answers = 0

    def __repr__(self) -> str:
        return f"<{self.role} {self.src}:{self.sport} -> {self.dst}:{self.port} served by {self.served_by}>"

    def ask(self, text: str) -> str:
        data = text.encode()
        try:
            self.sock.sendall(data + b"\n")
            while b"\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionLost(f"{self!r}: closed by the peer")
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionLost(f"{self!r}: reset ({exc})") from None
        except socket.timeout:
            raise ConnectionLost(f"{self!r}: no answer to {text!r}") from None
        line, self.buf = self.buf.split(b"\n", 1)
        name, sep, echoed = line.partition(b":")
        if not sep or echoed != data:
            raise ConnectionLost(f"{self!r}: bad answer {line!r} to {text!r}")
        self.answers += 1
        if self.served_by is None:
            self.served_by = name.decode()
        return name.decode()

    def close(self) -> None:
        self.sock.close()


def udp_exchange(sock: socket.socket, payload: bytes, dst: tuple[str, int]) -> bytes | None:
    """Send one datagram and return the answer (None on timeout)."""
    sock.sendto(payload, dst)
    try:
        return sock.recv(65535)
    except socket.timeout:
        return None


# ----------------------------------------------------------------- the VM move

@dataclass(frozen=True)
class NewPort:
    """A second gateway port for a VM, as after a live migration to another host."""
    vm: str
    vm_ns: str
    port: str               # gateway-side ifname, in the gw namespace
    port_mac: str
    vm_if: str              # the VM's new interface (same MAC as its old one)
    vm_mac: str
    gw_ip: str
    gw_ip6: str
    vm_ip: str
    vm_ip6: str


def add_vm_port(tb: Testbed, vm_name: str, vm_if: str = "eth1") -> NewPort:
    """A new veth between the gateway (`gwvNb`) and the VM's namespace (`eth1`, with
    the VM's own MAC), with addresses 198.18.(110+N).1/.2 and 2001:db8:(110+N)::1/::2,
    static neighbours, and GRO on the VM side (a veth drops XDP-redirected frames
    unless its peer runs NAPI). The namespace's removal removes it."""
    vm = tb.vm(vm_name)
    n = int(vm.name[2:])
    p = NewPort(vm=vm.name, vm_ns=vm.ns, port=f"{vm.port}b", port_mac=f"02:00:00:00:11:{n:02x}", vm_if=vm_if,
                vm_mac=vm.mac, gw_ip=f"198.18.{110 + n}.1", gw_ip6=f"2001:db8:{110 + n}::1",
                vm_ip=f"198.18.{110 + n}.2", vm_ip6=f"2001:db8:{110 + n}::2")
    tb.cmd("gw", ["ip", "link", "add", p.port, "address", p.port_mac, "type", "veth",
                  "peer", "name", p.vm_if, "address", p.vm_mac, "netns", p.vm_ns])
    for role, dev, mine, theirs, their_mac in (("gw", p.port, (p.gw_ip, p.gw_ip6), (p.vm_ip, p.vm_ip6), p.vm_mac),
                                               (vm.name, p.vm_if, (p.vm_ip, p.vm_ip6), (p.gw_ip, p.gw_ip6),
                                                p.port_mac)):
        tb.cmd(role, ["ip", "addr", "add", f"{mine[0]}/24", "dev", dev])
        tb.cmd(role, ["ip", "addr", "add", f"{mine[1]}/64", "dev", dev])
        tb.cmd(role, ["ip", "link", "set", dev, "up"])
        for addr in theirs:
            tb.cmd(role, ["ip", "neigh", "replace", addr, "lladdr", their_mac, "dev", dev, "nud", "permanent"])
    tb.cmd(vm.name, ["ethtool", "-K", p.vm_if, "gro", "on"])
    return p


def switch_vm_to_port(tb: Testbed, p: NewPort) -> None:
    """The VM now lives behind its new port: default routes via it, old eth0 down."""
    tb.cmd(p.vm, ["ip", "route", "replace", "default", "via", p.gw_ip, "dev", p.vm_if])
    tb.cmd(p.vm, ["ip", "-6", "route", "replace", "default", "via", p.gw_ip6, "dev", p.vm_if])
    tb.cmd(p.vm, ["ip", "link", "set", tb.vm(p.vm).ifname, "down"])


def link_stats(tb: Testbed, role: str, ifname: str) -> dict[str, Any]:
    """{rx_packets, tx_packets, operstate} of an interface in a testbed namespace."""
    out = tb.cmd(role, ["ip", "-j", "-s", "link", "show", "dev", ifname]).stdout
    link = json.loads(out)[0]
    stats = link.get("stats64") or link.get("stats")
    return {"rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"],
            "operstate": link.get("operstate"), "flags": link.get("flags", [])}


# ----------------------------------------------------------------------- demo

TCP_INTERVAL_S = 0.05        # a line every 50 ms on each long-lived connection
UDP_INTERVAL_S = 0.02        # per UDP sender thread
UDP_FLOWS = 4                # sockets (flows) per UDP sender


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


def run_demo(prefix: str = "xgwd", seconds: float = 12.0, plot_path: str | None = "demo-rates.png") -> int:
    """Run the demo; 0 if everything worked (no connection reset, every VM kept its
    connections across the move, UDP answered, clean daemon exit), else 1."""
    seconds = max(4.0, min(float(seconds), 600.0))
    out = sys.stdout
    failures: list[str] = []
    tb = Testbed(prefix)
    daemon: GatewayDaemon | None = None
    workdir = tempfile.mkdtemp(prefix="xdpgw-demo-")
    tcp: list[_TcpWorker] = []
    udp: list[_UdpWorker] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()
    series = _Series()
    final: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    rc_daemon: int | None = None
    interrupted = False

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    try:
        say(f"xdpgw demo: testbed {prefix}, {seconds:.0f} s of traffic")
        tb.up()
        say(f"  testbed up in {tb.timings['up']:.2f} s: clients c1 (r1 {', '.join(tb.client('c1').ips)}), "
            f"c2 (r2 {tb.client('c2').ip}); VMs vm1..vm3 behind gwv1..gwv3; vm9 behind dc2 {DC2_ENDPOINT}")
        config = testbed_config(prefix)
        sock_path = config.gateway.api_socket
        daemon = GatewayDaemon.launch(tb, config, os.path.join(workdir, "xdpgw.toml"))
        say(f"  {daemon.ready_line}")
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        start_server(tb, "dc2", "dc2", dc2_binds())
        say(f"  servers up: vm1..vm3 (tcp {WEB_PORT} v4+v6, udp {ECHO_PORT}), dc2 (tcp {REMOTE_PORT} as vm9)")

        # ---- traffic: sockets first (they are made by forked helpers), then threads
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
            tcp.append(_TcpWorker(conn, f"{role}#{i}"))
        for role, src in (("c1", c1.ips[0]), ("c1", c1.ips[1]), ("c2", c2.ip)):
            socks = []
            for _ in range(UDP_FLOWS):
                s = tb.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(0.5)
                s.bind((src, 0))
                socks.append(s)
            udp.append(_UdpWorker(socks, f"{role}/{src}"))
        served = ", ".join(f"{w.label}{'(v6)' if ':' in w.conn.dst else ''}->{w.conn.served_by}" for w in tcp)
        say(f"  {len(tcp)} TCP connections open: {served}")
        say(f"  UDP: {len(udp)} senders x {UDP_FLOWS} flows, one request every {UDP_INTERVAL_S * 1000:.0f} ms each")

        t_start = time.monotonic()
        deadline = t_start + seconds
        for w in (*tcp, *udp):
            th = threading.Thread(target=w.run, args=(stop, deadline), daemon=True)
            th.start()
            threads.append(th)

        # ---- live view
        regions, vms = ("r1", "r2"), ("vm1", "vm2", "vm3", "vm9")
        say("")
        say("  time |" + "".join(f"{r:>16}" for r in regions) + " |" + "".join(f"{v:>14}" for v in vms)
            + " |   tcp ok   udp answered")
        say("       |" + "".join(f"{'pps/total':>16}" for _ in regions) + " |"
            + "".join(f"{'pps/total':>14}" for _ in vms) + " |")
        prev = api.call(sock_path, "stats")
        prev_t = time.monotonic()
        moved_done = False
        for tick in range(1, math.ceil(seconds) + 1):
            time.sleep(max(0.0, min(t_start + tick, deadline) - time.monotonic()))
            now = api.call(sock_path, "stats")
            t_now = time.monotonic()
            dt = max(t_now - prev_t, 1e-6)
            rel = t_now - t_start
            series.t.append(rel)
            cells_r, cells_v = [], []
            for r in regions:
                pps = (now["regions"][r]["packets"] - prev["regions"][r]["packets"]) / dt
                series.regions.setdefault(r, []).append(pps)
                cells_r.append(f"{pps:>7.0f}/{now['regions'][r]['packets']:<8}")
            for v in vms:
                pps = (now["vms"][v]["packets"] - prev["vms"][v]["packets"]) / dt
                series.vms.setdefault(v, []).append(pps)
                cells_v.append(f"{pps:>6.0f}/{now['vms'][v]['packets']:<7}")
            ok = sum(1 for w in tcp if w.error is None)
            sent = sum(w.sent for w in udp)
            ans = sum(w.answered for w in udp)
            say(f"{rel:5.1f}s |" + "".join(f"{c:>16}" for c in cells_r) + " |"
                + "".join(f"{c:>14}" for c in cells_v) + f" | {ok:>3}/{len(tcp):<3} {ans:>6}/{sent:<6}")
            prev, prev_t = now, t_now

            if not moved_done and rel >= seconds / 2:
                moved_done = True
                moved = _move_busiest_vm(tb, sock_path, tcp, say, rel)
                series.move_at, series.move_label = rel, f"move {moved.get('vm', '?')}"
        stop.set()
        for th in threads:
            th.join(timeout=5)
        final = api.call(sock_path, "stats")
        if moved.get("vm"):
            moved["new_if_stats"] = link_stats(tb, moved["vm"], moved["vm_if"])
    except KeyboardInterrupt:
        interrupted = True
        failures.append("interrupted (Ctrl-C)")
    except Exception as exc:  # noqa: BLE001 - the demo reports, then cleans up
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=5)
        for w in tcp:
            w.conn.close()
        for w in udp:
            for s in w.socks:
                s.close()
        if daemon is not None and daemon.running and not final:
            try:
                final = api.call(sock_path, "stats")
            except Exception:  # noqa: BLE001 - the summary just has less in it
                pass
        if daemon is not None:
            try:
                rc_daemon = daemon.stop()
            except Exception as exc:  # noqa: BLE001
                failures.append(f"stopping the daemon: {exc}")
        try:
            tb.down()
        except Exception as exc:  # noqa: BLE001
            failures.append(f"testbed down: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)

    # ---- summary
    say("")
    say(f"summary (prefix {prefix}, {seconds:.0f} s of traffic)")
    if daemon is not None and daemon.startup_s is not None:
        say(f"  daemon: up in {daemon.startup_s:.2f} s ({daemon.mode} XDP on {tb.UPLINK}), "
            f"stopped with exit code {rc_daemon}")
        if rc_daemon != 0:
            failures.append(f"daemon exit code {rc_daemon}")
    if final:
        for section, names in (("regions", ("r1", "r2", "unknown")), ("vms", ("vm1", "vm2", "vm3", "vm9"))):
            for name in names:
                c = final[section][name]
                say(f"  {section[:-1]:<6} {name:<8} {c['packets']:>8} packets {c['bytes']:>10} bytes")
        drops = {k: v for k, v in final["drops"].items() if v}
        say(f"  flows: {final['flows']['entries']} entries; drops: "
            + (", ".join(f"{k} {v}" for k, v in drops.items()) or "none"))
    resets = [w for w in tcp if w.error is not None]
    switched = [w for w in tcp if w.switched_to is not None]
    if tcp:
        moved_conns = [w for w in tcp if moved.get("vm") and w.conn.served_by == moved["vm"]]
        survived = [w for w in moved_conns if w.error is None and w.switched_to is None
                    and w.lines > moved.get("lines_before", {}).get(w.label, 0)]
        say(f"  TCP: {len(tcp)} connections opened, {len(tcp) - len(resets)} alive at the end, "
            f"{sum(w.lines for w in tcp)} lines answered; {len(resets)} reset/lost, "
            f"{len(switched)} answered by another server")
        if moved.get("vm"):
            say(f"  move: {moved['vm']} {moved['old_port']} -> {moved['port']} at {moved['at']:.1f} s "
                f"(re-programmed in {moved['api_ms']:.1f} ms): {len(survived)}/{len(moved_conns)} of its "
                f"connections survived on the same VM; {moved['vm']}/{moved['vm_if']} received "
                f"{moved.get('new_if_stats', {}).get('rx_packets', '?')} packets on the new port")
            if len(survived) != len(moved_conns):
                failures.append(f"{len(moved_conns) - len(survived)} connections of {moved['vm']} "
                                "did not survive the move")
        elif not interrupted and not failures:
            failures.append("no VM was moved")
        for w in resets:
            failures.append(f"connection {w.label}: {w.error}")
        for w in switched:
            failures.append(f"connection {w.label} served by {w.conn.served_by} was answered by {w.switched_to}")
    if udp:
        sent = sum(w.sent for w in udp)
        ans = sum(w.answered for w in udp)
        wrong = sum(w.wrong for w in udp)
        say(f"  UDP: {sent} requests sent, {ans} answered, {sent - ans - wrong} lost, {wrong} wrong")
        if wrong or sent - ans > max(1, sent // 100):
            failures.append(f"UDP: {sent - ans} of {sent} requests not answered correctly (over 1%)")
    if plot_path and series.t:
        say(f"  plot: {_write_plot(series, plot_path)}")
    leftover = [n for n in tb.namespaces if os.path.exists(f"/var/run/netns/{n}")]
    if leftover:
        failures.append(f"namespaces left: {leftover}")
    say(f"  testbed down: {'clean' if not leftover else 'LEFTOVERS'}")
    if failures:
        say("  result: FAILED")
        for f in failures:
            say(f"    - {f}")
        return 1
    say("  result: OK")
    return 0


def _move_busiest_vm(tb: Testbed, sock_path: str, tcp: list[_TcpWorker], say, rel: float) -> dict[str, Any]:
    """Live-migrate the local VM serving the most connections to a new gateway port:
    make before break (new port, move, then the VM's routes and old eth0)."""
    counts: dict[str, int] = {}
    for w in tcp:
        if w.error is None and w.conn.served_by in ("vm1", "vm2", "vm3"):
            counts[w.conn.served_by] = counts.get(w.conn.served_by, 0) + 1
    if not counts:
        say(f"{rel:5.1f}s  EVENT: no local VM serves a connection; nothing to move")
        return {}
    vm = max(sorted(counts), key=lambda n: counts[n])
    old_port = tb.vm(vm).port
    lines_before = {w.label: w.lines for w in tcp}
    t0 = time.monotonic()
    p = add_vm_port(tb, vm)
    t1 = time.monotonic()
    result = api.call(sock_path, "vm.move", name=vm, port=p.port)
    t2 = time.monotonic()
    switch_vm_to_port(tb, p)
    say(f"{rel:5.1f}s  EVENT: live-migrating {vm} (serves {counts[vm]} of {len(tcp)} connections) from "
        f"{old_port} to new port {result['port']} (mac {result['mac']}): port built in "
        f"{(t1 - t0) * 1000:.0f} ms, gateway re-programmed in {(t2 - t1) * 1000:.1f} ms, "
        f"old {tb.vm(vm).ifname} down")
    return {"vm": vm, "old_port": old_port, "port": p.port, "vm_if": p.vm_if, "at": rel,
            "api_ms": (t2 - t1) * 1000, "lines_before": lines_before}

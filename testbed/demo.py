"""`xdpgw demo` (and `make demo`): the whole story on the namespace testbed, in about a minute.

Set-up: the testbed with a second data center (dc2, reachable by IP-in-IP) running
xdpgw too (decapsulation, no service or VM of its own at start), the control center
(`xdpgw center`, in the router's namespace), dc2's agent (testbed/dcagent.py: it creates
VMs and adds them to dc2's xdpgw), the servers in vm1..vm3 and the gateway daemon
(`xdpgw run` with health checks, the heavy-region monitor, the center link and the
VM-port watcher). Then real TCP and UDP from two regions, a live view of both
gateways' counters once a second, and six events, each waited for (bounded) and measured:

  1. two regions' traffic, served at home;
  2. region r1 grows heavy (a client in r1 raises its send rate past the monitor's
     threshold): the center chooses dc2, has its agent prepare VMs (added to dc2's
     xdpgw with the service), tells the gateway to distribute; r1's new connections
     are tunnelled to dc2, whose xdpgw decapsulates them and picks a VM by Maglev
     (its counters show it), while r1's existing sessions stay on their home VMs;
  3. a VM's server dies (killed by pid): health checks take the VM out of the
     Maglev tables and only its flows move;
  4. a VM live-migrates to a new port and announces itself there (gratuitous ARP):
     the gateway re-points it from the announcement alone; its connections survive;
  5. r1 calms down (the extra traffic stops): the offload is cleared, new flows
     come home, dc2's VMs drain: the offloaded connections are still served there;
  6. the offloaded connections end: dc2's VMs go idle, its agent reports the request
     drained and the center releases it (the VMs leave dc2's xdpgw and are removed).

Then teardown and a summary: each event's measured timing, each expectation
held or not, and a plot of the rates with the events marked (demo-rates.png).
The demo only drives the daemon and the center through their API and CLI.

All traffic stays between the testbed's namespaces, addresses come only from
198.18.0.0/15 and 2001:db8::/32, every wait and loop is bounded in count and time,
and only processes started here are stopped (by pid).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from control.api import unix as api
from control.config import HealthConfig, MonitorConfig
from testbed.addresses import DC2_ENDPOINT, VIP4, VIP6
from testbed.config import ECHO_PORT, WEB_PORT, dc2_config, testbed_config
from testbed.kit import ConnectionLost, GatewayDaemon, LineConn, link_stats, poll_until, start_server, \
    udp_exchange, vm_binds, vm_health_binds, xdpgw_executable
from testbed.offload import OffloadLab, Ramp, ReadyProcess
from testbed.ports import add_port, announce, port_for, route_via, switch_to
from testbed.netns import netns_exists
from testbed.topology import Testbed, leftovers

TCP_INTERVAL_S = 0.05        # a line every 50 ms on each long-lived connection
UDP_INTERVAL_S = 0.02        # per UDP sender thread
UDP_FLOWS = 4                # sockets (flows) per UDP sender
NEW_PORT_SUFFIX = "b"        # the migrated VM's port on "another host": gwvNb
REGIONS = ("r1", "r2")
LOCAL_VMS = ("vm1", "vm2", "vm3")
NEW_R1_CONNS = 4             # r1 connections opened while the offload is active

# Short intervals keep the story within a minute. The traffic above is ~300 pps per
# region; the ramp takes r1 well past heavy, calm is clearly under clear.
MONITOR = MonitorConfig(interval=0.5, heavy_pps=1000.0, clear_pps=700.0, intervals=2, smoothing=0.7,
                        services=("web",))
RAMP_PPS = 1500
PROBE = dict(interval=0.2, timeout=0.2, rise=2, fall=2)
HEALTH = {"web": HealthConfig("tcp", **PROBE), "web6": HealthConfig("tcp", **PROBE),
          "echo": HealthConfig("udp", **PROBE)}
WAIT_S = 20.0                # the most any one event may take before the demo calls it missed
DRAIN_IDLE_S = 1.0           # dc2's agent: a draining VM without packets this long is drained
EVENTS = {1: "two regions", 2: "r1 heavy", 3: "VM failure", 4: "live migration", 5: "r1 calm",
          6: "dc2 released"}


@dataclass
class _TcpWorker:
    conn: LineConn
    label: str
    lines: int = 0
    error: str | None = None
    error_at: float | None = None
    switched_to: str | None = None     # answered by another server than the first
    finished: threading.Event = field(default_factory=threading.Event)   # the client is done: close

    def run(self, stop: threading.Event) -> None:
        i = 0
        while not stop.is_set() and not self.finished.is_set() and self.error is None:
            t = time.monotonic()
            try:
                who = self.conn.ask(f"{self.label} line {i}")
            except (ConnectionLost, OSError) as exc:
                self.error, self.error_at = str(exc), time.time()
                break
            if who != self.conn.served_by and self.switched_to is None:
                self.switched_to = who
            self.lines += 1
            i += 1
            stop.wait(max(0.0, TCP_INTERVAL_S - (time.monotonic() - t)))
        if self.finished.is_set():
            self.conn.close()


@dataclass
class _UdpWorker:
    """UDP requests round-robin over its sockets (one flow each); remembers which VM
    last answered each flow, and when."""
    socks: list[socket.socket]
    label: str
    sent: int = 0
    answered: int = 0
    wrong: int = 0
    served: list[str | None] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)
    lost_by: dict[str | None, int] = field(default_factory=dict)   # lost requests by the flow's last VM

    def __post_init__(self) -> None:
        self.served = [None] * len(self.socks)
        self.answered_at = [0.0] * len(self.socks)

    def run(self, stop: threading.Event) -> None:
        i = 0
        while not stop.is_set():
            t = time.monotonic()
            k = i % len(self.socks)
            payload = f"{self.label} {i}".encode()
            try:
                reply = udp_exchange(self.socks[k], payload, (VIP4, ECHO_PORT))
            except OSError:
                reply = None
            self.sent += 1
            if reply is None:
                self.lost_by[self.served[k]] = self.lost_by.get(self.served[k], 0) + 1
            else:
                name, _, echoed = reply.partition(b":")
                if echoed == payload and name.startswith(b"vm"):
                    self.answered += 1
                    self.served[k], self.answered_at[k] = name.decode(), time.time()
                else:
                    self.wrong += 1
            i += 1
            stop.wait(max(0.0, UDP_INTERVAL_S - (time.monotonic() - t)))


@dataclass
class _Series:
    t: list[float] = field(default_factory=list)
    regions: dict[str, list[float]] = field(default_factory=dict)
    vms: dict[str, list[float]] = field(default_factory=dict)
    marks: list[tuple[float, int, str]] = field(default_factory=list)   # (seconds since start, event, label)
    thresholds: dict[str, float] = field(default_factory=dict)


def _write_plot(series: _Series, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not written: matplotlib is not installed (pip install -e '.[bench]')"
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    for name, ys in series.regions.items():
        ax1.plot(series.t, ys, marker=".", label=f"region {name}")
    for name, level in series.thresholds.items():
        ax1.axhline(level, color="grey", linestyle=":", linewidth=1, label=name)
    for name, ys in series.vms.items():
        ax2.plot(series.t, ys, marker=".", label=name)
    for ax, title in ((ax1, "packets/s by source region (gateway counters)"),
                      (ax2, "packets/s by VM at home (gw1's counters), and to dc2's VMs (dc2's xdpgw)")):
        ax.set_ylabel("pps")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    # each event: its markers, the span between them shaded, one label with its steps
    events: dict[int, list[tuple[float, str]]] = {}
    for at, n, label in series.marks:
        events.setdefault(n, []).append((at, label))
    top = ax1.get_ylim()[1]
    for n, marks in sorted(events.items()):
        color, first, last = f"C{n + 3}", marks[0][0], marks[-1][0]
        for ax in (ax1, ax2):
            ax.axvspan(first, max(last, first + 0.05), color=color, alpha=0.15, linewidth=0)
            for at, _ in marks:
                ax.axvline(at, color=color, linestyle="--", linewidth=0.8)
        ax1.text(first, top * 0.98, f"{n}: " + " -> ".join(label for _, label in marks) + " ", rotation=90,
                 fontsize="x-small", color=color, va="top", ha="right")
    ax2.set_xlabel("seconds since traffic start")
    fig.suptitle("xdpgw demo: 2 r1 heavy, offloaded to dc2; 3 a VM fails; 4 a VM migrates; 5 r1 calms; "
                 "6 dc2 releases")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _Demo:
    """One run of the demo: its testbed, processes and traffic, and what it measured."""

    def __init__(self, prefix: str, seconds: float, out: TextIO) -> None:
        self.prefix, self.seconds, self.out = prefix, seconds, out
        self.dwell = seconds / (len(EVENTS) + 1)   # quiet stretches: before, between and after the events
        self.tb = Testbed(prefix, dc2_gateway=True)
        self.lab = OffloadLab()
        self.workdir = tempfile.mkdtemp(prefix=f"xdpgw-demo-{prefix}-")
        self.xdpgw = xdpgw_executable()
        self.center_path = ""
        self.daemon: GatewayDaemon | None = None
        self.rc_daemon: int | None = None
        self.dc2: GatewayDaemon | None = None      # dc2's xdpgw
        self.rc_dc2: int | None = None
        self.dc2_sock = ""
        self.center: ReadyProcess | None = None
        self.dcagent: ReadyProcess | None = None
        self.servers: dict[str, subprocess.Popen] = {}
        self.started: list[subprocess.Popen] = []   # every process started here (stopped by pid)
        self.sock_path = ""
        self.tcp: list[_TcpWorker] = []
        self.udp: list[_UdpWorker] = []
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.say_lock = threading.Lock()
        self.t0 = 0.0                     # wall time of the traffic start
        self.series = _Series()
        self.final: dict[str, Any] = {}
        self.events: dict[int, str] = {}                # event number -> what was measured
        self.checks: list[tuple[int, bool, str]] = []   # expectations: (event, held, what)
        self.failures: list[str] = []
        self.ramp: Ramp | None = None
        self.victim: str | None = None                  # the VM whose server fails
        self.offload: dict[str, Any] = {}               # what the events measured, for the checks after
        self.migration: dict[str, Any] = {}
        self.calm: dict[str, Any] = {}
        self.released: dict[str, Any] = {}
        self.interrupted = False

    def say(self, text: str = "") -> None:
        with self.say_lock:
            print(text, file=self.out, flush=True)

    def call(self, command: str, **args: Any) -> Any:
        return api.call(self.sock_path, command, **args)

    def dc2_vms(self) -> dict[str, dict]:
        """dc2's xdpgw's VMs (vm list: state, packets, idle_s)."""
        return {v["name"]: v for v in api.call(self.dc2_sock, "vm.list")}

    def rel(self, wall: float) -> float:
        return wall - self.t0

    def mark(self, n: int, wall: float, label: str) -> None:
        """A vertical marker on the plot: event `n` at wall time `wall`."""
        self.series.marks.append((self.rel(wall), n, label))

    def check(self, n: int, held: bool, what: str) -> None:
        self.checks.append((n, bool(held), what))

    def event(self, n: int, text: str) -> None:
        self.events[n] = text
        self.say(f"{time.time() - self.t0:5.1f}s  EVENT {n}: {text}")

    # ---- set-up
    def set_up(self) -> None:
        """Testbed, VM servers, center, dc2's agent, then the daemon; wait until every VM is healthy."""
        tb = self.tb
        self.say(f"xdpgw demo: testbed {self.prefix}, about {self.seconds:.0f} s of traffic")
        tb.up()
        self.say(f"  testbed up in {tb.timings['up']:.2f} s: clients c1 (r1 {', '.join(tb.client('c1').ips)}), "
                 f"c2 (r2 {tb.client('c2').ip}); VMs vm1..vm3 behind gwv1..gwv3; dc2 at {DC2_ENDPOINT} (IP-in-IP)")
        dc2 = dc2_config(self.prefix)
        self.dc2_sock = dc2.gateway.api_socket
        self.dc2 = GatewayDaemon.launch(tb, dc2, f"{self.workdir}/dc2.toml")
        self.started.append(self.dc2.proc)
        self.say(f"  dc2's xdpgw (pid {self.dc2.proc.pid}) up in {self.dc2.startup_s:.2f} s, {self.dc2.mode} XDP on "
                 f"dc2's {dc2.gateway.interface}: decapsulates tunnels to {DC2_ENDPOINT} from "
                 f"{', '.join(str(n) for n in dc2.gateway.decap_from)}; no service or VM yet")
        for vm in tb.vms:
            self.servers[vm.name] = start_server(tb, vm.name, vm.name, vm_binds() + vm_health_binds(tb, vm.name))
            self.started.append(self.servers[vm.name])
        self.center_path = str(self.lab.write_center_config(self.workdir))
        self.center = self.lab.start_center(tb, self.xdpgw, self.center_path)
        self.dcagent = self.lab.start_dc_agent(tb, drain_idle=DRAIN_IDLE_S)
        self.started += [self.center.proc, self.dcagent.proc]
        self.say(f"  servers up in vm1..vm3 (tcp {WEB_PORT} v4+v6, udp {ECHO_PORT}); center (pid {self.center.pid}) "
                 f"in the router; dc2's agent (pid {self.dcagent.pid})")
        config = testbed_config(self.prefix, health=HEALTH, monitor=MONITOR, center=self.lab.center_link(),
                                agent=self.lab.agent(), vm_ports=("gwv*",))
        self.sock_path = config.gateway.api_socket
        self.daemon = GatewayDaemon.launch(tb, config, f"{self.workdir}/xdpgw.toml")
        self.started.append(self.daemon.proc)
        self.say(f"  daemon (pid {self.daemon.proc.pid}) up in {self.daemon.startup_s:.2f} s, {self.daemon.mode} XDP "
                 f"on {tb.UPLINK}; API at {self.sock_path}")
        healthy = poll_until(lambda: all(v["health"] == "up" for v in self.call("vm.list") if v["name"] in LOCAL_VMS),
                             timeout=10)
        if not healthy:
            raise RuntimeError(f"VMs not healthy within 10 s: {self.call('vm.list')}")
        self.say(f"  monitor: every {MONITOR.interval} s, heavy over {MONITOR.heavy_pps:g} pps for "
                 f"{MONITOR.intervals} intervals, calm under {MONITOR.clear_pps:g}; health: tcp/udp probes every "
                 f"{PROBE['interval']} s, down after {PROBE['fall']} failures; VM ports gwv* watched")

    # ---- traffic
    def open_traffic(self) -> None:
        """The long-lived TCP connections and the UDP sockets (before any thread)."""
        tb = self.tb
        c1, c2 = tb.client("c1"), tb.client("c2")
        plan = [("c1", c1.ips[0], VIP4), ("c1", c1.ips[0], VIP4), ("c1", c1.ips[1], VIP4),
                ("c1", c1.ips[1], VIP4), ("c1", c1.ip6, VIP6),
                ("c2", c2.ip, VIP4), ("c2", c2.ip, VIP4), ("c2", c2.ip, VIP4), ("c2", c2.ip6, VIP6)]
        for role, src, dst in plan:
            self._open_tcp(role, src, dst, start=False)
        for role, src in (("c1", c1.ips[0]), ("c1", c1.ips[1]), ("c2", c2.ip)):
            socks = []
            for _ in range(UDP_FLOWS):
                s = tb.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(0.5)
                s.bind((src, 0))
                socks.append(s)
            self.udp.append(_UdpWorker(socks, f"{role}/{src}"))
        self.say(f"  {len(self.tcp)} TCP connections open: " + ", ".join(self._describe(w) for w in self.tcp))
        self.say(f"  UDP: {len(self.udp)} senders x {UDP_FLOWS} flows, one request every "
                 f"{UDP_INTERVAL_S * 1000:.0f} ms each")

    @staticmethod
    def _describe(w: _TcpWorker) -> str:
        return f"{w.label}{'(v6)' if ':' in w.conn.dst else ''}->{w.conn.served_by}"

    def _open_tcp(self, role: str, src: str, dst: str = VIP4, start: bool = True) -> _TcpWorker:
        conn = LineConn(self.tb, role, src, dst, WEB_PORT)
        conn.ask("hello")
        w = _TcpWorker(conn, f"{role}#{len(self.tcp)}")
        self.tcp.append(w)
        if start:
            self._start(w)
        return w

    def _start(self, worker: _TcpWorker | _UdpWorker) -> None:
        th = threading.Thread(target=worker.run, args=(self.stop,), daemon=True)
        th.start()
        self.threads.append(th)

    def _stop_threads(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=5)

    def run_story(self) -> None:
        """Traffic on its threads, the live view on another, the five events here."""
        self.t0 = time.time()
        for w in (*self.tcp, *self.udp):
            self._start(w)
        view = threading.Thread(target=self._live_view, daemon=True)
        view.start()
        self.threads.append(view)
        for step in (self._two_regions, self._heavy, self._vm_fails, self._vm_migrates, self._calm, self._release,
                     None):
            if self.stop.wait(self.dwell) or step is None:
                break
            step()
        self._stop_threads()
        self.final = self.call("stats")

    # ---- the live view
    def _live_view(self) -> None:
        self.say("")
        self.say("  time |" + "".join(f"{r + ' pps':>10}" for r in REGIONS) + "  r1 state |"
                 + "".join(f"{v:>7}" for v in LOCAL_VMS) + f"{'dc2':>7} | tcp ok   udp answered")
        prev, prev_t = self._counters(), time.monotonic()
        for tick in range(1, int(self.seconds * 10)):       # bounded; ends with the traffic
            if self.stop.wait(max(0.0, self.t0 + tick - time.time())):
                return
            now, t_now = self._counters(), time.monotonic()
            self._view_line(prev, now, max(t_now - prev_t, 1e-6))
            prev, prev_t = now, t_now

    def _counters(self) -> dict[str, Any]:
        """gw1's stats, and the packets dc2's xdpgw forwarded to each of its VMs ("dc2")."""
        return {**self.call("stats"), "dc2": {n: v["packets"] for n, v in self.dc2_vms().items()}}

    def _view_line(self, prev: dict[str, Any], now: dict[str, Any], dt: float) -> None:
        """One line of the live view (and one point of the plot's series)."""
        rel = time.time() - self.t0
        self.series.t.append(rel)
        cells_r, cells_v = [], []
        for r in REGIONS:
            pps = (now["regions"][r]["packets"] - prev["regions"][r]["packets"]) / dt
            self.series.regions.setdefault(r, []).append(pps)
            cells_r.append(f"{pps:>10.0f}")
        for v in LOCAL_VMS:
            pps = (now["vms"][v]["packets"] - prev["vms"][v]["packets"]) / dt
            self.series.vms.setdefault(v, []).append(pps)
            cells_v.append(f"{pps:>6.0f}{'!' if now['vms'][v]['state'] != 'active' else ' '}")
        # a VM released meanwhile takes its count with it: only the VMs in both samples
        pps = sum(n - prev["dc2"][vm] for vm, n in now["dc2"].items() if vm in prev["dc2"]) / dt
        self.series.vms.setdefault("dc2's VMs (dc2's xdpgw)", []).append(pps)
        cells_v.append(f"{pps:>6.0f} ")
        state = now["monitor"]["regions"]["r1"]["state"]
        ok = sum(1 for w in self.tcp if w.error is None)
        sent = sum(w.sent for w in self.udp)
        ans = sum(w.answered for w in self.udp)
        self.say(f"{rel:5.1f}s |" + "".join(cells_r) + f"{state:>10} |" + "".join(cells_v)
                 + f" | {ok:>2}/{len(self.tcp):<2} {ans:>6}/{sent:<6}")

    # ---- 1. two regions
    def _two_regions(self) -> None:
        rates = self.call("monitor")["regions"]
        home = sorted({w.conn.served_by for w in self.tcp})
        self.event(1, f"both served at home: r1 {rates['r1']['pps']:.0f} pps, r2 {rates['r2']['pps']:.0f} pps "
                      f"(smoothed), served by {', '.join(home)}")
        self.series.thresholds = {f"heavy ({MONITOR.heavy_pps:g} pps)": MONITOR.heavy_pps,
                                  f"calm ({MONITOR.clear_pps:g} pps)": MONITOR.clear_pps}

    # ---- 2. r1 heavy -> offload to dc2
    def _heavy(self) -> None:
        before = {w.label: w.conn.served_by for w in self.tcp}
        t_ramp = time.time()
        self.ramp = Ramp(self.tb, "c1", RAMP_PPS, max_s=WAIT_S + 3 * self.seconds).start()
        self.mark(2, t_ramp, f"r1 +{RAMP_PPS} pps")
        self.say(f"{self.rel(t_ramp):5.1f}s  r1 raises its send rate by ~{RAMP_PPS} pps (c1, UDP)")
        seen = self._wait_offload(True, "r1 was not offloaded")
        if seen is None:
            return
        active, r1, req, hist, t_seen = seen
        heavy_at, active_at = r1["heavy_at"] or t_seen, hist.get("active", t_seen)
        self.mark(2, heavy_at, f"heavy +{heavy_at - t_ramp:.1f} s")
        self.mark(2, active_at, f"{req.get('target', '?')} +{active_at - heavy_at:.2f} s")
        prepare = hist.get("prepared", active_at) - hist.get("preparing", active_at)
        endpoint = active[0]["endpoint"] if active else "?"
        self.event(2, f"r1 heavy {heavy_at - (r1['crossed_at'] or heavy_at):.2f} s after crossing "
                      f"{MONITOR.heavy_pps:g} pps ({heavy_at - t_ramp:.2f} s after the ramp); heavy -> offload "
                      f"distributed in {active_at - heavy_at:.2f} s (center request {req.get('id', '?')}: target "
                      f"{req.get('target', '?')}, prepared in {prepare:.2f} s, endpoint {endpoint})")
        self.offload = {"stats": self.call("stats"), "before": before}
        c1, c2 = self.tb.client("c1"), self.tb.client("c2")
        fresh = [self._open_tcp("c1", c1.ips[i % 2]) for i in range(NEW_R1_CONNS)]
        r2_new = self._open_tcp("c2", c2.ip)
        self.offload.update(fresh=fresh, r2_new=r2_new)
        self.say(f"{time.time() - self.t0:5.1f}s  new connections: " + ", ".join(self._describe(w) for w in fresh)
                 + f"; from r2: {self._describe(r2_new)}")

    def _wait_offload(self, present: bool, missed: str) -> tuple[list, dict, dict, dict[str, float], float] | None:
        """Wait (bounded) until r1 is offloaded at the gateway (`present`) or no longer is;
        then r1's offloads, its monitor state, the center's request with its history
        (state -> time) and when the demo saw it. None (and a failure) if it never happens."""
        def r1_offloads() -> list[dict]:
            return [o for o in self.call("offload.list") if o["region"] == "r1"]

        if not poll_until(lambda: bool(r1_offloads()) == present, WAIT_S, 0.05):
            self.failures.append(f"{missed} within {WAIT_S:.0f} s: {self.call('monitor')['regions']['r1']}")
            return None
        t_seen = time.time()
        req = self._center_request()
        hist = {h["state"]: h["at"] for h in req.get("history", [])}
        return r1_offloads(), self.call("monitor")["regions"]["r1"], req, hist, t_seen

    def _center_request(self) -> dict[str, Any]:
        """The center's request for r1/web, through `xdpgw center list` and `show ID`."""
        listing = self.lab.center_cli(self.tb, self.xdpgw, self.center_path, "list")
        rid = next((line.split()[0] for line in listing.stdout.splitlines()
                    if " region r1 " in line and " service web " in line), None)
        if rid is None:
            self.failures.append(f"xdpgw center list shows no request for r1/web: {listing.stdout}{listing.stderr}")
            return {}
        shown = self.lab.center_cli(self.tb, self.xdpgw, self.center_path, "show", rid)
        return json.loads(shown.stdout) if shown.returncode == 0 else {}

    def _offload_checks(self) -> None:
        """What held while r1 was offloaded (called just before it calms down)."""
        o = self.offload
        if not o:
            return
        fresh, r2_new = o["fresh"], o["r2_new"]
        in_dc2 = [w for w in fresh if (w.conn.served_by or "").startswith("dc2-")]
        by_vm: dict[str, int] = {}
        for w in in_dc2:
            by_vm[w.conn.served_by] = by_vm.get(w.conn.served_by, 0) + 1
        self.check(2, len(in_dc2) == len(fresh), f"r1's new connections served in dc2: {len(in_dc2)}/{len(fresh)} ("
                   + ", ".join(f"{k} {v}" for k, v in sorted(by_vm.items())) + ")")
        old_r1 = [w for w in self.tcp if w.label in o["before"] and w.conn.role == "c1"
                  and w.conn.served_by != self.victim]
        stayed = [w for w in old_r1 if w.error is None and w.switched_to is None]
        now = self.call("stats")
        home_pkts = sum(now["vms"][v]["packets"] - o["stats"]["vms"][v]["packets"] for v in LOCAL_VMS)
        self.check(2, len(stayed) == len(old_r1) and home_pkts > 0,
                   f"r1's sessions from before stayed home: {len(stayed)}/{len(old_r1)}; home VMs served "
                   f"{home_pkts} packets during the offload")
        offloaded = now["datapath"]["offload_fwd"] - o["stats"]["datapath"]["offload_fwd"]
        # dc2's xdpgw picked each VM (its flow table says which) and counted what it forwarded
        chosen = [api.call(self.dc2_sock, "flow.lookup", service="web", src=w.conn.src, sport=w.conn.sport)["vm"]
                  for w in in_dc2]
        agree = [w for w, vm in zip(in_dc2, chosen) if w.conn.served_by == f"dc2-{vm}"]
        at_dc2 = {n: v["packets"] for n, v in self.dc2_vms().items()}
        self.check(2, offloaded > 0 and len(agree) == len(fresh)
                   and all(at_dc2.get(vm.removeprefix("dc2-"), 0) > 0 for vm in by_vm),
                   f"dc2's xdpgw chose the VMs of r1's new connections ({len(agree)}/{len(fresh)} as its flow table "
                   f"says) and forwarded " + ", ".join(f"{k} {v}" for k, v in sorted(at_dc2.items()))
                   + f" packets ({offloaded} tunnelled by gw1)")
        r2_off = [x for x in self.call("offload.list") if x["region"] == "r2"]
        self.check(2, not r2_off and (r2_new.conn.served_by or "").startswith("vm"),
                   f"r2 untouched: {'no' if not r2_off else 'an'} offload, its new connection served at home "
                   f"({r2_new.conn.served_by})")

    # ---- 3. a VM's server fails
    def _vm_fails(self) -> None:
        flows = [(w, k) for w in self.udp for k in range(len(w.socks))]
        counts: dict[str, int] = {}
        for w, k in flows:
            if w.served[k] in LOCAL_VMS:
                counts[w.served[k]] = counts.get(w.served[k], 0) + 1
        if not counts:
            self.failures.append("no UDP flow was answered: no VM to fail")
            return
        victim = self.victim = max(sorted(counts), key=lambda n: counts[n])
        before = [w.served[k] for w, k in flows]
        proc = self.servers[victim]
        t_kill = time.time()
        self.tb.stop(proc)                                   # by pid (SIGTERM, then SIGKILL)
        self.mark(3, t_kill, f"{victim} killed")
        self.say(f"{self.rel(t_kill):5.1f}s  {victim}'s server (pid {proc.pid}) killed; it served "
                 f"{counts[victim]} of {len(flows)} UDP flows")
        down = poll_until(lambda: next((v for v in self.call("vm.list") if v["name"] == victim
                                        and v["state"] == "down" and v["tables_at"]), None), WAIT_S, 0.01)
        if not down:
            self.failures.append(f"{victim} was not taken out of the tables within {WAIT_S:.0f} s")
            return
        self.mark(3, down["tables_at"], f"out +{down['tables_at'] - t_kill:.2f} s")
        tables = self.call("maglev.tables")
        still = [s for s in ("web", "web6", "echo") if victim in tables[s]["slots"]]
        self.event(3, f"{victim}'s server killed -> health down in {down['health_since'] - t_kill:.2f} s -> "
                      f"out of the Maglev tables in {down['tables_at'] - t_kill:.2f} s")
        settled = poll_until(lambda: all(w.answered_at[k] > down["tables_at"] for w, k in flows), 5.0, 0.05)
        after = [w.served[k] for w, k in flows]
        moved = [i for i in range(len(flows)) if after[i] != before[i]]
        mine = [i for i in range(len(flows)) if before[i] == victim]
        self.check(3, settled and moved == mine and victim not in after and not still,
                   f"only {victim}'s flows moved: {len(moved)} of {len(flows)} UDP flows moved, {len(mine)} were "
                   f"{victim}'s; {victim} in no Maglev table")

    def final_checks(self) -> None:
        """The expectations that need the whole run (after the traffic stopped, before teardown)."""
        self._failure_checks()
        self._migration_checks()
        self._calm_checks()
        self._release_checks()

    def _failure_checks(self) -> None:
        victim = self.victim
        if victim is None:
            return
        others = [w for w in self.tcp if w.conn.served_by != victim]
        fine = [w for w in others if w.error is None and w.switched_to is None]
        lost_mine = sum(1 for w in self.tcp if w.conn.served_by == victim and w.error is not None)
        self.check(3, len(fine) == len(others), f"other VMs' connections untouched: {len(fine)}/{len(others)} "
                   f"({lost_mine} of {victim}'s closed with its server)")

    # ---- 4. a VM live-migrates and announces itself
    def _vm_migrates(self) -> None:
        counts: dict[str, int] = {}
        for w in self.tcp:
            if w.error is None and w.conn.served_by in LOCAL_VMS and w.conn.served_by != self.victim:
                counts[w.conn.served_by] = counts.get(w.conn.served_by, 0) + 1
        candidates = [v for v in LOCAL_VMS if v != self.victim]
        vm = max(candidates, key=lambda n: (counts.get(n, 0), -candidates.index(n)))
        mine = [w for w in self.tcp if w.conn.served_by == vm and w.error is None]
        lines_before = {w.label: w.lines for w in mine}
        p = port_for(self.prefix, vm, NEW_PORT_SUFFIX)
        add_port(p, gw_ns=self.tb.ns("gw"))
        watched = poll_until(lambda: p.port in (self.call("migration.status")["watcher"] or {}).get("ports", ()),
                             5.0)
        if not watched:
            self.failures.append(f"the daemon's VM-port watcher never attached to {p.port}")
            return
        switch_to(p)                      # the VM now lives behind its new port ...
        t_announce = time.time()
        announce(p)                       # ... and says so (no `vm move`)
        moved = poll_until(lambda: next((r for r in self.call("vm.registry") if r["name"] == vm
                                         and r["location"] == p.port), None), 5.0, 0.005)
        if not moved:
            self.failures.append(f"{vm}'s announcement on {p.port} did not move it within 5 s")
            return
        route_via(p, self.tb.ns("gw"))    # the health probes follow it (the VM is already there: no move)
        m = self.call("vm.history", name=vm)["migrations"][-1]
        self.mark(4, t_announce, f"{vm} GARP on {p.port}: {m['convergence_ms']:.1f} ms")
        self.event(4, f"{vm} announced itself on {p.port} ({m['detected_by']}) -> re-pointed in "
                      f"{m['convergence_ms']:.1f} ms (announcement in the kernel -> gateway re-programmed; "
                      f"{m['from_location']} -> {m['to_location']})")
        self.migration = {"vm": vm, "port": p, "conns": mine, "lines_before": lines_before, "record": m}

    def _migration_checks(self) -> None:
        mig = self.migration
        if not mig:
            return
        vm, p, m = mig["vm"], mig["port"], mig["record"]
        survived = [w for w in mig["conns"] if w.error is None and w.switched_to is None
                    and w.lines > mig["lines_before"][w.label]]
        rx = link_stats(self.tb, vm, p.vm_if)["rx_packets"]
        self.check(4, m["detected_by"] in ("garp", "na", "rarp") and m["status"] == "ok"
                   and len(survived) == len(mig["conns"]) and rx > 0,
                   f"{vm} moved by its own announcement ({m['detected_by']}, no vm move): "
                   f"{len(survived)}/{len(mig['conns'])} of its connections survived on {vm}; "
                   f"{rx} packets on {p.port}")

    # ---- 5. r1 calms down
    def _calm(self) -> None:
        self._offload_checks()
        if self.ramp is None:
            return
        self.ramp.end()
        t_end = time.time()
        self.mark(5, t_end, "r1 calm")
        self.say(f"{self.rel(t_end):5.1f}s  r1's extra traffic stops ({self.ramp.sent} datagrams sent)")
        seen = self._wait_offload(False, "the offload of r1 was not cleared")
        if seen is None:
            return
        _, r1, req, hist, t_seen = seen
        calm_at, cleared_at = r1["since"], hist.get("cleared", t_seen)
        self.mark(5, cleared_at, f"cleared +{cleared_at - t_end:.1f} s")
        self.event(5, f"r1 calm {calm_at - t_end:.2f} s after the ramp stopped; calm -> offload cleared in "
                      f"{cleared_at - calm_at:.2f} s (center request {req.get('id', '?')} {req.get('state', '?')})")
        home = self._open_tcp("c1", self.tb.client("c1").ip)
        self.calm = {"home": home, "state": req.get("state"),
                     "lines": {w.label: w.lines for w in self.offload.get("fresh", [])}}
        self.say(f"{time.time() - self.t0:5.1f}s  new connection: {self._describe(home)}")

    def _calm_checks(self) -> None:
        calm, o = self.calm, self.offload
        if not calm or not o:
            return
        self.check(5, calm["state"] in ("draining", "released") and
                   (calm["home"].conn.served_by or "").startswith("vm"),
                   f"offload cleared at the gateway, the center's request {calm['state']}; r1's next connection "
                   f"served at home ({calm['home'].conn.served_by})")
        fresh, after = o["fresh"], self.released.get("after_clear", {})
        still = [w for w in fresh if w.error is None and w.switched_to is None and after.get(w.label, 0) > 0]
        self.check(5, len(still) == len(fresh), f"connections offloaded before the clear finish in dc2: "
                   f"{len(still)}/{len(fresh)} still answered there while its VMs drained")

    # ---- 6. the offloaded connections end: dc2 releases its VMs
    def _release(self) -> None:
        calm, o = self.calm, self.offload
        if not calm or not o:
            return
        fresh = o["fresh"]
        after = {w.label: w.lines - calm["lines"][w.label] for w in fresh}
        before = self.dc2_vms()
        t_end = time.time()
        for w in fresh:
            w.finished.set()
        self.mark(6, t_end, "offloaded connections end")
        self.say(f"{self.rel(t_end):5.1f}s  r1's offloaded connections end ({sum(after.values())} lines answered in "
                 f"dc2 since the clear; dc2's VMs " + ", ".join(f"{n} {v['state']}" for n, v in sorted(before.items()))
                 + ")")
        req = poll_until(lambda: (lambda r: r if r.get("state") == "released" else None)(self._center_request()),
                         WAIT_S, 0.1)
        self.released = {"after_clear": after, "before": before}
        if not req:
            self.failures.append(f"the center did not release dc2's VMs within {WAIT_S:.0f} s")
            return
        hist = {h["state"]: h["at"] for h in req.get("history", [])}
        released_at = hist.get("released", time.time())
        self.mark(6, released_at, f"released +{released_at - t_end:.2f} s")
        self.event(6, f"offloaded connections closed -> dc2's VMs drained and released in {released_at - t_end:.2f} s "
                      f"(request {req['id']} {req['data'].get('released_by')}; clear -> released "
                      f"{released_at - hist.get('draining', released_at):.2f} s, drain idle {DRAIN_IDLE_S:g} s)")
        self.released.update(req=req, left=self.dc2_vms(),
                             namespaces=[n for n in before if netns_exists(f"{self.prefix}-{n}")])

    def _release_checks(self) -> None:
        rel = self.released
        if "req" not in rel:
            return
        states = {n: v["state"] for n, v in rel["before"].items()}
        self.check(6, rel["req"]["data"].get("released_by") == "drained" and set(states.values()) == {"draining"}
                   and not rel["left"] and not rel["namespaces"],
                   f"dc2's VMs drained ({', '.join(f'{n} {s}' for n, s in sorted(states.items()))}), released once "
                   f"idle ({rel['req']['data'].get('released_by')}): none left in dc2's xdpgw "
                   f"({len(rel['left'])}), their namespaces gone ({len(rel['namespaces'])} left)")

    # ---- teardown
    def tear_down(self) -> None:
        """Stop the traffic, the daemon, the center, dc2's agent and the servers (by pid),
        remove the testbed; never raises."""
        self._stop_threads()
        if self.ramp is not None:
            self.ramp.end()
        for w in self.tcp:
            w.conn.close()
        for w in self.udp:
            for s in w.socks:
                s.close()
        daemon = self.daemon
        if daemon is not None and daemon.running and not self.final:
            try:
                self.final = self.call("stats")
            except Exception:  # noqa: BLE001 - the summary just has less in it
                pass
        if daemon is not None:
            try:
                self.rc_daemon = daemon.stop()
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"stopping the daemon: {exc}")
        if self.dc2 is not None:
            try:
                self.rc_dc2 = self.dc2.stop()
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"stopping dc2's xdpgw: {exc}")
        for p in (self.dcagent, self.center):       # dc2's agent removes its VMs when it stops
            if p is not None:
                p.stop()
        try:
            self.tb.down()
        except Exception as exc:  # noqa: BLE001
            self.failures.append(f"testbed down: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- summary
    def summary(self, plot_path: str | None) -> int:
        """Print what happened; 0 if every event happened and every expectation held, else 1 (and why)."""
        self.say("")
        self.say(f"summary (prefix {self.prefix}, {self.seconds:.0f} s of story)")
        self._report_daemon()
        self.say("  events, as measured:")
        for n, name in EVENTS.items():
            text = self.events.get(n)
            self.say(f"    {n}. {name:<15} {text or 'did not happen'}")
            if text is None and not self.interrupted:
                self.failures.append(f"event {n} ({name}) did not happen")
        self.say("  expectations:")
        for _, held, what in sorted(self.checks, key=lambda c: c[0]):
            self.say(f"    {'held  ' if held else 'FAILED'}  {what}")
            if not held:
                self.failures.append(f"expectation failed: {what}")
        self._report_traffic()
        if plot_path and self.series.t:
            self.say(f"  plot: {_write_plot(self.series, plot_path)} ({len(self.series.marks)} events marked)")
        left = leftovers(self.prefix)
        alive = [p.pid for p in self.started if p.poll() is None]
        if left:
            self.failures.append(f"left behind: {left}")
        if alive:
            self.failures.append(f"processes still running: {alive}")
        self.say(f"  teardown: {'clean' if not left else 'LEFTOVERS'} (namespaces, pins, registry); "
                 f"{len(self.started) - len(alive)} of {len(self.started)} processes started here stopped "
                 f"(pids {' '.join(str(p.pid) for p in self.started)})")
        if self.failures:
            self.say("  result: FAILED")
            for f in self.failures:
                self.say(f"    - {f}")
            return 1
        self.say("  result: OK")
        return 0

    def _report_daemon(self) -> None:
        for what, daemon, rc in (("daemon", self.daemon, self.rc_daemon), ("dc2's xdpgw", self.dc2, self.rc_dc2)):
            if daemon is not None and daemon.startup_s is not None:
                self.say(f"  {what}: up in {daemon.startup_s:.2f} s ({daemon.mode} XDP), stopped with exit code {rc}")
                if rc != 0:
                    self.failures.append(f"{what} exit code {rc}")

    def _report_traffic(self) -> None:
        final = self.final
        if final:
            regions = ", ".join(f"{r} {final['regions'][r]['packets']}" for r in REGIONS)
            vms = ", ".join(f"{v} {final['vms'][v]['packets']}" for v in LOCAL_VMS)
            drops = {k: v for k, v in final["drops"].items() if v}
            served = ", ".join(f"{n} {v['packets']}" for n, v in sorted(self.released.get("before", {}).items()))
            self.say(f"  counters: regions {regions}; VMs {vms}; to dc2 {final['datapath']['offload_fwd']} packets "
                     f"(dc2's xdpgw forwarded to {served or 'no VM'}); flows {final['flows']['entries']}; drops "
                     + (", ".join(f"{k} {v}" for k, v in drops.items()) or "none"))
        if self.tcp:
            lost = [w for w in self.tcp if w.error is not None]
            expected = [w for w in lost if w.conn.served_by == self.victim]
            self.say(f"  TCP: {len(self.tcp)} connections, {sum(w.lines for w in self.tcp)} lines answered; "
                     f"{len(lost)} closed ({len(expected)} by the failed VM's server)")
            for w in lost:
                if w not in expected:
                    self.failures.append(f"connection {w.label} ({w.conn.served_by}): {w.error}")
            for w in self.tcp:
                if w.switched_to is not None:
                    self.failures.append(f"connection {w.label} served by {w.conn.served_by} was answered by "
                                         f"{w.switched_to}")
        if self.udp:
            sent = sum(w.sent for w in self.udp)
            ans = sum(w.answered for w in self.udp)
            wrong = sum(w.wrong for w in self.udp)
            lost_victim = sum(w.lost_by.get(self.victim, 0) for w in self.udp) if self.victim else 0
            lost_other = sent - ans - wrong - lost_victim
            self.say(f"  UDP: {sent} requests, {ans} answered, {lost_victim} lost to the failed VM before its "
                     f"flows moved, {lost_other} other losses, {wrong} wrong")
            if wrong or lost_other > max(1, sent // 100):
                self.failures.append(f"UDP: {lost_other} of {sent} requests lost (over 1%), {wrong} wrong")


def run_demo(prefix: str = "xgwd", seconds: float = 24.0, plot_path: str | None = "demo-rates.png") -> int:
    """Run the demo; 0 if every event happened and every expectation held, else 1."""
    demo = _Demo(prefix, max(12.0, min(float(seconds), 600.0)), sys.stdout)
    try:
        demo.set_up()
        demo.open_traffic()
        demo.run_story()
        demo.final_checks()
    except KeyboardInterrupt:
        demo.interrupted = True
        demo.failures.append("interrupted (Ctrl-C)")
    except Exception as exc:  # noqa: BLE001 - the demo reports, then cleans up
        demo.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        demo.tear_down()
    return demo.summary(plot_path)

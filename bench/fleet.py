"""Section fleet: VM migrations through a real 3-member etcd, applied by a fleet.

Set-up (all in namespaces of this run, removed at the end with every process
and data dir, also on failure):

* {p}-fe: the etcd members (testbed/etcd_cluster.py) on 198.18.250.1-3; the
  writer and the watcher-only processes run here too. The members' data dirs
  are in the run's directory, xdpgw-fleet-{p}-* in the temporary directory.
* {p}-fgN, one per gateway: a real `xdpgw run` daemon, XDP attached to up0 (a
  veth whose peer stays in the namespace: no traffic, the cost measured is the
  control plane's), reaching the members by mgmt0, a veth to {p}-fe.
* The store holds VMS VM records (Registry.sync_vm); every daemon has them all in
  its config, on 16 hosts it does not own, so a VM's location (host, port) is
  a tunnel to that host's endpoint.

A run: the writer moves MIGRATIONS distinct VMs to another host at RATE per
second, each with the registry's compare-and-swap (Registry.move, with the
record and move fields a detecting gateway writes, then its history row), from
4 threads on a fixed schedule. Every process applies each change from its
watch of /xdpgw/vms/:

* a gateway daemon re-points the VM in its dataplane; its `vm.list` gives the
  time it did (moved_at) and the revision it applied;
* a watcher-only process (`python -m bench.fleet watch`) is the store follower
  every gateway runs (control/migration/follow.py, control/store's watch) with
  an apply that timestamps each change instead of writing a dataplane.

Convergence of a migration: the writer's clock before its write -> the last of
all processes applied it (one host clock). Apply cost per change: the CPU time
(/proc/PID/stat) a process spent during the run, less what it spends idle
(measured over a quiet window just before), over the number of changes. Runs
are repeated with more watchers (8, 32, 64 processes) to show how the figures
move with the fleet. The machine's CPU use during each run is reported beside
them: on a small machine the fleet's processes and etcd share the same cores.

What a crashed run left (processes, namespaces, pins, its directory) goes with
`python -m bench --cleanup PREFIX` (cleanup() below)."""
from __future__ import annotations

import argparse
import glob
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import Context, Measurement

SECTION = "fleet"
HOSTS = 16
GATEWAYS = 8                     # gateway daemons of a full run (2 with --quick)
ETCD_IPS = ("198.18.250.1", "198.18.250.2", "198.18.250.3")
WRITERS = 4
WATCHER_BATCH = 8
RATE = 200.0
FOLLOW_WAIT_S = 120.0            # after the daemons are up, until every one follows the store
MGMT_IF = "mgmt0"
_TICK = os.sysconf("SC_CLK_TCK")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=20)


def vm_name(i: int) -> str:
    return f"v{i:05d}"


def host_of(i: int, shift: int = 0) -> str:
    return f"h{(i + shift) % HOSTS}"


def _mac(i: int) -> str:
    return f"02:fe:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


# ------------------------------------------------------------------ the network

@dataclass
class Net:
    prefix: str
    gateways: int
    made: list[str] = field(default_factory=list)

    @property
    def etcd_ns(self) -> str:
        return f"{self.prefix}-fe"

    def gw_ns(self, i: int) -> str:
        return f"{self.prefix}-fg{i}"

    def gw_name(self, i: int) -> str:
        """Gateway i's gateway.name: its pins and API socket are named after it."""
        return f"{self.prefix}-g{i}"

    def up(self) -> None:
        """{p}-fe with the members' addresses; per gateway its namespace, mgmt0 to {p}-fe, up0/up1."""
        _ip("netns", "add", self.etcd_ns)
        self.made.append(self.etcd_ns)
        _ip("-n", self.etcd_ns, "link", "set", "lo", "up")
        for addr in ETCD_IPS:
            _ip("-n", self.etcd_ns, "addr", "add", f"{addr}/32", "dev", "lo")
        for i in range(self.gateways):
            ns = self.gw_ns(i)
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.etcd_ns, "link", "add", f"to-g{i}", "type", "veth", "peer", "name", MGMT_IF, "netns", ns)
            _ip("-n", self.etcd_ns, "addr", "add", f"198.18.{240 + i}.1/24", "dev", f"to-g{i}")
            _ip("-n", self.etcd_ns, "link", "set", f"to-g{i}", "up")
            _ip("-n", ns, "addr", "add", f"198.18.{240 + i}.2/24", "dev", MGMT_IF)
            _ip("-n", ns, "link", "set", MGMT_IF, "up")
            _ip("-n", ns, "route", "add", "198.18.250.0/24", "via", f"198.18.{240 + i}.1", "dev", MGMT_IF)
            _ip("-n", ns, "link", "add", "up0", "address", "02:fd:00:00:00:01", "type", "veth", "peer", "name",
                "up1", "address", "02:fd:00:00:00:02")
            _ip("-n", ns, "addr", "add", f"198.18.{230 + i}.1/24", "dev", "up0")
            for dev in ("up0", "up1"):
                _ip("-n", ns, "link", "set", dev, "up")

    def down(self) -> None:
        # the veths go with the namespaces
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.made.clear()


def _run_dir_stem(prefix: str) -> str:
    return f"xdpgw-fleet-{prefix}-"


def cleanup(prefix: str) -> list[str]:
    """Remove what a crashed run with this exact prefix left: the processes inside its
    namespaces (etcd members, gateway daemons, watchers: all started by the run;
    SIGTERM by pid, SIGKILL after a grace), the namespaces (their veths go with them),
    the gateways' pins and API sockets, the run's directory (etcd data, configs)."""
    from control.config import GatewayConfig
    from dataplane.pinning import PIN_ROOT, remove_pins
    from testbed.netns import netns_exists

    net = Net(prefix, GATEWAYS)
    namespaces = [ns for ns in [net.etcd_ns, *(net.gw_ns(i) for i in range(GATEWAYS))] if netns_exists(ns)]
    pids = []
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20).stdout
        pids += [int(p) for p in out.split()]
    removed = [f"pid {p}" for p in _end(pids)]
    net.made = list(namespaces)
    net.down()
    removed += namespaces
    for i in range(GATEWAYS):
        if remove_pins(PIN_ROOT / net.gw_name(i)):
            removed.append(str(PIN_ROOT / net.gw_name(i)))
        sock = GatewayConfig(name=net.gw_name(i), interface="up0").api_socket
        if os.path.exists(sock):
            os.unlink(sock)
            removed.append(sock)
    for path in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(_run_dir_stem(prefix)) + "*")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _end(pids: list[int], grace: float = 15.0) -> list[int]:
    """SIGTERM each pid (a daemon detaches XDP and closes its store session), SIGKILL
    those still alive after `grace` seconds; the pids that were signalled."""
    signalled = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = signalled
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return signalled


def _running(pid: int) -> bool:
    """The pid exists and is not a zombie (a zombie's parent reaps it; it holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ the gateways

class _Procs:
    """What GatewayDaemon needs of a testbed: start a process (it enters its
    namespace itself, gateway.netns) and close its pipes once stopped."""

    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, start_new_session=True, **kw)

    def stop(self, proc: subprocess.Popen) -> None:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def gateway_config(net: Net, i: int, url: str, n_vms: int):
    """Gateway i: every VM, each on one of HOSTS hosts it does not own (a tunnel to the host's endpoint)."""
    import ipaddress

    from control.config import Config, GatewayConfig, HostConfig, StoreConfig, VMConfig, validate

    ip = ipaddress.ip_address
    hosts = tuple(HostConfig(name=f"h{k}", ports=("p*",), capacity=1 << 20, endpoint=ip(f"198.18.{100 + k}.1"))
                  for k in range(HOSTS))
    vms = tuple(VMConfig(name=vm_name(v), port=f"p{v}", mac=_mac(v), host=host_of(v)) for v in range(n_vms))
    return validate(Config(
        gateway=GatewayConfig(name=net.gw_name(i), interface="up0", netns=net.gw_ns(i),
                              tunnel_source=ip(f"198.18.{230 + i}.1"), next_hop_mac="02:fd:00:00:00:02",
                              flow_table_size=1024, max_vms=max(1024, n_vms), maglev_table_size=251),
        vms=vms, hosts=hosts, store=StoreConfig(url)))


def _populate(url: str, n_vms: int) -> int:
    """Register every VM as a gateway does (Registry.sync_vm), from 8 threads; the store's revision after."""
    from concurrent.futures import ThreadPoolExecutor

    from control.migration.registry import Registry
    from control.store import open_store

    store = open_store(url)
    try:
        reg = Registry(store, "bench")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda v: reg.sync_vm(vm_name(v), None, [], _mac(v), None, "port", f"p{v}",
                                                host=host_of(v)), range(n_vms)))
        return store.revision()
    finally:
        store.close()


def _write(url: str, names: list[str], shift: int, rate: float, members: list[str]) -> list[tuple]:
    """Move each VM of `names` to host +shift, the i-th at t0 + i / rate; per move
    (name, revision, write start, write end), times by time.time()."""
    from control.migration.registry import Registry
    from control.store import open_store
    from control.vms import Location

    store = open_store(url)
    reg = Registry(store, "bench-writer")
    try:
        records = {r.name: r for r in reg.vms()}
        out: list[tuple | None] = [None] * len(names)
        nxt = iter(range(len(names)))
        lock = threading.Lock()
        t0 = time.monotonic() + 0.2

        def worker() -> None:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                rec = records[names[i]]
                to = Location(host=host_of(int(rec.name[1:]), shift), port=rec.location, mac=rec.mac)
                move = {"by": "bench-writer", "detected_by": "garp", "t0_ns": time.monotonic_ns(), "at": time.time(),
                        "from": rec.where().as_dict()}
                start = time.time()
                written = reg.move(rec, to, move, members)
                end = time.time()
                reg.record_migration(rec.name, (rec.kind, rec.location), ("port", rec.location), "garp",
                                     round((end - start) * 1000, 3), {m: "watching" for m in members})
                out[i] = (rec.name, written.revision, start, end)

        threads = [threading.Thread(target=worker) for _ in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [o for o in out if o is not None]
    finally:
        store.close()


# ------------------------------------------------------------------ watcher-only processes

def watch_main(url: str, out: str, limit_s: float) -> None:
    """A watcher-only process: the store follower a gateway runs, its apply stamping
    each change (VM, revision, time.time()). Prints "ready <list seconds>" once
    following; on SIGTERM (or after limit_s) writes the stamps to `out` as JSON."""
    from control.migration.follow import Follower
    from control.migration.registry import Registry
    from control.store import open_store

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    store = open_store(url)
    reg = Registry(store, "watcher")
    t0 = time.monotonic()
    records, _ = reg.snapshot()
    list_s = time.monotonic() - t0
    stamps: list[tuple[str, int, float]] = []

    def apply(changed) -> set[str]:
        now = time.time()
        stamps.extend((r.name, r.revision, now) for r in changed)
        return set()

    follower = Follower(reg, apply, {r.name: r.where() for r in records}, url=url)
    follower.start()
    print(f"ready {list_s:.3f}", flush=True)
    stop.wait(limit_s)
    follower.stop()
    store.close()
    Path(out).write_text(json.dumps({"list_s": list_s, "stamps": stamps}))


@dataclass
class Watcher:
    proc: subprocess.Popen
    out: str
    list_s: float = float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _start_watchers(ctx: Context, net: Net, url: str, n: int, tmp: str, tag: str, limit_s: float) -> list[Watcher]:
    from testbed.netns import popen_in_netns

    watchers: list[Watcher] = []
    try:
        # in batches, as a fleet is rolled out: each start lists every VM, and dozens of
        # full listings at once keep a small etcd from answering within the client's window
        for first in range(0, n, WATCHER_BATCH):
            batch = []
            for k in range(first, min(n, first + WATCHER_BATCH)):
                out = os.path.join(tmp, f"w{tag}-{k}.json")
                proc = popen_in_netns(net.etcd_ns, [sys.executable, "-m", "bench.fleet", "watch", "--url", url, "--out",
                                                    out, "--limit", str(limit_s)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, cwd=str(Path(__file__).resolve().parents[1]),
                                      start_new_session=True)
                batch.append(Watcher(proc, out))
                watchers.append(batch[-1])
            deadline = time.monotonic() + 120
            for w in batch:
                ready, _, _ = select.select([w.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                line = w.proc.stdout.readline().decode() if ready else ""
                if not line.startswith("ready"):
                    raise RuntimeError(f"a watcher did not start: {line!r} {w.proc.stderr.read1(2000)!r}"
                                       if w.proc.poll() is not None else "a watcher was not ready in 120 s")
                w.list_s = float(line.split()[1])
            ctx.progress(f"watchers ready {len(watchers)}/{n}")
    except BaseException:
        for w in watchers:
            _stop(w.proc)
        raise
    return watchers


# ------------------------------------------------------------------ one run

def _run_once(ctx: Context, net: Net, url: str, daemons: list, socks: list[str], n_watchers: int, first: int,
              n_moves: int, shift: int, tmp: str, etcd_pids: list[int]) -> dict:
    """n_moves migrations of VMs first.. with all daemons and n_watchers watcher-only processes."""
    from control.api import unix as api
    from testbed.netns import run_in_netns

    procs = len(daemons) + n_watchers
    ctx.progress(f"{procs} processes: starting {n_watchers} watcher-only processes")
    watchers = _start_watchers(ctx, net, url, n_watchers, tmp, f"{procs}", 600)
    try:
        pids = {"gateways": [d.proc.pid for d in daemons], "watchers": [w.proc.pid for w in watchers],
                "etcd": etcd_pids}
        idle_s = 2.0
        ctx.progress(f"{procs} processes: {idle_s:.0f} s quiet window (idle CPU)")
        cpu0 = {k: [_cpu_s(p) for p in v] for k, v in pids.items()}
        time.sleep(idle_s)
        cpu1 = {k: [_cpu_s(p) for p in v] for k, v in pids.items()}
        names = [vm_name(v) for v in range(first, first + n_moves)]
        members = [net.gw_name(i) for i in range(len(daemons))]
        ctx.progress(f"{procs} processes: {n_moves} migrations at {RATE:.0f}/s")
        m0 = _machine_busy()
        t_run = time.monotonic()
        writes = run_in_netns(net.etcd_ns, _write, url, names, shift, RATE, members, timeout=60 + 4 * n_moves / RATE)
        write_s = time.monotonic() - t_run
        want = {name: rev for name, rev, _, _ in writes}
        # converged: every daemon has applied the last write of each moved VM (bounded)
        deadline = time.monotonic() + 60
        views: list[dict] = []
        while time.monotonic() < deadline:
            views = [{v["name"]: v for v in api.call(s, "vm.list", timeout=30) if v["name"] in want} for s in socks]
            if all(all((view.get(n, {}).get("revision") or 0) >= r for n, r in want.items()) for view in views):
                break
            ctx.progress(f"{procs} processes: waiting for the gateways to apply")
            time.sleep(0.5)
        time.sleep(1.0)                      # the watchers are not polled: a moment for the last events
        run_s = time.monotonic() - t_run
        m1 = _machine_busy()
        cpu2 = {k: [_cpu_s(p) for p in v] for k, v in pids.items()}
    finally:
        for w in watchers:
            _stop(w.proc)
    applied: dict[str, list[float]] = {name: [] for name in want}
    missing = 0
    for view in views:
        for name, rev in want.items():
            v = view.get(name)
            if v and v.get("revision") == rev and v.get("moved_at"):
                applied[name].append(v["moved_at"])
            else:
                missing += 1
    list_s = []
    for w in watchers:
        try:
            data = json.loads(Path(w.out).read_text())
        except (OSError, ValueError):
            missing += len(want)
            continue
        list_s.append(data["list_s"])
        seen = {(n, r): t for n, r, t in data["stamps"]}
        for name, rev in want.items():
            t = seen.get((name, rev))
            if t is None:
                missing += 1
            else:
                applied[name].append(t)
    conv, gw_conv, rows = [], [], []
    for name, rev, start, end in writes:
        times = applied[name]
        if len(times) == procs:
            c = (max(times) - start) * 1000
            conv.append(c)
            rows.append((start, c))
    for view in views:
        for name, rev, start, end in writes:
            v = view.get(name)
            if v and v.get("revision") == rev and v.get("moved_at"):
                gw_conv.append((v["moved_at"] - start) * 1000)
    write_ms = [(end - start) * 1000 for _, _, start, end in writes]
    t_first = min((r[0] for r in rows), default=0.0)

    def per_change(kind: str) -> list[float]:
        """CPU ms per change of each process of `kind`: run CPU less the idle rate over the run."""
        out = []
        for a, b, c in zip(cpu0[kind], cpu1[kind], cpu2[kind]):
            idle_rate = (b - a) / idle_s
            out.append(max(0.0, (c - b) - idle_rate * run_s) * 1000 / max(1, len(writes)))
        return out

    cpu_run = {k: sum(c - b for b, c in zip(cpu1[k], cpu2[k])) for k in pids}
    busy = (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
    return {"processes": procs, "gateways": len(daemons), "watchers": n_watchers, "migrations": len(writes),
            "converged": len(conv), "missing_applies": missing,
            "conv_ms": conv, "gw_conv_ms": gw_conv, "write_ms": write_ms,
            "timeline": [(round(s - t_first, 4), round(c, 3)) for s, c in rows],
            "write_s": write_s, "achieved_rate": len(writes) / max(1e-9, max((w[2] for w in writes), default=0)
                                                                  - min((w[2] for w in writes), default=0)),
            "run_s": run_s, "machine_busy": busy, "cpus": os.cpu_count(),
            "cpu_s": {k: round(v, 2) for k, v in cpu_run.items()},
            "gw_apply_ms": per_change("gateways"), "watcher_apply_ms": per_change("watchers"),
            "watcher_list_s": list_s}


# ------------------------------------------------------------------ the section

def run(ctx: Context) -> dict:
    from control.api import unix as api
    from dataplane.pinning import PIN_ROOT, remove_pins
    from testbed.etcd_cluster import EtcdCluster
    from testbed.kit import GatewayDaemon
    from testbed.netns import run_in_netns

    n_vms = ctx.size(10_000, 1000)
    n_moves = ctx.size(1000, 100)
    gateways = ctx.size(GATEWAYS, 2)
    fleets = ctx.size([8, 32, 64], [8])               # processes per run: gateways + watcher-only processes
    results: list[Measurement] = []
    info: dict = {"vms": n_vms, "migrations_per_run": n_moves, "rate_per_s": RATE, "gateways": gateways,
                  "hosts": HOSTS, "etcd_members": 3, "cpus": os.cpu_count(), "writer_threads": WRITERS}
    net = Net(ctx.prefix, gateways)
    tmp = tempfile.mkdtemp(prefix=_run_dir_stem(ctx.prefix))
    procs = _Procs()
    daemons: list = []
    runs: list[dict] = []
    try:
        ctx.progress(f"namespaces for etcd and {gateways} gateways")
        net.up()
        with EtcdCluster(hosts=ETCD_IPS, netns=net.etcd_ns, parent=tmp) as cluster:
            url = cluster.url
            ctx.progress(f"registering {n_vms} VMs in etcd")
            t0 = time.monotonic()
            run_in_netns(net.etcd_ns, _populate, url, n_vms, timeout=600)
            info["populate_s"] = round(time.monotonic() - t0, 1)
            try:
                socks = []
                t0 = time.monotonic()
                for i in range(gateways):
                    config = gateway_config(net, i, url, n_vms)
                    path = Path(tmp) / f"g{i}.toml"
                    path.write_text(config.to_toml())
                    daemons.append(GatewayDaemon(procs, str(path)))
                    socks.append(config.gateway.api_socket)
                ctx.progress(f"starting {gateways} gateway daemons together ({n_vms} VMs each, XDP on up0)")
                # together, as a fleet restarts: each lists the VM records and registers its own
                starts = [threading.Thread(target=d.start, kwargs={"timeout": 600}) for d in daemons]
                for t in starts:
                    t.start()
                for t in starts:
                    t.join()
                down = [i for i, d in enumerate(daemons) if not d.running]
                if down:
                    raise RuntimeError(f"gateway daemons {down} did not come up: {daemons[down[0]].stderr[-3:]}")
                info["gateways_start_s"] = round(time.monotonic() - t0, 1)
                info["xdp_modes"] = sorted({d.mode for d in daemons})
                # a daemon whose first listing takes longer than its start wait comes up degraded
                # and follows once the listing is in: the moves start when every one follows
                deadline = time.monotonic() + FOLLOW_WAIT_S
                for i, s in enumerate(socks):
                    while (st := api.call(s, "status")["store"])["state"] != "ok":
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"gateway {i}: not following the store {FOLLOW_WAIT_S:g} s "
                                               f"after the start: {st}")
                        time.sleep(0.2)
                info["gateways_following_s"] = round(time.monotonic() - t0, 1)
                for k, n_procs in enumerate(fleets):
                    try:
                        runs.append(_run_once(ctx, net, url, daemons, socks, max(0, n_procs - gateways),
                                              k * n_moves, n_moves, k + 1, tmp, cluster.pids()))
                    except RuntimeError as exc:
                        if not runs:
                            raise
                        # a larger fleet that could not run keeps the smaller ones' figures
                        info[f"failed@procs={n_procs}"] = str(exc)
                        break
            finally:
                for d in daemons:
                    d.stop()
    finally:
        net.down()
        for i in range(gateways):
            remove_pins(PIN_ROOT / net.gw_name(i))
        shutil.rmtree(tmp, ignore_errors=True)
    _measurements(runs, results, info)
    return {"results": results, "info": info}


def _measurements(runs: list[dict], results: list[Measurement], info: dict) -> None:
    base = runs[0]
    info["runs"] = [{k: v for k, v in r.items() if k not in ("conv_ms", "gw_conv_ms", "write_ms", "gw_apply_ms",
                                                            "watcher_apply_ms")}
                    | {"conv_p50_ms": _pct(r["conv_ms"], 0.5), "conv_p99_ms": _pct(r["conv_ms"], 0.99),
                       "conv_max_ms": max(r["conv_ms"], default=float("nan")),
                       "write_p50_ms": _pct(r["write_ms"], 0.5), "write_p99_ms": _pct(r["write_ms"], 0.99),
                       "gw_conv_p50_ms": _pct(r["gw_conv_ms"], 0.5), "gw_conv_p99_ms": _pct(r["gw_conv_ms"], 0.99),
                       "gw_apply_ms": r["gw_apply_ms"], "watcher_apply_ms": r["watcher_apply_ms"]}
                    for r in runs]
    for r in runs:
        n = r["processes"]
        ok = r["converged"] == r["migrations"] and r["missing_applies"] == 0
        params = {"processes": n, "gateways": r["gateways"], "watchers": r["watchers"], "migrations": r["migrations"],
                  "converged": r["converged"], "missing_applies": r["missing_applies"],
                  "machine_busy": round(r["machine_busy"], 3), "achieved_rate": round(r["achieved_rate"], 1),
                  "cpu_s": r["cpu_s"]}
        checks = {"every_process_applied_every_move": ok, "ok": ok}
        write50 = _pct(r["write_ms"], 0.5)
        for q, label in ((0.5, "p50"), (0.99, "p99"), (1.0, "max")):
            v = max(r["conv_ms"], default=float("nan")) if q == 1.0 else _pct(r["conv_ms"], q)
            results.append(Measurement(
                SECTION, f"convergence_{label}@procs={n}", f"convergence {label}, {n} processes", v, "ms",
                f"convergence {label} with {base['processes']} processes",
                max(base["conv_ms"], default=float("nan")) if q == 1.0 else _pct(base["conv_ms"], q),
                "writer's clock before the CAS -> the last process applied it (gateway moved_at, watcher stamp)",
                params=params, checks=checks,
                note=f"machine CPU {r['machine_busy'] * 100:.0f} % busy during the run"))
        results.append(Measurement(
            SECTION, f"write_p50@procs={n}", f"etcd write (CAS) latency p50, {n} processes", write50, "ms",
            f"with {base['processes']} processes", _pct(base["write_ms"], 0.5),
            f"Registry.move round trip from {WRITERS} writer threads at {RATE:.0f}/s",
            params=params | {"p99_ms": _pct(r["write_ms"], 0.99)}))
        results.append(Measurement(
            SECTION, f"write_p99@procs={n}", f"etcd write (CAS) latency p99, {n} processes", _pct(r["write_ms"], 0.99),
            "ms", f"with {base['processes']} processes", _pct(base["write_ms"], 0.99),
            f"Registry.move round trip from {WRITERS} writer threads at {RATE:.0f}/s", params=params))
        gw = sorted(r["gw_apply_ms"])
        wa = sorted(r["watcher_apply_ms"])
        if gw and wa:
            results.append(Measurement(
                SECTION, f"apply_cpu@procs={n}", f"gateway apply cost per change (CPU), {n} processes",
                _pct(gw, 0.5), "ms", "watcher-only process (the same follower, no dataplane)", _pct(wa, 0.5),
                "(CPU during the run - idle CPU rate x run time) / changes, /proc/PID/stat; median over processes",
                params=params | {"per_gateway_ms": [round(x, 3) for x in r["gw_apply_ms"]]}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description="a watcher-only process of the fleet bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch", help="follow /xdpgw/vms/ and stamp each change")
    w.add_argument("--url", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--limit", type=float, default=600.0, help="seconds at most")
    args = ap.parse_args(argv)
    watch_main(args.url, args.out, args.limit)


if __name__ == "__main__":
    main()

"""control/health.py: rise/fall hysteresis, each probe kind against real servers on
loopback (good, refused, wrong answer, timeout), the monitor (transitions, batching,
never blocked by a slow gateway update), 1000 checks, and the checks a config asks for.

Only loopback (127.0.0.1, ::1) is probed here; every server is bounded in time and
stopped by the test that started it. No time is asserted (the 1000-check cost is printed).
"""
from __future__ import annotations

import asyncio
import contextlib
import http.server
import ipaddress
import os
import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.config import HealthConfig
from control.health import (DEFAULT_PAYLOAD, Check, HealthMonitor, Hysteresis, checks_from_config, combine,
                            probe)
from testbed.config import testbed_config as make_config
from testbed.netns import free_port
from tests.waiting import wait_for

LO = ipaddress.ip_address("127.0.0.1")
LO6 = ipaddress.ip_address("::1")


def run(coro):
    return asyncio.run(coro)



# ------------------------------------------------------------------- servers

class TcpServer:
    """Accepts and closes connections in a thread (bounded by stop())."""

    def __init__(self, address: str = "127.0.0.1", backlog: int = 1024) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(backlog)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class UdpServer:
    """Answers every datagram (or, silent=True, none), in a thread (bounded by stop())."""

    def __init__(self, silent: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.silent = silent
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            self.received.append(data)
            if not self.silent:
                self.sock.sendto(b"pong:" + data, peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        status = {"/ok": 200, "/created": 201, "/fail": 503, "/moved": 301}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def raw_tcp_server(reply: bytes | None):
    """Accepts one connection at a time; sends `reply` (None: says nothing) and holds it open briefly."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)
    stop = threading.Event()
    held = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except (socket.timeout, OSError):
                continue
            if reply is not None:
                conn.settimeout(1.0)
                with contextlib.suppress(OSError):
                    conn.recv(4096)            # the request, so closing sends FIN, not RST
                    conn.sendall(reply)
                conn.close()
            else:
                held.append(conn)      # silent: keep it open until the test ends

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for c in held:
            c.close()
        sock.close()


def thread_cpu(native_id: int) -> float:
    """CPU seconds (user + system) one thread of this process has used."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(kind: str, port: int, address=LO, **kw) -> Check:
    kw.setdefault("timeout", 0.5)
    kw.setdefault("interval", 0.5)
    return Check(vm=kw.pop("vm", "vm1"), kind=kind, address=address, port=port, **kw)


# ----------------------------------------------------------------- hysteresis

@pytest.mark.parametrize("rise, fall, results, states", [
    # starts unknown; `rise` good in a row -> up
    (2, 3, [1, 1], ["unknown", "up"]),
    # `fall` bad in a row -> down; fewer do nothing
    (2, 3, [1, 1, 0, 0, 1, 0, 0, 0], ["unknown", "up", "up", "up", "up", "up", "up", "down"]),
    # from unknown, fall failures are needed too
    (2, 3, [0, 0, 0], ["unknown", "unknown", "down"]),
    # flapping never changes a decided state
    (2, 2, [1, 1, 0, 1, 0, 1, 0, 1], ["unknown", "up", "up", "up", "up", "up", "up", "up"]),
    (2, 2, [0, 0, 1, 0, 1, 0, 1, 1], ["unknown", "down", "down", "down", "down", "down", "down", "up"]),
    # rise = fall = 1: every probe decides
    (1, 1, [1, 0, 1, 0], ["up", "down", "up", "down"]),
])
def test_hysteresis(rise, fall, results, states):
    h = Hysteresis(rise, fall)
    seen = []
    for ok in results:
        before = h.state
        changed = h.record(bool(ok))
        assert changed == (h.state != before)
        seen.append(h.state)
    assert seen == states


@given(st.integers(1, 5), st.integers(1, 5), st.lists(st.booleans(), max_size=60))
def test_hysteresis_matches_its_definition(rise, fall, results):
    """The state after any sequence: the last decided run of `rise` goods or `fall` bads."""
    h = Hysteresis(rise, fall)
    for ok in results:
        h.record(ok)
    expected = "unknown"
    for i in range(1, len(results) + 1):
        tail = results[:i]
        if len(tail) >= rise and all(tail[-rise:]):
            expected = "up"
        elif len(tail) >= fall and not any(tail[-fall:]):
            expected = "down"
    assert h.state == expected


def test_combine():
    assert combine([]) == "unknown"
    assert combine(["up"]) == "up"
    assert combine(["up", "up"]) == "up"
    assert combine(["up", "unknown"]) == "unknown"
    assert combine(["up", "down"]) == "down"
    assert combine(["unknown", "down"]) == "down"


# --------------------------------------------------------------------- probes

def test_tcp_probe_ok_refused_and_ipv6():
    server = TcpServer()
    try:
        r = run(probe(check("tcp", server.port)))
        assert r.ok and r.detail == "connected" and r.rtt_ms is not None
        wait_for(lambda: server.accepted >= 1)
    finally:
        server.stop()
    r = run(probe(check("tcp", server.port)))
    assert not r.ok and r.detail == "connection refused"
    if socket.has_ipv6:
        try:
            server6 = TcpServer("::1")
        except OSError:
            pytest.skip("no IPv6 loopback")
        try:
            assert run(probe(check("tcp", server6.port, address=LO6))).ok
        finally:
            server6.stop()


def test_tcp_probe_times_out():
    """A listener whose accept queue is full drops SYNs: connect hangs until the timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):             # fill the accept queue (never accepted)
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        time.sleep(0.05)
        c = check("tcp", port, timeout=0.3, interval=0.3)
        t0 = time.monotonic()
        r = run(probe(c))
        elapsed = time.monotonic() - t0
        assert not r.ok and r.detail == "timeout (0.3 s)" and r.rtt_ms is None
        print(f"\ntcp probe timed out after {elapsed * 1000:.0f} ms (timeout 300 ms)")
    finally:
        for f in fillers:
            f.close()
        sock.close()


def test_http_probe_status_codes():
    with http_server() as port:
        for path, ok, detail in (("/ok", True, "HTTP 200"), ("/created", True, "HTTP 201"),
                                 ("/fail", False, "HTTP 503"), ("/moved", False, "HTTP 301"),
                                 ("/nope", False, "HTTP 404")):
            r = run(probe(check("http", port, path=path)))
            assert (r.ok, r.detail) == (ok, detail), path
    r = run(probe(check("http", port, path="/ok")))
    assert not r.ok and r.detail == "connection refused"


def test_http_probe_wrong_answer_and_timeout():
    with raw_tcp_server(b"SSH-2.0-OpenSSH\r\n") as port:
        r = run(probe(check("http", port)))
        assert not r.ok and r.detail.startswith("bad status line")
    with raw_tcp_server(b"") as port:
        r = run(probe(check("http", port)))
        assert not r.ok and r.detail == "no HTTP status line"
    with raw_tcp_server(None) as port:           # accepts, never answers
        r = run(probe(check("http", port, timeout=0.2, interval=0.2)))
        assert not r.ok and r.detail == "timeout (0.2 s)"


def test_udp_probe_reply_refused_and_silence():
    server = UdpServer()
    try:
        r = run(probe(check("udp", server.port, payload=b"are you there")))
        assert r.ok and r.detail == f"reply of {len(b'pong:are you there')} bytes"
        assert server.received == [b"are you there"]
    finally:
        server.stop()
    # nobody on the port: ICMP port unreachable -> refused at once, no waiting for the timeout
    r = run(probe(check("udp", free_port(socket.SOCK_DGRAM), timeout=5.0, interval=5.0)))
    assert not r.ok and r.detail == "connection refused"
    silent = UdpServer(silent=True)
    try:
        r = run(probe(check("udp", silent.port, timeout=0.2, interval=0.2)))
        assert not r.ok and r.detail == "timeout (0.2 s)"
        assert silent.received == [DEFAULT_PAYLOAD]
    finally:
        silent.stop()


def test_probe_result_as_dict():
    r = run(probe(check("tcp", free_port())))
    d = r.as_dict(check("tcp", 80))
    assert d["check"] == "tcp 127.0.0.1:80" and d["ok"] is False and d["detail"] == "connection refused"
    assert check("http", 8080, path="/h").describe() == "http 127.0.0.1:8080/h"
    assert check("udp", 53, address=LO6).describe() == "udp [::1]:53"


# -------------------------------------------------------------------- monitor

class Recorder:
    def __init__(self) -> None:
        self.batches: list[dict[str, str]] = []
        self.health: dict[str, str] = {}
        self.probes: dict[str, int] = {}
        self.lock = threading.Lock()

    def on_change(self, batch: dict[str, str]) -> None:
        with self.lock:
            self.batches.append(dict(batch))
            self.health.update(batch)

    def on_probe(self, vm, check, result) -> None:
        self.probes[vm] = self.probes.get(vm, 0) + 1


def test_monitor_up_down_up_with_a_real_server():
    server = TcpServer()
    port = server.port
    rec = Recorder()
    c = check("tcp", port, interval=0.05, timeout=0.05, rise=2, fall=2)
    mon = HealthMonitor([c], rec.on_change, rec.on_probe).start()
    try:
        wait_for(lambda: rec.health.get("vm1") == "up")
        assert mon.vm_health("vm1") == "up" and rec.batches[0] == {"vm1": "up"}
        server.stop()
        wait_for(lambda: rec.health.get("vm1") == "down")
        assert mon.last[0] is not None and mon.last[0].detail == "connection refused"
        server = TcpServer()         # a new listener on the same port
        server.sock.close()
        server.stop()
        again = socket.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen(64)
        try:
            wait_for(lambda: rec.health.get("vm1") == "up")
        finally:
            again.close()
        assert [b["vm1"] for b in rec.batches] == ["up", "down", "up"]
        assert rec.probes["vm1"] >= 2 + 2 + 2
        s = mon.summary()
        assert s["checks"] == 1 and s["vms"]["up"] == 1 and s["probes"] >= 6 and s["failed_probes"] >= 2
    finally:
        mon.stop()
        server.stop()
    assert not mon.running


def test_monitor_vm_is_down_if_any_check_is_down():
    tcp = TcpServer()
    udp = UdpServer()
    rec = Recorder()
    checks = [check("tcp", tcp.port, interval=0.05, timeout=0.05, rise=1, fall=1),
              check("udp", udp.port, interval=0.05, timeout=0.05, rise=1, fall=1)]
    mon = HealthMonitor(checks, rec.on_change, rec.on_probe).start()
    try:
        wait_for(lambda: rec.health.get("vm1") == "up")
        udp.stop()                                   # one of the two checks fails
        wait_for(lambda: rec.health.get("vm1") == "down")
        assert [h.state for h in mon.states] == ["up", "down"]
    finally:
        mon.stop()
        tcp.stop()


def test_monitor_is_never_blocked_by_a_slow_update():
    """While the gateway takes its time over one health change, probing goes on
    and later changes queue up into the next batch."""
    server = TcpServer()
    release = threading.Event()
    entered = threading.Event()
    batches = []

    def slow_on_change(batch):
        batches.append(dict(batch))
        entered.set()
        release.wait(10)

    checks = [check("tcp", server.port, vm=f"vm{i}", interval=0.05, timeout=0.05, rise=1, fall=1)
              for i in range(20)]
    mon = HealthMonitor(checks, slow_on_change).start()
    try:
        wait_for(entered.is_set)
        probes_then = mon.probes
        wait_for(lambda: mon.probes >= probes_then + 40)    # the loop keeps probing meanwhile
        assert len(batches) == 1
        wait_for(lambda: all(mon.vm_health(f"vm{i}") == "up" for i in range(20)))
        release.set()
        wait_for(lambda: sum(len(b) for b in batches) == 20)  # the rest came in later batches
        assert {vm for b in batches for vm in b} == {f"vm{i}" for i in range(20)}
        assert len(batches) < 20 or True                    # batching is allowed, not required
    finally:
        release.set()
        mon.stop()
        server.stop()


def test_monitor_a_failing_callback_does_not_stop_probing():
    server = TcpServer()
    calls = []

    def broken(batch):
        calls.append(batch)
        raise RuntimeError("gateway unavailable")

    mon = HealthMonitor([check("tcp", server.port, interval=0.05, timeout=0.05, rise=1, fall=1)], broken,
                        on_probe=lambda *a: 1 / 0).start()
    try:
        wait_for(lambda: calls)
        n = mon.probes
        wait_for(lambda: mon.probes > n + 3)
        assert mon.running
    finally:
        mon.stop()
        server.stop()


def test_thousand_checks_are_cheap():
    """1000 VMs (one check each, interval 1 s) against one loopback listener: all
    come up, and the CPU the process spends per second of probing is printed."""
    server = TcpServer(backlog=4096)
    rec = Recorder()
    checks = [check("tcp", server.port, vm=f"vm{i:04d}", interval=1.0, timeout=0.5, rise=1, fall=3)
              for i in range(1000)]
    mon = HealthMonitor(checks, rec.on_change, rec.on_probe).start()
    try:
        wait_for(lambda: len(rec.health) == 1000 and all(h == "up" for h in rec.health.values()), timeout=20)
        tid = mon._thread.native_id
        cpu0, loop0, t0, p0 = os.times(), thread_cpu(tid), time.monotonic(), mon.probes
        time.sleep(2.0)
        cpu1, loop1, t1, p1 = os.times(), thread_cpu(tid), time.monotonic(), mon.probes
        cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        n = max(1, p1 - p0)
        print(f"\n1000 checks: {p1 - p0} probes in {t1 - t0:.2f} s; the monitor's event-loop thread used "
              f"{(loop1 - loop0) / (t1 - t0) * 100:.1f} % of a core ({(loop1 - loop0) / n * 1e6:.0f} us per probe); "
              f"the whole process, loopback server included, {cpu / (t1 - t0) * 100:.1f} %; "
              f"{len(rec.batches)} batches delivered the 1000 'up's")
        assert mon.summary()["vms"]["up"] == 1000 and mon.failures == 0
    finally:
        mon.stop()
        server.stop()


# ---------------------------------------------------------------- from config

def test_checks_from_config():
    health = {"web": HealthConfig("tcp", interval=0.5, timeout=0.25, rise=1, fall=2),
              "web6": HealthConfig("tcp", interval=0.5, timeout=0.25, rise=1, fall=2),   # at the VM's IPv6 address
              "echo": HealthConfig("udp", port=9999, payload="hi")}
    config = make_config("xghtst", health=health)
    checks = checks_from_config(config)
    assert [(c.vm, c.describe()) for c in checks] == [
        (f"vm{n}", d) for n in (1, 2, 3)
        for d in (f"tcp 198.18.10{n}.2:8080", f"tcp [2001:db8:10{n}::2]:8080", f"udp 198.18.10{n}.2:9999")]
    tcp = checks[0]
    assert (tcp.interval, tcp.timeout, tcp.rise, tcp.fall, tcp.port) == (0.5, 0.25, 1, 2, 8080)
    udp = checks[2]
    assert (udp.payload, udp.interval, udp.timeout, udp.rise, udp.fall) == (b"hi", 1.0, 0.5, 2, 3)
    http_only = checks_from_config(make_config("xghtst", health={"web": HealthConfig("http")}))
    assert {c.path for c in http_only} == {"/"} and len(http_only) == 3
    assert checks_from_config(make_config("xghtst")) == []

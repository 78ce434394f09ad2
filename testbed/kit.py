"""What the e2e tests and the demo share on the namespace testbed: the servers
that run in the VMs and the remote DC (and what they bind), the gateway daemon
run by pid, the line-protocol TCP client and a UDP exchange, interface counters.

Processes are started in the testbed's namespaces and stopped by pid."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from control.config import Config
from testbed.config import ECHO_PORT, REMOTE_PORT, WEB_PORT
from testbed.addresses import VIP4, VIP6
from testbed.topology import Testbed

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
    """What health checks probe on a local VM: web (TCP) and echo (UDP) on the VM's own
    address of the VIP's family (web6 on its IPv6 one), served by the same process as
    the VIP (its death fails them)."""
    vm = tb.vm(vm_name)
    return [f"tcp:{vm.ip}:{WEB_PORT}", f"tcp:[{vm.ip6}]:{WEB_PORT}", f"udp:{vm.ip}:{ECHO_PORT}"]


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

# The daemon's log line (control/logs.py) once the gateway is up, on stderr.
READY_RE = re.compile(r"^(?:ts=\S+ )?level=info event=gateway\.up gateway=(?P<gateway>\S+) interface=(?P<interface>\S+) "
                      r"mode=(?P<mode>\w+) startup_s=(?P<startup_s>[0-9.]+) api=(?P<api>\S+)")


class GatewayDaemon:
    """`xdpgw run --config FILE` (which enters the gw namespace itself, `gateway.netns`),
    started and stopped by pid."""

    def __init__(self, tb: Testbed, config_path: str, xdpgw: str | None = None, role: str | None = None) -> None:
        self.tb = tb
        self.config_path = config_path
        self.role = role             # set: started by `ip netns exec` in this role's namespace instead
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
                    self.mode, self.startup_s = m["mode"], float(m["startup_s"])
                    self._ready.set()
        self._ready.set()            # EOF: the process is gone (start() checks which)

    def start(self, timeout: float = 60.0) -> float:
        """Start the daemon and wait, at most `timeout` s, for its ready line."""
        t0 = time.monotonic()
        argv = [self.xdpgw, "run", "--config", self.config_path]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        self.proc = self.tb.popen(self.role, argv, **pipes) if self.role else self.tb.spawn(argv, **pipes)
        for stream, sink, watch in ((self.proc.stdout, self.stdout, False), (self.proc.stderr, self.stderr, True)):
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


def poll_until(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """Call `predicate` until it returns something truthy and return that, or the
    last (falsy) value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def link_stats(tb: Testbed, role: str, ifname: str) -> dict[str, Any]:
    """{rx_packets, tx_packets, operstate} of an interface in a testbed namespace."""
    out = tb.cmd(role, ["ip", "-j", "-s", "link", "show", "dev", ifname]).stdout
    link = json.loads(out)[0]
    stats = link.get("stats64") or link.get("stats")
    return {"rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"],
            "operstate": link.get("operstate"), "flags": link.get("flags", [])}

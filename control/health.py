"""Health checks of the VMs: probes (tcp, http, udp), rise/fall hysteresis, and the
monitor that runs them for the daemon.

Every gateway probes the VMs on its own; nothing here talks to another gateway.
A service's `health` table (control/config/schema.py HealthConfig) gives each of its VMs
one check, probed at the VM's address of the service VIP's family (also for a VM
behind a tunnel). Identical
checks of one VM (two services on the same port, say) are probed once.

A VM's *health* is the combination of its checks: down if any check is down, up
if every check is up, unknown otherwise (no check yet decided, or none at all).
The gateway turns health and the operator's admin state into the one effective
state (control/vms.py effective_state).

HealthMonitor runs every check as an asyncio task on an event loop in a thread of
its own: a probe waits on its socket, never on a lock, so 1000 VMs cost 1000
sleeping coroutines and a few sockets at a time (bounded by `max_concurrent`).
Health changes are handed, batched, to `on_change` in a second thread, so a
gateway update (a Maglev rebuild and swap) never delays a probe and a slow probe
never delays a gateway update.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from control.config import Config, IPAddress
from control.events import GatewayEvents
from control.vms import HEALTH_STATES

log = logging.getLogger(__name__)

DEFAULT_PATH = "/"
DEFAULT_PAYLOAD = b"xdpgw health probe"
HTTP_MAX_STATUS_LINE = 1024


@dataclass(frozen=True)
class Check:
    """One check of one VM: what to probe, how often, and when to change state."""
    vm: str
    kind: str                      # tcp | http | udp
    address: IPAddress
    port: int
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 3
    path: str = DEFAULT_PATH       # http
    payload: bytes = DEFAULT_PAYLOAD  # udp

    def describe(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.kind} {host}:{self.port}{self.path if self.kind == 'http' else ''}"


def checks_from_config(config: Config) -> list[Check]:
    """Every check the config asks for, one per (VM, distinct probe), in a stable order."""
    checks: dict[Check, None] = {}
    for service in config.services:
        h = service.health
        if h is None:
            continue
        for name in service.vms:
            address = config.vm(name).address(service.vip.version)
            if address is None:   # config validation forbids it; be safe for hand-built configs
                raise ValueError(f"VM {name!r} of service {service.name!r} has no IPv{service.vip.version} "
                                 "address to probe")
            checks[Check(vm=name, kind=h.kind, address=address, port=h.port or service.port,
                         interval=h.interval, timeout=h.timeout, rise=h.rise, fall=h.fall,
                         path=h.path or DEFAULT_PATH,
                         payload=h.payload.encode() if h.payload else DEFAULT_PAYLOAD)] = None
    return sorted(checks, key=lambda c: (c.vm, c.describe(), c.interval))


# --------------------------------------------------------------------- probes

@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str                    # "connected", "HTTP 200", "connection refused", "timeout (0.5 s)"
    rtt_ms: float | None           # set when the probe got an answer
    at: float                      # wall-clock time the probe ended

    def as_dict(self, check: Check | None = None) -> dict:
        out = {"ok": self.ok, "detail": self.detail,
               "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3), "at": self.at}
        if check is not None:
            out["check"] = check.describe()
        return out


class ProbeFailed(Exception):
    """The target answered, but not as a healthy VM would (e.g. HTTP 503)."""


async def _tcp(check: Check) -> str:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if check.address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (str(check.address), check.port))
    finally:
        sock.close()
    return "connected"


async def _http(check: Check) -> str:
    reader, writer = await asyncio.open_connection(str(check.address), check.port)
    try:
        host = f"[{check.address}]" if check.address.version == 6 else str(check.address)
        if check.port != 80:
            host += f":{check.port}"
        writer.write(f"GET {check.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: xdpgw-health\r\n"
                     "Connection: close\r\n\r\n".encode("ascii"))
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    parts = line[:HTTP_MAX_STATUS_LINE].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ProbeFailed("no HTTP status line" if not line else f"bad status line {line[:40]!r}")
    status = int(parts[1])
    if not 200 <= status < 300:
        raise ProbeFailed(f"HTTP {status}")
    return f"HTTP {status}"


class _FirstReply(asyncio.DatagramProtocol):
    def __init__(self, answer: asyncio.Future) -> None:
        self.answer = answer

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.answer.done():
            self.answer.set_result(len(data))

    def error_received(self, exc: Exception) -> None:   # ICMP unreachable on the connected socket
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _udp(check: Check) -> str:
    loop = asyncio.get_running_loop()
    answer = loop.create_future()
    family = socket.AF_INET6 if check.address.version == 6 else socket.AF_INET
    transport, _ = await loop.create_datagram_endpoint(lambda: _FirstReply(answer), family=family,
                                                       remote_addr=(str(check.address), check.port))
    try:
        transport.sendto(check.payload)
        size = await answer
    finally:
        transport.close()
    return f"reply of {size} bytes"


_PROBES = {"tcp": _tcp, "http": _http, "udp": _udp}


async def probe(check: Check) -> ProbeResult:
    """Probe once; never raises (a failure is a result), never takes longer than check.timeout."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(check.timeout):      # no extra task per probe, unlike wait_for
            detail = await _PROBES[check.kind](check)
    except TimeoutError:
        return ProbeResult(False, f"timeout ({check.timeout:g} s)", None, time.time())
    except ProbeFailed as exc:
        return ProbeResult(False, str(exc), (time.perf_counter() - t0) * 1000, time.time())
    except ConnectionRefusedError:
        return ProbeResult(False, "connection refused", (time.perf_counter() - t0) * 1000, time.time())
    except OSError as exc:
        return ProbeResult(False, exc.strerror or type(exc).__name__, None, time.time())
    return ProbeResult(True, detail, (time.perf_counter() - t0) * 1000, time.time())


# ----------------------------------------------------------------- hysteresis

@dataclass
class Hysteresis:
    """Health of one check: `rise` good probes in a row make it up, `fall` failed
    ones in a row make it down; it starts unknown (and leaves unknown the same way)."""
    rise: int
    fall: int
    state: str = "unknown"
    good_run: int = 0
    bad_run: int = 0

    def record(self, ok: bool) -> bool:
        """Count one probe result; True if the state changed."""
        if ok:
            self.good_run, self.bad_run = self.good_run + 1, 0
            if self.state != "up" and self.good_run >= self.rise:
                self.state = "up"
                return True
        else:
            self.bad_run, self.good_run = self.bad_run + 1, 0
            if self.state != "down" and self.bad_run >= self.fall:
                self.state = "down"
                return True
        return False


def combine(states: Iterable[str]) -> str:
    """A VM's health from its checks' states: down if any is down, up if all are up."""
    states = list(states)
    if "down" in states:
        return "down"
    if states and all(s == "up" for s in states):
        return "up"
    return "unknown"


# -------------------------------------------------------------------- monitor

@dataclass
class _VmHealth:
    checks: list[int] = field(default_factory=list)   # indexes into HealthMonitor.checks
    health: str = "unknown"
    since: float = field(default_factory=time.time)


class HealthMonitor:
    """Runs the checks until stop(). Callbacks:

    * ``on_change({vm: health})``: VMs whose health changed, batched; called in the
      monitor's applier thread, one call at a time, in order;
    * ``on_probe(vm, check, result)``: after every probe, in the event-loop thread
      (keep it to an attribute store).

    Every probe's result and round trip also go to `events` (the metrics), if given.
    """

    def __init__(self, checks: Iterable[Check], on_change: Callable[[dict[str, str]], None],
                 on_probe: Callable[[str, Check, ProbeResult], None] | None = None,
                 max_concurrent: int = 512, events: GatewayEvents | None = None) -> None:
        self.checks = list(checks)
        self.on_change = on_change
        self.on_probe = on_probe
        self.events = events
        self.max_concurrent = max_concurrent
        self.states = [Hysteresis(c.rise, c.fall) for c in self.checks]
        self.last: list[ProbeResult | None] = [None] * len(self.checks)
        self.vms: dict[str, _VmHealth] = {}
        for i, c in enumerate(self.checks):
            self.vms.setdefault(c.vm, _VmHealth()).checks.append(i)
        self.probes = 0
        self.failures = 0
        self.applied_batches = 0
        self._pending: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xdpgw-health-apply")

    # ---- lifecycle
    def start(self) -> "HealthMonitor":
        self._thread = threading.Thread(target=self._thread_main, name="xdpgw-health", daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every probe and wait (bounded) for the threads to end."""
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:       # the loop is already closed
                pass
            self._thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def carry_from(self, old: "HealthMonitor") -> None:
        """Before start(): the checks `old` ran too keep their probe history and
        state, so a config reload re-decides no VM whose checks did not change."""
        index = {c: i for i, c in enumerate(old.checks)}
        for i, c in enumerate(self.checks):
            if c in index:
                self.states[i], self.last[i] = old.states[index[c]], old.last[index[c]]
        for name, vm in self.vms.items():
            vm.health = combine(self.states[i].state for i in vm.checks)
            if name in old.vms and old.vms[name].health == vm.health:
                vm.since = old.vms[name].since

    # ---- queries (any thread)
    def vm_health(self, vm: str) -> str:
        return self.vms[vm].health if vm in self.vms else "unknown"

    def summary(self) -> dict:
        counts = {s: 0 for s in HEALTH_STATES}
        for v in self.vms.values():
            counts[v.health] += 1
        return {"checks": len(self.checks), "probes": self.probes, "failed_probes": self.failures,
                "vms": counts, "batches_applied": self.applied_batches}

    # ---- the loop
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopping = asyncio.Event()
        self._dirty = asyncio.Event()
        self._limit = asyncio.Semaphore(self.max_concurrent)
        self._started.set()
        n = max(1, len(self.checks))
        # Spread the first probes over the interval so 1000 checks do not fire at once.
        tasks = [asyncio.create_task(self._run_check(i, c, c.interval * i / n)) for i, c in enumerate(self.checks)]
        applier = asyncio.create_task(self._applier())
        await self._stopping.wait()
        for t in (*tasks, applier):
            t.cancel()
        await asyncio.gather(*tasks, applier, return_exceptions=True)

    async def _run_check(self, i: int, check: Check, offset: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(offset)
        next_at = loop.time()
        while True:
            async with self._limit:
                result = await probe(check)
            self._record(i, check, result)
            next_at += check.interval
            delay = next_at - loop.time()
            if delay < 0:                 # overran (slow probes): keep the pace, skip the backlog
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    def _record(self, i: int, check: Check, result: ProbeResult) -> None:
        self.probes += 1
        self.failures += not result.ok
        self.last[i] = result
        if self.events is not None:
            self.events.probe(check.vm, check.kind, result.ok, None if result.rtt_ms is None else result.rtt_ms / 1000)
        if self.on_probe is not None:
            try:
                self.on_probe(check.vm, check, result)
            except Exception:  # noqa: BLE001 - a bad callback must not stop probing
                log.exception("health: on_probe failed")
        if not self.states[i].record(result.ok):
            return
        vm = self.vms[check.vm]
        health = combine(self.states[j].state for j in vm.checks)
        if health != vm.health:
            vm.health, vm.since = health, result.at
            self._pending[check.vm] = health
            self._dirty.set()

    async def _applier(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            batch, self._pending = self._pending, {}
            if batch:
                await loop.run_in_executor(self._executor, self._deliver, batch)

    def _deliver(self, batch: dict[str, str]) -> None:
        try:
            self.on_change(batch)
            self.applied_batches += 1
        except Exception:  # noqa: BLE001 - the monitor goes on; the next change retries the state
            log.exception("health: applying %s failed", batch)

"""`xdpgw capture`: packets seen by the XDP program, as pcap.

Two halves, one per process:

* the daemon's `CaptureService` owns the armed state. `capture.start` (unix
  socket only: the HTTP agent API cannot arm a capture) resolves the names of
  the filter to the gateway's ids, arms the program and answers with the ring
  buffer's map id; the capture is leased to the caller's pid. A thread
  watches a pidfd of that process: when it exits, however it exits, the
  capture is disarmed. `capture.stop` and the daemon's own stop disarm too;
  a new daemon loads a new program, which starts unarmed.
* the CLI (`run_capture`) checks its flags against the config (one line naming
  the flag, exit 2), arms through the daemon, opens the ring buffer by id (so
  it needs no bpffs, whatever mount namespace it runs in), writes classic pcap
  and stops after COUNT packets or on SIGINT/SIGTERM: disarm, flush what is
  still in the ring, exit 0.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Mapping, TextIO

from control.api.commands import CommandTable, arg, int_arg
from control.api.errors import BadRequest, Refused
from control.api.unix import call
from control.config import Config
from control.logs import event
from dataplane import structs as S
from dataplane.capture import VERDICTS, CaptureFilter, CapturedPacket, CaptureReader, arm, disarm, ring_id

log = logging.getLogger("xdpgw.capture")

UNKNOWN_REGION = "unknown"            # the region of sources no prefix matches (id 0)
POLL_MS = 200                         # how long the CLI waits for records before checking for a signal
LEASE_CHECK_S = 0.5                   # how often the lease watcher looks at its stop flag

# Classic pcap (https://www.tcpdump.org/manpages/pcap-savefile.5.html), microsecond timestamps
PCAP_MAGIC = 0xA1B2C3D4
PCAP_VERSION = (2, 4)
LINKTYPE_ETHERNET = 1
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")


class BadFlag(ValueError):
    """A capture flag the gateway cannot satisfy; the message names the flag."""


@dataclass(frozen=True)
class CaptureRequest:
    """The filter by name, as the operator gave it (None: any)."""
    snaplen: int = S.CAPTURE_SNAPLEN_MAX
    region: str | None = None
    service: str | None = None
    vm: str | None = None
    verdict: str | None = None
    reason: str | None = None

    def check(self, config: Config) -> "CaptureRequest":
        """Self, if every flag names something of `config`; else BadFlag naming the flag.
        A drop reason implies the drop verdict."""
        names = {"--region": (self.region, [r.name for r in config.regions] + [UNKNOWN_REGION]),
                 "--service": (self.service, [s.name for s in config.services]),
                 "--vm": (self.vm, [v.name for v in config.vms]),
                 "--verdict": (self.verdict, sorted(VERDICTS)),
                 "--reason": (self.reason, S.DROP_REASONS)}
        for flag, (value, known) in names.items():
            if value is not None and value not in known:
                raise BadFlag(f"{flag} {value!r}: not one of {', '.join(known)}")
        if not 1 <= self.snaplen <= S.CAPTURE_SNAPLEN_MAX:
            raise BadFlag(f"--snaplen {self.snaplen}: out of range 1..{S.CAPTURE_SNAPLEN_MAX}")
        if self.reason is not None and self.verdict not in (None, "drop"):
            raise BadFlag(f"--reason {self.reason!r} selects drops; it cannot go with --verdict {self.verdict}")
        return self

    def args(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# ---------------------------------------------------------------- daemon side

class CaptureService:
    """The daemon's half: one capture at a time, leased to a live process."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.lock = threading.Lock()
        self.owner: int | None = None        # pid of the process the capture is leased to
        self._released = threading.Event()
        self._watcher: threading.Thread | None = None

    def commands(self) -> CommandTable:
        return CommandTable({"capture.start": self.start, "capture.stop": self.stop})

    def _ids(self, args: Mapping[str, Any]) -> CaptureFilter:
        """The filter with the gateway's ids for the names in `args`."""
        gw = self.gateway
        with gw.lock:
            regions = {UNKNOWN_REGION: S.XDPGW_REGION_UNKNOWN, **gw.region_ids}
            services = dict(gw.service_ids)
            vms = {name: vm.vm_id for name, vm in gw.vms.items()}
        ids: dict[str, int | None] = {}
        for field, known, noun in (("region", regions, "region"), ("service", services, "service"),
                                   ("vm", vms, "VM")):
            name = arg(args, field, required=False)
            if name is not None and name not in known:
                raise LookupError(f"unknown {noun} {name!r}")
            ids[field] = None if name is None else known[name]
        verdict, reason = arg(args, "verdict", required=False), arg(args, "reason", required=False)
        snaplen = int_arg(args, "snaplen", 1, S.CAPTURE_SNAPLEN_MAX, S.CAPTURE_SNAPLEN_MAX)
        return CaptureFilter(snaplen=snaplen, verdict=verdict, reason=reason, **ids)

    def start(self, args: Mapping[str, Any]) -> dict:
        """Arm for the process `pid`; answers the ring buffer's map id and the id -> name
        tables a reader needs to name what it decodes."""
        pid = int_arg(args, "pid", 1, 2 ** 22)
        flt = self._ids(args)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise BadRequest(f"argument 'pid': no process {pid}") from None
        with self.lock:
            if self.owner is not None:
                os.close(pidfd)
                raise Refused(f"a capture is already running (pid {self.owner}); one at a time")
            try:
                arm(self.gateway.dataplane, flt)
            except BaseException:
                os.close(pidfd)
                raise
            self.owner = pid
            self._released.clear()
            self._watcher = threading.Thread(target=self._watch, args=(pid, pidfd), name="xdpgw-capture",
                                             daemon=True)
            self._watcher.start()
        event(log, "capture.armed", pid=pid, **{k: v for k, v in args.items() if k != "pid"})
        gw = self.gateway
        with gw.lock:
            return {"ring_id": ring_id(gw.dataplane),
                    "regions": {str(i): n for n, i in {UNKNOWN_REGION: 0, **gw.region_ids}.items()},
                    "services": {str(i): n for n, i in gw.service_ids.items()},
                    "vms": {str(vm.vm_id): n for n, vm in gw.vms.items()}}

    def stop(self, args: Mapping[str, Any]) -> dict:
        pid = int_arg(args, "pid", 1, 2 ** 22)
        with self.lock:
            if self.owner != pid:
                raise Refused(f"no capture of pid {pid} is running")
        self._release("stopped")
        return {"stopped": pid}

    def _watch(self, pid: int, pidfd: int) -> None:
        """Disarm when the owner exits (its pidfd turns readable) or on release."""
        try:
            while not self._released.is_set():
                ready, _, _ = select.select([pidfd], [], [], LEASE_CHECK_S)
                if ready:
                    self._release("owner exited")
                    return
        finally:
            os.close(pidfd)

    def _release(self, why: str) -> None:
        with self.lock:
            if self.owner is None:
                return
            disarm(self.gateway.dataplane)
            pid, self.owner = self.owner, None
            self._released.set()
        event(log, "capture.disarmed", pid=pid, why=why)

    def close(self) -> None:
        """The daemon stops: no capture outlives it."""
        self._release("daemon stopping")
        if self._watcher is not None:
            self._watcher.join(timeout=2 * LEASE_CHECK_S)


# ------------------------------------------------------------------- CLI side

class PcapWriter:
    """Classic pcap, LINKTYPE_ETHERNET: one record per frame (a forwarded or
    tunnelled packet is two: as received, then as sent)."""

    def __init__(self, out: BinaryIO, snaplen: int) -> None:
        self.out = out
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; pcap wants the wall clock
        self.offset_ns = time.time_ns() - time.monotonic_ns()
        out.write(_PCAP_HEADER.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, snaplen, LINKTYPE_ETHERNET))

    def write(self, packet: CapturedPacket) -> None:
        sec, ns = divmod(packet.ts_ns + self.offset_ns, 1_000_000_000)
        for frame in packet.frames:
            self.out.write(_PCAP_RECORD.pack(sec, ns // 1000, len(frame.data), frame.length) + frame.data)

    def flush(self) -> None:
        self.out.flush()


def summary_line(packet: CapturedPacket, names: Mapping[str, Mapping[str, str]]) -> str:
    """One key=value line per captured packet: what the pcap cannot say."""
    def name(kind: str, i: int | None) -> str:
        return "-" if i is None else names[kind].get(str(i), f"#{i}")

    fields = [f"verdict={packet.verdict}", f"reason={packet.reason or '-'}",
              f"region={name('regions', packet.region)}", f"service={name('services', packet.service)}",
              f"vm={name('vms', packet.vm)}", f"ifindex={packet.ifindex}",
              f"rx_len={packet.received.length}", f"tx_len={packet.sent.length if packet.sent else '-'}"]
    return " ".join(fields)


def run_capture(config: Config, request: CaptureRequest, out: BinaryIO, count: int | None = None,
                summary: TextIO | None = None) -> int:
    """Capture until `count` packets (None: no limit) or SIGINT/SIGTERM; returns
    the number of packets written. Flags must have been checked (CaptureRequest.check)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    sock, pid = config.gateway.api_socket, os.getpid()
    try:
        started = call(sock, "capture.start", pid=pid, **request.args())
        reader = CaptureReader.by_id(started["ring_id"])
        writer = PcapWriter(out, request.snaplen)
        print(f"xdpgw: capturing on gateway {config.gateway.name}, snaplen {request.snaplen}; Ctrl-C stops",
              file=sys.stderr, flush=True)
        written = 0

        def write(packets: list[CapturedPacket]) -> None:
            nonlocal written
            for p in packets[:None if count is None else count - written]:
                writer.write(p)
                if summary is not None:
                    print(summary_line(p, started), file=summary, flush=True)
                written += 1
            writer.flush()

        try:
            writer.flush()
            while not stop.is_set() and (count is None or written < count):
                write(reader.poll(POLL_MS))
            call(sock, "capture.stop", pid=pid)
            write(reader.poll(0))          # what arrived before the disarm
        except BrokenPipeError:
            # whoever read our output is gone (`| tcpdump -c N`): stop quietly; the
            # lease ends with this process, and what is still buffered goes nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        finally:
            reader.close()
        return written
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

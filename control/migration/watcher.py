"""Watch the host ports VMs sit behind: put the VM-port program
(dataplane/vmport.py) on every port whose name matches `[gateway] vm_ports`
(glob patterns), also on ports created later, turn its announcements into
Announcements, and follow netlink (links coming and going; the kernel learning
a VM's own address with its MAC on a port).

Everything runs in the calling process's network namespace (the daemon has
joined the gateway's). Two threads, each loop bounded by a poll timeout and a
stop event."""
from __future__ import annotations

import fnmatch
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from typing import Callable

from control.migration.manager import Announcement
from dataplane.program import AttachError
from dataplane.vmport import PortAnnouncement, VmPortProgram

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTM_NEWLINK, RTM_DELLINK, RTM_NEWNEIGH = 16, 17, 28
POLL_MS = 100


def matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class PortWatcher:
    """mode "auto": native XDP where the port's driver has it, else generic, like
    the gateway's own program; or "native" or "generic" only."""

    def __init__(self, patterns: tuple[str, ...] | list[str], on_announce: Callable[[Announcement], object],
                 on_link_gone: Callable[[str], object] | None = None, mode: str = "auto") -> None:
        self.patterns = tuple(patterns)
        self.on_announce = on_announce
        self.on_link_gone = on_link_gone
        self.mode = mode
        self.program: VmPortProgram | None = None
        self.nl: socket.socket | None = None
        self.attached: dict[str, tuple[int, str]] = {}    # ifname -> (ifindex, mode)
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.events = 0
        self.errors: list[str] = []

    # ---- lifecycle
    def start(self) -> None:
        self.program = VmPortProgram(self._on_event)
        self.nl = self._netlink_socket()
        self.scan()
        for target, name in ((self._perf_loop, "xdpgw-portwatch"), (self._netlink_loop, "xdpgw-netlink")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=2)
        with self.lock:
            for name, (idx, mode) in list(self.attached.items()):
                self._detach(name, idx, mode)
            self.attached.clear()
        if self.nl is not None:
            self.nl.close()
        if self.program is not None:
            self.program.close()
            self.program = None

    # ---- ports
    def scan(self) -> None:
        """Attach to every matching port not watched yet; forget ports that are gone."""
        present = {name: idx for idx, name in socket.if_nameindex()}
        gone = []
        with self.lock:
            for name, (idx, _) in list(self.attached.items()):
                if present.get(name) != idx:
                    del self.attached[name]
                    gone.append(name)
            for name, idx in present.items():
                if name not in self.attached and matches(name, self.patterns):
                    self._attach(name, idx)
        for name in gone:
            if self.on_link_gone:
                try:
                    self.on_link_gone(name)
                except Exception as exc:  # noqa: BLE001
                    log.warning("link-gone handler for %s: %s", name, exc)

    def _attach(self, name: str, idx: int) -> None:
        try:
            self.attached[name] = (idx, self.program.attach(name, self.mode))
        except AttachError as exc:
            self.errors.append(str(exc))
            log.warning(self.errors[-1])

    def _detach(self, name: str, idx: int, mode: str) -> None:
        try:
            if socket.if_nametoindex(name) == idx:
                self.program.detach(name, mode)
        except (OSError, AttachError):    # the port may be gone already
            pass

    def status(self) -> dict:
        with self.lock:
            return {"patterns": list(self.patterns), "ports": {n: m for n, (_, m) in sorted(self.attached.items())},
                    "announcements": self.events, "errors": self.errors[-10:]}

    # ---- perf buffer
    def _on_event(self, ev: PortAnnouncement) -> None:
        self.events += 1
        try:
            port = socket.if_indextoname(ev.ifindex)
        except OSError:
            return
        self._announce(Announcement(ev.kind, ev.mac, ev.ip, port, ev.ts_ns))

    def _announce(self, a: Announcement) -> None:
        try:
            self.on_announce(a)
        except Exception as exc:  # noqa: BLE001 - one bad event never stops a reader
            log.warning("announcement %s: %s", a, exc)

    def _perf_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.program.poll(POLL_MS)
            except Exception as exc:  # noqa: BLE001
                log.warning("perf poll: %s", exc)
                self.stopping.wait(0.1)

    # ---- netlink
    @staticmethod
    def _netlink_socket() -> socket.socket:
        """A plain rtnetlink socket on the link and neighbour groups (pyroute2 parses
        the neighbour messages; its own socket objects are not for other threads)."""
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((0, RTMGRP_LINK | RTMGRP_NEIGH))
        return s

    def _netlink_loop(self) -> None:
        from pyroute2.netlink.rtnl.ndmsg import ndmsg

        while not self.stopping.is_set():
            try:
                ready, _, _ = select.select([self.nl], [], [], POLL_MS / 1000)
                if not ready:
                    continue
                data = self.nl.recv(1 << 16)
            except OSError as exc:
                if self.stopping.is_set():
                    return
                log.warning("netlink: %s", exc)     # e.g. ENOBUFS after a burst: rescan
                self.scan()
                continue
            rescan = False
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind in (RTM_NEWLINK, RTM_DELLINK):
                    rescan = True
                elif kind == RTM_NEWNEIGH:
                    try:
                        msg = ndmsg(data[offset:offset + length])
                        msg.decode()
                        self._on_neigh(msg)
                    except Exception as exc:  # noqa: BLE001 - a message we cannot parse is skipped
                        log.warning("netlink neighbour message: %s", exc)
                offset += (length + 3) & ~3
            if rescan:
                self.scan()

    def _on_neigh(self, msg) -> None:
        mac, dst = msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST")
        if not mac or not dst:
            return
        try:
            port = socket.if_indextoname(msg["ifindex"])
        except OSError:
            return
        if not matches(port, self.patterns):
            return
        self._announce(Announcement("netlink", mac, ipaddress.ip_address(dst), port, time.monotonic_ns()))

    # ---- VM-to-VM traffic
    def pair_bytes(self) -> dict[tuple[str, str], int]:
        """{(sender MAC, destination IP): bytes}, summed over CPUs."""
        return self.program.pair_bytes()

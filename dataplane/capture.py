"""Packet capture at the XDP hook (ebpf/capture.h), everything of it that
touches BPF: arm the program's filter and disarm it, and read its ring buffer
into `CapturedPacket`s. Which packets, who may capture and where they go is
the caller's business (control/capture.py)."""
from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass

from . import libbpf
from . import structs as S
from .maps import Dataplane

# XDP actions (uapi/linux/bpf.h) by what they mean for a packet of this program
XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
VERDICTS = {"drop": XDP_DROP, "pass": XDP_PASS, "tunnel": XDP_TX, "forward": XDP_REDIRECT}
VERDICT_NAMES = {v: k for k, v in VERDICTS.items()}
FILTER_MAP, RING_MAP = "capture_filter", "capture_ring"
META_SIZE = ct.sizeof(S.CaptureMeta)


@dataclass(frozen=True)
class CaptureFilter:
    """Which packets a capture records, by id; None matches any. `reason`
    (a name of S.DROP_REASONS) selects drops with that reason."""
    snaplen: int = S.CAPTURE_SNAPLEN_MAX
    region: int | None = None
    service: int | None = None
    vm: int | None = None
    verdict: str | None = None
    reason: str | None = None

    def to_c(self) -> S.CaptureFilter:
        """The map value; ValueError names the field that is out of range."""
        if not 1 <= self.snaplen <= S.CAPTURE_SNAPLEN_MAX:
            raise ValueError(f"capture snaplen {self.snaplen} out of range 1..{S.CAPTURE_SNAPLEN_MAX}")
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"capture verdict {self.verdict!r} must be one of {sorted(VERDICTS)}")
        if self.reason is not None and self.reason not in S.DROP_REASONS:
            raise ValueError(f"capture reason {self.reason!r} is not a drop reason")
        any_ = S.CAPTURE_ANY
        ids = {}
        for field in ("region", "service", "vm"):
            value = getattr(self, field)
            if value is not None and not 0 <= value < any_:
                raise ValueError(f"capture {field} id {value} out of range")
            ids[field] = any_ if value is None else value
        return S.CaptureFilter(armed=1, snaplen=self.snaplen, **ids,
                               verdict=any_ if self.verdict is None else VERDICTS[self.verdict],
                               reason=any_ if self.reason is None else S.DROP_REASONS.index(self.reason))


def arm(dp: Dataplane, f: CaptureFilter) -> None:
    """From now on, matching packets go to the ring buffer (one map write)."""
    libbpf.update_elem(dp._fd(FILTER_MAP), ct.c_uint32(0), f.to_c(), FILTER_MAP)


def disarm(dp: Dataplane) -> None:
    libbpf.update_elem(dp._fd(FILTER_MAP), ct.c_uint32(0), S.CaptureFilter(), FILTER_MAP)


def is_armed(dp: Dataplane) -> bool:
    value = S.CaptureFilter()
    libbpf.lookup_elem(dp._fd(FILTER_MAP), ct.c_uint32(0), value, FILTER_MAP)
    return bool(value.armed)


def ring_id(dp: Dataplane) -> int:
    """The ring buffer's map id: another process opens it with CaptureReader.by_id."""
    return libbpf.map_info(dp._fd(RING_MAP)).id


@dataclass(frozen=True)
class Frame:
    """A frame's first bytes as received ("rx") or as sent ("tx"), and its whole length."""
    direction: str
    length: int
    data: bytes


@dataclass(frozen=True)
class CapturedPacket:
    ts_ns: int                         # bpf_ktime_get_ns(): CLOCK_MONOTONIC
    ifindex: int                       # the interface it came in on
    region: int                        # region id (0: unknown)
    service: int | None                # service id; None: no service
    vm: int | None                     # VM id; None: none chosen, or offloaded
    verdict: str                       # "pass", "drop", "forward", "tunnel"
    reason: str | None                 # drop reason (drops only)
    received: Frame
    sent: Frame | None                 # forwarded and tunnelled packets: as sent

    @property
    def frames(self) -> list[Frame]:
        return [self.received] + ([self.sent] if self.sent else [])


def decode(record: bytes) -> CapturedPacket:
    """One capture_ring record: struct capture_meta, then the bytes as received, then as sent."""
    m = S.CaptureMeta.from_buffer_copy(record[:META_SIZE])
    rx_end = META_SIZE + m.rx_caplen
    if len(record) < rx_end + m.tx_caplen:
        raise ValueError(f"capture record of {len(record)} bytes is shorter than its header says")
    none = lambda v: None if v == S.CAPTURE_ANY else v   # noqa: E731
    sent = Frame("tx", m.tx_len, record[rx_end:rx_end + m.tx_caplen]) if m.tx_len else None
    return CapturedPacket(m.ts_ns, m.ifindex, m.region, none(m.service), none(m.vm),
                          VERDICT_NAMES.get(m.verdict, f"action{m.verdict}"),
                          S.DROP_REASONS[m.reason] if m.verdict == XDP_DROP and m.reason < S.DROP_MAX else None,
                          Frame("rx", m.rx_len, record[META_SIZE:rx_end]), sent)


class CaptureReader:
    """The capture ring buffer of a loaded program (its map fd, or its id when
    the program belongs to another process)."""

    def __init__(self, map_fd: int, own_fd: bool = False) -> None:
        self._fd = map_fd if own_fd else None
        self._ring = libbpf.RingBuffer(map_fd, RING_MAP)

    @classmethod
    def by_id(cls, map_id: int) -> "CaptureReader":
        fd = libbpf.map_fd_by_id(map_id)
        try:
            return cls(fd, own_fd=True)
        except BaseException:
            os.close(fd)
            raise

    def poll(self, timeout_ms: int) -> list[CapturedPacket]:
        """The packets captured within `timeout_ms` (0: those waiting now)."""
        return [decode(r) for r in self._ring.poll(timeout_ms)]

    def close(self) -> None:
        self._ring.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

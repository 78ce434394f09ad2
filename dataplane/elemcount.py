"""Element counts of hash maps as the kernel keeps them (per CPU, summed by the
kfunc bpf_map_sum_elem_count, Linux 6.6+), read without walking the maps: one
pass of a bpf_map iterator (ebpf/elemcount.bpf.c, compiled with clang by
setup.py into elemcount.bpf.o beside this module) costs the same for an empty
map and a full one.

The iterator is loaded once per process, on first use. Where it cannot load (an
older kernel, an object built without clang) the reason is logged once and
elem_counts() answers None, so that the caller can count some other way."""
from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

from . import libbpf

OBJECT = Path(__file__).with_name("elemcount.bpf.o")
PROGRAM = "elem_counts"
KFUNC = "bpf_map_sum_elem_count"
# struct elem_count of ebpf/elemcount.bpf.c: map id, padding, count
RECORD = struct.Struct("=IIq")

log = logging.getLogger("xdpgw.dataplane")
_lock = threading.Lock()
_loaded: libbpf.BpfIterator | str | None = None    # the iterator, or why it cannot load


def _load() -> libbpf.BpfIterator | str:
    try:
        obj = OBJECT.read_bytes()
    except OSError as exc:
        return f"cannot read {OBJECT} ({exc.strerror}); setup.py builds it with clang (make setup)"
    try:
        return libbpf.BpfIterator(obj, PROGRAM, f"the map element-count iterator {OBJECT.name}")
    except libbpf.BpfError as exc:
        if not libbpf.kernel_has_function(KFUNC):
            return f"the kernel has no kfunc {KFUNC} (Linux 6.6 added it)"
        return str(exc)


def _iterator() -> libbpf.BpfIterator | str:
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
            if isinstance(_loaded, str):
                log.warning("hash-map element counts unavailable: %s; counting entries by walking the maps",
                            _loaded)
        return _loaded


def elem_counts(map_ids: Sequence[int]) -> dict[int, int] | None:
    """The kernel's element count of each hash map in `map_ids` (map id -> count),
    or None when the iterator cannot load (the reason is logged once)."""
    iterator = _iterator()
    if isinstance(iterator, str):
        return None
    counts = {map_id: count for map_id, _, count in RECORD.iter_unpack(iterator.read())}
    missing = [i for i in map_ids if i not in counts]
    if missing:
        raise libbpf.BpfError(errno.ENOENT, f"element counts: no hash map with id {missing[0]}")
    return {i: counts[i] for i in map_ids}

"""Gateway state that outlives the daemon: pinned maps in bpffs.

The XDP program pins its state maps (flow table, counters, offloads) under one
directory per gateway (ebpf/maps.h, STATE_TABLE), and bcc reuses them when the
next daemon loads the program. Two things make that safe:

* ids: flows and counters are keyed by region, service and VM *ids*, so the
  name -> id assignment is kept in a pinned map of its own (`state_ids`) and a
  restarted gateway gives every known name its old id;
* layout: bcc reuses a pinned map whatever its shape, so a fingerprint of
  every pinned map's layout (key and value structs, entries) is stored with the
  ids and compared before anything is loaded; a mismatch is refused unless the
  operator asks for a reset. The kernel's own view of each reused map (sizes,
  entries, flags) is checked against the compiled program as well.
"""
from __future__ import annotations

import ctypes as ct
import ctypes.util
import functools
import hashlib
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import libbpf
from . import structs as S
from .program import Sizes

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "xdpgw"
BPF_FS_MAGIC = 0xCAFE4A11             # statfs f_type of a BPF file system (linux/magic.h)
MAPS_H = S.EBPF_DIR / "maps.h"
BPF_MAP_TYPE_HASH = 1                 # enum bpf_map_type
IDS_MAP = "state_ids"
KINDS = {"layout": 0, "region": 1, "service": 2, "vm": 3}
ID_SIZE = ct.sizeof(ct.c_uint64)      # state_ids value: an id, or a layout fingerprint / high-water id
# state_ids is created once and reused by every later daemon whatever its
# configuration, so its capacity is fixed: names of each kind, plus the
# layout entries (the fingerprint and a high-water id per kind) with room to spare.
NAMES_PER_KIND = 4096
LAYOUT_ENTRIES = 16
MAX_NAMES = NAMES_PER_KIND * (len(KINDS) - 1) + LAYOUT_ENTRIES
NAME_BYTES = 63                       # IdsKey: a name of up to 63 bytes after the kind byte


@dataclass(frozen=True)
class PinnedMap:
    """A STATE_TABLE of ebpf/maps.h: key and value types and its entries expression."""
    key: type
    value: type
    size: str                         # e.g. "XDPGW_MAX_REGIONS + 1"

    def entries(self, sizes: Sizes) -> int:
        """The expression (sums of products of numbers and names) under these sizes:
        names are the -D parameters of `sizes` and the constants of structs.h."""
        defines = sizes.defines()

        def value(factor: str) -> int:
            if factor.isdigit():
                return int(factor)
            if factor in defines:
                return defines[factor]
            if hasattr(S, factor):
                return getattr(S, factor)
            raise ValueError(f"{MAPS_H}: size {self.size!r} names {factor!r}, which is neither a Sizes "
                             "parameter nor a constant of dataplane/structs.py")

        return sum(math.prod(value(f.strip()) for f in term.split("*")) for term in self.size.split("+"))


_STATE_TABLE = re.compile(r'^STATE_TABLE\("\w+",\s*([^,]+?),\s*([^,]+?),\s*(\w+),\s*([^,]+?),', re.M)
_C_TYPES = {"__u32": ct.c_uint32, "__u64": ct.c_uint64, **{f"struct {n}": t for n, t in S.MIRRORS.items()}}


def _pinned_maps() -> dict[str, PinnedMap]:
    return {name: PinnedMap(_C_TYPES[key], _C_TYPES[value], size)
            for key, value, name, size in _STATE_TABLE.findall(MAPS_H.read_text())}


# Every STATE_TABLE of ebpf/maps.h.
PINNED_MAPS: dict[str, PinnedMap] = _pinned_maps()


class LayoutError(RuntimeError):
    """Pinned state from an incompatible build or configuration."""


class IdsKey(ct.Structure):
    _fields_ = [("kind", ct.c_uint8), ("name", ct.c_char * NAME_BYTES)]


def _describe(t: type) -> str:
    if issubclass(t, ct.Structure):
        return "{" + ",".join(f"{n}@{getattr(t, n).offset}:{_describe(ft)}" for n, ft, *_ in t._fields_) + "}"
    if issubclass(t, ct.Array):
        return f"{_describe(t._type_)}[{t._length_}]"
    return f"{t.__name__}/{ct.sizeof(t)}"


def fingerprint(sizes: Sizes) -> int:
    """64-bit digest of the layout of every pinned map under these sizes."""
    text = ";".join(f"{name}:{_describe(m.key)}:{_describe(m.value)}:{m.entries(sizes)}"
                    for name, m in sorted(PINNED_MAPS.items()))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") or 1


def _statfs_type(path: str | os.PathLike[str]) -> int | None:
    """statfs(2) f_type of `path` (None if it cannot be read); Python has no statfs."""
    buf = ct.create_string_buffer(256)               # struct statfs; f_type is its first field
    if _libc().statfs(os.fsencode(path), buf) != 0:
        return None
    return ct.c_long.from_buffer(buf).value


@functools.cache
def _libc() -> ct.CDLL:
    return ct.CDLL(ctypes.util.find_library("c"), use_errno=True)


def on_bpffs(path: str | os.PathLike[str]) -> bool:
    """Whether `path`, or its nearest existing parent, is on a BPF file system."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return _statfs_type(path) == BPF_FS_MAGIC


def _ancestors() -> list[int]:
    """PID 1, then this process's parent, grandparent, ... (those still running)."""
    pids, pid = [1], os.getppid()
    while pid > 1 and len(pids) < 64:
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                pid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            break
    return pids


@functools.cache
def _host_bpffs_fd() -> int | None:
    """An O_PATH descriptor of the host's /sys/fs/bpf, opened through the root of
    PID 1 or, if that is out of reach, of the nearest ancestor that sees one; kept
    open for the life of the process, so paths through it stay valid whoever exits."""
    for pid in _ancestors():
        try:
            fd = os.open(f"/proc/{pid}/root{BPFFS}", os.O_PATH | os.O_DIRECTORY)
        except OSError:
            continue
        if _statfs_type(f"/proc/self/fd/{fd}") == BPF_FS_MAGIC:
            return fd
        os.close(fd)
    return None


def reach(path: str | os.PathLike[str]) -> Path:
    """`path` (under /sys/fs/bpf) as this process can use it.

    `ip netns exec` gives the command a mount namespace with a fresh /sys and no
    bpffs, and a bpffs mounted there would be a new, empty instance. The host's
    instance, where earlier runs pinned their state, is still reachable through
    the root of a process outside that namespace; then `path` goes through a
    descriptor of its /sys/fs/bpf (/proc/self/fd/N/...). Elsewhere `path` is
    returned as it is, also when nothing is reachable (PinnedState.open says so)."""
    path = Path(path)
    if not path.is_relative_to(BPFFS) or on_bpffs(BPFFS):
        return path
    fd = _host_bpffs_fd()
    return path if fd is None else Path(f"/proc/self/fd/{fd}") / path.relative_to(BPFFS)


class PinnedState:
    """The pin directory of one gateway and its `state_ids` map."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)           # as configured: what messages name
        self.path = reach(self.dir)          # as this process reaches it
        self._fd: int | None = None

    @property
    def exists(self) -> bool:
        return (self.path / IDS_MAP).exists()

    def open(self) -> None:
        """Open the ids map, creating the directory and map on first use."""
        if self._fd is not None:
            return
        if not on_bpffs(self.path):
            raise LayoutError(f"pin directory {self.dir} is on {mount_type(self.dir)}, not on a BPF filesystem in "
                              "this mount namespace, and no process outside it shows the host's /sys/fs/bpf "
                              "(`ip netns exec` hides it): set gateway.netns and run xdpgw from the host instead")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LayoutError(f"cannot create pin directory {self.dir}: {exc.strerror} "
                              "(is bpffs mounted at /sys/fs/bpf?)") from None
        path = str(self.path / IDS_MAP)
        if os.path.exists(path):
            self._fd = libbpf.obj_get(path)
        else:
            self._fd = libbpf.map_create(BPF_MAP_TYPE_HASH, IDS_MAP, ct.sizeof(IdsKey), ID_SIZE, MAX_NAMES)
            libbpf.obj_pin(self._fd, path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _get(self, kind: str, name: str) -> int | None:
        value = ct.c_uint64()
        key = IdsKey(KINDS[kind], name.encode())
        return value.value if libbpf.lookup_elem(self._fd, key, value, IDS_MAP) else None

    def _put(self, kind: str, name: str, value: int) -> None:
        libbpf.update_elem(self._fd, IdsKey(KINDS[kind], name.encode()), ct.c_uint64(value), IDS_MAP)

    def _all(self, kind: str) -> dict[str, int]:
        keys, values, n = libbpf.lookup_batch(self._fd, ct.sizeof(IdsKey), ID_SIZE, MAX_NAMES, IDS_MAP)
        out = {}
        for i in range(n):
            key = IdsKey.from_buffer_copy(keys, i * ct.sizeof(IdsKey))
            if key.kind == KINDS[kind]:
                out[key.name.decode()] = int.from_bytes(values[i * ID_SIZE:(i + 1) * ID_SIZE], "little")
        return out

    def check_layout(self, sizes: Sizes) -> None:
        """Refuse pinned state of another layout; record ours on first use."""
        want = fingerprint(sizes)
        have = self._get("layout", "maps")
        if have is None:
            self._put("layout", "maps", want)
        elif have != want:
            raise LayoutError(f"the pinned state in {self.dir} was made with another map layout "
                              "(program or table sizes changed); run with --reset to discard it "
                              "(flows and counters start over)")

    def assign_ids(self, kind: str, names: list[str], first: int, last: int) -> tuple[dict[str, int], set[str]]:
        """Ids for `names` and the set of names that are new here.

        A known name keeps its id. A new name takes an id above every id this
        gateway ever gave (pinned flows may still name a departed VM's id, and
        must not land on a stranger); ids are reused only when the range is spent."""
        known = self._all(kind)
        ids = {n: known[n] for n in names if n in known}
        high = self._get("layout", f"high_{kind}") or first - 1
        used = set(ids.values())
        fresh = [i for i in range(high + 1, last + 1)] + [i for i in range(first, high + 1) if i not in used]
        new = [n for n in names if n not in ids]
        if len(new) > len(fresh):
            raise LayoutError(f"no free {kind} id in {first}..{last} for {new[len(fresh)]!r}")
        for name, i in zip(new, fresh):
            ids[name] = i
            self._put(kind, name, i)
        if new:
            self._put("layout", f"high_{kind}", max(high, *(ids[n] for n in new)))
        for stale in set(known) - set(names):
            libbpf.delete_elem(self._fd, IdsKey(KINDS[kind], stale.encode()), IDS_MAP)
        return ids, set(new)

    def reset(self) -> None:
        """Remove every pinned object of this gateway."""
        self.close()
        remove_pins(self.path)


def mount_type(path: Path) -> str:
    """File system type of the mount that holds `path` (it need not exist yet)."""
    best, fstype = "", "no file system"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, kind, *_ = line.split()
            point = point.replace("\\040", " ")
            if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
                best, fstype = point, kind
    return fstype


def check_reused_maps(bpf, sizes: Sizes) -> None:
    """The kernel's view of each pinned map must be what the compiled program expects."""
    problems = []
    for name, m in PINNED_MAPS.items():
        info = libbpf.map_info(bpf.get_table(name.encode()).map_fd)
        want = (ct.sizeof(m.key), ct.sizeof(m.value), m.entries(sizes))
        have = (info.key_size, info.value_size, info.max_entries)
        if have != want:
            problems.append(f"{name} has key/value/entries {have}, this build expects {want}")
    if problems:
        raise LayoutError("pinned maps do not fit this build: " + "; ".join(problems)
                          + "; run with --reset to discard them")


def remove_pins(directory: str | os.PathLike[str]) -> bool:
    """Remove a gateway's pin directory; False when there was none."""
    try:
        shutil.rmtree(reach(directory))
        return True
    except FileNotFoundError:
        return False

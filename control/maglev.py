"""Maglev lookup table (NSDI'16 permutation, weighted), the same on every gateway.

Spec (build_table_reference below is it, in code; cython/maglev.pyx must match it
bit for bit):

* backends are (name, vm_id, weight); they are sorted by the UTF-8 bytes of the
  name so the order of discovery never matters; weight-0 backends (draining) get
  no slots; duplicate names are an error;
* fnv(name, s) is FNV-1a 64 over the UTF-8 name with basis 0xcbf29ce484222325 ^ s;
  offset = fnv(name, seed) % M, skip = fnv(name, seed ^ 0x9E3779B97F4A7C15) % (M-1) + 1,
  and backend i's permutation is (offset + j*skip) % M for j = 0, 1, ...;
* rounds r = 0, 1, ...: backends in sorted order each place
  floor((r+1)*w/w_max) - floor(r*w/w_max) entries (exactly one per round when the
  weights are equal, i.e. plain Maglev); an entry goes to the first empty slot
  along the backend's permutation, which resumes where it left off; stop when all
  M slots are filled;
* with no backend of weight > 0 every slot is NO_VM.

M must be prime (so every permutation visits every slot) and larger than the
number of backends.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np

from dataplane.extensions import extension
from dataplane.program import Sizes
from dataplane.structs import XDPGW_NO_VM


NO_VM = XDPGW_NO_VM
DEFAULT_M = Sizes().maglev_m
DEFAULT_SEED = Sizes().hash_seed
U32_MAX = 0xFFFFFFFF

_FNV_BASIS = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_SKIP_SALT = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1

Backend = tuple[str, int, int]  # (name, vm_id, weight)


def _ext():
    return extension("control._maglev")


_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Miller-Rabin with the first 12 prime bases: exact for n < 3.18e23."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _prepare(backends: Iterable[Backend], m: int, seed: int) -> list[tuple[bytes, int, int]]:
    """Validate, sort by UTF-8 name and drop weight-0 backends: (name_utf8, vm_id, weight)."""
    items = list(backends)
    m, seed = operator.index(m), operator.index(seed)
    if not 0 <= seed <= U32_MAX:
        raise ValueError(f"seed must be in 0..{U32_MAX}, got {seed}")
    if not is_prime(m) or m > U32_MAX:
        raise ValueError(f"table size m must be a prime below 2^32, got {m}")
    # Counted over all backends, draining ones too, so a valid configuration
    # does not become invalid when a VM comes back.
    if m <= len(items):
        raise ValueError(f"table size m={m} must be larger than the number of backends ({len(items)})")
    named = []
    for name, vm_id, weight in items:
        if not isinstance(name, str):
            raise TypeError(f"backend name must be a str, got {type(name).__name__}")
        vm_id, weight = operator.index(vm_id), operator.index(weight)
        if not 0 <= vm_id < NO_VM:
            raise ValueError(f"backend {name!r}: vm_id must be in 0..{NO_VM - 1}, got {vm_id}")
        if not 0 <= weight <= U32_MAX:
            raise ValueError(f"backend {name!r}: weight must be in 0..{U32_MAX}, got {weight}")
        named.append((name.encode("utf-8"), vm_id, weight))
    named.sort()  # by name bytes; equal names end up adjacent
    for (a, _, _), (b, _, _) in zip(named, named[1:]):
        if a == b:
            raise ValueError(f"duplicate backend name: {a.decode('utf-8')!r}")
    return [b for b in named if b[2]]


def build_table(backends: Iterable[Backend], m: int = DEFAULT_M, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Maglev table as uint32[m] of vm_ids (Cython; identical to build_table_reference)."""
    active = _prepare(backends, m, seed)
    if not active:
        return np.full(m, NO_VM, dtype=np.uint32)
    return _ext().build_table(active, m, seed)


def _fnv1a64(data: bytes, salt: int) -> int:
    h = _FNV_BASIS ^ salt
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _M64
    return h


def build_table_reference(backends: Iterable[Backend], m: int = DEFAULT_M, seed: int = DEFAULT_SEED) -> np.ndarray:
    """The spec in pure Python (slow at production table sizes); see the module doc."""
    active = _prepare(backends, m, seed)
    if not active:
        return np.full(m, NO_VM, dtype=np.uint32)
    offsets = [_fnv1a64(name, seed) % m for name, _, _ in active]
    skips = [_fnv1a64(name, seed ^ _SKIP_SALT) % (m - 1) + 1 for name, _, _ in active]
    w_max = max(weight for _, _, weight in active)
    next_j = [0] * len(active)
    table: list[int | None] = [None] * m
    filled = 0
    r = 0
    while True:
        for i, (_, vm_id, weight) in enumerate(active):
            for _ in range((r + 1) * weight // w_max - r * weight // w_max):
                while True:
                    slot = (offsets[i] + next_j[i] * skips[i]) % m
                    next_j[i] += 1
                    if table[slot] is None:
                        break
                table[slot] = vm_id
                filled += 1
                if filled == m:
                    return np.array(table, dtype=np.uint32)
        r += 1


def table_diff(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Slot indexes (uint32, ascending) whose vm_id differs: the only slots to rewrite."""
    old, new = np.asarray(old), np.asarray(new)
    if old.shape != new.shape or old.ndim != 1:
        raise ValueError(f"tables must be 1-D and the same size, got {old.shape} and {new.shape}")
    return np.flatnonzero(old != new).astype(np.uint32)

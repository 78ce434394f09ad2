"""Fold per-CPU BPF map values (counters) into one value per key.

A per-CPU map lookup returns, for each key, one value per possible CPU, each
padded to a multiple of 8 bytes; the counters are u64 fields that each CPU
increments on its own, so the total is the sum over CPUs, wrapping mod 2^64
exactly as the kernel's counters do.
"""
from __future__ import annotations

import numpy as np

from dataplane.extensions import extension


def _ext():
    return extension("dataplane._fold")


def _check_raw(raw: np.ndarray) -> np.ndarray:
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint64 or raw.ndim != 3:
        raise ValueError("raw must be a uint64 array of shape (n_keys, n_cpus, n_fields)")
    # The Cython loop wants C order and aligned u64 loads; copy only if needed.
    return np.require(raw, requirements=["C_CONTIGUOUS", "ALIGNED"])


def fold_percpu(raw: np.ndarray) -> np.ndarray:
    """uint64[n_keys, n_cpus, n_fields] -> uint64[n_keys, n_fields], summed over CPUs (Cython)."""
    return _ext().fold_percpu(_check_raw(raw))


def fold_percpu_reference(raw: np.ndarray) -> np.ndarray:
    """The same fold with numpy: uint64 sums wrap mod 2^64 like the C loop."""
    return _check_raw(raw).sum(axis=1, dtype=np.uint64)


def percpu_value_stride(value_size: int) -> int:
    """Bytes one CPU's value takes in a per-CPU lookup buffer: round_up(value_size, 8)."""
    return (value_size + 7) // 8 * 8


def percpu_value_size(value_size: int, n_cpus: int) -> int:
    """Bytes one key's values take in a per-CPU lookup buffer: one stride per possible CPU."""
    return percpu_value_stride(value_size) * n_cpus


def fold_bytes(buf: bytes, n_keys: int, n_cpus: int, value_size: int, n_fields: int) -> np.ndarray:
    """Fold the value buffer of a per-CPU map (batch) lookup into uint64[n_keys, n_fields].

    buf holds, per key, n_cpus values of value_size bytes each padded to a
    multiple of 8; the first n_fields u64 (host byte order) of each value are
    summed, the rest of the value (if any) is ignored.
    """
    if n_keys < 0 or n_cpus < 1 or n_fields < 1 or value_size < 8 * n_fields:
        raise ValueError(
            f"need n_keys >= 0, n_cpus >= 1, n_fields >= 1 and value_size >= 8*n_fields; "
            f"got n_keys={n_keys} n_cpus={n_cpus} value_size={value_size} n_fields={n_fields}"
        )
    stride = percpu_value_stride(value_size)
    expected = n_keys * percpu_value_size(value_size, n_cpus)
    size = memoryview(buf).nbytes
    if size != expected:
        raise ValueError(
            f"buffer is {size} bytes, expected {expected} "
            f"({n_keys} keys x {n_cpus} CPUs x {stride} bytes)"
        )
    raw = np.frombuffer(buf, dtype=np.uint64).reshape(n_keys, n_cpus, stride // 8)
    return fold_percpu(raw[:, :, :n_fields])

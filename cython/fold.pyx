# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Fold per-CPU BPF map values into one value per key (dataplane/fold.py wraps it)."""
from libc.stdint cimport uint64_t

import numpy


def fold_percpu(const uint64_t[:, :, ::1] raw):
    """Sum raw[n_keys, n_cpus, n_fields] over CPUs, wrapping mod 2^64 like the counters."""
    cdef Py_ssize_t n_keys = raw.shape[0]
    cdef Py_ssize_t n_cpus = raw.shape[1]
    cdef Py_ssize_t n_fields = raw.shape[2]
    cdef Py_ssize_t k, c, f
    out = numpy.zeros((n_keys, n_fields), dtype=numpy.uint64)
    cdef uint64_t[:, ::1] o = out
    with nogil:
        # Loop order follows memory order of raw; unsigned overflow wraps in C.
        for k in range(n_keys):
            for c in range(n_cpus):
                for f in range(n_fields):
                    o[k, f] += raw[k, c, f]
    return out

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Weighted Maglev table population (NSDI'16), the fast path.

control/maglev.py holds the spec (build_table_reference), sorts, filters and
validates the backends; this module only re-checks what would otherwise make it
write out of bounds or loop forever.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

import numpy

cdef uint32_t NO_VM = 0xFFFFFFFFu
cdef uint64_t FNV_BASIS = 0xcbf29ce484222325ULL
cdef uint64_t FNV_PRIME = 0x100000001b3ULL
cdef uint64_t SKIP_SALT = 0x9E3779B97F4A7C15ULL


cdef struct Walker:
    uint64_t pos      # next permutation position: (offset + j*skip) % m
    uint64_t skip
    uint64_t acc      # (round * weight) % w_max: decides whether it places this round
    uint64_t weight
    uint32_t vm_id


cdef uint64_t _fnv1a(const uint8_t* p, Py_ssize_t n, uint64_t salt) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint64_t h = FNV_BASIS ^ salt
    for i in range(n):
        h = (h ^ p[i]) * FNV_PRIME
    return h


cdef bint _is_prime(uint64_t n) noexcept nogil:
    # Trial division is enough here: m is a table size, below 2^32.
    cdef uint64_t d = 5
    if n < 4:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    while d * d <= n:
        if n % d == 0 or n % (d + 2) == 0:
            return False
        d += 6
    return True


cdef int _populate(Walker* w, Py_ssize_t n, uint32_t[::1] table, uint64_t m,
                   uint64_t w_max) noexcept nogil:
    # Probing an occupancy bitmap (8 KiB for m=65537, fits L1) rather than the
    # 256 KiB table itself measured ~20% faster.
    cdef uint64_t* used = <uint64_t*>calloc((m + 63) // 64, sizeof(uint64_t))
    cdef uint64_t filled = 0
    cdef uint64_t c
    cdef Py_ssize_t b
    if used == NULL:
        return -1
    while True:
        for b in range(n):
            # floor((r+1)*w/w_max) - floor(r*w/w_max) is 0 or 1 since w <= w_max;
            # the running remainder gives it without a division.
            w[b].acc += w[b].weight
            if w[b].acc < w_max:
                continue
            w[b].acc -= w_max
            c = w[b].pos
            while used[c >> 6] & (1ULL << (c & 63)):
                c += w[b].skip
                if c >= m:
                    c -= m
            used[c >> 6] |= 1ULL << (c & 63)
            table[c] = w[b].vm_id
            c += w[b].skip
            if c >= m:
                c -= m
            w[b].pos = c
            filled += 1
            if filled == m:
                free(used)
                return 0


def build_table(list backends, uint64_t m, uint32_t seed):
    """Populate uint32[m] from (name_utf8: bytes, vm_id, weight) tuples sorted by name.

    Weights must be > 0 and vm_ids != NO_VM (NO_VM is never a real VM).
    """
    cdef Py_ssize_t n = len(backends)
    cdef Py_ssize_t i
    cdef uint64_t w_max = 0
    cdef bytes name
    cdef uint32_t vm_id, weight
    cdef Walker* walkers
    cdef int rc
    if n == 0:
        raise ValueError("need at least one backend")
    if m > 0xFFFFFFFFu or not _is_prime(m) or <uint64_t>n >= m:
        raise ValueError(f"m must be a prime below 2^32 and > number of backends, got {m}")
    table = numpy.empty(m, dtype=numpy.uint32)
    cdef uint32_t[::1] tv = table
    walkers = <Walker*>malloc(n * sizeof(Walker))
    if walkers == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            name, vm_id, weight = backends[i]
            if name is None or weight == 0 or vm_id == NO_VM:
                raise ValueError("need a bytes name, weight > 0 and vm_id != 0xFFFFFFFF")
            walkers[i].pos = _fnv1a(<const uint8_t*>PyBytes_AS_STRING(name),
                                    PyBytes_GET_SIZE(name), seed) % m
            walkers[i].skip = _fnv1a(<const uint8_t*>PyBytes_AS_STRING(name),
                                     PyBytes_GET_SIZE(name), seed ^ SKIP_SALT) % (m - 1) + 1
            walkers[i].acc = 0
            walkers[i].weight = weight
            walkers[i].vm_id = vm_id
            if weight > w_max:
                w_max = weight
        with nogil:
            rc = _populate(walkers, n, tv, m, w_max)
        if rc != 0:
            raise MemoryError()
    finally:
        free(walkers)
    return table

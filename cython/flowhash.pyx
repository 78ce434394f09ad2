# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Flow hash shared with the XDP program, bit for bit.

The spec, the argument checks and the public wrappers live in control/flowhash.py
(flow_hash_reference is the contract); this module is the fast path and trusts
its callers to pass in-range values.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t

import numpy


cdef inline uint32_t _rotl32(uint32_t x, int r) noexcept nogil:
    return (x << r) | (x >> (32 - r))


cdef inline uint32_t _mix(uint32_t h, uint32_t w) noexcept nogil:
    # One murmur3-32 body step; every product is stored in a uint32_t before it
    # is shifted so C's unsigned wrap-around gives the mod-2^32 arithmetic.
    cdef uint32_t k = w * <uint32_t>0xcc9e2d51u
    k = _rotl32(k, 15)
    k = k * <uint32_t>0x1b873593u
    h ^= k
    h = _rotl32(h, 13)
    return h * <uint32_t>5u + <uint32_t>0xe6546b64u


cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline uint32_t _flow_hash(const uint8_t* addr, uint16_t sport, uint16_t dport,
                                uint8_t proto, uint32_t seed) noexcept nogil:
    cdef uint32_t h = seed
    h = _mix(h, _be32(addr))
    h = _mix(h, _be32(addr + 4))
    h = _mix(h, _be32(addr + 8))
    h = _mix(h, _be32(addr + 12))
    h = _mix(h, (<uint32_t>sport << 16) | <uint32_t>dport)
    h = _mix(h, <uint32_t>proto)
    h ^= 24  # input length in bytes, as murmur3 does
    h ^= h >> 16
    h = h * <uint32_t>0x85ebca6bu
    h ^= h >> 13
    h = h * <uint32_t>0xc2b2ae35u
    h ^= h >> 16
    return h


def flow_hash(const uint8_t[::1] addr16, uint16_t sport, uint16_t dport, uint8_t proto,
              uint32_t seed) -> int:
    """Hash one flow; addr16 is the 16-byte (IPv4-mapped for IPv4) source address."""
    if addr16.shape[0] != 16:
        raise ValueError(f"addr16 must be 16 bytes, got {addr16.shape[0]}")
    return _flow_hash(&addr16[0], sport, dport, proto, seed)


def flow_hash_many(const uint8_t[:, ::1] addrs, const uint16_t[::1] sports,
                   const uint16_t[::1] dports, const uint8_t[::1] protos, uint32_t seed):
    """Hash N flows at once: addrs is uint8[N, 16]; returns uint32[N]."""
    cdef Py_ssize_t n = addrs.shape[0]
    cdef Py_ssize_t i
    if addrs.shape[1] != 16:
        raise ValueError(f"addrs must have shape (N, 16), got (N, {addrs.shape[1]})")
    if sports.shape[0] != n or dports.shape[0] != n or protos.shape[0] != n:
        raise ValueError("addrs, sports, dports and protos must have the same length")
    out = numpy.empty(n, dtype=numpy.uint32)
    cdef uint32_t[::1] o = out
    with nogil:
        for i in range(n):
            o[i] = _flow_hash(&addrs[i, 0], sports[i], dports[i], protos[i], seed)
    return out

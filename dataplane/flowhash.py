"""Flow hash: the contract between the control plane and the XDP program.

Spec (flow_hash_reference below is it, in code; the C in the XDP program and
cython/flowhash.pyx must match it bit for bit):

* addr16 is the 16-byte source address, IPv4 given IPv4-mapped (::ffff:a.b.c.d);
* words w0..w3 = addr16[0:4], [4:8], [8:12], [12:16] read as big-endian u32,
  w4 = (sport << 16) | dport (host-order u16 values), w5 = proto;
* murmur3-32 body over the six words starting from h = seed, then h ^= 24 (the
  length in bytes) and murmur3's fmix32.

A flow's Maglev slot is flow_hash(...) % M.
"""
from __future__ import annotations

import ipaddress

import numpy as np

from dataplane.extensions import extension
from dataplane.structs import addr16 as mapped_address


M32 = 0xFFFFFFFF


def _ext():
    return extension("dataplane._flowhash")


def _check_flow(addr16: bytes, sport: int, dport: int, proto: int, seed: int) -> None:
    # Shared by both implementations so out-of-range input fails the same way
    # instead of being truncated by C conversions.
    if len(addr16) != 16:
        raise ValueError(f"addr16 must be 16 bytes, got {len(addr16)}")
    for name, value, top in (("sport", sport, 0xFFFF), ("dport", dport, 0xFFFF),
                             ("proto", proto, 0xFF), ("seed", seed, M32)):
        if not 0 <= value <= top:
            raise ValueError(f"{name} must be in 0..{top}, got {value}")


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & M32


def flow_hash_reference(addr16: bytes, sport: int, dport: int, proto: int, seed: int) -> int:
    """The spec in pure Python: murmur3-32 over the six flow words (see module doc)."""
    _check_flow(addr16, sport, dport, proto, seed)
    words = [int.from_bytes(addr16[i:i + 4], "big") for i in range(0, 16, 4)]
    words += [(sport << 16) | dport, proto]
    h = seed
    for w in words:
        k = (w * 0xCC9E2D51) & M32
        k = _rotl32(k, 15)
        k = (k * 0x1B873593) & M32
        h ^= k
        h = _rotl32(h, 13)
        h = (h * 5 + 0xE6546B64) & M32
    h ^= 24
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    h ^= h >> 16
    return h


def flow_hash(addr16: bytes, sport: int, dport: int, proto: int, seed: int) -> int:
    """Hash one flow with the Cython implementation (same result as the reference)."""
    _check_flow(addr16, sport, dport, proto, seed)
    return _ext().flow_hash(addr16, sport, dport, proto, seed)


def _as_uint_array(values, dtype: type, name: str, ndim: int) -> np.ndarray:
    # Refuse values that a plain astype() would silently wrap.
    arr = np.asarray(values)
    if arr.dtype != dtype and arr.size:
        if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > np.iinfo(dtype).max:
            raise ValueError(f"{name} must hold integers that fit {np.dtype(dtype).name}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got {arr.ndim}")
    return np.ascontiguousarray(arr, dtype=dtype)


def flow_hash_many(addrs, sports, dports, protos, seed: int) -> np.ndarray:
    """Hash N flows: addrs uint8[N, 16], sports/dports u16[N], protos u8[N] -> uint32[N]."""
    if not 0 <= seed <= M32:
        raise ValueError(f"seed must be in 0..{M32}, got {seed}")
    return _ext().flow_hash_many(
        _as_uint_array(addrs, np.uint8, "addrs", 2),
        _as_uint_array(sports, np.uint16, "sports", 1),
        _as_uint_array(dports, np.uint16, "dports", 1),
        _as_uint_array(protos, np.uint8, "protos", 1),
        seed,
    )


def address_bytes(ip: str) -> bytes:
    """16-byte form of an address as the dataplane keys it (IPv4 -> ::ffff:a.b.c.d)."""
    if not isinstance(ip, str):  # ip_address() would also take ints and packed bytes
        raise TypeError(f"address must be a str, got {type(ip).__name__}")
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 address: {ip!r}") from None
    return bytes(mapped_address(addr))


def maglev_slot(src_ip: str, sport: int, dport: int, proto: int, seed: int, m: int) -> int:
    """Index into a Maglev table of size m that the dataplane picks for this flow."""
    return flow_hash(address_bytes(src_ip), sport, dport, proto, seed) % m

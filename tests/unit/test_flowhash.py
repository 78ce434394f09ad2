"""Flow hash: Cython == the spec (reference), fixed vectors, address handling."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.flowhash import (
    address_bytes,
    flow_hash,
    flow_hash_many,
    flow_hash_reference,
    maglev_slot,
)

u16 = st.integers(0, 0xFFFF)
u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
addr16 = st.binary(min_size=16, max_size=16)

# Computed with flow_hash_reference (the spec in control/flowhash.py), which was
# also checked against the standard MurmurHash3_x86_32 (mmh3) over the six words
# packed little-endian. Any change here breaks agreement with the XDP program.
VECTORS = [
    ("10.0.0.1", 12345, 80, 6, 0x0, 0x5310231D),
    ("192.168.1.100", 5353, 53, 17, 0x0, 0xB0EF3A25),
    ("10.0.0.1", 12345, 80, 6, 0xDEADBEEF, 0x612098CB),
    ("2001:db8::1", 443, 8443, 6, 0x1, 0xD00F4106),
    ("::", 0, 0, 0, 0x0, 0xDD059501),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 65535, 255, 0xFFFFFFFF, 0x2B3660CD),
    ("fe80::1", 0, 0, 58, 0x2A, 0xBF922730),
]


@settings(max_examples=2000)
@given(addr16, u16, u16, u8, u32)
def test_cython_matches_reference(addr, sport, dport, proto, seed):
    assert flow_hash(addr, sport, dport, proto, seed) == flow_hash_reference(addr, sport, dport, proto, seed)


@pytest.mark.parametrize("ip,sport,dport,proto,seed,expected", VECTORS)
def test_regression_vectors(ip, sport, dport, proto, seed, expected):
    addr = address_bytes(ip)
    assert flow_hash_reference(addr, sport, dport, proto, seed) == expected
    assert flow_hash(addr, sport, dport, proto, seed) == expected


@settings(max_examples=50)
@given(st.lists(st.tuples(addr16, u16, u16, u8), min_size=0, max_size=64), u32)
def test_many_matches_reference(flows, seed):
    addrs = np.frombuffer(b"".join(f[0] for f in flows), dtype=np.uint8).reshape(len(flows), 16)
    got = flow_hash_many(addrs, [f[1] for f in flows], [f[2] for f in flows], [f[3] for f in flows], seed)
    assert got.dtype == np.uint32
    assert got.tolist() == [flow_hash_reference(*f, seed) for f in flows]


def test_many_rejects_values_that_would_wrap():
    addrs = np.zeros((1, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match="sports"):
        flow_hash_many(addrs, [70000], [1], [6], 0)
    with pytest.raises(ValueError, match="same length"):
        flow_hash_many(addrs, [1, 2], [1, 2], [6, 6], 0)


def test_ipv4_is_ipv4_mapped():
    assert address_bytes("10.1.2.3") == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert address_bytes("10.1.2.3") == address_bytes("::ffff:10.1.2.3")
    assert flow_hash(address_bytes("10.1.2.3"), 1, 2, 6, 0) == flow_hash(address_bytes("::ffff:a01:203"), 1, 2, 6, 0)


def test_ipv6_bytes():
    assert address_bytes("2001:db8::1") == bytes.fromhex("20010db8000000000000000000000001")


@pytest.mark.parametrize("bad", ["10.0.0.256", "not-an-ip", "", "2001:db8::g", "10.0.0.1/24"])
def test_bad_address_names_it(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        address_bytes(bad)


@pytest.mark.parametrize("impl", [flow_hash, flow_hash_reference])
def test_out_of_range_fields(impl):
    addr = address_bytes("10.0.0.1")
    with pytest.raises(ValueError, match="sport"):
        impl(addr, 65536, 80, 6, 0)
    with pytest.raises(ValueError, match="proto"):
        impl(addr, 1, 80, 256, 0)
    with pytest.raises(ValueError, match="seed"):
        impl(addr, 1, 80, 6, -1)
    with pytest.raises(ValueError, match="16 bytes"):
        impl(addr[:4], 1, 80, 6, 0)


def test_maglev_slot():
    expected = flow_hash_reference(address_bytes("10.0.0.1"), 12345, 80, 6, 7) % 65537
    assert maglev_slot("10.0.0.1", 12345, 80, 6, 7, 65537) == expected
    assert 0 <= maglev_slot("2001:db8::5", 1, 2, 17, 0, 251) < 251


def test_hash_spreads_ports_evenly():
    # Sanity for the Maglev use: consecutive source ports spread over slots.
    addr = address_bytes("198.51.100.7")
    slots = [flow_hash(addr, p, 443, 6, 0) % 251 for p in range(10000, 10000 + 25100)]
    counts = np.bincount(slots, minlength=251)
    assert counts.min() > 50 and counts.max() < 150  # expected 100 each

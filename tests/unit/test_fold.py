"""Per-CPU counter folding: Cython == numpy reference, wrap-around, raw buffer layout."""
import numpy as np
import pytest

from dataplane.fold import fold_bytes, fold_percpu, fold_percpu_reference, percpu_value_size, percpu_value_stride

U64_MAX = np.iinfo(np.uint64).max


@pytest.mark.parametrize("shape", [(0, 4, 2), (1, 1, 1), (7, 2, 3), (300, 64, 2), (5, 128, 8)])
def test_cython_matches_reference(shape):
    rng = np.random.default_rng(sum(shape))
    raw = rng.integers(0, U64_MAX, size=shape, dtype=np.uint64, endpoint=True)
    got = fold_percpu(raw)
    assert got.dtype == np.uint64 and got.shape == (shape[0], shape[2])
    assert np.array_equal(got, fold_percpu_reference(raw))


def test_wraps_mod_2_64():
    raw = np.array([[[U64_MAX, 5], [2, U64_MAX - 4]]], dtype=np.uint64)  # 1 key, 2 CPUs
    expected = [[1, 0]]  # (2^64-1 + 2) and (5 + 2^64-5) mod 2^64
    assert fold_percpu(raw).tolist() == expected
    assert fold_percpu_reference(raw).tolist() == expected


def test_values_near_2_64_match_reference():
    rng = np.random.default_rng(7)
    raw = U64_MAX - rng.integers(0, 1000, size=(50, 16, 3), dtype=np.uint64)
    assert np.array_equal(fold_percpu(raw), fold_percpu_reference(raw))


def test_non_contiguous_input_is_accepted():
    raw = np.arange(2 * 3 * 4, dtype=np.uint64).reshape(2, 3, 4)[:, :, ::2]
    assert np.array_equal(fold_percpu(raw), raw.sum(axis=1))


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4), dtype=np.int64), np.zeros((2, 3), dtype=np.uint64)])
def test_rejects_wrong_dtype_or_shape(bad):
    with pytest.raises(ValueError, match="uint64"):
        fold_percpu(bad)
    with pytest.raises(ValueError, match="uint64"):
        fold_percpu_reference(bad)


def percpu_buffer(values: np.ndarray, value_size: int) -> bytes:
    """What a per-CPU map lookup returns: per key, per CPU, the value padded to 8 bytes.

    Value bytes past the u64 fields and the alignment padding are filled with
    junk so the test proves they are ignored.
    """
    n_keys, n_cpus, n_fields = values.shape
    stride = (value_size + 7) // 8 * 8
    out = bytearray()
    for k in range(n_keys):
        for c in range(n_cpus):
            out += values[k, c].astype(np.uint64).tobytes()
            out += b"\xab" * (value_size - 8 * n_fields)
            out += b"\xcd" * (stride - value_size)
    return bytes(out)


def test_value_stride():
    assert [percpu_value_stride(s) for s in (8, 12, 16, 20, 24)] == [8, 16, 16, 24, 24]
    assert [percpu_value_size(s, 4) for s in (8, 12, 16)] == [32, 64, 64]


@pytest.mark.parametrize("value_size,n_fields", [
    (16, 2),   # struct traffic_counter
    (24, 3),   # struct service_counter
    (24, 2),   # read only the first two fields of a 24-byte value
    (12, 1),   # 12-byte value padded to 16 per CPU
    (20, 2),   # 20-byte value padded to 24 per CPU
])
def test_fold_bytes(value_size, n_fields):
    rng = np.random.default_rng(value_size * 10 + n_fields)
    values = rng.integers(0, U64_MAX, size=(9, 4, n_fields), dtype=np.uint64, endpoint=True)
    buf = percpu_buffer(values, value_size)
    got = fold_bytes(buf, 9, 4, value_size, n_fields)
    assert got.shape == (9, n_fields)
    assert np.array_equal(got, fold_percpu_reference(values))


def test_fold_bytes_accepts_any_buffer_and_alignment():
    values = np.arange(3 * 2 * 2, dtype=np.uint64).reshape(3, 2, 2)
    buf = percpu_buffer(values, 16)
    expected = values.sum(axis=1)
    assert np.array_equal(fold_bytes(bytearray(buf), 3, 2, 16, 2), expected)
    misaligned = memoryview(b"\x00" + buf)[1:]  # e.g. a slice of a larger buffer
    assert np.array_equal(fold_bytes(misaligned, 3, 2, 16, 2), expected)
    assert fold_bytes(b"", 0, 2, 16, 2).shape == (0, 2)


def test_fold_bytes_rejects_bad_layout():
    buf = bytes(3 * 2 * 16)
    with pytest.raises(ValueError, match="expected 96"):
        fold_bytes(buf[:-8], 3, 2, 16, 2)
    with pytest.raises(ValueError, match="value_size"):
        fold_bytes(buf, 3, 2, 16, 3)  # 3 u64 fields do not fit 16 bytes
    with pytest.raises(ValueError, match="n_cpus"):
        fold_bytes(buf, 3, 0, 16, 2)

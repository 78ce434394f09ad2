"""ctypes bindings to libbpf.so.1 for what bcc 0.26 lacks: BPF_PROG_TEST_RUN
with options, creating inner maps for map-in-map swaps, batch map operations
and pinning."""
from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import os

BPF_MAP_TYPE_ARRAY = 2
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_ANY = 0
BPF_F_MMAPABLE = 1 << 10


class BpfError(OSError):
    """A bpf() call failed; the message names the operation and the map or program."""


def _load() -> ct.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ct.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(errno.ENOENT, f"cannot load libbpf ({name}): {exc}; run `make setup`") from exc


_lib = _load()


class TestRunOpts(ct.Structure):
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
        ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
    ]


class XdpMd(ct.Structure):
    _fields_ = [("data", ct.c_uint32), ("data_end", ct.c_uint32), ("data_meta", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("rx_queue_index", ct.c_uint32),
                ("egress_ifindex", ct.c_uint32)]


class BatchOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


class MapCreateOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("inner_map_fd", ct.c_uint32), ("map_flags", ct.c_uint32), ("map_extra", ct.c_uint64),
                ("numa_node", ct.c_uint32), ("map_ifindex", ct.c_uint32)]


class MapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16), ("ifindex", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64), ("btf_id", ct.c_uint32),
                ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32), ("pad", ct.c_uint32),
                ("map_extra", ct.c_uint64)]


_lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(TestRunOpts)]
_lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32,
                                ct.POINTER(MapCreateOpts)]
_lib.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32),
                                      ct.POINTER(BatchOpts)]
_lib.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                      ct.POINTER(ct.c_uint32), ct.POINTER(BatchOpts)]
_lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
_lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
_lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_lib.bpf_obj_get.argtypes = [ct.c_char_p]
_lib.bpf_map_get_fd_by_id.argtypes = [ct.c_uint32]
_lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]


def _check(rc: int, what: str) -> int:
    """libbpf 1.x returns -errno on failure (and sets errno)."""
    if rc < 0:
        err = -rc if rc != -1 else ct.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


def prog_test_run(prog_fd: int, data: bytes, *, repeat: int = 1, ingress_ifindex: int = 0,
                  out_size: int = 4096, flags: int = 0, batch_size: int = 0) -> tuple[int, bytes, int]:
    """Run an XDP program on one frame. Returns (verdict, output bytes, ns per run)."""
    buf_in = ct.create_string_buffer(bytes(data), len(data))
    buf_out = ct.create_string_buffer(out_size)
    ctx = XdpMd(data=0, data_end=len(data), ingress_ifindex=ingress_ifindex)
    opts = TestRunOpts(sz=ct.sizeof(TestRunOpts), data_in=ct.addressof(buf_in), data_size_in=len(data),
                       repeat=repeat, flags=flags, batch_size=batch_size)
    if not flags & BPF_F_TEST_XDP_LIVE_FRAMES:
        opts.data_out = ct.addressof(buf_out)
        opts.data_size_out = out_size
    if ingress_ifindex:
        opts.ctx_in = ct.addressof(ctx)
        opts.ctx_size_in = ct.sizeof(ctx)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), f"BPF_PROG_TEST_RUN on program fd {prog_fd}")
    return opts.retval, buf_out.raw[:opts.data_size_out], opts.duration


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0) -> int:
    opts = MapCreateOpts(sz=ct.sizeof(MapCreateOpts), map_flags=flags)
    return _check(_lib.bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries,
                                      ct.byref(opts)), f"creating map {name}")


def update_batch(map_fd: int, keys: bytes, values: bytes, count: int, what: str) -> None:
    key_buf = ct.create_string_buffer(keys, len(keys))
    value_buf = ct.create_string_buffer(values, len(values))
    n = ct.c_uint32(count)
    opts = BatchOpts(sz=ct.sizeof(BatchOpts))
    _check(_lib.bpf_map_update_batch(map_fd, key_buf, value_buf, ct.byref(n), ct.byref(opts)),
           f"batch update of {what}")


def lookup_batch(map_fd: int, key_size: int, value_size: int, max_entries: int, what: str,
                 chunk: int = 8192) -> tuple[bytes, bytes, int]:
    """All entries of a hash map in batches. Returns (keys, values, count)."""
    keys = ct.create_string_buffer(key_size * max_entries)
    values = ct.create_string_buffer(value_size * max_entries)
    in_batch = ct.create_string_buffer(max(key_size, 8))
    out_batch = ct.create_string_buffer(max(key_size, 8))
    opts = BatchOpts(sz=ct.sizeof(BatchOpts))
    total = 0
    first = True
    while total < max_entries:
        n = ct.c_uint32(min(chunk, max_entries - total))
        rc = _lib.bpf_map_lookup_batch(map_fd, None if first else in_batch, out_batch,
                                       ct.addressof(keys) + total * key_size,
                                       ct.addressof(values) + total * value_size, ct.byref(n), ct.byref(opts))
        total += n.value
        if rc < 0:
            err = -rc if rc != -1 else ct.get_errno()
            if err == errno.ENOENT:   # walked past the last entry
                break
            raise BpfError(err, f"batch lookup of {what}: {os.strerror(err)}")
        ct.memmove(in_batch, out_batch, len(out_batch))
        first = False
    return keys.raw[:total * key_size], values.raw[:total * value_size], total


def update_elem(map_fd: int, key: ct._SimpleCData | ct.Structure | ct.Array, value, what: str) -> None:
    _check(_lib.bpf_map_update_elem(map_fd, ct.byref(key), ct.byref(value), BPF_ANY), f"updating {what}")


def lookup_elem(map_fd: int, key, value, what: str) -> bool:
    """Fill `value` from the map; False when the key is absent."""
    rc = _lib.bpf_map_lookup_elem(map_fd, ct.byref(key), ct.byref(value))
    if rc < 0 and (-rc if rc != -1 else ct.get_errno()) == errno.ENOENT:
        return False
    _check(rc, f"looking up {what}")
    return True


def delete_elem(map_fd: int, key, what: str) -> bool:
    """Delete a key; False when it was absent."""
    rc = _lib.bpf_map_delete_elem(map_fd, ct.byref(key))
    if rc < 0 and (-rc if rc != -1 else ct.get_errno()) == errno.ENOENT:
        return False
    _check(rc, f"deleting from {what}")
    return True


def map_fd_by_id(map_id: int) -> int:
    return _check(_lib.bpf_map_get_fd_by_id(map_id), f"opening map id {map_id}")


def map_info(map_fd: int) -> MapInfo:
    info = MapInfo()
    n = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(map_fd, ct.byref(info), ct.byref(n)), f"reading info of map fd {map_fd}")
    return info


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pinning fd {fd} at {path}")


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"opening pinned object {path}")

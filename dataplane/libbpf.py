"""ctypes bindings to libbpf.so.1 for what bcc 0.26 lacks: BPF_PROG_TEST_RUN
with options, creating inner maps for map-in-map swaps, batch map operations,
pinning, reading a ring buffer map opened by id (another process's), and
loading a clang-built object with an iterator program (bcc cannot call kfuncs)."""
from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import functools
import os

BPF_MAP_TYPE_ARRAY = 2
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_ANY = 0
BPF_F_MMAPABLE = 1 << 10


class BpfError(OSError):
    """A bpf() call failed; the message names the operation and the map or program."""


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


class ProgInfo(ct.Structure):
    """struct bpf_prog_info up to the fields read here (the kernel fills what fits)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64), ("load_time", ct.c_uint64),
                ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * 16), ("ifindex", ct.c_uint32), ("gpl_compatible", ct.c_uint32),
                ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64), ("nr_jited_ksyms", ct.c_uint32),
                ("nr_jited_func_lens", ct.c_uint32), ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
                ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32), ("func_info", ct.c_uint64),
                ("nr_func_info", ct.c_uint32), ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
                ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
                ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32)]


class LineInfo(ct.Structure):
    """struct bpf_line_info."""
    _fields_ = [("insn_off", ct.c_uint32), ("file_name_off", ct.c_uint32), ("line_off", ct.c_uint32),
                ("line_col", ct.c_uint32)]


# int (*)(void *ctx, void *data, size_t size): libbpf's ring buffer callback
RingBufferSample = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)

_SIGNATURES = {
    "bpf_prog_test_run_opts": [ct.c_int, ct.POINTER(TestRunOpts)],
    "bpf_map_create": [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.POINTER(MapCreateOpts)],
    "bpf_map_update_batch": [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.POINTER(BatchOpts)],
    "bpf_map_lookup_batch": [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                             ct.POINTER(ct.c_uint32), ct.POINTER(BatchOpts)],
    "bpf_map_update_elem": [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64],
    "bpf_map_lookup_elem": [ct.c_int, ct.c_void_p, ct.c_void_p],
    "bpf_map_delete_elem": [ct.c_int, ct.c_void_p],
    "bpf_obj_pin": [ct.c_int, ct.c_char_p],
    "bpf_obj_get": [ct.c_char_p],
    "bpf_map_get_fd_by_id": [ct.c_uint32],
    "bpf_obj_get_info_by_fd": [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)],
    "ring_buffer__new": [ct.c_int, RingBufferSample, ct.c_void_p, ct.c_void_p],
    "ring_buffer__poll": [ct.c_void_p, ct.c_int],
    "ring_buffer__consume": [ct.c_void_p],
    "ring_buffer__free": [ct.c_void_p],
    "bpf_object__open_mem": [ct.c_void_p, ct.c_size_t, ct.c_void_p],
    "bpf_object__load": [ct.c_void_p],
    "bpf_object__find_program_by_name": [ct.c_void_p, ct.c_char_p],
    "bpf_object__close": [ct.c_void_p],
    "bpf_program__attach_iter": [ct.c_void_p, ct.c_void_p],
    "bpf_link__fd": [ct.c_void_p],
    "bpf_link__destroy": [ct.c_void_p],
    "bpf_iter_create": [ct.c_int],
    "btf__load_vmlinux_btf": [],
    "btf__find_by_name_kind": [ct.c_void_p, ct.c_char_p, ct.c_uint32],
    "btf__free": [ct.c_void_p],
    "btf__load_from_kernel_by_id": [ct.c_uint32],
    "btf__name_by_offset": [ct.c_void_p, ct.c_uint32],
    "libbpf_strerror": [ct.c_int, ct.c_char_p, ct.c_size_t],
}
_RESTYPES = {"ring_buffer__new": ct.c_void_p, "bpf_object__open_mem": ct.c_void_p,
             "bpf_object__find_program_by_name": ct.c_void_p, "bpf_program__attach_iter": ct.c_void_p,
             "bpf_object__close": None, "btf__load_vmlinux_btf": ct.c_void_p, "btf__free": None,
             "btf__load_from_kernel_by_id": ct.c_void_p, "btf__name_by_offset": ct.c_char_p}
BTF_KIND_FUNC = 12


@functools.cache
def lib() -> ct.CDLL:
    """libbpf, loaded on first use so that importing the dataplane needs no libbpf."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        handle = ct.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(errno.ENOENT, f"cannot load libbpf ({name}): {exc}; run `make setup`") from None
    for function, argtypes in _SIGNATURES.items():
        getattr(handle, function).argtypes = argtypes
    for function, restype in _RESTYPES.items():
        getattr(handle, function).restype = restype
    return handle


def _errno(rc: int) -> int:
    """libbpf 1.x returns -errno on failure (and sets errno)."""
    return -rc if rc != -1 else ct.get_errno()


def _strerror(err: int) -> str:
    """errno's text, or that of libbpf's own codes (4000 and up: bad ELF, relocation, ...)."""
    buf = ct.create_string_buffer(128)
    lib().libbpf_strerror(err, buf, len(buf))
    return buf.value.decode(errors="replace")


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = _errno(rc)
        raise BpfError(err, f"{what}: {_strerror(err)}")
    return rc


def _pointer(ptr: int | None, what: str) -> int:
    """libbpf's constructors return NULL on failure, with errno set."""
    if not ptr:
        err = ct.get_errno()
        raise BpfError(err, f"{what}: {_strerror(err)}")
    return ptr


def _found(rc: int, what: str) -> bool:
    """False for ENOENT (no such key), True on success; other failures raise."""
    if rc < 0 and _errno(rc) == errno.ENOENT:
        return False
    _check(rc, what)
    return True


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
    _check(lib().bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), f"BPF_PROG_TEST_RUN on program fd {prog_fd}")
    return opts.retval, buf_out.raw[:opts.data_size_out], opts.duration


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0) -> int:
    opts = MapCreateOpts(sz=ct.sizeof(MapCreateOpts), map_flags=flags)
    return _check(lib().bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries,
                                       ct.byref(opts)), f"creating map {name}")


def update_batch(map_fd: int, keys: bytes, values: bytes, count: int, what: str) -> None:
    key_buf = ct.create_string_buffer(keys, len(keys))
    value_buf = ct.create_string_buffer(values, len(values))
    n = ct.c_uint32(count)
    opts = BatchOpts(sz=ct.sizeof(BatchOpts))
    _check(lib().bpf_map_update_batch(map_fd, key_buf, value_buf, ct.byref(n), ct.byref(opts)),
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
        rc = lib().bpf_map_lookup_batch(map_fd, None if first else in_batch, out_batch,
                                        ct.addressof(keys) + total * key_size,
                                        ct.addressof(values) + total * value_size, ct.byref(n), ct.byref(opts))
        total += n.value
        if not _found(rc, f"batch lookup of {what}"):   # walked past the last entry
            break
        ct.memmove(in_batch, out_batch, len(out_batch))
        first = False
    return keys.raw[:total * key_size], values.raw[:total * value_size], total


def update_elem(map_fd: int, key: ct._SimpleCData | ct.Structure | ct.Array, value, what: str) -> None:
    _check(lib().bpf_map_update_elem(map_fd, ct.byref(key), ct.byref(value), BPF_ANY), f"updating {what}")


def lookup_elem(map_fd: int, key, value, what: str) -> bool:
    """Fill `value` from the map; False when the key is absent."""
    return _found(lib().bpf_map_lookup_elem(map_fd, ct.byref(key), ct.byref(value)), f"looking up {what}")


def delete_elem(map_fd: int, key, what: str) -> bool:
    """Delete a key; False when it was absent."""
    return _found(lib().bpf_map_delete_elem(map_fd, ct.byref(key)), f"deleting from {what}")


def map_fd_by_id(map_id: int) -> int:
    return _check(lib().bpf_map_get_fd_by_id(map_id), f"opening map id {map_id}")


def map_info(map_fd: int) -> MapInfo:
    info = MapInfo()
    n = ct.c_uint32(ct.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(map_fd, ct.byref(info), ct.byref(n)), f"reading info of map fd {map_fd}")
    return info


def _prog_info(prog_fd: int, info: ProgInfo) -> ProgInfo:
    n = ct.c_uint32(ct.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, ct.byref(info), ct.byref(n)), f"reading info of program fd {prog_fd}")
    return info


def prog_tag(prog_fd: int) -> str:
    """The program's tag as in its kernel symbol bpf_prog_<tag>_<name>."""
    return bytes(_prog_info(prog_fd, ProgInfo()).tag).hex()


def prog_map_ids(prog_fd: int) -> list[int]:
    """The kernel ids of the maps a program uses."""
    n = _prog_info(prog_fd, ProgInfo()).nr_map_ids
    ids = (ct.c_uint32 * n)()
    _prog_info(prog_fd, ProgInfo(nr_map_ids=n, map_ids=ct.addressof(ids)))
    return list(ids)


def prog_jited_lines(prog_fd: int) -> list[tuple[int, int, str]]:
    """Where each source line of a JIT-compiled program starts: (kernel address,
    line number, source text), sorted by address; empty without BTF line info."""
    first = _prog_info(prog_fd, ProgInfo())
    n, jn = first.nr_line_info, first.nr_jited_line_info
    if not n or n != jn or first.line_info_rec_size != ct.sizeof(LineInfo):
        return []
    lines, addrs = (LineInfo * n)(), (ct.c_uint64 * n)()
    info = ProgInfo(nr_line_info=n, line_info_rec_size=ct.sizeof(LineInfo), line_info=ct.addressof(lines),
                    nr_jited_line_info=n, jited_line_info_rec_size=8, jited_line_info=ct.addressof(addrs))
    _prog_info(prog_fd, info)
    btf = lib().btf__load_from_kernel_by_id(first.btf_id)
    if not btf:
        return []
    try:
        def text(off: int) -> str:
            raw = lib().btf__name_by_offset(btf, off)
            return raw.decode(errors="replace").strip() if raw else ""
        return sorted((addrs[i], lines[i].line_col >> 10, text(lines[i].line_off)) for i in range(n))
    finally:
        lib().btf__free(btf)


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"pinning fd {fd} at {path}")


def obj_get(path: str) -> int:
    return _check(lib().bpf_obj_get(path.encode()), f"opening pinned object {path}")


class RingBuffer:
    """A BPF_MAP_TYPE_RINGBUF map read through libbpf; records come back as bytes."""

    def __init__(self, map_fd: int, what: str) -> None:
        self.what = what
        self._records: list[bytes] = []

        def sample(_ctx, data, size) -> int:
            self._records.append(ct.string_at(data, size))   # only copy here: a callback cannot raise
            return 0

        self._callback = RingBufferSample(sample)            # kept alive as long as libbpf may call it
        self._rb = _pointer(lib().ring_buffer__new(map_fd, self._callback, None, None), f"opening ring buffer {what}")

    def poll(self, timeout_ms: int) -> list[bytes]:
        """The records that arrive within `timeout_ms` (0: those waiting now); a
        signal ends the wait early with what has arrived."""
        rc = lib().ring_buffer__poll(self._rb, timeout_ms) if timeout_ms else lib().ring_buffer__consume(self._rb)
        if rc < 0 and _errno(rc) != errno.EINTR:
            _check(rc, f"reading ring buffer {self.what}")
        records, self._records = self._records, []
        return records

    def close(self) -> None:
        if self._rb:
            lib().ring_buffer__free(self._rb)
            self._rb = None


def kernel_has_function(name: str) -> bool:
    """Whether the running kernel's BTF (/sys/kernel/btf/vmlinux) has a function `name`."""
    btf = _pointer(lib().btf__load_vmlinux_btf(), "reading the kernel's BTF")
    try:
        return lib().btf__find_by_name_kind(btf, name.encode(), BTF_KIND_FUNC) > 0
    finally:
        lib().btf__free(btf)


class BpfIterator:
    """A BPF iterator program from an object file's bytes, loaded and attached until
    close(); each read() runs it once (a new iterator instance, so concurrent reads
    are independent) and returns what it wrote."""

    def __init__(self, obj: bytes, program: str, what: str) -> None:
        self.what = what
        self._link = None
        self._buf = ct.create_string_buffer(obj, len(obj))   # libbpf reads it until the load
        self._obj = _pointer(lib().bpf_object__open_mem(self._buf, len(obj), None), f"opening {what}")
        try:
            _check(lib().bpf_object__load(self._obj), f"loading {what}")
            prog = _pointer(lib().bpf_object__find_program_by_name(self._obj, program.encode()),
                            f"finding program {program} in {what}")
            self._link = _pointer(lib().bpf_program__attach_iter(prog, None), f"attaching {what}")
        except BpfError:
            self.close()
            raise

    def read(self) -> bytes:
        fd = _check(lib().bpf_iter_create(lib().bpf_link__fd(self._link)), f"running {self.what}")
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._link:
            lib().bpf_link__destroy(self._link)
            self._link = None
        if self._obj:
            lib().bpf_object__close(self._obj)
            self._obj = None

"""Where the time goes inside a BPF program, by source line (bench `breakdown`):
dataplane/libbpf.py prog_jited_lines maps the JIT image to the program's C
lines through its BTF line info, and bench/profiling.py bpf_line_profile gives
each perf sample inside the program to its line. Checked on a program whose
time is, by construction, almost all in one line."""
from __future__ import annotations

import os
import time

import pytest

from bench.profiling import bpf_line_profile
from dataplane import libbpf

SOURCE = r"""
#include <uapi/linux/bpf.h>
int spin(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (data + 8 > data_end)
        return XDP_ABORTED;
    __u64 x = *(volatile __u64 *)data;
    for (int i = 0; i < 4000; i++)
        x = x * 6364136223846793005ull + (x >> 29);   /* the hot line */
    return x == 42 ? XDP_DROP : XDP_PASS;
}
"""
FRAME = bytes(range(64))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, perf)")


@pytest.fixture(scope="module")
def spin():
    from bcc import BPF

    bpf = BPF(text=SOURCE.encode())
    fn = bpf.load_func(b"spin", BPF.XDP)
    yield fn.fd
    bpf.cleanup()


def _symbol_range(fd: int) -> tuple[int, int]:
    name = f"bpf_prog_{libbpf.prog_tag(fd)}_spin"
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, _, sym = line.split()[:3]
            if sym == name:
                return int(addr, 16), name
    raise AssertionError(f"{name} not in /proc/kallsyms")


def test_lines_lie_inside_the_jit_image_in_order(spin):
    lines = libbpf.prog_jited_lines(spin)
    start, _ = _symbol_range(spin)
    addrs = [a for a, _, _ in lines]
    assert addrs == sorted(addrs) and addrs[0] == start
    assert all(a < start + 65536 for a in addrs)
    hot = [(num, text) for _, num, text in lines if "the hot line" in text]
    assert hot and all(num > 0 for num, _ in hot)


def test_samples_go_to_the_hot_line(spin):
    def workload(deadline: float) -> None:
        while time.monotonic() < deadline:
            libbpf.prog_test_run(spin, FRAME, repeat=2000)

    prof = bpf_line_profile(workload, spin, seconds=1.5, pid=os.getpid())
    assert isinstance(prof, dict), prof
    assert prof["in_program"] > 20, prof
    top = prof["lines"][0]
    assert "the hot line" in top["source"] and top["percent"] > 50, prof["lines"][:5]
    assert sum(line["percent"] for line in prof["lines"]) <= 100.01

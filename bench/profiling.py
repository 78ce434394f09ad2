"""perf profiles (cpu-clock samples: this machine's guest has no PMU, so no
cycles/instructions and no `bpftool prog profile`). JIT-compiled BPF programs
show up as bpf_prog_<tag>_<name>; the tag is dropped from the names here. Inside
one program, samples are attributed to C source lines through its BTF line info
(bpf_line_profile)."""
from __future__ import annotations

import bisect
import collections
import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Callable


def _record(workload: Callable[[float], None], seconds: float, pid: int | None, cpu: int | None,
            report: Callable[[str, str], object]) -> object:
    """Sample `pid` (or everything on `cpu`) while `workload(deadline)` runs, then
    `report(perf, perf.data)`; or why not, as a string."""
    perf = shutil.which("perf")
    if not perf:
        return "perf not installed"
    target = ["-p", str(pid)] if pid is not None else ["-C", str(cpu)]
    tmp = tempfile.mkdtemp(prefix="xgb-perf-")
    data = os.path.join(tmp, "perf.data")
    proc = None
    try:
        proc = subprocess.Popen([perf, "record", "-q", "-e", "cpu-clock", *target, "-o", data, "--", "sleep",
                                 str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)
        workload(time.monotonic() + seconds)
        try:
            proc.wait(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            return "perf record did not finish"
        return report(perf, data)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"perf failed: {exc}"
    finally:
        if proc is not None and proc.poll() is None:     # ours: end it by its pid
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


def perf_profile(workload: Callable[[float], None], seconds: float = 2.0, pid: int | None = None,
                 cpu: int | None = None, top: int = 15) -> list[dict] | str:
    """The top symbols with their share of the samples taken while `workload` ran."""
    def report(perf: str, data: str) -> list[dict] | str:
        rep = subprocess.run([perf, "report", "-i", data, "--stdio", "--sort", "sym", "--percent-limit", "0.5"],
                             capture_output=True, text=True, timeout=60).stdout
        rows = []
        for line in rep.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+\[([k.])\]\s+(\S+)", line)
            if m:
                rows.append({"percent": float(m.group(1)), "space": "kernel" if m.group(2) == "k" else "user",
                             "symbol": re.sub(r"bpf_prog_[0-9a-f]{16}_", "bpf_prog_", m.group(3))})
        return rows[:top] or "no samples"
    return _record(workload, seconds, pid, cpu, report)


def bpf_line_profile(workload: Callable[[float], None], prog_fd: int, seconds: float = 2.0,
                     pid: int | None = None, cpu: int | None = None, top: int = 25) -> dict | str:
    """Where the time inside one JIT-compiled BPF program goes, by C source line:
    each sample in the program is given to the last line (BTF line info) that
    starts at or before its address. cpu-clock samples land on the instruction
    after a stall, so a line's share includes waiting for what the lines just
    before it loaded."""
    from dataplane import libbpf

    lines = libbpf.prog_jited_lines(prog_fd)
    if not lines:
        return "the program has no BTF line info"
    symbol = f"bpf_prog_{libbpf.prog_tag(prog_fd)}_"
    starts = [addr for addr, _, _ in lines]

    def report(perf: str, data: str) -> dict | str:
        out = subprocess.run([perf, "script", "-i", data, "-F", "ip,sym"], capture_output=True, text=True,
                             timeout=120).stdout
        total, inside, by_line = 0, 0, collections.Counter()
        for row in out.splitlines():
            parts = row.split(None, 1)
            if len(parts) != 2:
                continue
            total += 1
            if not parts[1].startswith(symbol):
                continue
            inside += 1
            k = bisect.bisect_right(starts, int(parts[0], 16)) - 1
            if k >= 0:
                by_line[(lines[k][1], lines[k][2])] += 1
        if not inside:
            return "no samples in the program"
        return {"samples": total, "in_program": round(100 * inside / total, 2),
                "lines": [{"percent": round(100 * n / inside, 2), "line": num, "source": src[:160]}
                          for (num, src), n in by_line.most_common(top)]}
    return _record(workload, seconds, pid, cpu, report)

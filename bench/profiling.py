"""perf profiles (cpu-clock samples: this machine's guest has no PMU, so no
cycles/instructions and no `bpftool prog profile`). JIT-compiled BPF programs
show up as bpf_prog_<tag>_<name>; the tag is dropped from the names here."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Callable


def perf_profile(workload: Callable[[float], None], seconds: float = 2.0, pid: int | None = None,
                 cpu: int | None = None, top: int = 15) -> list[dict] | str:
    """Sample `pid` (or everything on `cpu`) while `workload(deadline)` runs;
    returns the top symbols with their share of the samples, or why not."""
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
        rep = subprocess.run([perf, "report", "-i", data, "--stdio", "--sort", "sym", "--percent-limit", "0.5"],
                             capture_output=True, text=True, timeout=60).stdout
        rows = []
        for line in rep.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+\[([k.])\]\s+(\S+)", line)
            if m:
                rows.append({"percent": float(m.group(1)), "space": "kernel" if m.group(2) == "k" else "user",
                             "symbol": re.sub(r"bpf_prog_[0-9a-f]{16}_", "bpf_prog_", m.group(3))})
        return rows[:top] or "no samples"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"perf failed: {exc}"
    finally:
        if proc is not None and proc.poll() is None:     # ours: end it by its pid
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)

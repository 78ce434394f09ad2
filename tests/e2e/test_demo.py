"""`xdpgw demo` end to end, once: the command a user runs, in a subprocess (bounded),
with a fresh prefix and its own working directory. Its summary must show every
event of the story happened (with a measured timing) and every expectation held
(among them: dc2's xdpgw served the offloaded connections and released its VMs),
and nothing may be left behind: namespaces, pins, registry files, the demo's
working directory, or any process it started (by the pids it reports, by its
prefix, and dc2's VM servers). Times are printed (-s), never asserted."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import tempfile

from testbed.kit import xdpgw_executable
from testbed.topology import leftovers
from tests.e2e.conftest import unique_prefix

PREFIX = unique_prefix("xgd")
SECONDS = 12           # the shortest story the demo allows
TIMEOUT_S = 240

EVENTS = {            # event number -> (name in the summary, the timing it must state)
    1: ("two regions", r"r1 \d+ pps, r2 \d+ pps"),
    2: ("r1 heavy", r"heavy -> offload distributed in [0-9.]+ s .*target dc2"),
    3: ("VM failure", r"server killed -> health down in [0-9.]+ s -> out of the Maglev tables in [0-9.]+ s"),
    4: ("live migration", r"announced itself on gwv\db \(garp\) -> re-pointed in [0-9.]+ ms"),
    5: ("r1 calm", r"calm -> offload cleared in [0-9.]+ s"),
    6: ("dc2 released", r"offloaded connections closed -> dc2's VMs drained and released in [0-9.]+ s \(request "
                        r"\d+ drained;"),
}


def _cmdlines() -> dict[int, str]:
    out = {}
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/cmdline", "rb") as f:
                out[int(d[6:])] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return out


def test_demo_tells_the_whole_story(tmp_path):
    before = set(_cmdlines())
    try:
        run = subprocess.run([xdpgw_executable(), "demo", "--prefix", PREFIX, "--seconds", str(SECONDS)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        left = leftovers(PREFIX)
    out = run.stdout
    print(f"\n{out}")
    assert run.returncode == 0, out[-3000:] + run.stderr[-2000:]
    summary = out[out.index("\nsummary (prefix"):]

    for n, (name, timing) in EVENTS.items():
        line = next((ln for ln in summary.splitlines() if ln.startswith(f"    {n}. {name}")), None)
        assert line is not None and "did not happen" not in line, f"event {n} ({name}): {line!r}"
        assert re.search(timing, line), f"event {n} states no timing: {line!r}"
    expectations = summary[summary.index("  expectations:"):summary.index("  counters:")].splitlines()[1:]
    assert len(expectations) == 10 and all(ln.startswith("    held  ") for ln in expectations), expectations
    assert any(ln.startswith("    held    dc2's xdpgw chose the VMs of r1's new connections") for ln in expectations)
    assert "  result: OK" in summary
    assert (tmp_path / "demo-rates.png").stat().st_size > 0
    assert "(10 events marked)" in summary

    # nothing left behind
    assert left == [], left
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"xdpgw-demo-{PREFIX}-*"))
    pids = [int(p) for p in re.search(r"stopped \(pids ([0-9 ]+)\)", summary).group(1).split()]
    assert len(pids) == 7 and not [p for p in pids if os.path.exists(f"/proc/{p}")], pids
    new = {pid: cmd for pid, cmd in _cmdlines().items() if pid not in before}
    mine = {pid: cmd for pid, cmd in new.items() if PREFIX in cmd or "dc2-dv" in cmd}
    assert mine == {}, mine

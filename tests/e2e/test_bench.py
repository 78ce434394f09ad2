"""The benchmarks run (python -m bench --quick: every section once, at a tiny
size) and produce what `make bench` promises: a results JSON with every
section, each figure with its baseline and ratio, the targets, and the plots.

No test here looks at a time: the machine is shared and quick sizes measure
nothing. What is asserted is structure, and correctness the benchmarks check
themselves (every timed new flow was new, every frame generated end to end is
delivered or accounted for), and that nothing is left behind."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("per_packet", "katran", "scaling", "e2e", "control", "breakdown", "metrics", "fleet", "ab")
PLOTS = ("per_packet.png", "katran.png", "scaling_flows.png", "scaling_vms.png", "e2e.png", "maglev.png",
         "breakdown.png", "fleet.png")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, network namespaces)")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-progress", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    doc = json.loads((out / "latest.json").read_text()) if (out / "latest.json").exists() else None
    return proc, out, doc


def test_runs_every_section(quick_run):
    proc, out, doc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert doc is not None
    assert set(doc["sections"]) == set(SECTIONS)
    for name, sec in doc["sections"].items():
        assert "error" not in sec, f"{name}: {sec.get('error')}\n{sec.get('traceback')}"
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == doc
    assert doc["meta"]["quick"] is True


@pytest.mark.parametrize("section", SECTIONS)
def test_every_figure_has_a_baseline_and_a_ratio(quick_run, section):
    _, _, doc = quick_run
    results = doc["sections"][section]["results"]
    assert results, f"{section} reported nothing"
    for r in results:
        for field in ("key", "name", "value", "unit", "baseline", "baseline_value", "ratio", "method"):
            assert field in r, f"{section}/{r.get('key')}: no {field}"
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r
        # quick sizes measure nothing: a net-of-harness figure may even come out
        # at zero on a busy machine, so only the shape is checked, not the sign
        assert isinstance(r["baseline_value"], (int, float)) and math.isfinite(r["baseline_value"]), r
        if r.get("paired_ratio") is not None:
            # measured in pairs back to back: the median of the pairs' ratios
            assert r["ratio"] == r["paired_ratio"] and r["ratio"] > 0, r
        elif r["baseline_value"]:
            assert r["ratio"] == pytest.approx(r["value"] / r["baseline_value"])
        else:
            assert r["ratio"] is None
        assert r["baseline"]


@pytest.mark.parametrize("section", SECTIONS)
def test_self_checks_hold(quick_run, section):
    """Counter checks: each timed packet took the path its class names (a new
    flow was a miss, a hit a hit); end to end, every frame is accounted for."""
    _, _, doc = quick_run
    for r in doc["sections"][section]["results"]:
        checks = r["checks"]
        if section == "e2e":
            assert checks["accounted"], r
            assert checks["generated"] > 0
            assert checks["lossless"] or not r["key"].startswith("mpps_2cpu"), r
        elif "ok" in checks:
            assert checks["ok"], r


def test_sections_cover_the_issue(quick_run):
    _, _, doc = quick_run
    keys = {s: {r["key"] for r in doc["sections"][s]["results"]} for s in SECTIONS}
    assert {"new_flow", "hit_v4", "hit_v6", "tunnel_vm", "offloaded", "non_vip", "malformed",
            "xdp_drop_min", "xdp_redirect_min"} <= keys["per_packet"]
    assert any(k.startswith("hit@flows=") for k in keys["scaling"])
    assert any(k.startswith("new@vms=") for k in keys["scaling"])
    assert {"mpps@flows=1", "mpps@flows=1000"} <= keys["e2e"]
    assert {"maglev_swap", "flows_read@api", "flows_read@raw", "startup"} <= keys["control"]
    assert any(k.startswith("maglev_build@") for k in keys["control"])
    assert any(k.startswith("fold@") for k in keys["control"])
    # per packet: rotated figures in steady state (the targets') and on a fresh table
    assert {"new_flow@fresh", "hit_v4@fresh", "tunnel_vm@fresh", "xdp_redirect_min@fresh"} <= keys["per_packet"]
    assert {"mpps_2cpu@flows=1000", "mpps_2cpu_baseline@flows=1000"} <= keys["e2e"]
    assert {"convergence_p50@procs=8", "convergence_p99@procs=8", "convergence_max@procs=8", "write_p50@procs=8",
            "write_p99@procs=8", "apply_cpu@procs=8"} <= keys["fleet"]
    probe = doc["sections"]["per_packet"]["info"]["repeat_probe"]
    # the kernel re-runs repeat=R on one unreset buffer: encap and new flows are not repeat-stable
    assert not probe["tunnel_vm"]["repeat_stable"] and not probe["new_flow"]["repeat_stable"]
    assert probe["hit_v4"]["repeat_stable"]


def test_targets_listed_not_judged_in_quick_runs(quick_run):
    _, _, doc = quick_run
    names = {t["name"] for t in doc["targets"]}
    assert {"e2e_1k_flows", "per_packet_hit_v4", "per_packet_new_flow", "flat_hit", "flat_new", "maglev_build",
            "read_flows", "startup", "e2e_1m_flows", "e2e_2cpu", "katran_hit_udp_tunnel", "katran_hit_udp_local",
            "katran_hit_tcp_ack_tunnel", "katran_hit_tcp_ack_local", "katran_new_udp_tunnel",
            "katran_new_udp_local"} <= names
    assert all(t["met"] is None for t in doc["targets"])


def test_katran_skipped_without_a_checkout(quick_run):
    """No --katran-src: the section says Katran was skipped and times xdpgw's side
    alone, fresh and steady, against the minimal redirect."""
    proc, _, doc = quick_run
    sec = doc["sections"]["katran"]
    assert sec["info"]["katran"].startswith("skipped: no Katran checkout given")
    assert "Katran skipped: no Katran checkout given" in proc.stdout
    keys = {r["key"] for r in sec["results"]}
    for state in ("fresh", "steady"):
        assert {f"hit_udp_tunnel@{state}", f"hit_udp_local@{state}", f"hit_tcp_ack_tunnel@{state}",
                f"hit_tcp_ack_local@{state}", f"new_udp_tunnel@{state}", f"new_udp_local@{state}",
                f"xdp_drop_min@{state}", f"xdp_redirect_min@{state}"} <= keys
    assert not any(k.startswith("katran_") for k in keys)
    assert all(r["baseline"] == "minimal redirect" for r in sec["results"])
    katran_targets = [t for t in doc["targets"] if t["name"].startswith("katran_")]
    assert katran_targets and all(t["measured"] is None and "skipped" in t["detail"] for t in katran_targets)


def test_katran_checkout_checked_before_running(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--katran-src", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bench: --katran-src {tmp_path}: no katran/lib/bpf/balancer.bpf.c (expected a facebookincubator/katran "
        "checkout)"]


def test_ab_without_a_build_is_this_tree_against_itself(quick_run):
    _, _, doc = quick_run
    sec = doc["sections"]["ab"]
    assert sec["info"]["other"].startswith("this tree again (A/A")
    keys = {r["key"] for r in sec["results"]}
    assert {f"{c}@{state}" for c in ("hit_udp_tunnel", "hit_udp_local", "new_udp_tunnel", "new_udp_local")
            for state in ("fresh", "steady")} <= keys
    for r in sec["results"]:
        assert r["checks"]["this"]["ok"] and r["checks"]["other"]["ok"], r
        assert len(r["params"]["this_ns"]) == len(r["params"]["other_ns"]) >= 1


def test_ab_build_checked_before_running(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--ab-ebpf", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bench: --ab-ebpf {tmp_path}: no xdpgw.c there (give the ebpf/ directory of a build)"]


def test_ab_refuses_a_build_with_other_map_layouts(tmp_path):
    """A build whose Maglev lines hold 8 VM ids instead of 16: this tree's control
    plane cannot program it, and the section says so in one line."""
    other = tmp_path / "ebpf"
    shutil.copytree(ROOT / "ebpf", other)
    structs = other / "structs.h"
    text = structs.read_text()
    assert "#define MAGLEV_LINE_SLOTS 16" in text
    structs.write_text(text.replace("#define MAGLEV_LINE_SLOTS 16", "#define MAGLEV_LINE_SLOTS 8"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "ab", "--quick", "--no-progress",
                           "--ab-ebpf", str(other), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = json.loads((out / "latest.json").read_text())["sections"]["ab"]["error"]
    assert err.startswith(f"RuntimeError: --ab-ebpf {other}: this tree's control plane cannot load and program")
    assert err.endswith("compare builds with the same map layouts")


def test_plots_written(quick_run):
    _, out, doc = quick_run
    for name in PLOTS:
        path = out / name
        assert path.exists(), name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(path) in doc["plots"]


def test_nothing_left_behind(quick_run):
    _, _, doc = quick_run
    prefix = doc["meta"]["namespace_prefix"]
    assert prefix.startswith("xgb")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in netns
    assert not list(Path("/sys/fs/bpf/xdpgw").glob(f"{prefix}-*"))


def test_fleet_every_process_applied_every_migration(quick_run):
    """Quick fleet: 2 gateway daemons + 6 watcher-only processes on a 3-member etcd;
    every one applied each of the 100 migrations (the revision written), and the
    timeline the plot draws has one point per migration."""
    proc, _, doc = quick_run
    info = doc["sections"]["fleet"]["info"]
    (run,) = info["runs"]
    assert (run["gateways"], run["watchers"], run["migrations"]) == (2, 6, 100)
    assert run["converged"] == 100 and run["missing_applies"] == 0, run
    assert len(run["timeline"]) == 100 and len(run["gw_apply_ms"]) == 2 and len(run["watcher_apply_ms"]) == 6
    assert "fleet      8 processes: 100 migrations" in proc.stdout


def test_table_printed(quick_run):
    proc, _, _ = quick_run
    assert "targets" in proc.stdout and "ratio" in proc.stdout


def test_list_and_cleanup():
    listed = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(SECTIONS)
    cleaned = subprocess.run([sys.executable, "-m", "bench", "--cleanup", "xgbzzz"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert cleaned.returncode == 0 and "nothing" in cleaned.stdout


def test_flows_array_matches_flows():
    """Dataplane.flows_array (the bulk read the control section times) returns
    exactly what flows() does, as numpy records."""
    import numpy as np

    from bench import frames as F
    from bench.programs import WEB, fill_flows, load_xdpgw, possible_cpus
    from dataplane import structs as S

    gw = load_xdpgw(flow_entries=4096)
    try:
        keys = F.flow_keys4(F.SRC["fill"], 0, 1000)
        fill_flows(gw.flow_fd(), keys, (1 + np.arange(1000) % 3).astype(np.uint32), WEB, possible_cpus())
        k, v = gw.dp.flows_array()
        objs = gw.dp.flows()
        assert k.size == v.size == len(objs) == gw.dp.flow_count() == 1000
        assert sorted(k.tobytes()[i * 40:(i + 1) * 40] for i in range(k.size)) == sorted(bytes(a) for a, _ in objs)
        assert {(bytes(a), bytes(b)) for a, b in objs} == {(k[i].tobytes(), v[i].tobytes()) for i in range(k.size)}
        assert sorted(bytes(S.flow_key4(a)) for a, _ in objs) == sorted(key.tobytes() for key in keys)
    finally:
        gw.close()

"""Results: the targets evaluated on a run, the printed table and the JSON
files (bench/results/<timestamp>.json and latest.json)."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

from .common import Measurement, Target


def _find(sections: dict, section: str, key: str) -> Measurement | None:
    for m in sections.get(section, {}).get("results", []):
        if m.key == key:
            return m
    return None


def _flatness(sections: dict, prefix: str) -> tuple[float | None, str]:
    rows = [m for m in sections.get("scaling", {}).get("results", []) if m.key.startswith(prefix)]
    ratios = [m.ratio for m in rows if math.isfinite(m.ratio) and m.ratio > 0]
    if len(ratios) < 2:
        return None, "not measured"
    detail = ", ".join(f"{m.params.get('flows')}: {m.value:.0f} ns ({m.ratio:.2f}x)" for m in rows)
    return max(ratios) / min(ratios), detail


def targets(sections: dict, quick: bool) -> list[Target]:
    out: list[Target] = []
    note = " [quick run: sizes below the target's, not evaluated]" if quick else ""

    if "e2e" in sections:
        for name, key, limit, what in (("e2e_1k_flows", "mpps@flows=1000", 0.75, "1k flows, one CPU"),
                                       ("e2e_1m_flows", "mpps@flows=1000000", 0.65, "1M flows, one CPU")):
            m = _find(sections, "e2e", key)
            out.append(Target(name, f"end to end, {what}: xdpgw >= {limit:g} x minimal redirect gateway, lossless",
                              m.ratio if m else None, limit, ">=", "x",
                              (f"xdpgw {m.value:.2f} Mpps vs {m.baseline_value:.2f} Mpps; lossless="
                               f"{m.checks.get('lossless')}, accounted={m.checks.get('accounted')}" if m
                               else "not measured") + note,
                              extra_ok=bool(m and m.checks.get("lossless"))))
        m = _find(sections, "e2e", "mpps_2cpu@flows=1000")
        out.append(Target("e2e_2cpu", "end to end, 1k flows per CPU: xdpgw on 2 CPUs >= 1.8 x its one-CPU Mpps, "
                          "lossless", m.ratio if m else None, 1.8, ">=", "x",
                          (f"{m.value:.2f} Mpps on 2 CPUs vs {m.baseline_value:.2f} Mpps on one; lossless="
                           f"{m.checks.get('lossless')}" if m else "not measured (fewer than 2 CPUs)") + note,
                          extra_ok=bool(m and m.checks.get("lossless"))))
    if "katran" in sections:
        out.extend(_katran_targets(sections, note))
    for key, limit, what in (("hit_v4", 2.0, "flow-hit"), ("new_flow", 3.0, "new-flow")):
        m = _find(sections, "per_packet", key)
        if m or "per_packet" in sections:
            out.append(Target(f"per_packet_{key}", f"{what} cost <= {limit:g} x minimal redirect program",
                              m.ratio if m else None, limit, "<=", "x",
                              (f"{m.value:.0f} ns vs {m.baseline_value:.0f} ns ({m.method})" if m else "not measured")
                              + note))
    if "scaling" in sections:
        for prefix, what in (("hit@flows=", "flow-hit"), ("new@flows=", "new-flow")):
            v, detail = _flatness(sections, prefix)
            out.append(Target(f"flat_{prefix.split('@')[0]}", f"{what} cost flat (within 20 %) from 1k to 1M flows "
                              "(max/min of the ratio to the baseline)", v, 1.2, "<=", "x", detail + note))
    if "control" in sections:
        m = _find(sections, "control", "maglev_build@N=1000")
        out.append(Target("maglev_build", "Maglev build N=1000, M=65537 <= 2 ms", m.value if m else None, 2.0, "<=",
                          "ms", (f"median {m.value:.2f} ms, fastest {m.params.get('min_ms', float('nan')):.2f} ms "
                                 f"(Python checks/sort {m.params.get('prepare_ms', float('nan')):.2f} ms + Cython "
                                 f"fill {m.params.get('populate_ms', float('nan')):.2f} ms); paper 1.8 ms"
                                 if m else "not measured (quick runs build N <= 100)") + note))
        arr = _find(sections, "control", "flows_read@array")
        api = _find(sections, "control", "flows_read@api")
        best = arr or api
        detail = "; ".join(f"{x.name}: {x.value:.2f} s" for x in (arr, api) if x) or "not measured"
        out.append(Target("read_flows", "reading 1M flow entries <= 1 s", best.value if best else None, 1.0, "<=",
                          "s", detail + note))
        m = _find(sections, "control", "startup")
        out.append(Target("startup", "daemon startup (compile + load + attach + program) <= 3 s",
                          m.value if m else None, 3.0, "<=", "s",
                          (f"median {m.value:.2f} s" if m else "not measured") + note))
    if "breakdown" in sections:
        found = [m for m in (_find(sections, "breakdown", f"capture_unarmed:{c}") for c in ("hot", "pass")) if m]
        worst = max((m.params["overhead_ns"] for m in found), default=None)
        out.append(Target("capture_unarmed", "unarmed packet capture <= 2 ns/packet (xdpgw vs its build without "
                          "capture, hot flow hits and passes)", worst, 2.0, "<=", "ns",
                          ("; ".join(f"{m.name}: {m.params['overhead_ns']:+.2f} ns ({m.value:.1f} vs "
                                     f"{m.baseline_value:.1f} ns, x{m.ratio:.3f})" for m in found)
                           or "not measured") + note))
    for t in out:
        t.applicable = not quick
    return out


# xdpgw's class, the limit of its cost as a multiple of Katran's same class (steady state)
KATRAN_TARGETS = (("hit_udp_tunnel", 0.5, "flow hit, tunnel VM"), ("hit_udp_local", 0.45, "flow hit, local VM"),
                  ("hit_tcp_ack_tunnel", 0.5, "TCP ACK flow hit, tunnel VM"),
                  ("hit_tcp_ack_local", 0.45, "TCP ACK flow hit, local VM"),
                  ("new_udp_tunnel", 0.7, "new flow into a full table, tunnel VM"),
                  ("new_udp_local", 0.7, "new flow into a full table, local VM"))


def _katran_targets(sections: dict, note: str) -> list[Target]:
    skipped = sections["katran"].get("info", {}).get("katran")
    out = []
    for key, limit, what in KATRAN_TARGETS:
        m = _find(sections, "katran", f"{key}@steady")
        measured = m if m and m.baseline.startswith("Katran") else None
        detail = (f"{m.value:.0f} ns vs Katran's {m.baseline_value:.0f} ns (steady state; fresh: "
                  f"{_ratio_text(_find(sections, 'katran', f'{key}@fresh'))})" if measured
                  else (skipped if isinstance(skipped, str) else "not measured"))
        out.append(Target(f"katran_{key}", f"{what}: xdpgw <= {limit:g} x Katran's, steady state",
                          measured.ratio if measured else None, limit, "<=", "x", detail + note))
    return out


def _ratio_text(m: Measurement | None) -> str:
    return f"{m.value:.0f} vs {m.baseline_value:.0f} ns, {m.ratio:.2f}x" if m else "n/a"


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    a = abs(x)
    s = f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 0.1 else f"{x:.3f}"
    return s


def table(sections: dict, tgts: list[Target]) -> str:
    lines = []
    header = f"{'section':<10} {'measurement':<52} {'value':>9} {'unit':<7} {'baseline':<40} {'base':>9} {'ratio':>7}  ok"
    lines.append(header)
    lines.append("-" * len(header))
    for name, sec in sections.items():
        for m in sec.get("results", []):
            ok = m.checks.get("ok")
            oks = "" if ok is None else ("yes" if ok else "NO")
            lines.append(f"{name:<10} {m.name[:52]:<52} {_fmt(m.value):>9} {m.unit:<7} {m.baseline[:40]:<40} "
                         f"{_fmt(m.baseline_value):>9} {_fmt(m.ratio):>7}  {oks}")
    for name, sec in sections.items():
        skipped = sec.get("info", {}).get("katran") if name == "katran" else None
        if isinstance(skipped, str):
            lines.append(f"{name:<10} Katran {skipped}")
    lines.extend(_fleet_lines(sections))
    if tgts:
        lines.append("")
        lines.append("targets")
        lines.append("-" * 7)
        for t in tgts:
            met = {True: "MET", False: "MISSED", None: "n/a"}[t.met]
            lines.append(f"{met:<7} {t.goal}: measured {_fmt(t.measured)}{t.unit} (limit {t.comparison} "
                         f"{t.limit:g}{t.unit}) -- {t.detail}")
    return "\n".join(lines)


def _fleet_lines(sections: dict) -> list[str]:
    """Per fleet run, what the machine had to give: its CPU use, each kind of process's
    CPU seconds, the write rate held, and whether every process applied every move."""
    info = sections.get("fleet", {}).get("info", {})
    out = []
    for r in info.get("runs", []):
        cpu = ", ".join(f"{k} {v:.1f} s" for k, v in r["cpu_s"].items())
        out.append(f"{'fleet':<10} {r['processes']} processes: {r['migrations']} migrations at "
                   f"{r['achieved_rate']:.0f}/s, {r['converged']} applied by all (missing applies: "
                   f"{r['missing_applies']}); machine CPU {r['machine_busy'] * 100:.0f} % busy of {r['cpus']} CPUs "
                   f"over {r['run_s']:.1f} s (CPU: {cpu})")
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def document(sections: dict, tgts: list[Target], meta: dict) -> dict:
    return {
        "meta": meta,
        "sections": {name: {"results": [m.to_json() for m in sec.get("results", [])],
                            "info": sec.get("info", {}),
                            **({"error": sec["error"], "traceback": sec.get("traceback")} if "error" in sec else {})}
                     for name, sec in sections.items()},
        "targets": [t.to_json() for t in tgts],
    }


def meta(args_quick: bool, started: float, argv: list[str], cpu: int, prefix: str, notes: list[str]) -> dict:
    u = platform.uname()
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1), "quick": args_quick, "argv": argv,
            "kernel": u.release, "machine": u.machine, "cpus": os.cpu_count(), "bench_cpu": cpu,
            "git_commit": _git_commit(), "namespace_prefix": prefix, "notes": notes,
            "pktgen": os.path.exists("/proc/net/pktgen")}


def write(doc: dict, out_dir: str, started: float) -> list[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    text = json.dumps(doc, indent=1, default=_json_default) + "\n"
    paths = [out / f"{stamp}.json", out / "latest.json"]
    for path in paths:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return [str(p) for p in paths]


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)

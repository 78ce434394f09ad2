"""PNG plots of a run's curves (matplotlib, Agg backend), written next to the JSON."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rows(sections: dict, section: str) -> list:
    return sections.get(section, {}).get("results", [])


def per_packet(sections: dict, out: Path) -> Path | None:
    rows = [m for m in _rows(sections, "per_packet") if "@" not in m.key or m.key.endswith("@repeat")]
    if not rows:
        return None
    plt = _plt()
    rotated = [m for m in rows if "@" not in m.key]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rotated) + 1.5))
    names = [m.name for m in rotated]
    ax.barh(names, [m.value for m in rotated], color=["#999" if m.key.startswith("xdp_") else "#3a7"
                                                      for m in rotated])
    rep = {m.key.split("@")[0]: m.value for m in rows if m.key.endswith("@repeat")}
    fresh = {m.key.split("@")[0]: m.value for m in _rows(sections, "per_packet") if m.key.endswith("@fresh")}
    for i, m in enumerate(rotated):
        ax.text(m.value, i, f" {m.value:.0f} ns ({m.ratio:.1f}x)", va="center", fontsize=8)
        if m.key in rep:
            ax.plot(rep[m.key], i, "k|", markersize=14)
        if m.key in fresh:
            ax.plot(fresh[m.key], i, "o", color="#135", markersize=4)
    ax.axvline(rotated[0].baseline_value, color="#c33", linestyle="--", linewidth=1, label="minimal redirect")
    ax.invert_yaxis()
    ax.set_xlabel("ns per packet (bars: rotated, steady-state table; o = fresh table; | = same frame repeated)")
    ax.set_title("xdpgw per-packet cost by class (BPF_PROG_RUN)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(plt, fig, out / "per_packet.png")


def vs_katran(sections: dict, out: Path) -> Path | None:
    """Per-packet cost by class: xdpgw (tunnel VM, local VM) beside Katran when it was
    measured; steady state as bars, fresh tables as dots."""
    rows = {m.key: m for m in _rows(sections, "katran")}
    if not rows:
        return None
    import numpy as np

    plt = _plt()
    groups = (("flow hit (UDP)", "hit_udp_tunnel", "hit_udp_local", "katran_hit_udp"),
              ("flow hit, TCP ACK", "hit_tcp_ack_tunnel", "hit_tcp_ack_local", "katran_hit_tcp_ack"),
              ("new flow, full table", "new_udp_tunnel", "new_udp_local", "katran_new_udp"))
    series = (("xdpgw, tunnel VM", 1, "#3a7"), ("xdpgw, local VM", 2, "#7c9"), ("Katran", 3, "#57a"))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    x = np.arange(len(groups))
    width = 0.27
    for j, (label, col, color) in enumerate(series):
        steady = [rows.get(f"{g[col]}@steady") for g in groups]
        fresh = [rows.get(f"{g[col]}@fresh") for g in groups]
        if not any(steady):
            continue
        pos = x + (j - 1) * width
        ax.bar(pos, [m.value if m else 0 for m in steady], width, color=color, label=f"{label}, steady state")
        ax.plot(pos, [m.value if m else np.nan for m in fresh], "o", color="#222", markersize=4)
        for px, m in zip(pos, steady):
            if m:
                ax.text(px, m.value, f"{m.value:.0f}", ha="center", va="bottom", fontsize=7)
    redirect = rows.get("xdp_redirect_min@steady")
    if redirect:
        ax.axhline(redirect.value, color="#c33", linestyle="--", linewidth=1, label="minimal redirect")
    ax.plot([], [], "o", color="#222", markersize=4, label="fresh table")
    ax.set_xticks(x)
    ax.set_xticklabels([g[0] for g in groups])
    ax.set_ylabel("ns per packet (rotated, BPF_PROG_RUN)")
    skipped = sections["katran"].get("info", {}).get("katran")
    ax.set_title("xdpgw beside Katran" + (" (Katran skipped: no checkout given)" if isinstance(skipped, str)
                                          else ""))
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "katran.png")


def scaling(sections: dict, out: Path) -> list[Path]:
    rows = _rows(sections, "scaling")
    if not rows:
        return []
    plt = _plt()
    paths = []
    for dim, label, fname in (("flows", "flow-table entries", "scaling_flows.png"),
                              ("vms", "VMs per service", "scaling_vms.png")):
        sel = [m for m in rows if f"@{dim}=" in m.key]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, style in (("hit", "o-"), ("new", "s-")):
            pts = sorted((m.params[dim], m.value, m.baseline_value) for m in sel if m.key.startswith(kind + "@"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label="flow-table hit" if kind == "hit" else "new flow")
        base = sorted((m.params[dim], m.baseline_value) for m in sel if m.key.startswith("hit@"))
        if base:
            ax.plot([b[0] for b in base], [b[1] for b in base], "--", color="#c33", label="minimal redirect")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("ns per packet")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"xdpgw per-packet cost vs {label}")
        paths.append(_save(plt, fig, out / fname))
    return paths


def e2e(sections: dict, out: Path) -> Path | None:
    rows = [m for m in _rows(sections, "e2e") if m.key.startswith("mpps@")]
    two = {m.key.split("@")[0]: m for m in _rows(sections, "e2e") if m.key.startswith("mpps_2cpu")}
    if not rows:
        return None
    plt = _plt()
    pts = sorted((m.params["flows"], m.value, m.baseline_value) for m in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="xdpgw")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", color="#c33", label="minimal redirect gateway")
    ax.plot([p[0] for p in pts], [0.75 * p[2] for p in pts], ":", color="#c33", alpha=0.6, label="0.75 x baseline")
    for key, marker, label in (("mpps_2cpu", "^", "xdpgw, 2 CPUs"),
                               ("mpps_2cpu_baseline", "v", "minimal redirect, 2 CPUs")):
        if key in two:
            m = two[key]
            ax.plot([m.params["flows_per_cpu"]], [m.value], marker, color="#3a7" if key == "mpps_2cpu" else "#c33",
                    label=f"{label} ({m.ratio:.2f}x one CPU)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("flows (per CPU)")
    ax.set_ylabel("delivered Mpps")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("end to end over veth: client -> gateway -> VMs")
    return _save(plt, fig, out / "e2e.png")


def maglev(sections: dict, out: Path) -> Path | None:
    rows = [m for m in _rows(sections, "control") if m.key.startswith("maglev_build@")]
    if not rows:
        return None
    plt = _plt()
    pts = sorted((m.params["n"], m.value, m.baseline_value) for m in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="Cython build_table")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", color="#c33", label="pure-Python reference")
    if rows[0].params.get("paper_ms"):
        ax.axhline(rows[0].params["paper_ms"], color="#888", linestyle=":", label="NSDI'16: 1.8 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("VMs (N)")
    ax.set_ylabel("ms per table")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Maglev table build, M={rows[0].params['m']}")
    return _save(plt, fig, out / "maglev.png")


def breakdown(sections: dict, out: Path) -> Path | None:
    rows = _rows(sections, "breakdown")
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(12, 0.4 * len(rows) + 1.5))
    ax.barh([m.name for m in rows], [m.value for m in rows],
            color=["#3a7" if m.key.startswith("variant:") else "#57a" for m in rows])
    for i, m in enumerate(rows):
        ax.text(m.value, i, f" {m.value:.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ns per packet")
    ax.set_title("xdpgw variants (green) and map primitives (blue)")
    return _save(plt, fig, out / "breakdown.png")


def fleet(sections: dict, out: Path) -> Path | None:
    """Convergence of each migration over the run's time, p50 and p99 per time bin,
    one pair of lines per fleet size (processes following the store)."""
    runs = [r for r in sections.get("fleet", {}).get("info", {}).get("runs", []) if r.get("timeline")]
    if not runs:
        return None
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = ("#3a7", "#57a", "#c33", "#a6c", "#888")
    for r, color in zip(runs, colors):
        t = np.array([p[0] for p in r["timeline"]])
        c = np.array([p[1] for p in r["timeline"]])
        ax.plot(t, c, ".", color=color, alpha=0.15, markersize=3)
        edges = np.linspace(0, t.max() + 1e-9, 21)
        mids, p50, p99 = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = c[(t >= lo) & (t < hi)]
            if sel.size:
                mids.append((lo + hi) / 2)
                p50.append(np.percentile(sel, 50))
                p99.append(np.percentile(sel, 99))
        label = f"{r['processes']} processes ({r['gateways']} gateways + {r['watchers']} watchers)"
        ax.plot(mids, p50, "-", color=color, label=f"p50, {label}")
        ax.plot(mids, p99, "--", color=color, label=f"p99, {label}")
    info = sections["fleet"]["info"]
    ax.set_xlabel(f"migration time (s since the first write; {info.get('rate_per_s', 0):.0f} migrations/s)")
    ax.set_ylabel("convergence (ms): write start -> last process applied")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"VM migrations through etcd, {info.get('vms')} VMs, {info.get('cpus')} CPUs")
    return _save(plt, fig, out / "fleet.png")


def draw_all(sections: dict, out_dir: str) -> list[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fn in (per_packet, vs_katran, e2e, maglev, breakdown, fleet):
        p = fn(sections, out)
        if p:
            paths.append(str(p))
    paths.extend(str(p) for p in scaling(sections, out))
    return paths

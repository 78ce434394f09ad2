"""Readable rendering of `xdpgw stats` (counters with the daemon's rates) and of
`xdpgw vm list` (state, health, last probe, time in state)."""
from __future__ import annotations

import time
from typing import Any


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def probe_text(probe: dict | None, now: float | None = None) -> str:
    """`ok tcp 198.18.101.2:8080 connected 0.2ms, 0.4s ago` or `never probed`."""
    if not probe:
        return "never probed"
    now = time.time() if now is None else now
    rtt = f" {probe['rtt_ms']:.1f}ms" if probe.get("rtt_ms") is not None else ""
    check = f"{probe['check']} " if probe.get("check") else ""
    return (f"{'ok' if probe['ok'] else 'FAIL'} {check}{probe['detail']}{rtt}, "
            f"{duration(max(0.0, now - probe['at']))} ago")


def vm_status_text(vm: dict, now: float | None = None) -> str:
    """State (with the admin state when it differs), health, time in state, last probe."""
    state = vm["state"] if vm.get("admin_state", vm["state"]) == vm["state"] else \
        f"{vm['state']} (admin {vm['admin_state']})"
    return (f"{state:<9} health {vm.get('health', 'unknown'):<7} for {duration(vm.get('in_state_s', 0.0))}; "
            f"last probe {probe_text(vm.get('last_probe'), now)}")


def render_vm_line(vm: dict) -> str:
    where = f"port {vm['port']} mac {vm['mac']}" if vm.get("port") else f"tunnel {vm['tunnel']}"
    return (f"{vm['name']:<12} id {vm['id']:<5} weight {vm['weight']:<3} {vm_status_text(vm)}; {where}")


def _rate(rates: dict, section: str, name: str) -> str:
    r = rates.get(section, {}).get(name)
    if not r:
        return f"{'-':>10} {'-':>12}"
    return f"{r['pps']:>10.1f} {r['bps'] / 1e6:>12.3f}"


def render(stats: dict[str, Any]) -> str:
    rates = stats.get("rates", {})
    lines = [f"{'':<22}{'packets':>12} {'bytes':>14} {'pps':>10} {'Mbit/s':>12}"]
    for section, title in (("regions", "region"), ("services", "service"), ("vms", "vm")):
        for name, c in stats[section].items():
            extra = ""
            if section == "services":
                extra = f"  new flows {c['new_flows']}"
            elif section == "vms":
                extra = f"  {vm_status_text(c)}"
            lines.append(f"{title + ' ' + name:<22}{c['packets']:>12} {c['bytes']:>14} "
                         f"{_rate(rates, section, name)}{extra}")
    f = stats["flows"]
    lines.append(f"flows: {f['entries']} entries, {f['hits']} hits, {f['misses']} misses")
    drops = {k: v for k, v in stats["drops"].items() if v}
    lines.append("drops: " + (", ".join(f"{k} {v}" for k, v in drops.items()) if drops else "none"))
    health = stats.get("health")
    if health and health.get("checks"):
        vms = health.get("vms", {})
        line = (f"health: {health['checks']} checks, {health['probes']} probes ({health['failed_probes']} failed); "
                f"VMs up {vms.get('up', 0)}, down {vms.get('down', 0)}, unknown {vms.get('unknown', 0)}")
        rebuild = health.get("last_rebuild")
        if rebuild:
            line += (f"; last table rebuild {duration(max(0.0, time.time() - rebuild['at']))} ago "
                     f"({', '.join(rebuild['services'])}: {rebuild['total_ms']:.1f} ms)")
        lines.append(line)
    lines += monitor_lines(stats.get("monitor"))
    return "\n".join(lines)


def monitor_lines(monitor: dict | None) -> list[str]:
    """`monitor: region r1 HEAVY 1234.0 pps 0.987 Mbit/s (heavy over 500 pps / - Mbit/s, clear under 250 / -)`."""
    if not monitor:
        return []
    def th(v: float | None, scale: float = 1.0) -> str:
        return "-" if v is None else f"{v / scale:g}"
    lines = [f"monitor: every {monitor['interval']:g} s, {monitor['intervals']} intervals to change state"]
    for name, r in monitor["regions"].items():
        t = r["thresholds"]
        lines.append(f"  region {name:<10} {r['state'].upper() if r['state'] == 'heavy' else r['state']:<7}"
                     f"{r['pps']:>10.1f} pps {r['bps'] / 1e6:>9.3f} Mbit/s (smoothed; heavy over "
                     f"{th(t['heavy_pps'])} pps / {th(t['heavy_bps'], 1e6)} Mbit/s, clear under "
                     f"{th(t['clear_pps'])} / {th(t['clear_bps'], 1e6)}; streak {r['streak']})")
    for name, c in (monitor.get("center") or {}).items():
        lines.append(f"  center: region {name} {c['event']} -> {'ok' if c['ok'] else 'FAILED: ' + str(c['error'])}")
    return lines

"""Readable rendering of `xdpgw stats`: counters with the daemon's rates."""
from __future__ import annotations

from typing import Any


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
                extra = f"  {c['state']}"
            lines.append(f"{title + ' ' + name:<22}{c['packets']:>12} {c['bytes']:>14} "
                         f"{_rate(rates, section, name)}{extra}")
    f = stats["flows"]
    lines.append(f"flows: {f['entries']} entries, {f['hits']} hits, {f['misses']} misses")
    drops = {k: v for k, v in stats["drops"].items() if v}
    lines.append("drops: " + (", ".join(f"{k} {v}" for k, v in drops.items()) if drops else "none"))
    return "\n".join(lines)

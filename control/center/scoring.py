"""Target search: every candidate data center gets a score in [0, 1] per factor;
the total is the weighted mean. Factors are pluggable (`@factor("name")`); weights
come from the center's config ([weights], missing = 1.0, 0 = off).

Hard rules first (a candidate that breaks one is not scored, and `explain` says why):
not the source data center, an agent to call, free capacity for the VMs asked for.
"""
from __future__ import annotations

import math
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

EARTH_KM = 6371.0


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


@dataclass
class Context:
    """What the factors see: the heavy region, the source data center, all candidates, the time."""
    region: dict            # {name, lat, lon, users}
    source: dict | None     # the source data center (dict of store.datacenter)
    candidates: list[dict]
    vms: int
    now: datetime


Factor = Callable[[Context, dict], tuple[float, str]]
FACTORS: dict[str, Factor] = {}


def factor(name: str) -> Callable[[Factor], Factor]:
    """Register a factor: f(context, datacenter) -> (score in [0, 1], the raw value as text)."""
    def register(f: Factor) -> Factor:
        FACTORS[name] = f
        return f
    return register


@factor("location")
def _location(ctx: Context, dc: dict) -> tuple[float, str]:
    """Near the heavy region: 1 at 0 km, 0.5 at 1000 km."""
    d = distance_km(ctx.region["lat"], ctx.region["lon"], dc["lat"], dc["lon"])
    return 1 / (1 + d / 1000), f"{d:.0f} km from region"


@factor("timezone")
def _timezone(ctx: Context, dc: dict) -> tuple[float, str]:
    """Off-peak local time: 1 at 03:00 local, 0 at 15:00 (cosine in between)."""
    local = ctx.now.astimezone(zoneinfo.ZoneInfo(dc["timezone"]))
    hour = local.hour + local.minute / 60
    return (1 + math.cos(2 * math.pi * (hour - 3) / 24)) / 2, f"{local:%H:%M} local"


@factor("transmit")
def _transmit(ctx: Context, dc: dict) -> tuple[float, str]:
    """Transmit rate relative to the best candidate's."""
    best = max((c["transmit_mbps"] for c in ctx.candidates), default=0) or 1
    return dc["transmit_mbps"] / best, f"{dc['transmit_mbps']:g} Mbit/s"


@factor("distance")
def _distance(ctx: Context, dc: dict) -> tuple[float, str]:
    """Distance to the users, compared with being served at home: the extra kilometres the
    region's users' traffic travels (1 when none, 0.5 at 1000 km more)."""
    d = distance_km(ctx.region["lat"], ctx.region["lon"], dc["lat"], dc["lon"])
    home = d if ctx.source is None else distance_km(ctx.region["lat"], ctx.region["lon"],
                                                    ctx.source["lat"], ctx.source["lon"])
    extra = max(0.0, d - home)
    return 1 / (1 + extra / 1000), f"+{extra:.0f} km for users"


@factor("capacity")
def _capacity(ctx: Context, dc: dict) -> tuple[float, str]:
    """Free share of the data center's capacity after the new VMs."""
    free = dc["capacity"] - dc["load"] - ctx.vms
    return max(0.0, free / dc["capacity"]) if dc["capacity"] else 0.0, f"{free} VMs free after"


@factor("latency")
def _latency(ctx: Context, dc: dict) -> tuple[float, str]:
    """Network latency: 1 at 0 ms, 0.5 at 20 ms."""
    return 1 / (1 + dc["latency_ms"] / 20), f"{dc['latency_ms']:g} ms"


def exclusion(ctx: Context, dc: dict) -> str | None:
    if ctx.source is not None and dc["name"] == ctx.source["name"]:
        return "source data center"
    if not dc.get("agent"):
        return "no agent"
    if dc["capacity"] - dc["load"] < ctx.vms:
        return f"not enough free capacity ({dc['capacity'] - dc['load']} < {ctx.vms} VMs)"
    return None


def score(ctx: Context, weights: dict[str, float]) -> list[dict]:
    """Every data center, best first: {name, eligible, excluded, total, factors: {f: {score, weight, value}}}."""
    rows = []
    for dc in ctx.candidates:
        why = exclusion(ctx, dc)
        row = {"name": dc["name"], "eligible": why is None, "excluded": why, "total": None, "factors": {}}
        if why is None:
            total = wsum = 0.0
            for name, f in FACTORS.items():
                w = weights.get(name, 1.0)
                s, value = f(ctx, dc)
                s = min(1.0, max(0.0, s))
                row["factors"][name] = {"score": round(s, 4), "weight": w, "value": value}
                total += w * s
                wsum += w
            row["total"] = round(total / wsum, 4) if wsum else 0.0
        rows.append(row)
    rows.sort(key=lambda r: (not r["eligible"], -(r["total"] or 0), r["name"]))
    return rows


def now_utc() -> datetime:
    return datetime.now(timezone.utc)

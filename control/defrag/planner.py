"""Tenant defragmentation: bring each tenant's chatty VMs onto the same host.

- traffic_matrix: the VM port watcher's (sender MAC, destination IP) byte
  counters turned into bytes per (source VM, destination VM);
- fragmentation: per tenant, the share of its VM-to-VM bytes that crosses hosts
  (pairs of VMs of different tenants do not count);
- plan: greedy local search over single-VM moves under host capacities (VMs per
  host): repeatedly take the move that removes the most cross-host bytes, until
  none removes any or `max_moves` VMs have moved; the result is ordered so every
  step fits the capacities at the time it runs.

Pure functions; the daemon feeds them the live counters, registry and [[host]]
config, and executes a plan through the migration path."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

Matrix = Mapping[tuple[str, str], int]        # (src VM, dst VM) -> bytes
DEFAULT_MAX_MOVES = 16


@dataclass(frozen=True)
class Move:
    vm: str
    src: str          # host
    dst: str          # host
    gain: int         # cross-host bytes removed (at the time it was chosen)


def traffic_matrix(pair_bytes: Mapping[tuple[str, str], int], vm_macs: Mapping[str, str],
                   vm_ips: Mapping[str, Sequence[str]]) -> dict[tuple[str, str], int]:
    """{(sender MAC, dst IP): bytes} -> {(src VM, dst VM): bytes}, a VM reached at any of
    its addresses (`vm_ips`: VM -> addresses); unknown ends are dropped."""
    by_mac = {mac.lower(): vm for vm, mac in vm_macs.items() if mac}
    by_ip = {ip: vm for vm, ips in vm_ips.items() for ip in ips}
    out: dict[tuple[str, str], int] = {}
    for (mac, ip), b in pair_bytes.items():
        src, dst = by_mac.get(mac.lower()), by_ip.get(ip)
        if src and dst and src != dst:
            out[(src, dst)] = out.get((src, dst), 0) + int(b)
    return out


def _tenant_pairs(matrix: Matrix, tenants: Mapping[str, str | None]) -> dict[tuple[str, str], int]:
    """Undirected intra-tenant pair weights {(a, b) a < b: bytes both ways}."""
    out: dict[tuple[str, str], int] = {}
    for (a, b), w in matrix.items():
        ta, tb = tenants.get(a), tenants.get(b)
        if ta is None or ta != tb or a == b:
            continue
        key = (a, b) if a < b else (b, a)
        out[key] = out.get(key, 0) + int(w)
    return out


def fragmentation(matrix: Matrix, placement: Mapping[str, str], tenants: Mapping[str, str | None]) -> dict[str, Any]:
    """{tenant: {total, cross, share}} and the overall figures under "all"."""
    per: dict[str, dict[str, Any]] = {}
    for (a, b), w in _tenant_pairs(matrix, tenants).items():
        t = per.setdefault(tenants[a], {"total": 0, "cross": 0})
        t["total"] += w
        if placement.get(a) != placement.get(b):
            t["cross"] += w
    total = sum(t["total"] for t in per.values())
    cross = sum(t["cross"] for t in per.values())
    for t in per.values():
        t["share"] = round(t["cross"] / t["total"], 6) if t["total"] else 0.0
    return {"tenants": dict(sorted(per.items())),
            "all": {"total": total, "cross": cross, "share": round(cross / total, 6) if total else 0.0}}


def _cross(pairs: Mapping[tuple[str, str], int], placement: Mapping[str, str]) -> int:
    return sum(w for (a, b), w in pairs.items() if placement[a] != placement[b])


def plan(matrix: Matrix, placement: Mapping[str, str], tenants: Mapping[str, str | None], capacity: Mapping[str, int],
         max_moves: int = DEFAULT_MAX_MOVES, movable: Iterable[str] | None = None) -> dict[str, Any]:
    """A migration plan: {"moves": [Move...], "before": fragmentation, "after": fragmentation,
    "reduction": cross-host bytes removed, "share_before", "share_after"}.

    `placement`: VM -> host for every VM that occupies a host (all count against
    capacity); `capacity`: host -> max VMs. Only VMs in `movable` (default: all
    placed VMs with a tenant) move; each moves at most once."""
    origin = dict(placement)
    pairs = _tenant_pairs(matrix, tenants)
    neighbours = _neighbours(pairs)
    candidates = set(movable) if movable is not None else {v for v in origin if tenants.get(v) is not None}
    moves = _greedy(origin, neighbours, candidates & set(neighbours), capacity, max_moves)
    ordered = _order(moves, origin, capacity)
    place = dict(origin)          # what the executable moves achieve (a swap between full hosts may not be)
    for m in ordered:
        place[m.vm] = m.dst
    before = fragmentation(matrix, origin, tenants)
    after = fragmentation(matrix, place, tenants)
    return {"moves": ordered, "before": before, "after": after,
            "reduction": _cross(pairs, origin) - _cross(pairs, place),
            "share_before": before["all"]["share"], "share_after": after["all"]["share"],
            "feasible": len(ordered) == len(moves)}


def _neighbours(pairs: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """VM -> {same-tenant peer: bytes both ways}."""
    neighbours: dict[str, dict[str, int]] = {}
    for (a, b), w in pairs.items():
        neighbours.setdefault(a, {})[b] = neighbours.setdefault(a, {}).get(b, 0) + w
        neighbours.setdefault(b, {})[a] = neighbours.setdefault(b, {}).get(a, 0) + w
    return neighbours


def _load(placement: Mapping[str, str], capacity: Mapping[str, int]) -> dict[str, int]:
    """Host -> VMs on it, for the hosts with a capacity."""
    load = {h: 0 for h in capacity}
    for h in placement.values():
        if h in load:
            load[h] += 1
    return load


def _greedy(placement: Mapping[str, str], neighbours: Mapping[str, Mapping[str, int]], candidates: set[str],
            capacity: Mapping[str, int], max_moves: int) -> list[Move]:
    """Repeatedly the best move that fits the capacities now (see _best_move), until
    none removes cross-host bytes or `max_moves` VMs have moved; each VM moves at most once."""
    place = dict(placement)
    load = _load(place, capacity)
    moved: set[str] = set()
    moves: list[Move] = []
    while len(moved) < max(0, int(max_moves)):
        best = _best_move(place, load, neighbours, candidates - moved, capacity, max_moves - len(moved))
        if best is None:
            break
        g, group, h = best
        for v in group:
            if place[v] == h:
                continue
            load[place[v]] -= 1
            load[h] += 1
            moves.append(Move(v, place[v], h, g if v == group[0] else 0))
            place[v] = h
            moved.add(v)
    return moves


def _best_move(place: Mapping[str, str], load: Mapping[str, int], neighbours: Mapping[str, Mapping[str, int]],
               free: set[str], capacity: Mapping[str, int], room: int) -> tuple[int, tuple[str, ...], str] | None:
    """(gain, VMs, host) of the best move of one free VM, or of one together with its
    chattiest free same-tenant peer (two VMs may have to leave together for a host
    where both fit) when `room` allows two more moves; None if no move gains."""
    best: tuple[int, tuple[str, ...], str] | None = None
    for vm in sorted(free):
        groups = [(vm,)]
        peers = [o for o in sorted(neighbours.get(vm, {}), key=lambda o: -neighbours[vm][o]) if o in free]
        if peers and room >= 2:
            groups.append((vm, peers[0]))
        for group in groups:
            for h in sorted(capacity):
                arriving = sum(1 for v in group if place[v] != h)
                if arriving == 0 or load[h] + arriving > capacity[h]:
                    continue
                g = _gain(group, h, place, neighbours)
                # a pair move must beat what its first VM gains alone
                if g > 0 and (best is None or g > best[0] or (g == best[0] and len(group) < len(best[1]))):
                    best = (g, group, h)
    return best


def _gain(group: tuple[str, ...], host: str, place: Mapping[str, str],
          neighbours: Mapping[str, Mapping[str, int]]) -> int:
    """Cross-host bytes removed by moving every VM of `group` to `host`."""
    new = {v: host for v in group}
    g = 0
    seen = set()
    for v in group:
        for other, w in neighbours.get(v, {}).items():
            key = (v, other) if v < other else (other, v)
            if key in seen:
                continue
            seen.add(key)
            before = place[v] != place[other]
            after = new.get(v, place[v]) != new.get(other, place[other])
            g += w * (before - after)
    return g


def _order(moves: list[Move], placement: Mapping[str, str], capacity: Mapping[str, int]) -> list[Move]:
    """Moves in an order that never overfills a host; moves caught in a cycle of
    full hosts (a swap between two full hosts) are left out."""
    load = _load(placement, capacity)
    pending, out = list(moves), []
    while pending:
        for m in pending:
            if load[m.dst] < capacity[m.dst]:
                load[m.dst] += 1
                load[m.src] -= 1
                out.append(m)
                pending.remove(m)
                break
        else:
            break
    return out


def describe(p: dict[str, Any]) -> str:
    lines = [f"defrag plan: {len(p['moves'])} move(s); cross-host share "
             f"{p['share_before']:.1%} -> {p['share_after']:.1%} (expected reduction {p['reduction']} bytes)"]
    for m in p["moves"]:
        mv = m if isinstance(m, dict) else m.__dict__
        lines.append(f"  {mv['vm']}: {mv['src']} -> {mv['dst']}")
    for name, t in p["before"]["tenants"].items():
        after = p["after"]["tenants"].get(name, t)
        lines.append(f"  tenant {name}: {t['share']:.1%} -> {after['share']:.1%} of {t['total']} bytes cross hosts")
    return "\n".join(lines)

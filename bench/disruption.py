"""How much does a VM failure disturb? `python -m bench.disruption`.

N VMs serve a service with a Maglev table of M slots; k of them fail. Printed:

* table entries that change: all of them, the failed VMs' own (they must
  change), and the others, which change only because Maglev's permutations
  shift when the failed VMs leave: the extra churn. The Maglev paper (NSDI'16,
  its resilience experiment) puts that at about 2.3 % for M = 65537 when 1 % of
  backends fail;
* flows (random 5-tuples hashed exactly as the dataplane does) that change VM:
  on a gateway without flow state (what another gateway sees of a flow whose
  packets ECMP now sends to it, and every new flow) the table's churn shows
  through; with the flow table only the failed VMs' flows move, since a flow
  keeps its recorded VM while that VM is up;
* the time to build the new table (Cython), the part of a failure's handling
  that grows with N.

Everything here is the real builder (control.maglev) and the real flow hash
(dataplane.flowhash); nothing is sent anywhere.
"""
from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from dataplane.flowhash import flow_hash_many
from control.maglev import build_table

PAPER_CHURN = 0.023     # Maglev (NSDI'16), resilience to backend changes: M = 65537, 1 % removed


def backends(n: int) -> list[tuple[str, int, int]]:
    return [(f"vm{i:04d}", i + 1, 1) for i in range(n)]


def random_flows(count: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """`count` TCP flows to port 8080 from random IPv4 sources in 198.18.0.0/15,
    in the dataplane's 16-byte address form."""
    addrs = np.zeros((count, 16), dtype=np.uint8)
    addrs[:, 10:12] = 0xFF
    addrs[:, 12] = 198
    addrs[:, 13] = 18 + rng.integers(0, 2, count)
    addrs[:, 14:16] = rng.integers(0, 256, (count, 2))
    sports = rng.integers(1024, 65536, count).astype(np.uint16)
    dports = np.full(count, 8080, dtype=np.uint16)
    protos = np.full(count, socket.IPPROTO_TCP, dtype=np.uint8)
    return addrs, sports, dports, protos


def trial(n: int, m: int, k: int, seed: int, flows: int, hash_seed: int = 0) -> dict:
    """One failure of k random VMs out of n: fractions of entries and of flows that change."""
    rng = random.Random(seed)
    all_vms = backends(n)
    failed = sorted(rng.sample(range(1, n + 1), k))
    failed_ids = np.array(failed, dtype=np.uint32)
    survivors = [b for b in all_vms if b[1] not in set(failed)]
    before = build_table(all_vms, m, hash_seed)
    t0 = time.perf_counter()
    after = build_table(survivors, m, hash_seed)
    build_ms = (time.perf_counter() - t0) * 1000
    changed = before != after
    own = np.isin(before, failed_ids)
    out = {
        "failed": failed,
        "entries_changed": float(changed.mean()),
        "entries_failed_own": float(own.mean()),
        "entries_changed_beyond_failed": float((changed & ~own).mean()),
        "build_ms": build_ms,
    }
    if flows:
        addrs, sports, dports, protos = random_flows(flows, np.random.default_rng(seed))
        slots = flow_hash_many(addrs, sports, dports, protos, hash_seed) % m
        vm_before, vm_after = before[slots], after[slots]
        on_failed = np.isin(vm_before, failed_ids)
        # With the flow table a flow keeps its VM unless that VM is down; then Maglev re-selects.
        vm_with_state = np.where(on_failed, vm_after, vm_before)
        out.update({
            "flows": flows,
            "flows_moved_without_state": float((vm_before != vm_after).mean()),
            "flows_moved_with_flow_table": float((vm_before != vm_with_state).mean()),
            "flows_on_failed_vms": float(on_failed.mean()),
            "healthy_flows_moved_with_flow_table": int(((vm_before != vm_with_state) & ~on_failed).sum()),
        })
    return out


def measure(n: int = 1000, m: int = 65537, k: int = 10, trials: int = 10, flows: int = 200_000,
            hash_seed: int = 0) -> dict:
    runs = [trial(n, m, k, seed, flows, hash_seed) for seed in range(trials)]

    def stat(key: str) -> dict:
        values = [r[key] for r in runs]
        return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}

    keys = ["entries_changed", "entries_failed_own", "entries_changed_beyond_failed", "build_ms"]
    if flows:
        keys += ["flows_moved_without_state", "flows_moved_with_flow_table", "flows_on_failed_vms"]
    return {"n": n, "m": m, "k": k, "trials": trials, "flows": flows, **{key: stat(key) for key in keys},
            "healthy_flows_moved_with_flow_table": sum(r.get("healthy_flows_moved_with_flow_table", 0)
                                                       for r in runs)}


def report(r: dict) -> str:
    def pct(key: str) -> str:
        s = r[key]
        return f"{100 * s['mean']:6.3f} %  (min {100 * s['min']:.3f}, max {100 * s['max']:.3f})"

    lines = [
        f"Maglev disruption: N = {r['n']} VMs, M = {r['m']}, k = {r['k']} fail "
        f"({100 * r['k'] / r['n']:.1f} %), {r['trials']} random failure sets",
        f"  table entries changed, all             {pct('entries_changed')}",
        f"    of which the failed VMs' own          {pct('entries_failed_own')}",
        f"    beyond the failed VMs' own (churn)    {pct('entries_changed_beyond_failed')}",
        f"  Maglev paper (NSDI'16), M = 65537, 1 % of backends fail: about {100 * PAPER_CHURN:.1f} % churn",
    ]
    if r["flows"]:
        lines += [
            f"  flows changing VM ({r['flows']} random flows per trial):",
            f"    without flow state (new flows; a gateway that never saw the flow) {pct('flows_moved_without_state')}",
            f"    with the flow table (established flows)                          "
            f"{pct('flows_moved_with_flow_table')}",
            f"    flows that were on the failed VMs                                {pct('flows_on_failed_vms')}",
            f"    flows on healthy VMs moved with the flow table: {r['healthy_flows_moved_with_flow_table']}",
        ]
    b = r["build_ms"]
    lines.append(f"  new table built (Cython) in {b['mean']:.2f} ms (min {b['min']:.2f}, max {b['max']:.2f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disruption", description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=1000, help="N (default 1000)")
    ap.add_argument("--m", type=int, default=65537, help="Maglev table size, prime (default 65537)")
    ap.add_argument("--fail", type=int, default=None, help="k VMs that fail (default 1 %% of N)")
    ap.add_argument("--trials", type=int, default=10, help="random failure sets (default 10)")
    ap.add_argument("--flows", type=int, default=200_000, help="random flows per trial (default 200000)")
    args = ap.parse_args(argv)
    k = args.fail if args.fail is not None else max(1, args.vms // 100)
    if not (0 < k < args.vms and 0 < args.trials <= 1000 and 0 <= args.flows <= 10_000_000):
        ap.error("need 0 < fail < vms, 1..1000 trials, 0..10^7 flows")
    print(report(measure(args.vms, args.m, k, args.trials, args.flows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

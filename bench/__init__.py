"""xdpgw benchmarks: `python -m bench` (make bench). See bench/README.md.

Sections (run in this order; `--only NAME` picks some):

  per_packet  ns/packet per packet class through xdpgw (BPF_PROG_RUN)
  katran      xdpgw beside Katran's balancer (--katran-src DIR), fresh and steady
  scaling     flow-hit / new-flow cost vs flow-table size and VMs per service
  e2e         delivered Mpps over veth namespaces, xdpgw vs a minimal gateway
  control     Maglev build, table swap, counter folding, flow reads, startup
  breakdown   where xdpgw's per-packet time goes: variants, map primitives, perf
  metrics     a Prometheus scrape of a gateway with 1k regions and 1M flows
  fleet       migrations through a 3-member etcd, applied by 8 daemons + watchers
  ab          this tree's XDP program beside another build of it (--ab-ebpf DIR)

Every figure is reported with a baseline measured in the same run and the
ratio to it."""
from __future__ import annotations

SECTIONS = ("per_packet", "katran", "scaling", "e2e", "control", "breakdown", "metrics", "fleet", "ab")
MODULES = {"per_packet": "perpacket", "katran": "katran", "scaling": "scaling", "e2e": "e2e",
           "control": "controlplane", "breakdown": "breakdown", "metrics": "metrics",
           "fleet": "fleet", "ab": "ab"}


def run(sections=SECTIONS, quick: bool = False, out_dir: str = "bench/results", **options):
    """Run sections in-process; returns the results document (also written to out_dir)."""
    from .__main__ import run_sections

    return run_sections(list(sections), quick=quick, out_dir=out_dir, **options)

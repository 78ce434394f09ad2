"""`python -m bench [--quick] [--only NAME ...] [--out DIR]`: run the benchmarks,
print the table, write bench/results/<timestamp>.json and latest.json, draw
the PNG plots. Must run as root (BPF, namespaces). See bench/README.md."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import traceback

from . import MODULES, SECTIONS
from .common import Context, Progress


class Terminated(Exception):
    """SIGTERM: unwind like Ctrl-C so every `finally` removes what it built."""


_MAIN_PID = os.getpid()


def _on_sigterm(signum, frame):
    if os.getpid() != _MAIN_PID:
        # a forked helper (pyroute2's netns helper, a namespace child): die as
        # SIGTERM normally makes a process die, without unwinding our stack
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated(f"signal {signum}")


def run_sections(sections: list[str], quick: bool = False, out_dir: str = "bench/results", vms: int = 2,
                 cpu: int = -1, perf: bool = True, progress: bool = True, argv: list[str] | None = None,
                 print_table: bool = False, katran_src: str | None = None, ab_ebpf: str | None = None) -> dict:
    from . import plots, report

    started = time.time()
    ctx = Context(quick=quick, out_dir=out_dir, progress=Progress(progress), cpu=cpu, vms=vms, perf=perf,
                  katran_src=katran_src, ab_ebpf=ab_ebpf)
    results: dict = {}
    for name in sections:
        ctx.progress.section = name
        ctx.progress("starting")
        t0 = time.monotonic()
        try:
            mod = importlib.import_module(f"bench.{MODULES[name]}")
            results[name] = mod.run(ctx)
        except (KeyboardInterrupt, Terminated):
            ctx.progress.done()
            raise
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            ctx.progress.done()
            print(f"bench: section {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            results[name] = {"results": [], "info": {}, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()}
        results[name].setdefault("info", {})["seconds"] = round(time.monotonic() - t0, 1)
    ctx.progress.section = "report"
    ctx.progress("writing results and plots")
    tgts = report.targets(results, quick)
    plot_paths = []
    try:
        plot_paths = plots.draw_all(results, out_dir)
    except Exception as exc:  # noqa: BLE001
        ctx.notes.append(f"plots failed: {type(exc).__name__}: {exc}")
    doc = report.document(results, tgts, report.meta(quick, started, argv or [], ctx.cpu, ctx.prefix, ctx.notes))
    doc["plots"] = plot_paths
    doc["files"] = report.write(doc, out_dir, started)
    ctx.progress.done()
    if print_table:
        print(report.table(results, tgts))
        print()
        for name, sec in results.items():
            if "error" in sec:
                print(f"section {name} FAILED: {sec['error']}")
        print("results: " + ", ".join(doc["files"]))
        if plot_paths:
            print("plots:   " + ", ".join(plot_paths))
    doc["_failed"] = [n for n, s in results.items() if "error" in s]
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one trial: proves it works, not a measurement")
    ap.add_argument("--only", action="append", choices=SECTIONS, metavar="NAME",
                    help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    ap.add_argument("--out", default="bench/results", help="directory for JSON and plots (default bench/results)")
    ap.add_argument("--vms", type=int, default=2, help="VM namespaces in the end-to-end test (default 2)")
    ap.add_argument("--cpu", type=int, default=-1, help="CPU to measure on (default: the last one)")
    ap.add_argument("--no-perf", action="store_true", help="do not sample a perf profile in the breakdown")
    ap.add_argument("--no-progress", action="store_true", help="no progress line")
    ap.add_argument("--katran-src", metavar="DIR",
                    help="a facebookincubator/katran checkout: build its balancer and time it beside xdpgw "
                         "(section katran; needs clang and llc)")
    ap.add_argument("--ab-ebpf", metavar="DIR",
                    help="another build's ebpf/ directory (same map layouts): time it beside this tree's program "
                         "(section ab; without it, the section times this tree's program against itself)")
    ap.add_argument("--list", action="store_true", help="list the sections and exit")
    ap.add_argument("--cleanup", metavar="PREFIX",
                    help="remove what a crashed run (e.g. xgb3f2) left: namespaces, pins, the fleet's processes and "
                         "data dirs; then exit")
    args = ap.parse_args(argv)

    if args.list:
        for name in SECTIONS:
            mod = importlib.import_module(f"bench.{MODULES[name]}")
            print(f"{name:<11} {(mod.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.cleanup:
        from . import fleet, topology

        removed = topology.cleanup(args.cleanup) + fleet.cleanup(args.cleanup)
        print("removed:", " ".join(removed) or "nothing")
        return 0
    if args.katran_src is not None:
        from .katran import checkout_problem

        problem = checkout_problem(args.katran_src)
        if problem:
            print(f"bench: {problem}", file=sys.stderr)
            return 2
    if args.ab_ebpf is not None:
        from .ab import ebpf_dir_problem

        problem = ebpf_dir_problem(args.ab_ebpf)
        if problem:
            print(f"bench: {problem}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("bench: must run as root (BPF programs, network namespaces)", file=sys.stderr)
        return 2
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS)]
    try:
        doc = run_sections(sections, quick=args.quick, out_dir=args.out, vms=args.vms, cpu=args.cpu,
                           perf=not args.no_perf, progress=not args.no_progress, argv=argv, print_table=True,
                           katran_src=args.katran_src, ab_ebpf=args.ab_ebpf)
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"\nbench: interrupted ({exc or 'Ctrl-C'}); everything it built was removed", file=sys.stderr)
        return 130
    return 1 if doc["_failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

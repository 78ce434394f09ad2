"""`xdpgw testbed` and `xdpgw demo`: registered through the `xdpgw.commands`
entry point, so the gateway's own CLI does not import the testbed."""
from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    tb = sub.add_parser("testbed", help="the built-in namespace testbed")
    tb.add_argument("action", choices=["up", "down"])
    tb.add_argument("--prefix", default="xgw", help="namespace name prefix (default xgw)")
    tb.set_defaults(handler=_testbed)
    demo = sub.add_parser("demo", help="the whole story on the testbed: two regions, one offloaded to dc2 while "
                                       "heavy, a VM failing, a VM migrating, then teardown and a summary")
    demo.add_argument("--prefix", default="xgwd", help="namespace name prefix (default xgwd)")
    demo.add_argument("--seconds", type=float, default=24.0,
                      help="quiet time around the five events, which add a few seconds (default 24, at least 12)")
    demo.set_defaults(handler=_demo)


def _testbed(args: argparse.Namespace) -> int:
    from testbed.topology import main

    return main([args.action, "--prefix", args.prefix])


def _demo(args: argparse.Namespace) -> int:
    from testbed.demo import run_demo

    return run_demo(prefix=args.prefix, seconds=args.seconds)

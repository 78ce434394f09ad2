"""A stand-in hypervisor orchestrator for the namespace testbed: "live-migrate"
a VM to another host by giving its namespace a new port of that host
(testbed/ports.py), then moving its routes there.

  python -m testbed.orchestrator PREFIX SUFFIXES VM HOST

SUFFIXES maps hosts to port-name suffixes ("ha=a,hb=b"): the new port of vmN
on host ha is gwvNa (in the gateway namespace), its VM end "eth" + suffix. Runs
in the gateway's network namespace (the daemon's, which runs it for
`xdpgw defrag apply`); prints the new port's name last."""
from __future__ import annotations

import sys

from testbed.ports import add_port, port_for, switch_to


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    prefix, suffixes, vm_name, host = args
    table = dict(item.split("=", 1) for item in suffixes.split(",") if item)
    if host not in table:
        print(f"unknown host {host!r}; known: {sorted(table)}", file=sys.stderr)
        return 2
    p = port_for(prefix, vm_name, table[host])
    add_port(p, gw_routes=True)
    switch_to(p)
    print(p.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

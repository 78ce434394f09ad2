"""A stand-in hypervisor orchestrator for the namespace testbed: "live-migrate"
a VM to another host by giving its namespace a new port of that host (the
technique of control/demo.py's add_vm_port), then moving its routes there.

  python -m testbed.orchestrator PREFIX SUFFIXES VM HOST

SUFFIXES maps hosts to port-name suffixes ("ha=a,hb=b"): the new port of vmN
on host ha is gwvNa (in the gateway namespace), its VM end "ethA"-style
"eth" + suffix. Runs in the gateway's network namespace (the daemon's, which
runs it for `xdpgw defrag apply`); prints the new port's name last.

Addresses: 198.19.(100 + 10k + N).1/.2 and 2001:db8:(1000 + 10k + N)::1/::2 for
suffix letter k (a = 0 ... o = 14). Nothing is created outside the testbed's
namespaces, whose removal removes it all."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from testbed import topology as T


@dataclass(frozen=True)
class HostPort:
    vm: str
    vm_ns: str
    port: str          # in the gateway namespace
    port_mac: str
    vm_if: str
    vm_mac: str
    gw_ip: str
    gw_ip6: str
    vm_ip: str         # the VM's own address (its config ip)


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=20)


def port_for(prefix: str, vm_name: str, suffix: str) -> HostPort:
    if len(suffix) != 1 or not "a" <= suffix <= "o":
        raise ValueError(f"suffix {suffix!r} must be one letter a..o")
    n = int(vm_name[2:])
    k = ord(suffix) - ord("a")
    vm = T._vm(n, prefix)
    return HostPort(vm=vm.name, vm_ns=vm.ns, port=f"{vm.port}{suffix}", port_mac=f"02:00:00:00:{0x20 + k:02x}:{n:02x}",
                    vm_if=f"eth{suffix}", vm_mac=vm.mac, gw_ip=f"198.19.{100 + 10 * k + n}.1",
                    gw_ip6=f"2001:db8:{1000 + 10 * k + n}::1", vm_ip=vm.ip)


def add_port(p: HostPort, gw_ns: str | None = None, gw_routes: bool = False) -> None:
    """Create the port (from the gateway namespace `gw_ns`, or the caller's if None).
    `gw_routes`: also route the VM's own address via the new port (the kernel then
    learns its neighbour there, which the netlink watcher sees)."""
    gw = ["ip", "-n", gw_ns] if gw_ns else ["ip"]
    vm = ["ip", "-n", p.vm_ns]
    vm_ip = p.gw_ip.rsplit(".", 1)[0] + ".2"
    vm_ip6 = p.gw_ip6.replace("::1", "::2")
    _run(gw + ["link", "add", p.port, "address", p.port_mac, "type", "veth", "peer", "name", p.vm_if,
               "address", p.vm_mac, "netns", p.vm_ns])
    _run(gw + ["addr", "add", f"{p.gw_ip}/24", "dev", p.port])
    _run(gw + ["addr", "add", f"{p.gw_ip6}/64", "dev", p.port])
    _run(gw + ["link", "set", p.port, "up"])
    _run(vm + ["addr", "add", f"{vm_ip}/24", "dev", p.vm_if])
    _run(vm + ["addr", "add", f"{vm_ip6}/64", "dev", p.vm_if])
    _run(vm + ["link", "set", p.vm_if, "up"])
    _run(vm + ["neigh", "replace", p.gw_ip, "lladdr", p.port_mac, "dev", p.vm_if, "nud", "permanent"])
    _run(vm + ["neigh", "replace", p.gw_ip6, "lladdr", p.port_mac, "dev", p.vm_if, "nud", "permanent"])
    _run(["ip", "netns", "exec", p.vm_ns, "ethtool", "-K", p.vm_if, "gro", "on"])
    if gw_routes:
        _run(gw + ["route", "replace", f"{p.vm_ip}/32", "dev", p.port])
        _run(gw + ["neigh", "replace", p.vm_ip, "lladdr", p.vm_mac, "dev", p.port, "nud", "permanent"])


def switch_to(p: HostPort) -> None:
    """The VM's default routes via the new port; its other interfaces down."""
    vm = ["ip", "-n", p.vm_ns]
    _run(vm + ["route", "replace", "default", "via", p.gw_ip, "dev", p.vm_if])
    _run(vm + ["-6", "route", "replace", "default", "via", p.gw_ip6, "dev", p.vm_if])
    out = subprocess.run(vm + ["-o", "link", "show"], check=True, capture_output=True, text=True, timeout=20).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name not in ("lo", p.vm_if):
            _run(vm + ["link", "set", name, "down"])


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

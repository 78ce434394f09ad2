"""Give a testbed VM a new gateway port, as a hypervisor does when it
live-migrates the VM to another host: a veth between the gateway namespace
(`gwvN` + suffix) and the VM's namespace (`eth` + suffix, carrying the VM's own
MAC), then, when the VM has "moved", its default routes via the new port.

The suffix is one letter a..o (letter k = 0..14), which fixes the address plan:
gateway end 198.19.(100 + 10k + N).1/24 and 2001:db8:(1000 + 10k + N)::1/64,
VM end .2 and ::2, gateway-side MAC 02:00:00:00:(20 + k):N. Nothing is created
outside the testbed's namespaces, whose removal removes it all.

The demo, the e2e tests, the stand-in orchestrator (testbed/orchestrator.py,
run by the daemon inside the gateway namespace) and dc2's agent (testbed/dcagent.py,
whose VMs are ports of dc2's gateway) all use this one operation.

A migrated VM then says where it is, as a guest or its hypervisor does: a
gratuitous ARP (or RARP, or an unsolicited neighbour advertisement for its IPv6
address) sent from its namespace on the new port (`announce`); the frames are
built here (`garp`, `rarp`, `na`) so tests can also forge them."""
from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
from dataclasses import dataclass

from testbed.addresses import Vm, vm_named
from testbed.netns import netns_socket

SUFFIXES = "abcdefghijklmno"


@dataclass(frozen=True)
class VmPort:
    vm: str
    vm_ns: str
    port: str          # in the gateway namespace
    port_mac: str
    vm_if: str         # the VM's end (with the VM's MAC)
    vm_mac: str
    gw_ip: str         # the gateway end's addresses (the VM's next hop once it moved)
    gw_ip6: str
    link_ip: str       # the VM end's addresses
    link_ip6: str
    vm_ip: str         # the VM's own addresses (its config ips, what it announces)
    vm_ip6: str


def port_for(prefix: str, vm_name: str, suffix: str) -> VmPort:
    """The new port `suffix` of VM `vm_name` in testbed `prefix` (nothing is created)."""
    if len(suffix) != 1 or suffix not in SUFFIXES:
        raise ValueError(f"port suffix {suffix!r} must be one letter a..o")
    vm = vm_named(vm_name, prefix)
    n = int(vm.name[2:])
    k = SUFFIXES.index(suffix)
    net4, net6 = f"198.19.{100 + 10 * k + n}", f"2001:db8:{1000 + 10 * k + n}"
    return VmPort(vm=vm.name, vm_ns=vm.ns, port=f"{vm.port}{suffix}", port_mac=f"02:00:00:00:{0x20 + k:02x}:{n:02x}",
                  vm_if=f"eth{suffix}", vm_mac=vm.mac, gw_ip=f"{net4}.1", gw_ip6=f"{net6}::1",
                  link_ip=f"{net4}.2", link_ip6=f"{net6}::2", vm_ip=vm.ip, vm_ip6=vm.ip6)


def own_port(vm: Vm) -> VmPort:
    """`vm`'s first port, with its own addresses on the link (its eth0 and the gateway's
    end), e.g. for a VM a data center creates at run time (nothing is created)."""
    return VmPort(vm=vm.name, vm_ns=vm.ns, port=vm.port, port_mac=vm.port_mac, vm_if=vm.ifname, vm_mac=vm.mac,
                  gw_ip=vm.gw_ip, gw_ip6=vm.gw_ip6, link_ip=vm.ip, link_ip6=vm.ip6, vm_ip=vm.ip,
                  vm_ip6=vm.ip6)


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=20)


def add_port(p: VmPort, gw_ns: str | None = None, gw_routes: bool = False) -> None:
    """Create the port (from the gateway namespace `gw_ns`, or the caller's if None),
    with static neighbours on the VM side and GRO on the VM end (a veth drops
    XDP-redirected frames unless its peer runs NAPI). `gw_routes`: also route the
    VM's own address via the new port (`route_via`)."""
    gw = ["ip", "-n", gw_ns] if gw_ns else ["ip"]
    vm = ["ip", "-n", p.vm_ns]
    _run(gw + ["link", "add", p.port, "address", p.port_mac, "type", "veth", "peer", "name", p.vm_if,
               "address", p.vm_mac, "netns", p.vm_ns])
    _run(gw + ["addr", "add", f"{p.gw_ip}/24", "dev", p.port])
    _run(gw + ["addr", "add", f"{p.gw_ip6}/64", "dev", p.port])
    _run(gw + ["link", "set", p.port, "up"])
    _run(vm + ["addr", "add", f"{p.link_ip}/24", "dev", p.vm_if])
    _run(vm + ["addr", "add", f"{p.link_ip6}/64", "dev", p.vm_if])
    _run(vm + ["link", "set", p.vm_if, "up"])
    _run(vm + ["neigh", "replace", p.gw_ip, "lladdr", p.port_mac, "dev", p.vm_if, "nud", "permanent"])
    _run(vm + ["neigh", "replace", p.gw_ip6, "lladdr", p.port_mac, "dev", p.vm_if, "nud", "permanent"])
    _run(["ip", "netns", "exec", p.vm_ns, "ethtool", "-K", p.vm_if, "gro", "on"])
    if gw_routes:
        route_via(p, gw_ns)


def route_via(p: VmPort, gw_ns: str | None = None) -> None:
    """Route the VM's own addresses (health probes, VM-to-VM traffic) via its new port,
    with static neighbours there (which the daemon's netlink watcher sees)."""
    gw = ["ip", "-n", gw_ns] if gw_ns else ["ip"]
    for addr, plen in ((p.vm_ip, 32), (p.vm_ip6, 128)):
        _run(gw + ["route", "replace", f"{addr}/{plen}", "dev", p.port])
        _run(gw + ["neigh", "replace", addr, "lladdr", p.vm_mac, "dev", p.port, "nud", "permanent"])


def switch_to(p: VmPort) -> None:
    """The VM now lives behind its new port: default routes via it, its own IPv6
    address on it, its other interfaces down."""
    vm = ["ip", "-n", p.vm_ns]
    _run(vm + ["route", "replace", "default", "via", p.gw_ip, "dev", p.vm_if])
    _run(vm + ["-6", "route", "replace", "default", "via", p.gw_ip6, "dev", p.vm_if])
    # an interface going down loses its IPv6 addresses (IPv4 ones stay): the VM's moves along
    if p.vm_ip6 != p.link_ip6:
        _run(vm + ["addr", "replace", f"{p.vm_ip6}/128", "dev", p.vm_if, "nodad"])
    out = subprocess.run(vm + ["-o", "link", "show"], check=True, capture_output=True, text=True, timeout=20).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name not in ("lo", p.vm_if):
            _run(vm + ["link", "set", name, "down"])


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def garp(mac: str, ip: str) -> bytes:
    """A gratuitous ARP request: `mac` announces `ip` (sender and target IP both `ip`), broadcast."""
    addr = ipaddress.ip_address(ip).packed
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, _mac(mac), addr, b"\0" * 6, addr)
    return b"\xff" * 6 + _mac(mac) + b"\x08\x06" + arp


def rarp(mac: str) -> bytes:
    """A RARP request for `mac` (what QEMU sends for a guest after a live migration)."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, _mac(mac), b"\0" * 4, _mac(mac), b"\0" * 4)
    return b"\xff" * 6 + _mac(mac) + b"\x80\x35" + arp


def na(mac: str, ip6: str) -> bytes:
    """An unsolicited neighbour advertisement: `mac` announces `ip6` to all nodes
    (override set, solicited clear), as a guest does after a live migration."""
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6   # scapy computes the checksum
    from scapy.layers.l2 import Ether

    return bytes(Ether(src=mac, dst="33:33:00:00:00:01") / IPv6(src=ip6, dst="ff02::1", hlim=255) /
                 ICMPv6ND_NA(tgt=ip6, R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=mac))


def send_frame(netns: str, ifname: str, frame: bytes) -> None:
    """Send one raw Ethernet frame out of `ifname` in namespace `netns`."""
    s = netns_socket(netns, socket.AF_PACKET, socket.SOCK_RAW)
    try:
        s.bind((ifname, 0))
        s.send(frame)
    finally:
        s.close()


def announce(p: VmPort) -> None:
    """The VM, now behind its new port, announces its address there (gratuitous ARP)."""
    send_frame(p.vm_ns, p.vm_if, garp(p.vm_mac, p.vm_ip))

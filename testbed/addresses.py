"""The namespace testbed's address plan: the names, MACs and addresses of every
role, link, client and VM (testbed/topology.py builds them and draws the
diagram). Addresses come only from 198.18.0.0/15 and 2001:db8::/32. A VM's
extra ports (testbed/ports.py) take 198.19.100.0/24 and up and 2001:db8:1000::
and up, apart from everything here."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "xgw"
ROLES: tuple[str, ...] = ("c1", "c2", "rt", "gw", "dc2", "vm1", "vm2", "vm3")

VIP4 = "198.19.0.10"
VIP6 = "2001:db8:f::10"
VIP4_NET = "198.19.0.0/24"
VIP6_NET = "2001:db8:f::/64"

UPLINK = "up0"                      # gateway's uplink, in {p}-gw
UPLINK_MAC = "02:00:00:00:02:02"
UPLINK_IP = "198.18.0.2"
UPLINK_IP6 = "2001:db8::2"
ROUTER_DOWNLINK = "to-gw"           # rt's end of the uplink veth (GRO on)
ROUTER_MAC = "02:00:00:00:02:01"
ROUTER_IP = "198.18.0.1"
ROUTER_IP6 = "2001:db8::1"

DC2_IF = "eth0"
DC2_MAC = "02:00:00:00:03:02"
DC2_ENDPOINT = "198.18.200.2"
DC2_ENDPOINT6 = "2001:db8:200::2"
ROUTER_DC2_IF = "to-dc2"
ROUTER_DC2_MAC = "02:00:00:00:03:01"
ROUTER_DC2_IP = "198.18.200.1"
ROUTER_DC2_IP6 = "2001:db8:200::1"

VM_IF = "eth0"

# the second gateway (Testbed(gateways=2))
GW2_ROLE = "gw2"
GW2_UPLINK_MAC = "02:00:00:00:02:12"
GW2_UPLINK_IP = "198.18.6.2"
GW2_UPLINK_IP6 = "2001:db8:6::2"
ROUTER_GW2_IF = "to-gw2"
ROUTER_GW2_MAC = "02:00:00:00:02:11"
ROUTER_GW2_IP = "198.18.6.1"
ROUTER_GW2_IP6 = "2001:db8:6::1"
GW2_VM_IF = "eth2"                  # the VM's interface toward gw2


@dataclass(frozen=True)
class Vm:
    name: str          # "vm1"
    ns: str            # "{p}-vm1"
    port: str          # gateway-side veth in {p}-gw: "gwv1"
    mac: str           # VM's eth0 MAC
    port_mac: str      # gateway-side port MAC
    ip: str
    ip6: str
    gw_ip: str         # gateway-side address on this link (the VM's default route)
    gw_ip6: str
    ifname: str = VM_IF


@dataclass(frozen=True)
class Client:
    name: str          # "c1"
    ns: str
    ip: str            # primary address
    ip6: str
    ips: tuple[str, ...]    # all IPv4 addresses (c1 has a second one)
    ip6s: tuple[str, ...]
    mac: str
    router_ip: str
    router_ip6: str
    router_mac: str
    router_port: str   # rt's interface toward this client
    subnet: str
    subnet6: str
    ifname: str = "eth0"


@dataclass(frozen=True)
class Gw2Port:
    """gw2's port to a VM: gwvN in {p}-gw2 <-> eth2 in the VM (with the VM's MAC)."""
    vm: str
    port: str          # "gwvN", in {p}-gw2 (the same name as gw1's port)
    port_mac: str
    vm_if: str
    vm_mac: str
    gw_ip: str
    gw_ip6: str
    vm_ip: str         # the VM's address on this link (gw2 reaches the VM's own ip via it)
    vm_ip6: str


def gw2_port(vm: Vm) -> Gw2Port:
    """gw2's port to `vm` (Testbed(gateways=2))."""
    n = int(vm.name[2:])
    return Gw2Port(vm=vm.name, port=vm.port, port_mac=f"02:00:00:00:12:{n:02x}", vm_if=GW2_VM_IF,
                   vm_mac=vm.mac, gw_ip=f"198.18.{120 + n}.1", gw_ip6=f"2001:db8:{120 + n}::1",
                   vm_ip=f"198.18.{120 + n}.2", vm_ip6=f"2001:db8:{120 + n}::2")


VM_NUMBERS = (1, 2, 3)               # the local VMs vm1..vm3


def _vm(n: int, prefix: str) -> Vm:
    return Vm(name=f"vm{n}", ns=f"{prefix}-vm{n}", port=f"gwv{n}",
              mac=f"02:00:00:00:00:{n:02x}", port_mac=f"02:00:00:00:01:{n:02x}",
              ip=f"198.18.{100 + n}.2", ip6=f"2001:db8:{100 + n}::2",
              gw_ip=f"198.18.{100 + n}.1", gw_ip6=f"2001:db8:{100 + n}::1")


def vm_named(name: str, prefix: str = DEFAULT_PREFIX) -> Vm:
    """The description of local VM `name` ("vm1".."vm3") in testbed `prefix`,
    without building anything."""
    n = name[2:]
    if not (name.startswith("vm") and n.isdigit() and int(n) in VM_NUMBERS):
        raise ValueError(f"{name!r} is not a testbed VM; the VMs are {', '.join(f'vm{i}' for i in VM_NUMBERS)}")
    return _vm(int(n), prefix)


def _client(n: int, prefix: str) -> Client:
    ips = (f"198.18.{n}.2", f"198.18.{n}.3") if n == 1 else (f"198.18.{n}.2",)
    ip6s = (f"2001:db8:{n}::2", f"2001:db8:{n}::3") if n == 1 else (f"2001:db8:{n}::2",)
    return Client(name=f"c{n}", ns=f"{prefix}-c{n}", ip=ips[0], ip6=ip6s[0], ips=ips,
                  ip6s=ip6s, mac=f"02:00:00:00:0{3 + n}:02",
                  router_ip=f"198.18.{n}.1", router_ip6=f"2001:db8:{n}::1",
                  router_mac=f"02:00:00:00:0{3 + n}:01", router_port=f"to-c{n}",
                  subnet=f"198.18.{n}.0/24", subnet6=f"2001:db8:{n}::/64")


def local_vms(prefix: str) -> list[Vm]:
    """The local VMs vm1..vm3 of testbed `prefix`."""
    return [_vm(n, prefix) for n in VM_NUMBERS]


def clients(prefix: str) -> list[Client]:
    """The clients c1 (region r1) and c2 (region r2) of testbed `prefix`."""
    return [_client(n, prefix) for n in (1, 2)]


# Default VM/client sets (prefix-independent fields are what callers usually need).
VMS: tuple[Vm, ...] = tuple(local_vms(DEFAULT_PREFIX))
CLIENTS: tuple[Client, ...] = tuple(clients(DEFAULT_PREFIX))

# VMs that dc2's agent creates at run time (testbed/dcagent.py), each a VM port of dc2's gateway
DC2_VM_NUMBERS = tuple(range(1, 9))
DC2_VM_ROLES: tuple[str, ...] = tuple(f"dv{n}" for n in DC2_VM_NUMBERS)


def dc2_vm(prefix: str, n: int) -> Vm:
    """dc2's VM dvN: namespace {p}-dvN, its eth0 a veth to dvN in dc2's namespace
    (dc2's gateway port), 198.18.(210+N).0/24 and 2001:db8:(210+N)::/64."""
    if n not in DC2_VM_NUMBERS:
        raise ValueError(f"dc2 VM number {n!r} must be in {DC2_VM_NUMBERS[0]}..{DC2_VM_NUMBERS[-1]}")
    return Vm(name=f"dv{n}", ns=f"{prefix}-dv{n}", port=f"dv{n}",
              mac=f"02:00:00:00:30:{n:02x}", port_mac=f"02:00:00:00:31:{n:02x}",
              ip=f"198.18.{210 + n}.2", ip6=f"2001:db8:{210 + n}::2",
              gw_ip=f"198.18.{210 + n}.1", gw_ip6=f"2001:db8:{210 + n}::1")

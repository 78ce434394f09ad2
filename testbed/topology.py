"""Network-namespace testbed for the gateway.

::

  {p}-c1 (region r1 client)  --+
  {p}-c2 (region r2 client)  --+-- {p}-rt (router) --- {p}-gw (gateway, uplink "up0")
  {p}-dc2 (remote DC)        --+                         |-- gwv1 <-> {p}-vm1 (eth0)
                                                         |-- gwv2 <-> {p}-vm2 (eth0)
                                                         |-- gwv3 <-> {p}-vm3 (eth0)

With ``Testbed(prefix, gateways=2)`` a second, independent gateway serves the same VMs::

  {p}-rt --- to-gw2 <-> {p}-gw2 (uplink "up0", 198.18.6.2)
                           |-- gwv1 <-> {p}-vm1 (eth2, the VM's own MAC)
                           |-- gwv2 <-> {p}-vm2 (eth2)
                           |-- gwv3 <-> {p}-vm3 (eth2)

gw2 has its own uplink from the router and its own port to every VM: a second
veth per VM, whose VM end carries the VM's MAC, so gw2's config names the same
ports, MACs and addresses as gw1's (only the [gateway] table differs). The
point-to-point links of gw1 stay exactly as they are (no bridge to add, nothing
of the one-gateway testbed changes). gw2 reaches each VM's own address (its
``ip``, which the health checks probe) by a host route via the VM's eth2. The
VMs' replies (direct server return, from the VIP) leave by their default route
via gw1's namespace, which plays the hosts' router: no XDP program is on that
path, so it does not matter which gateway carried the request. The router sends
the VIPs to gw1, gw2 or both (ECMP, per-flow layer-4 hash, dead links skipped):
``steer("gw1" | "gw2" | "ecmp")``.

Everything lives in namespaces named ``f"{prefix}-{role}"``; every veth is created
*inside* those namespaces (never in the root namespace), so removing the namespaces
removes everything.  Addresses come only from 198.18.0.0/15 and 2001:db8::/32 (the plan:
testbed/addresses.py).

The remote data center (dc2) receives IP-in-IP sent to DC2_ENDPOINT / DC2_ENDPOINT6,
in one of two ways:

* ``Testbed(prefix, dc2_gateway=True)``: dc2 is a data center running xdpgw. Its
  gateway (started by the caller on testbed/config.py ``dc2_config``, on dc2's eth0)
  decapsulates in XDP and balances the VIPs by Maglev over VMs that dc2's agent
  (testbed/dcagent.py) creates at run time: namespaces ``{prefix}-dvN`` whose eth0
  is a veth to ``dvN`` in dc2 (testbed/addresses.py ``dc2_vm``), a VM port of dc2's
  gateway. The VMs answer the clients from the VIP (DSR) through dc2, which routes.
* otherwise dc2 is a plain tunnel endpoint with the VIPs on its loopback. This kernel
  is built without ipip/sit/ip6tnl (and without modules), so the kernel tunnel
  devices cannot be created; instead a small XDP program (testbed/testbed_xdp.c,
  compiled by bcc) strips the outer header on dc2's eth0 (4in4, 6in4, 4in6, 6in6)
  and passes the inner packet to dc2's stack, which is what a "remote any" tunnel
  device would do (``dc2_decap=False``: no decapsulator).

testbed_xdp.c also holds the router's do-nothing XDP program (see ``_attach_xdp_pass``).

Command line (for crashed runs and demos)::

  python -m testbed.topology up|down|cleanup [--prefix xgw]
"""

from __future__ import annotations

import argparse
import atexit
import functools
import glob
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from dataplane.pinning import PIN_ROOT, remove_pins
from testbed import addresses
from testbed.addresses import (
    DC2_ENDPOINT,
    DC2_ENDPOINT6,
    DC2_IF,
    DC2_MAC,
    DC2_VM_ROLES,
    DEFAULT_PREFIX,
    GW2_ROLE,
    GW2_UPLINK_IP,
    GW2_UPLINK_IP6,
    GW2_UPLINK_MAC,
    ROLES,
    ROUTER_DC2_IF,
    ROUTER_DC2_IP,
    ROUTER_DC2_IP6,
    ROUTER_DC2_MAC,
    ROUTER_DOWNLINK,
    ROUTER_GW2_IF,
    ROUTER_GW2_IP,
    ROUTER_GW2_IP6,
    ROUTER_GW2_MAC,
    ROUTER_IP,
    ROUTER_IP6,
    ROUTER_MAC,
    UPLINK,
    UPLINK_IP,
    UPLINK_IP6,
    UPLINK_MAC,
    VIP4,
    VIP4_NET,
    VIP6,
    VIP6_NET,
    Client,
    Gw2Port,
    Vm,
)
from testbed.netns import (
    NETNS_RUN_DIR,
    netns_exists,
    netns_socket,
    popen_in_netns,
    run_cmd_in_netns,
    run_in_netns,
)

log = logging.getLogger(__name__)

@dataclass
class _End:
    role: str
    ifname: str
    mac: str
    addrs: tuple[str, ...]   # "addr/prefixlen"


@dataclass
class _Link:
    a: _End
    b: _End


def _links(clients: Sequence[Client], vms: Sequence[Vm], gw2_ports: Sequence[Gw2Port] = ()) -> list[_Link]:
    links = []
    for c in clients:
        n = c.name[1:]
        links.append(_Link(
            _End("rt", c.router_port, c.router_mac,
                 (f"{c.router_ip}/24", f"{c.router_ip6}/64")),
            _End(c.name, c.ifname, c.mac,
                 tuple(f"{a}/24" for a in c.ips) + tuple(f"{a}/64" for a in c.ip6s))))
        assert n  # names are c1, c2
    links.append(_Link(
        _End("rt", ROUTER_DOWNLINK, ROUTER_MAC, (f"{ROUTER_IP}/24", f"{ROUTER_IP6}/64")),
        _End("gw", UPLINK, UPLINK_MAC, (f"{UPLINK_IP}/24", f"{UPLINK_IP6}/64"))))
    links.append(_Link(
        _End("rt", ROUTER_DC2_IF, ROUTER_DC2_MAC,
             (f"{ROUTER_DC2_IP}/24", f"{ROUTER_DC2_IP6}/64")),
        _End("dc2", DC2_IF, DC2_MAC, (f"{DC2_ENDPOINT}/24", f"{DC2_ENDPOINT6}/64"))))
    for vm in vms:
        links.append(_Link(
            _End("gw", vm.port, vm.port_mac, (f"{vm.gw_ip}/24", f"{vm.gw_ip6}/64")),
            _End(vm.name, vm.ifname, vm.mac, (f"{vm.ip}/24", f"{vm.ip6}/64"))))
    if gw2_ports:
        links.append(_Link(
            _End("rt", ROUTER_GW2_IF, ROUTER_GW2_MAC, (f"{ROUTER_GW2_IP}/24", f"{ROUTER_GW2_IP6}/64")),
            _End(GW2_ROLE, UPLINK, GW2_UPLINK_MAC, (f"{GW2_UPLINK_IP}/24", f"{GW2_UPLINK_IP6}/64"))))
    for p in gw2_ports:
        links.append(_Link(
            _End(GW2_ROLE, p.port, p.port_mac, (f"{p.gw_ip}/24", f"{p.gw_ip6}/64")),
            _End(p.vm, p.vm_if, p.vm_mac, (f"{p.vm_ip}/24", f"{p.vm_ip6}/64"))))
    return links


# ------------------------------------------------------------------ sysctl (per netns)

def _common_sysctls() -> dict[str, str]:
    return {
        # rp_filter: decapsulated packets and DSR replies (source = VIP) arrive on
        # interfaces that are not the reverse path; effective value is max(all, dev),
        # so both all and default (for devices created later) must be 0.
        "net/ipv4/conf/all/rp_filter": "0",
        "net/ipv4/conf/default/rp_filter": "0",
        # no DAD: IPv6 addresses usable at once (DAD needs both all and dev < 1)
        "net/ipv6/conf/all/accept_dad": "0",
        "net/ipv6/conf/default/accept_dad": "0",
        "net/ipv6/conf/all/dad_transmits": "0",
        "net/ipv6/conf/default/dad_transmits": "0",
        # nobody here should learn routes from router advertisements
        "net/ipv6/conf/all/accept_ra": "0",
        "net/ipv6/conf/default/accept_ra": "0",
    }


def sysctls_for(role: str) -> dict[str, str]:
    """The sysctls of a testbed role's namespace (a VM's role: vmN, or dvN for dc2's)."""
    s = _common_sysctls()
    if role in ("rt", "gw", GW2_ROLE, "dc2"):
        s.update({
            "net/ipv4/ip_forward": "1",
            "net/ipv6/conf/all/forwarding": "1",
            "net/ipv6/conf/default/forwarding": "1",
            # redirects would make hosts bypass the gateway; keep paths fixed
            "net/ipv4/conf/all/send_redirects": "0",
            "net/ipv4/conf/default/send_redirects": "0",
        })
    if role.startswith(("vm", "dv")) or role == "dc2":
        # DSR hosts: the VIP is on lo; never answer ARP for it on eth0
        s.update({
            "net/ipv4/conf/all/arp_ignore": "1",
            "net/ipv4/conf/all/arp_announce": "2",
        })
    return s


def write_sysctls(values: dict[str, str]) -> None:
    """Write `values` ({key under /proc/sys: value}) in the caller's namespace (run it
    in a role's namespace with run_in_netns)."""
    # /proc/sys/net resolves to the opener's netns, so a setns()-ed child can write
    # it directly (no exec of sysctl needed).
    for key, value in values.items():
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)


# ------------------------------------------------- dc2 decapsulator (hand-made XDP)

@functools.cache
def _testbed_programs() -> tuple[int, int]:
    """(decap fd, pass fd) of testbed_xdp.c, compiled once per process.

    Loading does not depend on a namespace; the fds are attached to devices of
    the testbed's namespaces through netlink, and the devices keep them."""
    from bcc import BPF

    words = ipaddress.IPv6Address(DC2_ENDPOINT6).packed
    cflags = [f"-DDC2_ENDPOINT4={int(ipaddress.IPv4Address(DC2_ENDPOINT)):#x}u"]
    cflags += [f"-DDC2_ENDPOINT6_{i}={int.from_bytes(words[4 * i:4 * i + 4], 'big'):#x}u" for i in range(4)]
    bpf = BPF(src_file=str(Path(__file__).with_name("testbed_xdp.c")).encode(), cflags=cflags)
    _LOADED.append(bpf)   # keeps the programs' fds open
    return bpf.load_func(b"testbed_decap", BPF.XDP).fd, bpf.load_func(b"testbed_pass", BPF.XDP).fd


_LOADED: list = []


# ------------------------------------------------------------------------ cleanup

def _ns_names(prefix: str) -> list[str]:
    # every role any testbed of this prefix may have, so cleanup finds gw2 and dc2's VMs too
    return [f"{prefix}-{r}" for r in ROLES + (GW2_ROLE,) + DC2_VM_ROLES]


def pin_dir(prefix: str, gateway: str) -> str:
    """Where a testbed gateway pins its state: per prefix, so runs never share it."""
    return str(PIN_ROOT / f"{prefix}-{gateway}")


def registry_path(prefix: str, gateway: str) -> str:
    """Where a testbed gateway keeps its VM registry (SQLite): per prefix, removed with it."""
    return f"/run/xdpgw/{prefix}-{gateway}.db"


def cleanup_prefix(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove the testbed namespaces of ``prefix`` (e.g. after a crashed run),
    and the pinned state of its gateways.

    Only the exact names this module creates (``{prefix}-{role}``) are touched, so
    a prefix never sweeps up another prefix's namespaces.  Never raises for
    already-gone namespaces.  Processes still inside are not killed (they are not
    ours to kill); the namespace dies with its last process.  Returns removed names.
    """
    removed = []
    for name in _ns_names(prefix):
        if not netns_exists(name):
            continue
        try:
            pr_netns.remove(name)
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove netns %s: %s", name, exc)
    for pins in PIN_ROOT.glob(f"{prefix}-*"):
        if remove_pins(pins):
            removed.append(str(pins))
    for suffix in ("", "-wal", "-shm"):          # VM registries (registry_path)
        for db in Path("/run/xdpgw").glob(f"{glob.escape(prefix)}-*.db{suffix}"):
            db.unlink(missing_ok=True)
            removed.append(str(db))
    return removed


def leftovers(prefix: str) -> list[str]:
    """What of ``prefix`` still exists: namespaces named ``{prefix}-...``, pinned
    state and VM registry files (what ``cleanup_prefix`` removes)."""
    left = sorted(n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(prefix + "-")) \
        if os.path.isdir(NETNS_RUN_DIR) else []
    left += [str(p) for p in PIN_ROOT.glob(f"{glob.escape(prefix)}-*")]
    left += [str(p) for p in Path("/run/xdpgw").glob(f"{glob.escape(prefix)}-*.db*")]
    return left


# ------------------------------------------------------------------------ testbed

@dataclass
class Testbed:
    """The namespace topology.  ``with Testbed(prefix) as tb: ...`` brings it up and
    always tears it down."""

    __test__ = False                 # not a pytest test class, despite the name

    prefix: str = DEFAULT_PREFIX
    dc2_decap: bool = True           # attach the hand-made XDP decapsulator on dc2's eth0 (not with dc2_gateway)
    gro: bool = True                 # GRO on the veth ends that receive XDP redirects
    gateways: int = 1                # 2: a second gateway {p}-gw2 with its own ports to the same VMs
    dc2_gateway: bool = False        # dc2 runs xdpgw (no VIP, no hand-made decapsulator; see the module doc)
    vms: list[Vm] = field(init=False)
    gw2_ports: list[Gw2Port] = field(init=False)
    clients: list[Client] = field(init=False)
    timings: dict[str, float] = field(init=False, default_factory=dict)
    _procs: list[subprocess.Popen] = field(init=False, default_factory=list)
    _is_up: bool = field(init=False, default=False)

    # re-exported so users need only the instance
    VIP4 = VIP4
    VIP6 = VIP6
    VIP4_NET = VIP4_NET
    VIP6_NET = VIP6_NET
    DC2_ENDPOINT = DC2_ENDPOINT
    DC2_ENDPOINT6 = DC2_ENDPOINT6
    UPLINK = UPLINK
    UPLINK_MAC = UPLINK_MAC
    UPLINK_IP = UPLINK_IP
    UPLINK_IP6 = UPLINK_IP6
    ROUTER_MAC = ROUTER_MAC
    ROUTER_IP = ROUTER_IP
    ROUTER_IP6 = ROUTER_IP6
    ROUTER_DOWNLINK = ROUTER_DOWNLINK

    def __post_init__(self) -> None:
        # namespace names are {prefix}-vmN etc.; keep them readable and path-safe
        if not self.prefix or "/" in self.prefix or len(self.prefix) > 40:
            raise ValueError(f"bad testbed prefix {self.prefix!r}")
        if self.gateways not in (1, 2):
            raise ValueError(f"gateways must be 1 or 2, got {self.gateways!r}")
        self.vms = addresses.local_vms(self.prefix)
        self.clients = addresses.clients(self.prefix)
        self.gw2_ports = [addresses.gw2_port(vm) for vm in self.vms] if self.gateways == 2 else []

    # ---- names
    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES + ((GW2_ROLE,) if self.gateways == 2 else ())

    def ns(self, role: str) -> str:
        if role not in self.roles:
            raise KeyError(f"unknown role {role!r}; roles: {self.roles}")
        return f"{self.prefix}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [f"{self.prefix}-{r}" for r in self.roles]

    def vm(self, name: str) -> Vm:
        return next(v for v in self.vms if v.name == name)

    def client(self, name: str) -> Client:
        return next(c for c in self.clients if c.name == name)

    # ---- lifecycle
    def __enter__(self) -> "Testbed":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> "Testbed":
        """Build the topology.  Leftovers with this prefix are removed first; on any
        failure everything built so far is removed and the error re-raised."""
        t0 = time.monotonic()
        self.down()
        atexit.register(self.down)   # Ctrl-C in a demo still cleans up
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._is_up = True
        self.timings["up"] = time.monotonic() - t0
        return self

    def down(self) -> None:
        """Stop processes started through ``popen`` and remove every namespace of this
        prefix.  Safe to call repeatedly; never raises for already-gone things."""
        t0 = time.monotonic()
        atexit.unregister(self.down)
        self._stop_procs()
        cleanup_prefix(self.prefix)
        self._is_up = False
        self.timings["down"] = time.monotonic() - t0

    @property
    def is_up(self) -> bool:
        return self._is_up and all(netns_exists(n) for n in self.namespaces)

    # ---- running things inside
    def run(self, role: str, func: Callable[..., Any], *args: Any,
            timeout: float = 30.0, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)`` in a child inside the role's namespace."""
        return run_in_netns(self.ns(role), func, *args, timeout=timeout, **kwargs)

    def socket(self, role: str, family: int = socket.AF_INET,
               sock_type: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket living in the role's namespace, used from this process."""
        return netns_socket(self.ns(role), family, sock_type)

    def cmd(self, role: str, argv: Sequence[str], timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess:
        return run_cmd_in_netns(self.ns(role), argv, timeout=timeout, check=check)

    def popen(self, role: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start a process in the role's namespace; ``down()`` stops it by pid.
        ``start_new_session`` so the signal reaches the process itself, not just
        ``ip netns exec`` (which execs into it anyway)."""
        kw.setdefault("start_new_session", True)
        proc = popen_in_netns(self.ns(role), argv, **kw)
        self._procs.append(proc)
        return proc

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start a process that enters a namespace by itself (e.g. a gateway daemon
        with ``gateway.netns``, which must keep the host's /sys/fs/bpf that
        ``ip netns exec`` would hide); ``down()`` stops it by pid like ``popen``."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(list(argv), **kw)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 2.0) -> None:
        """Terminate one process started via ``popen`` (SIGTERM, then SIGKILL)."""
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)
            except ProcessLookupError:
                pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def _stop_procs(self) -> None:
        for proc in list(self._procs):
            try:
                self.stop(proc)
            except Exception as exc:  # noqa: BLE001 - teardown must go on
                log.warning("could not stop pid %s: %s", proc.pid, exc)
        self._procs.clear()

    # ---- construction
    def _build(self) -> None:
        t = time.monotonic()
        for role in self.roles:
            pr_netns.create(self.ns(role))
        for role in self.roles:
            # before any link exists: new devices copy the "default" values
            values = sysctls_for(role)
            if role == "rt" and self.gateways == 2:
                values.update({
                    # ECMP over the gateways by the flow's 5-tuple, as a data-center fabric does
                    "net/ipv4/fib_multipath_hash_policy": "1",
                    "net/ipv6/fib_multipath_hash_policy": "1",
                    # a gateway whose link is down is no next hop (for ECMP failover)
                    "net/ipv4/conf/all/ignore_routes_with_linkdown": "1",
                    "net/ipv4/conf/default/ignore_routes_with_linkdown": "1",
                    "net/ipv6/conf/all/ignore_routes_with_linkdown": "1",
                    "net/ipv6/conf/default/ignore_routes_with_linkdown": "1",
                })
            self.run(role, write_sysctls, values, timeout=10)
        self.timings["ns+sysctl"] = time.monotonic() - t

        t = time.monotonic()
        iprs: dict[str, IPRoute] = {}
        try:
            for role in self.roles:
                # flags=0: never create a namespace implicitly (pyroute2's default)
                iprs[role] = IPRoute(netns=self.ns(role), flags=0)
            self._build_links(iprs)
            self._build_routes(iprs)
            if self.dc2_decap and not self.dc2_gateway:
                self.attach_dc2_decap(iprs["dc2"])
            self._attach_xdp_pass(iprs["rt"], ROUTER_DOWNLINK)
            if self.gateways == 2:
                self._attach_xdp_pass(iprs["rt"], ROUTER_GW2_IF)
        finally:
            for ipr in iprs.values():
                ipr.close()
        self.timings["netlink"] = time.monotonic() - t

        t = time.monotonic()
        if self.gro:
            self._enable_gro()
        self.timings["gro"] = time.monotonic() - t

    def _build_links(self, iprs: dict[str, IPRoute]) -> None:
        links = _links(self.clients, self.vms, self.gw2_ports)
        for link in links:
            # created inside a's namespace with the peer put straight into b's:
            # nothing ever appears in the root namespace
            iprs[link.a.role].link(
                "add", ifname=link.a.ifname, kind="veth", address=link.a.mac,
                peer={"ifname": link.b.ifname, "address": link.b.mac,
                      "net_ns_fd": self.ns(link.b.role)})
        for role in self.roles:
            lo = iprs[role].link_lookup(ifname="lo")[0]
            iprs[role].link("set", index=lo, state="up")
        for link in links:
            for end, other in ((link.a, link.b), (link.b, link.a)):
                ipr = iprs[end.role]
                idx = ipr.link_lookup(ifname=end.ifname)[0]
                for cidr in end.addrs:
                    addr, plen = cidr.split("/")
                    ipr.addr("add", index=idx, address=addr, prefixlen=int(plen))
                ipr.link("set", index=idx, state="up")
                # static neighbours: no ARP/ND races in tests, the XDP path can
                # rely on them from the first packet
                for cidr in other.addrs:
                    ipr.neigh("add", dst=cidr.split("/")[0], lladdr=other.mac, ifindex=idx)
        # VIPs on the loopback of every backend (local VMs and the remote DC, unless
        # dc2 runs xdpgw: then its gateway serves them by VMs its agent creates)
        for role in [v.name for v in self.vms] + ([] if self.dc2_gateway else ["dc2"]):
            lo = iprs[role].link_lookup(ifname="lo")[0]
            iprs[role].addr("add", index=lo, address=VIP4, prefixlen=32)
            iprs[role].addr("add", index=lo, address=VIP6, prefixlen=128)

    def _build_routes(self, iprs: dict[str, IPRoute]) -> None:
        def default(role: str, gw4: str, gw6: str) -> None:
            iprs[role].route("add", dst="0.0.0.0/0", gateway=gw4, family=socket.AF_INET)
            iprs[role].route("add", dst="::/0", gateway=gw6, family=socket.AF_INET6)

        for c in self.clients:
            default(c.name, c.router_ip, c.router_ip6)
        for vm in self.vms:
            default(vm.name, vm.gw_ip, vm.gw_ip6)
        default("gw", ROUTER_IP, ROUTER_IP6)
        default("dc2", ROUTER_DC2_IP, ROUTER_DC2_IP6)
        rt = iprs["rt"]
        # the VIPs and the VM subnets live behind the gateway
        rt.route("add", dst=VIP4_NET, gateway=UPLINK_IP, family=socket.AF_INET)
        rt.route("add", dst=VIP6_NET, gateway=UPLINK_IP6, family=socket.AF_INET6)
        for vm in self.vms:
            net4 = str(ipaddress.ip_interface(f"{vm.ip}/24").network)
            net6 = str(ipaddress.ip_interface(f"{vm.ip6}/64").network)
            rt.route("add", dst=net4, gateway=UPLINK_IP, family=socket.AF_INET)
            rt.route("add", dst=net6, gateway=UPLINK_IP6, family=socket.AF_INET6)
        if self.gateways == 2:
            default(GW2_ROLE, ROUTER_GW2_IP, ROUTER_GW2_IP6)
            gw2 = iprs[GW2_ROLE]
            for vm, p in zip(self.vms, self.gw2_ports):
                # the VM's own address (what health checks probe) via its link to gw2
                gw2.route("add", dst=f"{vm.ip}/32", gateway=p.vm_ip, family=socket.AF_INET)
                gw2.route("add", dst=f"{vm.ip6}/128", gateway=p.vm_ip6, family=socket.AF_INET6)

    def steer(self, to: str) -> None:
        """Where the router sends the VIPs: "gw1", "gw2", or "ecmp" (both; a flow's
        layer-4 hash picks one, and a gateway whose link is down is skipped)."""
        hops = {"gw1": [(UPLINK_IP, UPLINK_IP6)], "gw2": [(GW2_UPLINK_IP, GW2_UPLINK_IP6)],
                "ecmp": [(UPLINK_IP, UPLINK_IP6), (GW2_UPLINK_IP, GW2_UPLINK_IP6)]}
        if to not in hops:
            raise ValueError(f"steer: {to!r} is not one of {sorted(hops)}")
        if to != "gw1" and self.gateways != 2:
            raise ValueError(f"steer {to!r}: this testbed has one gateway")
        for family, net, i in (("-4", VIP4_NET, 0), ("-6", VIP6_NET, 1)):
            via = ["via", hops[to][0][i]] if len(hops[to]) == 1 else \
                [word for hop in hops[to] for word in ("nexthop", "via", hop[i])]
            self.cmd("rt", ["ip", family, "route", "replace", net, *via])

    def attach_dc2_decap(self, ipr: IPRoute | None = None) -> None:
        """Load the IP-in-IP decapsulator and attach it (native XDP) on dc2's eth0."""
        fd, _ = _testbed_programs()
        own = ipr is None
        if own:
            ipr = IPRoute(netns=self.ns("dc2"), flags=0)
        try:
            idx = ipr.link_lookup(ifname=DC2_IF)[0]
            # the device keeps a reference to the program; our fd can go
            ipr.link("set", index=idx, xdp_fd=fd)
        finally:
            if own:
                ipr.close()

    def _attach_xdp_pass(self, ipr: IPRoute, ifname: str) -> None:
        """A do-nothing XDP program (XDP_PASS) on the router's end of the uplink.

        The gateway sends tunnelled packets back out of up0 with XDP_TX. A veth
        schedules its peer's NAPI after XDP_TX only if the *peer* has an XDP
        program (veth_xdp_flush checks the peer queue's xdp_prog); with GRO alone
        the frames sit in the peer's ring until unrelated traffic kicks it, so
        IP-in-IP to dc2 stalled. Redirects (devmap) are flushed either way."""
        _, fd = _testbed_programs()
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], xdp_fd=fd)

    def detach_dc2_decap(self) -> None:
        with IPRoute(netns=self.ns("dc2"), flags=0) as ipr:
            idx = ipr.link_lookup(ifname=DC2_IF)[0]
            ipr.link("set", index=idx, xdp_fd=-1)

    def _enable_gro(self) -> None:
        # A veth delivers frames that XDP redirected (or XDP_TX-ed) into it only if
        # its *peer* runs NAPI: an XDP program or GRO on the peer.  The gateway
        # redirects into gwvN (peer: vmN eth0) and transmits on up0 (peer: to-gw).
        # to-gw also gets TX checksumming off: a veth otherwise hands the gateway
        # frames with checksums left for "hardware" to finish, a state XDP
        # forwarding drops, so the VM would see bad checksums. A real NIC puts
        # complete checksums on the wire. The same for to-dc2 when dc2 runs xdpgw.
        targets = [(vm.name, vm.ifname, ["gro", "on"]) for vm in self.vms]
        targets.append(("rt", ROUTER_DOWNLINK, ["gro", "on", "tx", "off"]))
        if self.dc2_gateway:
            targets.append(("rt", ROUTER_DC2_IF, ["tx", "off"]))
        targets += [(p.vm, p.vm_if, ["gro", "on"]) for p in self.gw2_ports]
        if self.gateways == 2:
            targets.append(("rt", ROUTER_GW2_IF, ["gro", "on", "tx", "off"]))
        procs = [(role, ifname, popen_in_netns(self.ns(role), ["ethtool", "-K", ifname, *features],
                                               stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True))
                 for role, ifname, features in targets]
        for role, ifname, p in procs:
            try:
                _, err = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                raise RuntimeError(f"ethtool on {role}/{ifname} timed out") from None
            if p.returncode != 0:
                raise RuntimeError(f"ethtool -K {ifname} in {role} failed: {err}")

    # ---- introspection helpers for tests/demo
    def ifindex(self, role: str, ifname: str) -> int:
        with IPRoute(netns=self.ns(role), flags=0) as ipr:
            found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise KeyError(f"{ifname} not in {self.ns(role)}")
        return found[0]

    def describe(self) -> str:
        lines = [f"testbed {self.prefix}: namespaces {', '.join(self.namespaces)}",
                 f"  VIP {VIP4} / {VIP6}; uplink {self.ns('gw')}/{UPLINK} {UPLINK_IP} "
                 f"{UPLINK_MAC}; router {ROUTER_IP} {ROUTER_MAC}",
                 f"  dc2 endpoint {DC2_ENDPOINT} / {DC2_ENDPOINT6}"]
        for c in self.clients:
            lines.append(f"  {c.name} ({c.ns}): {', '.join(c.ips + c.ip6s)}")
        for v in self.vms:
            lines.append(f"  {v.name} ({v.ns}): {v.ip} {v.ip6} {v.mac} via gw port "
                         f"{v.port} {v.port_mac}")
        if self.gateways == 2:
            lines.append(f"  gw2: uplink {self.ns(GW2_ROLE)}/{UPLINK} {GW2_UPLINK_IP} {GW2_UPLINK_MAC}; "
                         f"router {ROUTER_GW2_IP} {ROUTER_GW2_MAC} ({ROUTER_GW2_IF})")
            for p in self.gw2_ports:
                lines.append(f"  {p.vm} also via gw2 port {p.port} {p.port_mac} <-> {p.vm_if} {p.vm_ip} {p.vm_ip6}")
        return "\n".join(lines)


# ------------------------------------------------------------------------ CLI

def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.topology")
    ap.add_argument("action", choices=("up", "down", "cleanup"))
    ap.add_argument("--prefix", default=DEFAULT_PREFIX)
    ap.add_argument("--no-decap", action="store_true", help="no XDP decap on dc2")
    ap.add_argument("--gateways", type=int, choices=(1, 2), default=1, help="1 (default) or 2 gateways")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.action == "up":
        tb = Testbed(args.prefix, dc2_decap=not args.no_decap, gateways=args.gateways)
        tb.up()
        atexit.unregister(tb.down)   # the CLI leaves it up on purpose
        print(tb.describe())
        print(f"up in {tb.timings['up']:.2f}s")
    else:
        removed = cleanup_prefix(args.prefix)
        print("removed:", " ".join(removed) or "nothing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

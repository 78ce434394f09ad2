"""The end-to-end benchmark's namespaces, built with pyroute2:

    {p}-cl  eth0 ==veth== up0  {p}-gw  gwv1 ==veth== eth0  {p}-v1
                                       gwv2 ==veth== eth0  {p}-v2   ...

{p} is the run's prefix ("xgb" + 3 hex digits). Every veth is created inside a
namespace with its peer put straight into the other one: nothing ever appears
in the root namespace, and removing the namespaces removes everything (XDP
programs attached to the veths included). No addresses are configured and IPv6
is disabled in every namespace, so the kernel sends nothing of its own: every
frame on these links is the benchmark's. Frames carry addresses of
198.18.0.0/15 only."""
from __future__ import annotations

import atexit
import logging
import subprocess
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from testbed.netns import netns_exists, run_in_netns

log = logging.getLogger(__name__)

XDP_FLAGS_DRV_MODE = 1 << 2
CLIENT_IF = "eth0"
UPLINK = "up0"
VM_IF = "eth0"


def client_mac() -> str:
    return "02:00:00:0a:00:02"


def uplink_mac() -> str:
    return "02:00:00:0a:00:01"


def port_name(i: int) -> str:
    return f"gwv{i}"


def port_mac(i: int) -> str:
    return f"02:00:00:0b:00:{i:02x}"


def vm_mac(i: int) -> str:
    """VM MACs are 02:00:00:0c:00:NN; the sink program counts frames under NN."""
    return f"02:00:00:0c:00:{i:02x}"


def _disable_ipv6() -> None:
    for key in ("all", "default"):
        with open(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6", "w") as f:
            f.write("1")


@dataclass
class Topology:
    prefix: str
    n_vms: int = 2
    queues: int = 1               # rx and tx queues of every veth (one per CPU that sends)
    _created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.n_vms <= 200:
            raise ValueError("n_vms must be 1..200")

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-cl"

    @property
    def gw_ns(self) -> str:
        return f"{self.prefix}-gw"

    def vm_ns(self, i: int) -> str:
        return f"{self.prefix}-v{i}"

    @property
    def namespaces(self) -> list[str]:
        return [self.client_ns, self.gw_ns] + [self.vm_ns(i) for i in range(1, self.n_vms + 1)]

    def __enter__(self) -> "Topology":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> "Topology":
        atexit.register(self.down)
        try:
            for ns in self.namespaces:
                if netns_exists(ns):
                    raise RuntimeError(f"network namespace {ns} exists already")
                pr_netns.create(ns)
                self._created.append(ns)
                run_in_netns(ns, _disable_ipv6, timeout=10)
            self._links()
        except BaseException:
            self.down()
            raise
        return self

    def _links(self) -> None:
        iprs = {ns: IPRoute(netns=ns, flags=0) for ns in self.namespaces}
        # a veth queue per sending CPU: a frame sent on CPU c goes to the peer's
        # queue c, whose NAPI runs on c, so CPUs share no queue on the path
        q = {"num_tx_queues": self.queues, "num_rx_queues": self.queues}
        try:
            iprs[self.client_ns].link("add", ifname=CLIENT_IF, kind="veth", address=client_mac(), **q,
                                      peer={"ifname": UPLINK, "address": uplink_mac(), "net_ns_fd": self.gw_ns, **q})
            for i in range(1, self.n_vms + 1):
                iprs[self.gw_ns].link("add", ifname=port_name(i), kind="veth", address=port_mac(i), **q,
                                      peer={"ifname": VM_IF, "address": vm_mac(i), "net_ns_fd": self.vm_ns(i), **q})
            for ns, ipr in iprs.items():
                for link in ipr.get_links():
                    ipr.link("set", index=link["index"], state="up")
        finally:
            for ipr in iprs.values():
                ipr.close()

    def down(self) -> None:
        """Remove every namespace this object created. Safe to call repeatedly."""
        atexit.unregister(self.down)
        for ns in list(self._created):
            try:
                if netns_exists(ns):
                    pr_netns.remove(ns)
            except OSError as exc:
                log.warning("could not remove netns %s: %s", ns, exc)
            self._created.remove(ns)

    # ---- helpers -----------------------------------------------------------
    def ifindex(self, ns: str, ifname: str) -> int:
        with IPRoute(netns=ns, flags=0) as ipr:
            found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise KeyError(f"{ifname} not in {ns}")
        return found[0]

    def attach_xdp(self, ns: str, ifname: str, prog_fd: int) -> None:
        """Attach in native (driver) mode; the device holds its own reference."""
        with IPRoute(netns=ns, flags=0) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", prog_fd),
                                                      ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})

    def xdp_mode(self, ns: str, ifname: str) -> str | None:
        with IPRoute(netns=ns, flags=0) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        xdp = link.get_attr("IFLA_XDP")
        return xdp.get_attr("IFLA_XDP_ATTACHED") if xdp else None

    def veth_stats(self, ns: str, ifname: str) -> dict[str, int]:
        """`ethtool -S` of a veth: per-queue XDP counters (packets, drops, redirects, xmit errors)."""
        try:
            out = subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-S", ifname], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        stats = {}
        for line in out.splitlines():
            name, sep, value = line.strip().rpartition(":")
            if sep and value.strip().lstrip("-").isdigit():
                stats[name.strip()] = int(value)
        return stats

    def all_veth_stats(self) -> dict[str, dict[str, int]]:
        out = {f"client/{CLIENT_IF}": self.veth_stats(self.client_ns, CLIENT_IF),
               f"gw/{UPLINK}": self.veth_stats(self.gw_ns, UPLINK)}
        for i in range(1, self.n_vms + 1):
            out[f"gw/{port_name(i)}"] = self.veth_stats(self.gw_ns, port_name(i))
            out[f"vm{i}/{VM_IF}"] = self.veth_stats(self.vm_ns(i), VM_IF)
        return out


def cleanup(prefix: str) -> list[str]:
    """Remove the namespaces and pinned gateway state of a crashed run with this
    exact prefix ({prefix}-cl, {prefix}-gw, {prefix}-vN; /sys/fs/bpf/xdpgw/{prefix}-*)."""
    from dataplane.pinning import PIN_ROOT, remove_pins

    removed = []
    if not prefix or "/" in prefix:
        raise ValueError(f"bad prefix {prefix!r}")
    names = [f"{prefix}-cl", f"{prefix}-gw"] + [f"{prefix}-v{i}" for i in range(1, 201)]
    for ns in names:
        if netns_exists(ns):
            try:
                pr_netns.remove(ns)
                removed.append(ns)
            except OSError as exc:
                log.warning("could not remove netns %s: %s", ns, exc)
    for role in ("e2e", "start"):
        pins = PIN_ROOT / f"{prefix}-{role}"
        if remove_pins(pins):
            removed.append(str(pins))
    return removed

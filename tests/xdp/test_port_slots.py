"""Port slots of the devmap through control.gateway.Gateway: a VM moved back and
forth between two ports more times than the devmap has slots, each port
re-created (a new ifindex) before the VM comes back to it, still forwards
(exact verdict and bytes through BPF_PROG_TEST_RUN), and the devmap holds only
the slot of the port the VM is behind.

The ports are veths in a network namespace the test creates and the test
thread enters (devmap writes resolve interface indexes in the caller's
namespace); no traffic leaves BPF_PROG_TEST_RUN."""
from __future__ import annotations

import ipaddress
import secrets
import subprocess

import pytest
from pyroute2 import IPRoute
from pyroute2.netns import popns, pushns
from scapy.all import IP, TCP

from control.config import Config, GatewayConfig, ServiceConfig, VMConfig, validate
from control.gateway import Gateway

ip = ipaddress.ip_address
VIP = "198.19.0.10"
VM_MAC = "02:00:00:00:05:01"
PORT_MAC = "02:00:00:00:06:{:02x}"


@pytest.fixture
def ports_netns():
    """A fresh namespace the test thread is in; IPRoute to make its ports."""
    name = "xgps" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        pushns(name)
        try:
            with IPRoute() as ipr:
                yield ipr
        finally:
            popns()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True, timeout=10)


def make_port(ipr: IPRoute, name: str, n: int) -> int:
    """(Re-)create port `name` (a veth, peer `name`p) with MAC PORT_MAC(n); returns its ifindex."""
    if ipr.link_lookup(ifname=name):
        ipr.link("del", ifname=name)
    ipr.link("add", ifname=name, kind="veth", peer=f"{name}p", address=PORT_MAC.format(n))
    (idx,) = ipr.link_lookup(ifname=name)
    ipr.link("set", index=idx, state="up")
    return idx


def one_vm_gateway(gw, port: str) -> Gateway:
    vm = VMConfig("vm1", ips=(ip("198.18.150.1"),), port=port, mac=VM_MAC)
    svc = ServiceConfig("a", ip(VIP), 8080, "tcp", ("vm1",))
    g = Gateway(validate(Config(GatewayConfig("gwt", "lo", maglev_table_size=gw.m, hash_seed=gw.seed),
                                services=(svc,), vms=(vm,))))
    g.dataplane = gw.dp
    g.program()
    return g


def check_forwards(gw, g: Gateway, port: str, port_idx: int, n: int) -> None:
    l3 = IP(src="198.18.1.5", dst=VIP) / TCP(sport=40000, dport=8080, flags="A")
    r = gw.run(gw.ingress(l3))
    assert (r.verdict, r.vm_id) == ("REDIRECT", g.vms["vm1"].vm_id), (port, r)
    assert r.data == gw.expected_local(0, l3, vm_mac=VM_MAC, port_mac=PORT_MAC.format(n))
    assert gw.dp.ports() == {r.port_slot: port_idx}


@pytest.fixture
def empty_devmap(gw):
    for slot in gw.dp.ports():
        gw.dp.clear_port(slot)
    yield gw
    for slot in gw.dp.ports():
        gw.dp.clear_port(slot)


def test_back_and_forth_between_two_recreated_ports(empty_devmap, ports_netns):
    gw, ipr = empty_devmap, ports_netns
    moves = gw.sizes.max_ports + 10
    idx = make_port(ipr, "xgp0", 0)
    g = one_vm_gateway(gw, "xgp0")
    check_forwards(gw, g, "xgp0", idx, 0)
    for i in range(1, moves + 1):
        port = f"xgp{i % 2}"
        idx = make_port(ipr, port, i % 2)      # a new ifindex; the kernel empties its old slot
        g.move_vm("vm1", port=port)
        check_forwards(gw, g, port, idx, i % 2)

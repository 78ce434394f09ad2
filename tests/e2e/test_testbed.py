"""Integration tests of the namespace testbed: real namespaces, real sockets.

Each module run uses its own random prefix, so parallel/crashed runs never collide;
the fixture always tears down, also on failure.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import subprocess
import sys
import time

import pytest
from pyroute2 import netns as pr_netns

from testbed import addresses
from testbed.netns import netns_socket, run_in_netns
from testbed.topology import Testbed, cleanup_prefix
from tests.e2e.conftest import netns_list, running_testbed

PREFIX = "xgt" + secrets.token_hex(2)      # e.g. xgt3f9a; namespaces xgt3f9a-vm1
IO_TIMEOUT = 5.0


def _ours(prefix: str) -> list[str]:
    return [n for n in netns_list() if n.startswith(prefix + "-")]


@pytest.fixture(scope="module")
def tb():
    with running_testbed(PREFIX) as env:
        yield env.tb
    assert _ours(PREFIX) == []


# ------------------------------------------------------------------ helpers (netns)

ECHO_SERVER = r"""
import select, socket, sys, time
addr, port, lifetime = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((addr, port))
print("ready", flush=True)
deadline, n = time.monotonic() + lifetime, 0
while time.monotonic() < deadline and n < 100:   # bounded in time and count
    r, _, _ = select.select([s], [], [], 0.2)
    if r:
        data, peer = s.recvfrom(2048)
        s.sendto(b"echo:" + data, peer)
        n += 1
"""

# Runs inside the router namespace under `ip netns exec` (scapy must be imported
# there: it caches interfaces at import).  One packet, then exit.
INJECT = r"""
import sys
from scapy.all import Ether, IP, IPv6, UDP, Raw, sendp
outer, inner, src, dst, sport, payload = sys.argv[1:7]
(iface, smac, dmac, osrc4, odst4, osrc6, odst6) = sys.argv[7:14]
if inner == "4":
    pkt_in = IP(src=src, dst=dst, ttl=64) / UDP(sport=int(sport), dport=9)
else:
    pkt_in = IPv6(src=src, dst=dst, hlim=64) / UDP(sport=int(sport), dport=9)
pkt_in = pkt_in / Raw(payload.encode())
proto = 4 if inner == "4" else 41
if outer == "4":
    pkt_out = IP(src=osrc4, dst=odst4, proto=proto, ttl=64) / pkt_in
else:
    pkt_out = IPv6(src=osrc6, dst=odst6, nh=proto, hlim=64) / pkt_in
sendp(Ether(src=smac, dst=dmac) / pkt_out, iface=iface, count=1, verbose=False)
print("sent", len(pkt_out))
"""


def _udp_roundtrip(family: int, src: str, dst: str, port: int, payload: bytes,
                   timeout: float) -> tuple[bytes, str]:
    """Runs in the client namespace (forked child)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(timeout)
        s.sendto(payload, (dst, port))
        data, peer = s.recvfrom(2048)
        return data, peer[0]


def _wait_ready(proc: subprocess.Popen, timeout: float) -> None:
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    assert r, "server did not report ready"
    assert proc.stdout.readline().strip() == "ready"


def _if_names() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


# ------------------------------------------------------------------ netns helpers

def test_run_in_netns_sees_namespace_interfaces(tb):
    assert run_in_netns(tb.ns("c1"), _if_names) == ["eth0", "lo"]
    assert run_in_netns(tb.ns("gw"), _if_names) == ["gwv1", "gwv2", "gwv3", "lo", "up0"]


def _boom(msg: str) -> None:
    raise ValueError(msg)


def test_run_in_netns_reraises_and_bounds_time(tb):
    with pytest.raises(ValueError, match="kaput"):
        run_in_netns(tb.ns("c1"), _boom, "kaput")
    with pytest.raises(FileNotFoundError):
        run_in_netns(PREFIX + "-nope", _if_names)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        run_in_netns(tb.ns("c1"), time.sleep, 30, timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_netns_socket_lives_in_namespace(tb):
    # binding to an address that only exists in c1 proves the socket is there
    with netns_socket(tb.ns("c1")) as s:
        s.bind((tb.clients[0].ips[1], 0))


def test_gro_enabled_on_redirect_targets(tb):
    for role, ifname in [("vm1", "eth0"), ("vm2", "eth0"), ("vm3", "eth0"),
                         ("rt", addresses.ROUTER_DOWNLINK)]:
        out = tb.cmd(role, ["ethtool", "-k", ifname]).stdout
        assert "generic-receive-offload: on" in out, (role, ifname)


# ------------------------------------------------------------------ routed path

@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("src_index", [0, 1], ids=["src-primary", "src-secondary"])
def test_udp_echo_client_to_vm_via_gateway_kernel(tb, family, src_index):
    c1, vm1 = tb.client("c1"), tb.vm("vm1")
    v6 = family == socket.AF_INET6
    dst = vm1.ip6 if v6 else vm1.ip
    src = (c1.ip6s if v6 else c1.ips)[src_index]
    port = 7007
    proc = tb.popen("vm1", [sys.executable, "-c", ECHO_SERVER, dst, str(port), "15"],
                    stdout=subprocess.PIPE, text=True)
    try:
        _wait_ready(proc, 10)
        data, peer = tb.run("c1", _udp_roundtrip, family, src, dst, port,
                            b"hello", IO_TIMEOUT, timeout=IO_TIMEOUT + 5)
        assert data == b"echo:hello"
        assert peer == dst
    finally:
        tb.stop(proc)
    assert proc.returncode is not None


def test_vm_replies_from_vip_reach_client(tb):
    """VM default route goes back through the gateway: a reply sourced from the VIP
    (as after XDP delivery) is routed by gw and rt to the client."""
    c1 = tb.client("c1")
    with tb.socket("c1") as rx, tb.socket("vm2") as tx:
        rx.bind((c1.ip, 40123))
        rx.settimeout(IO_TIMEOUT)
        tx.bind((addresses.VIP4, 80))
        tx.sendto(b"from-vip", (c1.ip, 40123))
        data, peer = rx.recvfrom(2048)
    assert data == b"from-vip" and peer == (addresses.VIP4, 80)


def test_plain_traffic_to_dc2_passes_decapsulator(tb):
    c1 = tb.client("c1")
    with tb.socket("dc2") as rx, tb.socket("c1") as tx:
        rx.bind((addresses.DC2_ENDPOINT, 9))
        rx.settimeout(IO_TIMEOUT)
        tx.bind((c1.ip, 0))
        tx.sendto(b"plain", (addresses.DC2_ENDPOINT, 9))
        data, peer = rx.recvfrom(2048)
    assert data == b"plain" and peer[0] == c1.ip


# ------------------------------------------------------------------ dc2 decap + DSR

@pytest.mark.parametrize("outer", ["4", "6"], ids=["outer4", "outer6"])
@pytest.mark.parametrize("inner", ["4", "6"], ids=["inner4", "inner6"])
def test_dc2_decapsulates_and_replies_direct(tb, outer, inner):
    c1 = tb.client("c1")
    fam = socket.AF_INET if inner == "4" else socket.AF_INET6
    vip = addresses.VIP4 if inner == "4" else addresses.VIP6
    client_ip = c1.ip if inner == "4" else c1.ip6
    sport = 41000 + int(outer) * 10 + int(inner)
    payload = f"tunnelled-{outer}in{inner}"
    with tb.socket("dc2", fam) as server, tb.socket("c1", fam) as client:
        server.bind((vip, 9))
        server.settimeout(IO_TIMEOUT)
        client.bind((client_ip, sport))
        client.settimeout(IO_TIMEOUT)
        # the gateway's encapsulation, sent from the router toward dc2
        res = tb.cmd("rt", [sys.executable, "-c", INJECT, outer, inner, client_ip, vip,
                            str(sport), payload, addresses.ROUTER_DC2_IF, addresses.ROUTER_DC2_MAC,
                            addresses.DC2_MAC, addresses.UPLINK_IP, addresses.DC2_ENDPOINT,
                            addresses.UPLINK_IP6, addresses.DC2_ENDPOINT6], timeout=60)
        assert res.stdout.startswith("sent"), res.stderr
        data, peer = server.recvfrom(2048)
        assert data == payload.encode()
        assert peer[0] == client_ip and peer[1] == sport
        # direct server return: dc2 answers from the VIP straight to the client
        server.sendto(b"dsr-reply", peer[:2])
        data, peer = client.recvfrom(2048)
        assert data == b"dsr-reply"
        assert peer[0] == vip and peer[1] == 9


# ------------------------------------------------------------------ lifecycle

def test_up_replaces_leftovers_and_down_is_clean_and_repeatable():
    prefix = PREFIX + "x"
    bed = Testbed(prefix, dc2_decap=False)
    try:
        # a leftover from a "crashed run"
        pr_netns.create(f"{prefix}-rt")
        assert _ours(prefix) == [f"{prefix}-rt"]
        bed.up()
        assert sorted(_ours(prefix)) == sorted(bed.namespaces)
        assert bed.is_up
        assert run_in_netns(bed.ns("rt"), _if_names) == [
            "lo", "to-c1", "to-c2", "to-dc2", "to-gw"]
    finally:
        bed.down()
    assert _ours(prefix) == []
    assert not bed.is_up
    bed.down()                      # second down: no error
    assert cleanup_prefix(prefix) == []
    # a sibling prefix is untouched by cleanup of another one
    other = f"{prefix}y-rt"
    pr_netns.create(other)
    try:
        cleanup_prefix(prefix)
        assert other in netns_list()
    finally:
        pr_netns.remove(other)


def test_context_manager_always_tears_down():
    prefix = PREFIX + "z"
    with pytest.raises(RuntimeError, match="inside"):
        with Testbed(prefix, dc2_decap=False, gro=False) as bed:
            assert bed.is_up
            raise RuntimeError("inside")
    assert _ours(prefix) == []


def test_prefix_names_fit(tb):
    assert all(len(n) <= 64 for n in tb.namespaces)
    assert os.path.exists(f"/var/run/netns/{tb.ns('vm3')}")

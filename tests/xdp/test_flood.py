"""Flood behaviour (issue 4.3): past the per-CPU new-flow limit, new flows are
still served by Maglev, consistently, but not recorded, so established flows
are never pushed out of the flow table."""
from __future__ import annotations

import os
import time

import pytest
from scapy.all import IP, TCP

from dataplane.flowhash import maglev_slot
from dataplane.libbpf import prog_test_run
from tests.xdp.harness import VIP4, WEB, XdpHarness

LIMIT = 50
TABLE = 256          # a small flow table: a flood this size would evict everything


@pytest.fixture(scope="module")
def flood_program():
    from dataplane.program import Sizes, load

    sizes = Sizes(flow_entries=TABLE, new_flow_limit=LIMIT)
    bpf, fn = load(sizes, trace=True)
    yield bpf, fn, sizes
    bpf.cleanup()


@pytest.fixture
def fgw(flood_program):
    g = XdpHarness(flood_program)
    g.reset()
    # The limit is per CPU and per second: stay on one CPU so one window counts every flow.
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    time.sleep(1.1)          # a fresh window: the last test's flood is over
    yield g
    os.sched_setaffinity(0, cpus)


def syn(src: str, sport: int):
    return XdpHarness.ingress(IP(src=src, dst=VIP4) / TCP(sport=sport, dport=8080, flags="S"))


def test_flood_flows_are_served_by_maglev_but_not_recorded(fgw):
    established = [("198.18.1.7", 40000 + i) for i in range(5)]
    for src, sport in established:
        assert fgw.run(syn(src, sport)).verdict == "REDIRECT"
    table = fgw.dp.maglev_table(WEB)
    before = fgw.snapshot()
    flood = [("198.18.2.9", 1024 + i) for i in range(3 * LIMIT)]
    results = [fgw.run(syn(src, sport)) for src, sport in flood]      # well within one second
    d = fgw.delta(before)
    for (src, sport), r in zip(flood, results):
        assert r.verdict == "REDIRECT"
        assert r.vm_id == table[maglev_slot(src, sport, 8080, 6, fgw.seed, fgw.m)], "left Maglev's choice"
    recorded = [f for f in flood if fgw.dp.flow(fgw.flow_key(f[0], VIP4, f[1], 8080, 6)) is not None]
    # the window already holds the 5 established flows (unless it rolled over in between)
    assert LIMIT - len(established) <= len(recorded) <= LIMIT
    assert d.stats["flood_unrecorded"] == len(flood) - len(recorded)
    assert d.services[WEB][2] == len(flood)            # new_flows counts every new flow served
    for src, sport in established:
        assert fgw.dp.flow(fgw.flow_key(src, VIP4, sport, 8080, 6)) is not None


def test_established_flows_keep_their_vm_during_a_flood(fgw):
    src, sport = "198.18.1.7", 45000
    first = fgw.run(syn(src, sport)).vm_id
    other = next(v for v in (1, 2, 3) if v != first)
    fgw.dp.set_maglev_table(WEB, fgw.table([other]))   # Maglev alone would now move it
    frames = [bytes(syn("198.18.2.9", 2000 + i)) for i in range(4 * TABLE)]
    for frame in frames:                 # raw test runs: the flood fits in one rate window
        prog_test_run(fgw.fn.fd, frame)
    assert fgw.dp.flow(fgw.flow_key(src, VIP4, sport, 8080, 6)) is not None, "evicted by the flood"
    assert fgw.run(syn(src, sport)).vm_id == first


def test_no_limit_records_every_flow(gw):
    before = gw.snapshot()
    for i in range(3 * LIMIT):
        gw.run(syn("198.18.2.9", 3000 + i))
    assert gw.delta(before).stats["flood_unrecorded"] == 0
    assert len(gw.dp.flows()) == 3 * LIMIT


# ------------------------------------------------------------ a real flood in the testbed

FLOOD_SCRIPT = r"""
import socket, struct, sys
src, dst, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
sa, da = socket.inet_aton(src), socket.inet_aton(dst)
for i in range(count):                      # bounded: `count` SYNs, each a new flow
    sport = 1024 + i % 60000
    hdr = struct.pack("!HHIIBBHHH", sport, port, i, 0, 5 << 4, 0x02, 64240, 0, 0)
    c = csum(sa + da + struct.pack("!BBH", 0, 6, len(hdr)) + hdr)
    s.sendto(hdr[:16] + struct.pack("!H", c) + hdr[18:], (dst, 0))
print(count)
"""


def test_syn_flood_in_the_testbed_leaves_established_connections_in_place(tmp_path):
    import secrets
    import subprocess
    import sys

    from control.api import unix as api
    from testbed.kit import GatewayDaemon, LineConn, start_server, vm_binds
    from testbed.config import WEB_PORT, testbed_config
    from testbed.topology import Testbed

    prefix = "xgf" + secrets.token_hex(2)[:3]
    tb = Testbed(prefix)
    daemon = None
    conns = []
    try:
        tb.up()
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        config = testbed_config(prefix, flow_table_size=1024, new_flow_rate_limit=200)
        daemon = GatewayDaemon.launch(tb, config, tmp_path / "gw.toml")
        c1 = tb.client("c1")
        conns = [LineConn(tb, "c1", c1.ips[i % 2], VIP4, WEB_PORT, timeout=10) for i in range(6)]
        for c in conns:
            c.ask("before")
        time.sleep(1.1)                  # the connections' own window is over
        flood = subprocess.run(["ip", "netns", "exec", tb.ns("c2"), sys.executable, "-c", FLOOD_SCRIPT,
                                tb.client("c2").ip, VIP4, str(WEB_PORT), "6000"],
                               capture_output=True, text=True, timeout=60)
        assert flood.returncode == 0, flood.stderr
        stats = api.call(config.gateway.api_socket, "stats")
        assert stats["services"]["web"]["new_flows"] >= 6000       # every SYN was served
        assert stats["datapath"]["flood_unrecorded"] > 6000 - 1024  # most were not recorded
        # Busy connections also survive a plain LRU (the kernel's LRU gives referenced
        # entries a second chance); idle ones do not: test_established_flows_keep_their_vm...
        for c in conns:
            assert c.ask("after") == c.served_by
            lookup = api.call(config.gateway.api_socket, "flow.lookup", service="web", src=c.src, sport=c.sport)
            assert lookup["reason"] == "flow table", f"{c!r} was evicted by the flood"
    finally:
        for c in conns:
            c.close()
        if daemon is not None:
            assert daemon.stop() == 0
        tb.down()

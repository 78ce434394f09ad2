"""Region offload end to end, in a two-data-center testbed:

  dc1 = the gateway gw1 (`xdpgw run` with [monitor], [center], [agent]) and vm1..vm3;
  dc2 = the stand-in remote DC (IP-in-IP decap), with no VIP of its own, and its agent
        (control/dcagent.py), which creates VMs behind dc2 on "prepare";
  the control center (`xdpgw center`) runs in the router's namespace (198.18.0.1).

Region r1 ramps past its threshold (UDP from c1, bounded in count and time); the
monitor marks it heavy, the center picks dc2, has it prepare, and tells gw1 to
offload r1/web to dc2. New TCP connections from r1 are served by dc2's VMs (they
answer from the VIP: a plain TCP client cannot tell); connections opened before keep
their VMs; r2 is untouched. The center is restarted while the offload is active;
after the ramp-down the restarted center clears it: new flows come home, flows
offloaded meanwhile finish at dc2. Times are printed (README "Region offload"), never asserted.
Prefix "xgo" + 3 hex; every namespace and pin goes at the end, also on failure."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.waiting import wait_for

from control.api import unix as api
from control.config import MonitorConfig
from testbed.kit import LineConn, start_server, vm_binds
from testbed.config import WEB_PORT
from testbed.config import testbed_config as make_config
from testbed.addresses import DC2_ENDPOINT, VIP4
from testbed.offload import OffloadLab, Ramp
from tests.e2e.conftest import running_testbed, unique_prefix

PREFIX = unique_prefix("xgo")
LAB = OffloadLab()
INTERVAL = 0.5
HEAVY_PPS = 300.0
RAMP_PPS = 1500
RAMP_MAX_S = 30.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    # the testbed's teardown stops the center and the dc agent (which stops its VMs' servers) by pid
    with running_testbed(PREFIX, dc2_vip=False) as bed:
        tb = bed.tb
        config = make_config(PREFIX, monitor=MonitorConfig(interval=INTERVAL, heavy_pps=HEAVY_PPS, intervals=2,
                                                           smoothing=0.7, services=("web",)),
                             center=LAB.center_link(), agent=LAB.agent())
        gw_path = tmp / "gw1.toml"
        gw_path.write_text(config.to_toml())
        center_path = LAB.write_center_config(tmp)

        daemon = bed.daemon(gw_path)
        xdpgw = daemon.xdpgw
        e = {"tb": tb, "daemon": daemon, "sock": config.gateway.api_socket, "xdpgw": xdpgw,
             "center_path": str(center_path), "tmp": tmp}
        e["start_center"] = lambda: LAB.start_center(tb, xdpgw, center_path)
        e["center"] = e["start_center"]()
        e["dcagent"] = LAB.start_dc_agent(tb)
        daemon.start(timeout=60)
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        yield e
    assert not [p for p in os.listdir("/sys/fs/bpf/xdpgw") if p.startswith(PREFIX)] \
        if os.path.isdir("/sys/fs/bpf/xdpgw") else True


def center_cli(env, *args: str) -> subprocess.CompletedProcess:
    return LAB.center_cli(env["tb"], env["xdpgw"], env["center_path"], *args)



def test_offload_lifecycle(env):
    tb, sock = env["tb"], env["sock"]
    c1, c2 = tb.client("c1"), tb.client("c2")
    offloads = lambda: api.call(sock, "offload.list")   # noqa: E731

    # ---- before: everything local
    before = [LineConn(tb, "c1", c1.ips[i % 2], VIP4, WEB_PORT) for i in range(4)]
    for c in before:
        assert c.ask("before").startswith("vm"), c
    r2_conns = [LineConn(tb, "c2", c2.ip, VIP4, WEB_PORT) for _ in range(2)]
    for c in r2_conns:
        assert c.ask("r2 before").startswith("vm")
    wait_for(lambda: api.call(sock, "monitor")["regions"]["r1"]["pps"] >= 0, 5, what="two monitor samples")
    assert offloads() == []

    # ---- ramp r1 past its threshold
    ramp = Ramp(tb, "c1", RAMP_PPS, RAMP_MAX_S).start()
    t_ramp = time.time()
    try:
        active = wait_for(lambda: [o for o in offloads() if o["region"] == "r1"], 30, 0.05, what="the offload of r1/web")
        t_active = time.time()
        assert active == [{"region": "r1", "service": "web", "endpoint": DC2_ENDPOINT}]
        mon = api.call(sock, "monitor")
        assert mon["regions"]["r1"]["state"] == "heavy" and mon["regions"]["r2"]["state"] == "normal"
        crossed = mon["regions"]["r1"]["crossed_at"]

        # new connections from r1 go to dc2's VMs; they answer from the VIP (the client sees no difference)
        offloaded = [LineConn(tb, "c1", c1.ips[i % 2], VIP4, WEB_PORT) for i in range(6)]
        served = {c.ask("offloaded") for c in offloaded}
        assert served <= {"dc2-dv1", "dc2-dv2"} and served, served
        for c in offloaded:
            assert c.sock.getpeername() == (VIP4, WEB_PORT)
        # connections opened before keep their VMs; r2 is untouched (old and new connections)
        for c in before:
            assert c.ask("during") == c.served_by
        for c in r2_conns:
            assert c.ask("r2 during") == c.served_by
        assert LineConn(tb, "c2", c2.ip, VIP4, WEB_PORT).ask("r2 new").startswith("vm")
        assert not [o for o in offloads() if o["region"] == "r2"]

        # the center: request active at dc2; explain shows every candidate's factors
        listing = center_cli(env, "list")
        assert listing.returncode == 0 and "active" in listing.stdout and "-> dc2" in listing.stdout, listing
        rid = listing.stdout.split()[0]
        shown = json.loads(center_cli(env, "show", rid).stdout)
        explain = center_cli(env, "explain", rid)
        assert explain.returncode == 0 and "dc2" in explain.stdout and "source data center" in explain.stdout
        print(f"\n{explain.stdout}")

        # ---- the center restarts while the offload is active: nothing is lost
        tb.stop(env["center"].proc)
        env["center"] = env["start_center"]()
        assert any("open_requests=1" in line for line in env["center"].lines), env["center"].lines
        again = json.loads(center_cli(env, "show", rid).stdout)
        assert again["state"] == "active" and again["history"] == shown["history"]
    finally:
        ramp.end()
    t_ramp_end = time.time()

    # ---- ramp-down: the monitor calls r1 calm, the (restarted) center clears the offload
    wait_for(lambda: not offloads(), 30, 0.05, what="the offload to be cleared")
    t_cleared = time.time()
    assert json.loads(center_cli(env, "show", rid).stdout)["state"] == "cleared"
    for c in offloaded:                        # offloaded flows finish where they are
        assert c.ask("after") == c.served_by
    for c in before:
        assert c.ask("after") == c.served_by
    home = LineConn(tb, "c1", c1.ip, VIP4, WEB_PORT)
    assert home.ask("home again").startswith("vm")

    history = {h["state"]: h["at"] for h in shown["history"]}
    print(f"region offload, measured (interval {INTERVAL} s, K = 2, heavy {HEAVY_PPS:g} pps, ramp ~{RAMP_PPS} pps):\n"
          f"  ramp start -> threshold crossed (first interval over): {crossed - t_ramp:.2f} s\n"
          f"  threshold crossed -> offload active at gw1: {history['active'] - crossed:.2f} s "
          f"({(history['active'] - crossed) / INTERVAL:.1f} intervals; seen by the test "
          f"{t_active - crossed:.2f} s)\n"
          f"    of which center: requested -> active {history['active'] - history['requested']:.2f} s "
          f"(prepare at dc2 {history['prepared'] - history['preparing']:.2f} s)\n"
          f"  ramp end -> offload cleared: {t_cleared - t_ramp_end:.2f} s; ramp sent {ramp.sent} datagrams")
    for c in before + offloaded + r2_conns + [home]:
        c.close()

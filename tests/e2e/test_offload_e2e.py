"""Region offload end to end, in a two-data-center testbed, once per family (the VIP
of web: IPv4, tunnelled IP-in-IP; of web6: IPv6, tunnelled by GUE, so dc2's XDP program
decapsulates both kinds):

  dc1 = the gateway gw1 (`xdpgw run` with [monitor], [center], [agent]) and vm1..vm3;
  dc2 = a data center running xdpgw too (Testbed(dc2_gateway=True), testbed/config.py
        dc2_config: decapsulation of the tunnels from gw1, no service or VM at start) and
        its agent (testbed/dcagent.py), which on "prepare" creates VMs dvN and adds them
        (and the service) to dc2's gateway;
  the control center (`xdpgw center`) runs in the router's namespace (198.18.0.1).

Region r1 ramps past its threshold (UDP from c1, bounded in count and time); the
monitor marks it heavy, the center picks dc2, has it prepare, and tells gw1 to
offload r1's service to dc2. New TCP connections from r1 are tunnelled to dc2, whose
xdpgw decapsulates them and picks a VM by Maglev (its flow table says which; its
per-VM counters match what the VMs received); the VMs answer from the VIP straight
to the clients (DSR: a plain TCP client cannot tell). Connections opened before keep
their VMs; r2 is untouched. The center is restarted while the offload is active;
after the ramp-down the restarted center clears it: new flows come home, flows
offloaded meanwhile finish at dc2, whose VMs drain and, once idle, are released
(out of dc2's gateway, namespaces gone). A second offload is cleared with a flow
still talking: it is served until release_after, then released.
Times are printed (README "Region offload"), never asserted.
Prefix "xgo" + 3 hex; every namespace and pin goes at the end, also on failure."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from tests.waiting import wait_for

from control.api import unix as api
from control.config import MonitorConfig
from testbed.kit import ConnectionLost, LineConn, poll_until, start_server, vm_binds
from testbed.config import WEB_PORT, dc2_config
from testbed.config import testbed_config as make_config
from testbed.addresses import DC2_ENDPOINT, VIP4, VIP6
from testbed.netns import netns_exists
from testbed.offload import OffloadLab, Ramp
from tests.e2e.conftest import running_testbed, unique_prefix

INTERVAL = 0.5
HEAVY_PPS = 300.0
RAMP_PPS = 1500
RAMP_MAX_S = 30.0
DRAIN_IDLE_S = 1.0          # dc2's agent: a draining VM without packets this long is drained
RELEASE_AFTER_S = 8.0       # the center: release at the latest this long after the clear
# per family: the service, its VIP, and how gw1 tunnels the offloaded flows to dc2
FAMILIES = {4: ("web", VIP4, "ipip"), 6: ("web6", VIP6, "gue")}


@pytest.fixture(scope="module", params=sorted(FAMILIES), ids=lambda v: f"ipv{v}")
def env(request, tmp_path_factory):
    family = request.param
    service, vip, encap = FAMILIES[family]
    prefix = unique_prefix("xgo")
    lab = OffloadLab()
    tmp = tmp_path_factory.mktemp(f"offload{family}")
    # the testbed's teardown stops the center and the dc agent (which stops its VMs' servers) by pid
    with running_testbed(prefix, dc2_gateway=True) as bed:
        tb = bed.tb
        config = make_config(prefix, monitor=MonitorConfig(interval=INTERVAL, heavy_pps=HEAVY_PPS, intervals=2,
                                                           smoothing=0.7, services=(service,)),
                             center=lab.center_link(), agent=lab.agent())
        gw_path = tmp / "gw1.toml"
        gw_path.write_text(config.to_toml())
        center_path = lab.write_center_config(tmp, release_after=RELEASE_AFTER_S, encap=encap)
        dc2 = dc2_config(prefix)
        bed.launch(dc2, tmp / "dc2.toml")

        daemon = bed.daemon(gw_path)
        xdpgw = daemon.xdpgw
        e = {"tb": tb, "daemon": daemon, "sock": config.gateway.api_socket, "dc2": dc2.gateway.api_socket,
             "xdpgw": xdpgw, "center_path": str(center_path), "tmp": tmp, "lab": lab, "family": family,
             "service": service, "vip": vip, "encap": encap}
        e["start_center"] = lambda: lab.start_center(tb, xdpgw, center_path)
        e["center"] = e["start_center"]()
        e["dcagent"] = lab.start_dc_agent(tb, drain_idle=DRAIN_IDLE_S)
        daemon.start(timeout=60)
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        yield e
    assert not [p for p in os.listdir("/sys/fs/bpf/xdpgw") if p.startswith(prefix)] \
        if os.path.isdir("/sys/fs/bpf/xdpgw") else True


def center_cli(env, *args: str) -> subprocess.CompletedProcess:
    return env["lab"].center_cli(env["tb"], env["xdpgw"], env["center_path"], *args)


def center_show(env, rid: str) -> dict:
    return json.loads(center_cli(env, "show", rid).stdout)


def sources(env, role: str) -> tuple[str, ...]:
    c = env["tb"].client(role)
    return c.ips if env["family"] == 4 else c.ip6s


def dc2_vms(env) -> dict[str, dict]:
    return {v["name"]: v for v in api.call(env["dc2"], "vm.list")}


def tcp_received(env, vm: str) -> int:
    """The TCP segments dc2's VM `vm` received (Tcp InSegs in its namespace {p}-dvN): what
    its server's connections got. (Its link also carries dc2's own neighbour discovery
    and listener reports, which never pass the XDP program.)"""
    snmp = subprocess.run(["ip", "netns", "exec", f"{env['tb'].prefix}-{vm}", "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
    header, values = [line.split()[1:] for line in snmp if line.startswith("Tcp:")]
    return int(values[header.index("InSegs")])


def offload_active(env) -> tuple[str, float]:
    """Ramp r1 until its offload is active at gw1; returns the center's request id and
    when the test saw it. The ramp is left running (env["ramp"])."""
    sock, service = env["sock"], env["service"]
    env["ramp"] = Ramp(env["tb"], "c1", RAMP_PPS, RAMP_MAX_S).start()
    env["t_ramp"] = time.time()
    active = poll_until(lambda: [o for o in api.call(sock, "offload.list") if o["region"] == "r1"], 30, 0.05)
    assert active, (f"no offload of r1/{service} within 30 s: center {center_cli(env, 'list').stdout!r}, "
                    f"monitor {api.call(sock, 'monitor')}, dc2's agent {env['dcagent'].lines[-5:]}")
    t_active = time.time()
    assert active == [{"region": "r1", "service": service, "endpoint": DC2_ENDPOINT, "encap": env["encap"]}]
    listing = center_cli(env, "list").stdout.splitlines()
    rid = next(line.split()[0] for line in listing if f" region r1 service {service} " in line
               and line.split()[1] not in ("released", "cleared", "failed"))
    wait_for(lambda: center_show(env, rid)["state"] == "active", 5, 0.05, what=f"request {rid} active")
    return rid, t_active


class Talk:
    """A line on each of `conns` every `every` s on a thread, until `end()` (bounded by
    `max_s`): keeps their VMs busy. `answered`: when each round was answered in full;
    `lost`: the first connection lost, if one was."""

    def __init__(self, conns: list[LineConn], every: float = 0.2, max_s: float = 60.0) -> None:
        self.conns, self.every, self.max_s = conns, every, max_s
        self.answered: list[float] = []
        self.lost: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        k = 0
        while not self.stop.is_set() and time.monotonic() - t0 < self.max_s:
            try:
                for c in self.conns:
                    if c.ask(f"still {k}") != c.served_by:
                        self.lost = f"{c!r}: answered by another server"
                        return
            except ConnectionLost as exc:
                self.lost = str(exc)
                return
            self.answered.append(time.time())
            k += 1
            self.stop.wait(self.every)

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def ramp_down_and_clear(env) -> float:
    env["ramp"].end()
    env["t_ramp_end"] = time.time()
    wait_for(lambda: not api.call(env["sock"], "offload.list"), 30, 0.05, what="the offload to be cleared")
    return time.time()


def test_offload_lifecycle(env):
    tb, sock, service, vip = env["tb"], env["sock"], env["service"], env["vip"]
    c2 = tb.client("c2")
    r1 = sources(env, "c1")
    offloads = lambda: api.call(sock, "offload.list")   # noqa: E731

    # ---- before: everything local; dc2's gateway serves nothing yet
    before = [LineConn(tb, "c1", r1[i % 2], vip, WEB_PORT) for i in range(4)]
    for c in before:
        assert c.ask("before").startswith("vm"), c
    r2_src = c2.ip if env["family"] == 4 else c2.ip6
    r2_conns = [LineConn(tb, "c2", r2_src, vip, WEB_PORT) for _ in range(2)]
    for c in r2_conns:
        assert c.ask("r2 before").startswith("vm")
    wait_for(lambda: api.call(sock, "monitor")["regions"]["r1"]["pps"] >= 0, 5, what="two monitor samples")
    assert offloads() == []
    assert dc2_vms(env) == {} and api.call(env["dc2"], "maglev.tables") == {}

    # ---- ramp r1 past its threshold
    try:
        rid, t_active = offload_active(env)
        mon = api.call(sock, "monitor")
        assert mon["regions"]["r1"]["state"] == "heavy" and mon["regions"]["r2"]["state"] == "normal"
        crossed = mon["regions"]["r1"]["crossed_at"]

        # dc2's agent made the VMs and added them, and the service, to dc2's gateway
        at_dc2 = dc2_vms(env)
        assert sorted(at_dc2) == ["dv1", "dv2"] and all(v["state"] == "active" for v in at_dc2.values()), at_dc2
        assert set(api.call(env["dc2"], "maglev.tables")[service]["slots"]) == {"dv1", "dv2"}
        rx_before = {vm: tcp_received(env, vm) for vm in at_dc2}
        pkts_before = {vm: v["packets"] for vm, v in at_dc2.items()}

        # new connections from r1 go to dc2's VMs, as dc2's xdpgw chose them; they answer
        # from the VIP straight to the client (the client sees no difference)
        offloaded = [LineConn(tb, "c1", r1[i % 2], vip, WEB_PORT) for i in range(8)]
        for c in offloaded:
            for k in range(3):
                c.ask(f"offloaded {k}")
        served = {c.served_by for c in offloaded}
        assert served <= {"dc2-dv1", "dc2-dv2"} and served, served
        for c in offloaded:
            assert c.sock.getpeername()[:2] == (vip, WEB_PORT)
            at_gw1 = api.call(sock, "flow.lookup", service=service, src=c.src, sport=c.sport)
            assert at_gw1["reason"] == f"flow table: offloaded to {DC2_ENDPOINT}", at_gw1
            chosen = api.call(env["dc2"], "flow.lookup", service=service, src=c.src, sport=c.sport)
            assert (chosen["region"], chosen["vm"], chosen["reason"]) == \
                ("r1", c.served_by.removeprefix("dc2-"), "flow table"), chosen
        # dc2's per-VM counters: exactly what each VM's server received (once the last delayed ACKs are in)
        def counts() -> tuple[dict[str, int], dict[str, int]]:
            at = dc2_vms(env)
            return ({vm: at[vm]["packets"] - pkts_before[vm] for vm in at},
                    {vm: tcp_received(env, vm) - rx_before[vm] for vm in at})
        forwarded, received = poll_until(lambda: (lambda f, r: (f, r) if f == r else None)(*counts()), 3, 0.1) \
            or counts()
        assert forwarded == received and sum(forwarded.values()) > 0, (forwarded, received)
        for vm in at_dc2:
            assert (forwarded[vm] > 0) == (f"dc2-{vm}" in served), (vm, forwarded, served)

        # connections opened before keep their VMs; r2 is untouched (old and new connections)
        for c in before:
            assert c.ask("during") == c.served_by
        for c in r2_conns:
            assert c.ask("r2 during") == c.served_by
        assert LineConn(tb, "c2", r2_src, vip, WEB_PORT).ask("r2 new").startswith("vm")
        assert not [o for o in offloads() if o["region"] == "r2"]

        # the center: request active at dc2; explain shows every candidate's factors
        shown = center_show(env, rid)
        assert shown["state"] == "active" and shown["target"] == "dc2"
        explain = center_cli(env, "explain", rid)
        assert explain.returncode == 0 and "dc2" in explain.stdout and "source data center" in explain.stdout
        print(f"\n{explain.stdout}")

        # ---- the center restarts while the offload is active: nothing is lost
        env["tb"].stop(env["center"].proc)
        env["center"] = env["start_center"]()
        assert any("open_requests=1" in line for line in env["center"].lines), env["center"].lines
        again = center_show(env, rid)
        assert again["state"] == "active" and again["history"] == shown["history"]
        talk = Talk(offloaded)                  # the offloaded flows go on through the clear
    finally:
        t_cleared = ramp_down_and_clear(env)

    # ---- ramp-down: the monitor calls r1 calm, the (restarted) center clears the offload;
    # dc2's VMs drain: offloaded flows finish there, no new flow reaches them
    wait_for(lambda: center_show(env, rid)["state"] == "draining", 10, 0.05, what=f"request {rid} draining")
    assert {v["state"] for v in dc2_vms(env).values()} == {"draining"}
    t_draining = time.time()
    wait_for(lambda: talk.answered and talk.answered[-1] > t_draining + 1.0, 5, 0.05,
             what="the offloaded flows answered at dc2 while it drains")
    talk.end()
    assert talk.lost is None, talk.lost
    assert center_show(env, rid)["state"] == "draining"      # busy VMs are not released
    for c in before:
        assert c.ask("after") == c.served_by
    home = LineConn(tb, "c1", r1[0], vip, WEB_PORT)
    assert home.ask("home again").startswith("vm")

    # ---- the offloaded flows end: the VMs go idle, the center releases them
    for c in offloaded:
        c.close()
    t_closed = time.time()
    done = wait_for(lambda: (lambda r: r if r["state"] == "released" else None)(center_show(env, rid)),
                    RELEASE_AFTER_S + 10, 0.1, what=f"request {rid} released")
    t_released = time.time()
    hist = {h["state"]: h["at"] for h in done["history"]}
    assert done["data"]["released_by"] == "drained", done["data"]
    assert dc2_vms(env) == {} and service not in api.call(env["dc2"], "maglev.tables")
    assert not [vm for vm in ("dv1", "dv2") if netns_exists(f"{tb.prefix}-{vm}")]

    history = {h["state"]: h["at"] for h in shown["history"]}
    print(f"region offload, IPv{env['family']} VIP {vip} (interval {INTERVAL} s, K = 2, heavy {HEAVY_PPS:g} pps, "
          f"ramp ~{RAMP_PPS} pps):\n"
          f"  ramp start -> threshold crossed (first interval over): {crossed - env['t_ramp']:.2f} s\n"
          f"  threshold crossed -> offload active at gw1: {history['active'] - crossed:.2f} s "
          f"({(history['active'] - crossed) / INTERVAL:.1f} intervals; seen by the test "
          f"{t_active - crossed:.2f} s)\n"
          f"    of which center: requested -> active {history['active'] - history['requested']:.2f} s "
          f"(prepare at dc2, 2 VMs into its xdpgw: {history['prepared'] - history['preparing']:.2f} s)\n"
          f"  ramp end -> offload cleared: {t_cleared - env['t_ramp_end']:.2f} s; "
          f"ramp sent {env['ramp'].sent} datagrams\n"
          f"  clear (offload.clear at gw1, drain at dc2) -> released: {hist['released'] - hist['draining']:.2f} s; "
          f"last offloaded flow closed -> released: {hist['released'] - t_closed:.2f} s "
          f"(drain idle {DRAIN_IDLE_S:g} s, status poll 1 s; seen by the test {t_released - t_closed:.2f} s)")
    for c in before + r2_conns + [home]:
        c.close()


def test_release_after_with_a_flow_still_open(env):
    """Cleared with an offloaded flow still talking: its VM never goes idle, so the
    flow is served until release_after, then the VMs are released."""
    tb, vip = env["tb"], env["vip"]
    try:
        rid, _ = offload_active(env)
        talker = LineConn(tb, "c1", sources(env, "c1")[0], vip, WEB_PORT, timeout=1.0)
        assert talker.ask("offloaded").startswith("dc2-dv"), talker
        talk = Talk([talker], max_s=RAMP_MAX_S + RELEASE_AFTER_S + 15)
    finally:
        t_cleared = ramp_down_and_clear(env)
    try:
        done = wait_for(lambda: (lambda r: r if r["state"] == "released" else None)(center_show(env, rid)),
                        RELEASE_AFTER_S + 10, 0.1, what=f"request {rid} released")
    finally:
        talk.end()
        talker.close()
    cleared_at, answered = done["data"]["cleared_at"], talk.answered
    assert done["data"]["released_by"] == "release_after", done["data"]
    assert done["data"]["released_at"] >= cleared_at + RELEASE_AFTER_S
    # served all along, well past the point where an idle request is released, up to the release
    # (then its VM is gone: the connection is lost)
    assert answered and answered[-1] >= cleared_at + RELEASE_AFTER_S - 1.0, (answered[-1:], cleared_at)
    assert dc2_vms(env) == {} and not [vm for vm in ("dv1", "dv2") if netns_exists(f"{tb.prefix}-{vm}")]
    print(f"\nIPv{env['family']}: cleared with a flow talking -> released {done['data']['released_at'] - cleared_at:.2f} s "
          f"after the clear (release_after {RELEASE_AFTER_S:g} s); last answer "
          f"{answered[-1] - cleared_at:.2f} s after the clear; offload cleared {t_cleared - env['t_ramp_end']:.2f} s "
          f"after the ramp end")

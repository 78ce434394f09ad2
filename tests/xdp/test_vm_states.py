"""VM states through control/gateway.py (issue 5): admin state x health -> one
effective state; the order of dataplane writes; batched, per-service rebuilds;
tables that depend only on names, weights and the seed; and, through the real XDP
program (BPF_PROG_TEST_RUN), weights, drain and the re-selection of a down VM's flows.
"""
from __future__ import annotations

import ipaddress
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP

from control.config import Config, GatewayConfig, ServiceConfig, VMConfig, validate
from control.gateway import Gateway, GatewayError
from control.vms import ADMIN_STATES, HEALTH_STATES, effective_state
from control.maglev import NO_VM

ip = ipaddress.ip_address
VIP = "198.19.0.10"
M_SMALL = 251


# ------------------------------------------------------------------ fake dataplane

class FakeDataplane:
    """Records the gateway's writes in order (what a test of ordering needs)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.tables: dict[int, np.ndarray] = {}
        self.states: dict[int, str] = {}

    def set_region_prefixes(self, prefixes) -> None:
        pass

    def set_services(self, services) -> None:
        pass

    def set_vm(self, vm_id, where, state="active") -> None:
        self.states[vm_id] = state
        self.log.append(("vm", vm_id, state))

    def set_vms(self, vms) -> None:
        for vm_id, where, state in vms:
            self.set_vm(vm_id, where, state)

    def set_vm_state(self, vm_id, state) -> None:
        self.states[vm_id] = state
        self.log.append(("state", vm_id, state))

    def set_maglev_table(self, sid, table) -> None:
        self.tables[sid] = np.array(table)
        self.log.append(("table", sid, frozenset(int(x) for x in np.unique(table))))

    def maglev_table(self, sid):
        return self.tables.get(sid)

    def set_decap(self, addresses, trusted, gue_port) -> None:
        pass


def config_of(vms: list[tuple[str, int]], services: dict[str, list[str]], m: int = M_SMALL, seed: int = 7,
              port_vms: bool = False) -> Config:
    """VMs (name, weight) behind tunnels (or on port lo), each with an ip; services a, b, ...
    on the VIP, ports 8080, 8081, ..."""
    vm_configs = []
    for i, (name, weight) in enumerate(vms, start=1):
        where = {"port": "lo", "mac": f"02:00:00:00:10:{i:02x}"} if port_vms else {"tunnel": ip("198.18.200.2")}
        vm_configs.append(VMConfig(name, ips=(ip(f"198.18.150.{i}"),), weight=weight, **where))
    svcs = tuple(ServiceConfig(name, ip(VIP), 8080 + i, "tcp", tuple(members))
                 for i, (name, members) in enumerate(services.items()))
    gw = GatewayConfig("gwt", "lo", tunnel_source=ip("198.18.0.2"), next_hop_mac="02:00:00:00:02:01",
                       maglev_table_size=m, hash_seed=seed)
    return validate(Config(gw, services=svcs, vms=tuple(vm_configs)))


def fake_gateway(config: Config, monkeypatch) -> tuple[Gateway, FakeDataplane]:
    monkeypatch.setattr(Gateway, "_location", lambda self, vm: ("somewhere", vm.config.name))
    g = Gateway(config)
    dp = FakeDataplane()
    g.dataplane = dp
    g.program()
    dp.log.clear()
    return g, dp


FIVE = [("vm1", 1), ("vm2", 1), ("vm3", 1), ("vm4", 1), ("vm5", 1)]
TWO_SERVICES = {"a": ["vm1", "vm2", "vm3", "vm4"], "b": ["vm3", "vm4", "vm5"]}


def members(g: Gateway, service: str) -> set[str]:
    names = {vm.vm_id: n for n, vm in g.vms.items()}
    return {names[int(i)] for i in np.unique(g.tables[g.service_ids[service]]) if i != NO_VM}


def name_table(g: Gateway, service: str) -> list[str]:
    names = {vm.vm_id: n for n, vm in g.vms.items()}
    return [names.get(int(i), "-") for i in g.tables[g.service_ids[service]]]


# ---------------------------------------------------------------- effective state

@pytest.mark.parametrize("admin, health, weight", list(itertools.product(ADMIN_STATES, HEALTH_STATES, (0, 1, 5))))
def test_effective_state(admin, health, weight):
    expected = ("down" if health == "down" or admin == "down" else
                "draining" if admin == "draining" or weight == 0 else "active")
    assert effective_state(admin, health, weight) == expected


def test_unknown_health_leaves_the_admin_state(monkeypatch):
    g, dp = fake_gateway(config_of(FIVE, TWO_SERVICES), monkeypatch)
    assert all(vm.health == "unknown" and vm.state == "active" for vm in g.vms.values())
    assert members(g, "a") == {"vm1", "vm2", "vm3", "vm4"}
    g.set_vm_health({"vm1": "up"})
    assert g.vms["vm1"].state == "active" and dp.log == []       # nothing to change


# ------------------------------------------------------------------ write order

def test_a_failing_vm_leaves_the_tables_before_it_is_marked_down(monkeypatch):
    g, dp = fake_gateway(config_of(FIVE, TWO_SERVICES), monkeypatch)
    vm3 = g.vms["vm3"].vm_id
    described = g.set_vm_health({"vm3": "down"})
    assert [d["name"] for d in described] == ["vm3"] and described[0]["state"] == "down"
    tables = [e for e in dp.log if e[0] == "table"]
    assert {e[1] for e in tables} == {g.service_ids["a"], g.service_ids["b"]}
    assert all(vm3 not in e[2] for e in tables)
    assert dp.log[-1] == ("state", vm3, "down")                  # after every table swap
    assert dp.states[vm3] == "down"
    assert members(g, "a") == {"vm1", "vm2", "vm4"} and members(g, "b") == {"vm4", "vm5"}


def test_a_returning_vm_is_usable_before_the_tables_name_it(monkeypatch):
    g, dp = fake_gateway(config_of(FIVE, TWO_SERVICES), monkeypatch)
    vm3 = g.vms["vm3"].vm_id
    g.set_vm_health({"vm3": "down"})
    dp.log.clear()
    g.set_vm_health({"vm3": "up"})
    assert dp.log[0] == ("state", vm3, "active")
    assert [e[0] for e in dp.log[1:]] == ["table", "table"] and all(vm3 in e[2] for e in dp.log[1:])
    assert members(g, "a") == {"vm1", "vm2", "vm3", "vm4"}


def test_batched_changes_rebuild_each_affected_table_once(monkeypatch):
    g, dp = fake_gateway(config_of(FIVE, TWO_SERVICES), monkeypatch)
    g.set_vm_health({"vm1": "down", "vm2": "down", "vm3": "down"})
    assert [e[:2] for e in dp.log if e[0] == "table"] == [("table", g.service_ids["a"]), ("table", g.service_ids["b"])]
    assert [e for e in dp.log if e[0] == "state"] == [("state", g.vms[n].vm_id, "down") for n in ("vm1", "vm2", "vm3")]
    dp.log.clear()
    g.set_vm_health({"vm1": "up"})                 # vm1 serves only a: b is not even rebuilt
    assert [e[:2] for e in dp.log if e[0] == "table"] == [("table", g.service_ids["a"])]
    assert g.last_rebuild["services"] == ["a"] and g.last_rebuild["build_ms"] >= 0


def test_admin_state_and_health_combine(monkeypatch):
    g, dp = fake_gateway(config_of(FIVE, TWO_SERVICES), monkeypatch)
    vm1 = g.vms["vm1"]
    d = g.set_vm_state("vm1", "draining")                        # xdpgw vm drain vm1
    assert (d["state"], d["admin_state"], d["health"]) == ("draining", "draining", "unknown")
    assert "vm1" not in members(g, "a") and dp.states[vm1.vm_id] == "draining"
    g.set_vm_health({"vm1": "down"})
    assert vm1.state == "down" and dp.states[vm1.vm_id] == "down"
    g.set_vm_health({"vm1": "up"})
    assert vm1.state == "draining" and "vm1" not in members(g, "a")   # the drain holds
    d = g.set_vm_state("vm1", "active")                          # xdpgw vm up vm1 clears it
    assert (d["state"], d["admin_state"], d["health"]) == ("active", "active", "up")
    assert "vm1" in members(g, "a")
    g.set_vm_state("vm1", "down")                                # the admin override
    assert vm1.state == "down" and "vm1" not in members(g, "a")
    g.set_vm_health({"vm1": "up"})
    assert vm1.state == "down"
    g.set_vm_state("vm1", "active")
    g.set_vm_health({"vm1": "down"})
    assert vm1.state == "down"
    g.set_vm_state("vm1", "active")                              # `up` cannot override failing checks
    assert vm1.state == "down" and "vm1" not in members(g, "a")


def test_time_in_state_and_probe_fields(monkeypatch):
    g, _ = fake_gateway(config_of(FIVE, TWO_SERVICES), monkeypatch)
    vm = g.vms["vm2"]
    since = vm.since
    g.record_probe("vm2", {"ok": False, "detail": "connection refused", "rtt_ms": 0.1, "at": 5.0,
                           "check": "tcp 198.18.150.2:8080"})
    g.record_probe("nosuch", {"ok": True})                       # ignored
    g.set_vm_health({"vm2": "down"})
    d = vm.describe()
    assert d["last_probe"]["detail"] == "connection refused"
    assert d["health"] == "down" and d["health_since"] >= since and d["since"] >= since
    assert d["tables_at"] is not None and d["tables_at"] >= d["since"] and d["in_state_s"] >= 0
    before = vm.since
    g.set_vm_state("vm2", "draining")                            # still down: not a new state
    assert vm.since == before and vm.state == "down"
    counters_shape = {"admin_state", "health", "health_since", "last_probe", "since", "in_state_s", "tables_at"}
    assert counters_shape <= set(d)


def test_bad_requests_change_nothing(monkeypatch):
    g, dp = fake_gateway(config_of(FIVE, TWO_SERVICES), monkeypatch)
    with pytest.raises(GatewayError, match="unknown VM 'vm9'"):
        g.set_vm_health({"vm1": "down", "vm9": "down"})
    with pytest.raises(GatewayError, match="health 'sick'"):
        g.set_vm_health({"vm1": "down", "vm2": "sick"})
    with pytest.raises(GatewayError, match="state 'up'"):
        g.set_vm_state("vm1", "up")
    assert dp.log == [] and all(vm.state == "active" for vm in g.vms.values())


def test_weight_zero_is_draining(monkeypatch):
    g, dp = fake_gateway(config_of([("vm1", 1), ("vm2", 0), ("vm3", 3)], {"a": ["vm1", "vm2", "vm3"]}), monkeypatch)
    assert g.vms["vm2"].state == "draining" and g.vms["vm2"].admin_state == "active"
    assert members(g, "a") == {"vm1", "vm3"}


# --------------------------------------------- consistency without coordination

VMS8 = [(f"vm{i}", w) for i, w in zip(range(1, 9), (1, 1, 2, 1, 3, 1, 1, 2))]
SERVICES8 = {"a": [f"vm{i}" for i in range(1, 9)], "b": ["vm2", "vm4", "vm6", "vm8"]}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([n for n, _ in VMS8]), st.sampled_from(["up", "down", "unknown"])),
                max_size=25),
       st.randoms(use_true_random=False))
def test_tables_depend_only_on_the_healthy_set(events, rnd):
    """Two gateways, one configured with the VMs in another order (so other VM ids),
    get the same health news in different orders and batches: once they know the
    same final health, every slot names the same VM."""
    mp = pytest.MonkeyPatch()
    try:
        g1, _ = fake_gateway(config_of(VMS8, SERVICES8), mp)
        shuffled = VMS8[:]
        rnd.shuffle(shuffled)
        services = {s: rnd.sample(vms, len(vms)) for s, vms in SERVICES8.items()}
        g2, _ = fake_gateway(config_of(shuffled, services), mp)
    finally:
        mp.undo()
    for vm, health in events:                      # one at a time, as they come
        g1.set_vm_health({vm: health})
    final: dict[str, str] = {}
    for vm, health in events:
        final[vm] = health
    items = list(final.items())
    rnd.shuffle(items)
    while items:                                   # in random batches, in another order
        k = rnd.randint(1, len(items))
        g2.set_vm_health(dict(items[:k]))
        items = items[k:]
    for s in SERVICES8:
        assert name_table(g1, s) == name_table(g2, s)
    expected_a = {n for n, _ in VMS8 if final.get(n) != "down"}
    assert members(g1, "a") == expected_a


# ------------------------------------------------- through the XDP program

def control_gateway(gw, vms: list[tuple[str, int]], services: dict[str, list[str]]) -> Gateway:
    """A control.gateway.Gateway programming the session's loaded program (fixture `gw`)."""
    g = Gateway(config_of(vms, services, m=gw.m, seed=gw.seed, port_vms=True))
    g.dataplane = gw.dp
    g.program()
    return g


def flow(gw, n: int, sport: int = 20000):
    return gw.ingress(IP(src=f"198.18.{1 + n // 50000}.{2 + n % 200}", dst=VIP) /
                      TCP(sport=sport + n % 40000, dport=8080, flags="A"))


def send(gw, frames) -> list[int | None]:
    out = []
    for f in frames:
        r = gw.run(f)
        assert r.verdict == "REDIRECT", r.verdict
        out.append(r.vm_id)
    return out


def test_weights_through_the_gateway(gw):
    g = control_gateway(gw, [("vm1", 1), ("vm2", 2), ("vm3", 3), ("vm4", 0)], {"a": ["vm1", "vm2", "vm3", "vm4"]})
    ids = {n: vm.vm_id for n, vm in g.vms.items()}
    table = gw.dp.maglev_table(g.service_ids["a"])             # what the dataplane uses
    counts = {n: int((table == ids[n]).sum()) for n in ids}
    assert counts["vm4"] == 0
    for n, w in (("vm1", 1), ("vm2", 2), ("vm3", 3)):
        assert abs(counts[n] / gw.m - w / 6) < 0.01, counts
    assert g.maglev_tables()["a"]["slots"] == {n: c for n, c in counts.items() if c}
    chosen = send(gw, [flow(gw, i) for i in range(3000)])
    share = {n: chosen.count(ids[n]) / len(chosen) for n in ids}
    assert share["vm4"] == 0
    for n, w in (("vm1", 1), ("vm2", 2), ("vm3", 3)):
        assert abs(share[n] - w / 6) < 0.04, share


def test_health_down_reselects_its_flows_and_keeps_the_others(gw):
    g = control_gateway(gw, [("vm1", 1), ("vm2", 1), ("vm3", 1), ("vm4", 1)], {"a": ["vm1", "vm2", "vm3", "vm4"]})
    ids = {n: vm.vm_id for n, vm in g.vms.items()}
    frames = [flow(gw, i) for i in range(800)]
    first = send(gw, frames)
    assert set(first) == set(ids.values())
    g.set_vm_health({"vm2": "down"})
    second = send(gw, frames)                        # never dropped: re-selected on this packet
    moved = [i for i in range(len(frames)) if first[i] != second[i]]
    assert sorted(moved) == [i for i in range(len(frames)) if first[i] == ids["vm2"]]
    assert ids["vm2"] not in second
    # a returning VM takes new flows only: every established flow keeps its VM
    g.set_vm_health({"vm2": "up"})
    assert send(gw, frames) == second
    fresh = send(gw, [flow(gw, i, sport=1000) for i in range(400)])
    assert ids["vm2"] in fresh


def test_drain_keeps_flows_and_takes_no_new_ones(gw):
    g = control_gateway(gw, [("vm1", 1), ("vm2", 1), ("vm3", 1)], {"a": ["vm1", "vm2", "vm3"]})
    ids = {n: vm.vm_id for n, vm in g.vms.items()}
    frames = [flow(gw, i) for i in range(300)]
    first = send(gw, frames)
    on_vm1 = first.count(ids["vm1"])
    assert on_vm1 > 0
    g.set_vm_state("vm1", "draining")                            # xdpgw vm drain vm1
    assert send(gw, frames) == first                             # existing flows stay, vm1's too
    fresh = send(gw, [flow(gw, i, sport=5000) for i in range(300)])
    assert ids["vm1"] not in fresh
    g.set_vm_state("vm1", "active")                              # xdpgw vm up vm1
    assert ids["vm1"] in send(gw, [flow(gw, i, sport=9000) for i in range(300)])


def test_vm_status_rendering():
    import time

    from control.stats_view import duration, render_vm_line

    vm = {"name": "vm1", "id": 1, "weight": 2, "state": "draining", "admin_state": "draining", "health": "up",
          "in_state_s": 75.0, "port": "gwv1", "mac": "02:00:00:00:00:01",
          "last_probe": {"ok": True, "detail": "connected", "rtt_ms": 0.4, "at": time.time() - 1.0,
                         "check": "tcp 198.18.101.2:8080"}}
    line = render_vm_line(vm)
    assert line.startswith("vm1") and "draining  health up      for 1m15s" in line, line
    assert "last probe ok tcp 198.18.101.2:8080 connected 0.4ms, 1.0s ago" in line and "port gwv1" in line
    down = {**vm, "state": "down", "admin_state": "active", "health": "down", "in_state_s": 2.0,
            "last_probe": {**vm["last_probe"], "ok": False, "detail": "connection refused"}}
    assert "down (admin active) health down" in render_vm_line(down)
    assert "last probe FAIL tcp 198.18.101.2:8080 connection refused" in render_vm_line(down)
    tunnel = {"name": "vm9", "id": 4, "weight": 1, "state": "active", "tunnel": "198.18.200.2"}
    assert "health unknown for 0.0s; last probe never probed; tunnel 198.18.200.2" in render_vm_line(tunnel)
    assert (duration(5), duration(3725)) == ("5.0s", "1h02m")

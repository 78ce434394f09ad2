"""The metrics without a kernel: the gateway's families from known counters (exact
names and sample values, through prometheus_client's own exposition and parser),
the event histograms, the center's /metrics after a request went through, and
the `[metrics] listen` config errors."""
from __future__ import annotations

import ipaddress
import math
import socket
import tomllib
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from control.center.config import parse_center_document
from control.center.metrics import CenterCollector
from control.config import ConfigError, parse_config
from control.events import GatewayEvents, Histogram
from control.health import Check, HealthMonitor
from control.metrics import MetricsServer, gateway_metrics
from control.migration.manager import Announcement, MigrationError, MigrationManager
from control.migration.registry import Registry
from control.vms import Location
from dataplane import structs as S
from testbed.netns import free_port
from tests.configs import MINIMAL
from tests.prom import Samples, samples, value
from tests.unit.center_fixtures import document
from tests.unit.test_center_api import REQ, post, wait_state, with_center
from tests.waiting import wait_for


class Families:
    """A collector that yields fixed families (what a scrape would read)."""

    def __init__(self, produce) -> None:
        self.produce = produce

    def collect(self):
        return self.produce()


def exposition(produce) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(produce))
    return generate_latest(registry).decode()


def scrape(produce) -> Samples:
    """The exposition of `produce`'s families, parsed back."""
    return samples(exposition(produce))


def counters() -> dict:
    stats = {name: 0 for name in S.STAT_NAMES}
    stats.update(flow_hits=70, flow_misses=30, flood_unrecorded=2, flow_reselect=1, local_fwd=95, tunnel_fwd=4,
                 offload_fwd=1, icmp_err_fwd=0, **{"pass": 11})
    drops = {name: 0 for name in S.DROP_REASONS}
    drops["ip4_bad_ihl"] = 3
    vm = {"admin_state": "active", "health_since": 0.0, "last_probe": None, "since": 0.0, "in_state_s": 1.0,
          "tables_at": None}
    return {
        "regions": {"unknown": {"packets": 5, "bytes": 300}, "r1": {"packets": 100, "bytes": 64000},
                    "r2": {"packets": 0, "bytes": 0}},
        "services": {"web": {"packets": 100, "bytes": 64000, "new_flows": 30}},
        "vms": {"vm1": {"packets": 60, "bytes": 38400, **vm, "state": "active", "health": "up"},
                "vm2": {"packets": 40, "bytes": 25600, **vm, "state": "down", "health": "down"}},
        "drops": drops,
        "flows": {"entries": None, "hits": 70, "misses": 30},
        "datapath": stats,
    }


def test_gateway_families_from_known_counters() -> None:
    events = GatewayEvents()
    events.probe("vm1", "tcp", True, 0.002)
    events.probe("vm1", "tcp", True, 0.004)
    events.probe("vm2", "tcp", False, None)
    events.convergence.observe(0.03)
    events.maglev_swapped(["web"], 0.0015)
    monitor = {"r1": {"state": "heavy", "pps": 1200.0, "bps": 80000.0}, "r2": {"state": "normal", "pps": 0.0,
                                                                             "bps": 0.0}}
    got = scrape(lambda: gateway_metrics(counters(), events, 1 << 20, [("r1", "web", "198.18.200.2")], monitor))

    def v(name: str, **labels: str) -> float:
        return value(got, name, **labels)

    assert v("xdpgw_region_packets_total", region="r1") == 100
    assert v("xdpgw_region_bytes_total", region="r1") == 64000
    assert v("xdpgw_region_packets_total", region="unknown") == 5
    assert v("xdpgw_region_packets_total", region="r2") == 0
    assert v("xdpgw_service_packets_total", service="web") == 100
    assert v("xdpgw_service_bytes_total", service="web") == 64000
    assert v("xdpgw_service_new_flows_total", service="web") == 30
    assert v("xdpgw_vm_packets_total", vm="vm2") == 40
    assert v("xdpgw_vm_bytes_total", vm="vm1") == 38400
    assert [v("xdpgw_vm_state", vm="vm2", state=s) for s in ("active", "draining", "down")] == [0, 0, 1]
    assert [v("xdpgw_vm_health", vm="vm1", health=h) for h in ("unknown", "up", "down")] == [0, 1, 0]
    assert v("xdpgw_drops_total", reason="ip4_bad_ihl") == 3
    assert v("xdpgw_drops_total", reason="no_vm") == 0
    assert len([k for k in got if k[0] == "xdpgw_drops_total"]) == len(S.DROP_REASONS)
    assert v("xdpgw_flow_table_hits_total") == 70
    assert v("xdpgw_flow_table_misses_total") == 30
    assert v("xdpgw_flow_table_reselects_total") == 1
    assert v("xdpgw_flow_table_flood_unrecorded_total") == 2
    assert v("xdpgw_flow_table_capacity") == 1 << 20
    assert v("xdpgw_packets_passed_total") == 11
    assert v("xdpgw_packets_forwarded_total", path="local") == 95
    assert v("xdpgw_packets_forwarded_total", path="offload") == 1
    assert v("xdpgw_offloads_active") == 1
    assert v("xdpgw_offload", region="r1", service="web", endpoint="198.18.200.2") == 1
    assert v("xdpgw_region_monitor_packets_per_second", region="r1") == 1200
    assert v("xdpgw_region_monitor_bytes_per_second", region="r1") == 10000
    assert v("xdpgw_region_heavy", region="r1") == 1 and v("xdpgw_region_heavy", region="r2") == 0
    assert v("xdpgw_health_probes_total", vm="vm1", result="ok") == 2
    assert v("xdpgw_health_probes_total", vm="vm2", result="failed") == 1
    assert v("xdpgw_health_probe_rtt_seconds_count", kind="tcp") == 2
    assert v("xdpgw_health_probe_rtt_seconds_sum", kind="tcp") == pytest.approx(0.006)
    assert v("xdpgw_health_probe_rtt_seconds_bucket", kind="tcp", le="0.001") == 0
    assert v("xdpgw_health_probe_rtt_seconds_bucket", kind="tcp", le="0.0025") == 1
    assert v("xdpgw_health_probe_rtt_seconds_bucket", kind="tcp", le="0.005") == 2
    assert v("xdpgw_health_probe_rtt_seconds_bucket", kind="tcp", le="+Inf") == 2
    assert v("xdpgw_migration_convergence_seconds_count") == 1
    assert v("xdpgw_migration_convergence_seconds_bucket", le="0.025") == 0
    assert v("xdpgw_migration_convergence_seconds_bucket", le="0.05") == 1
    assert v("xdpgw_maglev_rebuilds_total", service="web") == 1
    assert v("xdpgw_maglev_swap_duration_seconds_count") == 1
    assert v("xdpgw_maglev_swap_duration_seconds_bucket", le="0.001") == 0
    assert v("xdpgw_maglev_swap_duration_seconds_bucket", le="0.0025") == 1


def test_without_monitor_no_rate_families() -> None:
    got = scrape(lambda: gateway_metrics(counters(), GatewayEvents(), 1024, [], None))
    names = {name for name, _ in got}
    assert not any(n.startswith("xdpgw_region_monitor") or n == "xdpgw_region_heavy" for n in names)
    assert got[("xdpgw_offloads_active", ())] == 0


def test_flow_table_entries_only_when_counted() -> None:
    """The entries gauge carries the kernel's count; without one (an older kernel) it is left out."""
    counted = counters()
    counted["flows"]["entries"] = 1234
    got = scrape(lambda: gateway_metrics(counted, GatewayEvents(), 1024, [], None))
    assert got[("xdpgw_flow_table_entries", ())] == 1234
    got = scrape(lambda: gateway_metrics(counters(), GatewayEvents(), 1024, [], None))
    assert "xdpgw_flow_table_entries" not in {name for name, _ in got}


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 7.0):
        h.observe(value, "x")
    (labels, observed), = h.values().items()
    assert labels == ("x",)
    assert observed.buckets == [(0.1, 1), (1.0, 3), (math.inf, 4)]
    assert observed.sum == pytest.approx(8.6)


def test_metrics_server_serves_the_text_format_on_loopback() -> None:
    port = free_port()
    server = MetricsServer(f"127.0.0.1:{port}",
                           Families(lambda: gateway_metrics(counters(), GatewayEvents(), 8, [], None)))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
    finally:
        server.close()
    assert 'xdpgw_region_packets_total{region="r1"} 100.0' in text.splitlines()


def test_metrics_server_port_in_use_is_a_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            MetricsServer(f"127.0.0.1:{port}", Families(lambda: iter(())))
    assert str(err.value).startswith(f"metrics.listen: cannot listen on 127.0.0.1:{port}: ")


BAD_LISTEN = 'is not ADDR:PORT or [ADDR6]:PORT (port 1..65535)'


@pytest.mark.parametrize("table, expected", [
    ('listen = "9417"', f'metrics.listen: "9417" {BAD_LISTEN}'),
    ('listen = "localhost:9417"', f'metrics.listen: "localhost:9417" {BAD_LISTEN}'),
    ('listen = "127.0.0.1:0"', f'metrics.listen: "127.0.0.1:0" {BAD_LISTEN}'),
    ("listen = 9417", "metrics.listen: expected a string, got integer 9417"),
    ('port = 9417', "metrics.port: unknown key"),
    ("", "metrics.listen: missing required key"),
])
def test_metrics_listen_errors(tmp_path, table: str, expected: str) -> None:
    """The same one-line error from the gateway's config and from the center's."""
    with pytest.raises(ConfigError) as err:
        parse_config(MINIMAL + f"\n[metrics]\n{table}\n")
    assert str(err.value) == expected and len(expected.splitlines()) == 1
    with pytest.raises(ConfigError) as err:
        parse_center_document({**document(tmp_path), "metrics": tomllib.loads(table)})
    assert str(err.value) == expected


def test_metrics_listen_parsed(tmp_path) -> None:
    config = parse_config(MINIMAL + '\n[metrics]\nlisten = "[::1]:9417"\n')
    assert config.metrics.listen == "[::1]:9417"
    assert parse_config(config.to_toml()) == config
    assert parse_config(MINIMAL).metrics is None
    center = parse_center_document({**document(tmp_path), "metrics": {"listen": "127.0.0.1:9418"}})
    assert center.metrics.listen == "127.0.0.1:9418"
    assert parse_center_document(document(tmp_path)).metrics is None


def test_center_metrics_after_a_request(tmp_path) -> None:
    """The real registry and exposition over the center driven through its HTTP API with fake agents."""
    async def body(client, center):
        status, req = await post(client, "/v1/requests", REQ)
        assert status == 201
        assert (await wait_state(client, req["id"], "active"))["state"] == "active"
        return scrape(CenterCollector(center.store, center.workflow.events).collect)

    got = with_center(tmp_path, body)
    assert got[("xdpgw_center_requests", (("state", "active"),))] == 1
    assert got[("xdpgw_center_requests", (("state", "requested"),))] == 0
    assert got[("xdpgw_center_requests", (("state", "failed"),))] == 0
    # requested -> target_chosen -> preparing -> prepared -> distributing -> active: one step from each
    for state in ("requested", "target_chosen", "preparing", "prepared", "distributing"):
        assert got[("xdpgw_center_step_duration_seconds_count", (("outcome", "ok"), ("state", state)))] == 1, state
        assert got[("xdpgw_center_step_duration_seconds_bucket",
                    (("le", "+Inf"), ("outcome", "ok"), ("state", state)))] == 1
    assert not any(k[0] == "xdpgw_center_step_duration_seconds_count" and ("outcome", "error") in k[1] for k in got)


def test_migration_convergence_is_observed_when_applied(tmp_path) -> None:
    """The manager observes the announcement-to-last-gateway time of a move it applied
    (a fake clock: the local re-pointing takes 30 ms), and nothing for a failed one."""
    events = GatewayEvents()
    reg = Registry(str(tmp_path / "r.db"))
    reg.sync_vm("vm1", 1, ["198.18.101.2"], "02:00:00:00:00:01", None, "port", "gwv1")
    now = [10**12]

    def check_local(name, port=None, mac=None, tunnel=None, host=None):
        if port == "gone":
            raise RuntimeError("no such port")
        return Location(host, port, mac)

    def move_local(name, port=None, mac=None, tunnel=None, **_):
        now[0] += 30_000_000

    m = MigrationManager(reg, "gw1", move_local, check_local=check_local, clock=lambda: now[0], events=events)
    try:
        assert m.announce(Announcement("garp", "02:00:00:00:00:01", None, "gwv1b", now[0])).result == "applied"
        with pytest.raises(MigrationError, match="no such port"):
            m.move("vm1", port="gone")
    finally:
        m.close()
        reg.close()
    got = scrape(lambda: gateway_metrics(counters(), events, 8, [], None))
    assert value(got, "xdpgw_migration_convergence_seconds_count") == 1
    assert value(got, "xdpgw_migration_convergence_seconds_sum") == pytest.approx(0.03)
    assert value(got, "xdpgw_migration_convergence_seconds_bucket", le="0.025") == 0
    assert value(got, "xdpgw_migration_convergence_seconds_bucket", le="0.05") == 1


def test_health_probes_are_counted_as_they_happen() -> None:
    """Real TCP probes of a listener on loopback, then of a closed port: each probe lands in
    the events, with a round trip for every answered one (refusals answer too)."""
    events = GatewayEvents()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        checks = [Check(vm="vm1", kind="tcp", address=ipaddress.ip_address("127.0.0.1"), port=port, interval=0.05),
                  Check(vm="vm2", kind="tcp", address=ipaddress.ip_address("127.0.0.1"), port=free_port(),
                        interval=0.05)]
        monitor = HealthMonitor(checks, on_change=lambda changes: None, events=events).start()
        try:
            wait_for(lambda: all(events.probes.values().get((vm, r), 0) >= 2
                                 for vm, r in (("vm1", "ok"), ("vm2", "failed"))), timeout=10,
                     what="two probes of each VM")
        finally:
            monitor.stop()
    probes = events.probes.values()
    assert set(probes) == {("vm1", "ok"), ("vm2", "failed")}
    (rtt,) = events.probe_rtt.values().values()
    assert rtt.buckets[-1][1] == monitor.probes == sum(probes.values())


def test_store_state_as_the_gateway_follows_it() -> None:
    """Degraded is 1 exactly while the follower says so; no store, no store families."""
    def families(store):
        return scrape(lambda: gateway_metrics(counters(), GatewayEvents(), 8, [], None, store))

    got = families({"url": "etcd://198.18.0.1:2379", "state": "degraded", "revision": 41, "since": 1.0,
                    "relists": 0})
    assert got[("xdpgw_store_degraded", ())] == 1
    assert got[("xdpgw_store_revision", ())] == 41
    got = families({"url": "etcd://198.18.0.1:2379", "state": "ok", "revision": 42, "since": 2.0, "relists": 1})
    assert got[("xdpgw_store_degraded", ())] == 0
    assert got[("xdpgw_store_revision", ())] == 42
    assert not any(name.startswith("xdpgw_store") for name, _ in families(None))

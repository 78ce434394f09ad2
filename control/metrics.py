"""Prometheus metrics: `GET /metrics` on `[metrics] listen`, for the gateway daemon
(GatewayCollector) and the control center (control/center/metrics.py), in the
Prometheus text format written by prometheus_client.

Collectors read at scrape time; nothing samples in the background. A gateway scrape
is one Gateway.counters(count_flows=False): batch lookups of the per-CPU counter
arrays (regions, services, VMs, drops, stats), folded over CPUs in Cython
(dataplane/fold.py). It never walks the flow table: its entries are the kernel's
element count (dataplane/elemcount.py), left out where the kernel keeps none.
Events that need observing when they happen (probe round trips, migration
convergence, Maglev swaps) are recorded in control/events.py and read from there.

This is the only gateway module that imports prometheus_client."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from control.config import ConfigError, parse_listen
from control.events import GatewayEvents, Histogram
from control.vms import ADMIN_STATES, HEALTH_STATES

# datapath stats (ebpf/structs.h STAT_*) -> how the forwarded-packets counter labels them
FORWARD_PATHS = {"local_fwd": "local", "tunnel_fwd": "tunnel", "offload_fwd": "offload",
                 "icmp_err_fwd": "icmp_error"}


def counter(name: str, doc: str, labels: list[str],
            values: Iterable[tuple[Sequence[str], float]]) -> CounterMetricFamily:
    """A counter family; `name` without the _total suffix."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, v in values:
        family.add_metric(list(label_values), v)
    return family


def gauge(name: str, doc: str, labels: list[str], values: Iterable[tuple[Sequence[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, v in values:
        family.add_metric(list(label_values), v)
    return family


def one_hot(name: str, doc: str, key: str, label: str, states: Iterable[str],
            current: dict[str, str]) -> GaugeMetricFamily:
    """A state as a gauge: 1 for the series of each entry's current state, 0 for its others."""
    states = tuple(states)
    return gauge(name, doc, [key, label],
                 (([entry, s], float(s == now)) for entry, now in current.items() for s in states))


def histogram(name: str, doc: str, labels: list[str], h: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for label_values, value in sorted(h.values().items()):
        buckets = [("+Inf" if math.isinf(bound) else floatToGoString(bound), n) for bound, n in value.buckets]
        family.add_metric(list(label_values), buckets, value.sum)
    return family


def gateway_metrics(counters: dict, events: GatewayEvents, flow_capacity: int,
                    offloads: list[tuple[str, str, str]], monitor: dict | None,
                    store: dict | None = None) -> Iterator[Metric]:
    """The gateway's metric families from a Gateway.counters() reading, its events, the
    flow table's size, its offloads (region, service, endpoint), the region
    monitor's snapshot (None without a [monitor]) and the store as the gateway
    follows it (its status(); None without one)."""
    regions, services, vms = counters["regions"], counters["services"], counters["vms"]
    stats = counters["datapath"]
    yield counter("xdpgw_region_packets", "IP packets received from each source region (region=\"unknown\": "
                  "no prefix matched)", ["region"], (((r,), c["packets"]) for r, c in regions.items()))
    yield counter("xdpgw_region_bytes", "Bytes (Ethernet frames) received from each source region", ["region"],
                  (((r,), c["bytes"]) for r, c in regions.items()))
    yield counter("xdpgw_service_packets", "Packets to each service's VIP, port and protocol", ["service"],
                  (((s,), c["packets"]) for s, c in services.items()))
    yield counter("xdpgw_service_bytes", "Bytes of the packets to each service", ["service"],
                  (((s,), c["bytes"]) for s, c in services.items()))
    yield counter("xdpgw_service_new_flows", "New flows of each service (given a VM or an offload target)",
                  ["service"], (((s,), c["new_flows"]) for s, c in services.items()))
    yield counter("xdpgw_vm_packets", "Packets forwarded to each VM", ["vm"],
                  (((v,), c["packets"]) for v, c in vms.items()))
    yield counter("xdpgw_vm_bytes", "Bytes forwarded to each VM", ["vm"],
                  (((v,), c["bytes"]) for v, c in vms.items()))
    yield one_hot("xdpgw_vm_state", "Each VM's effective state (1 for the current one): active takes new flows, "
                  "draining keeps its flows, down takes none", "vm", "state", ADMIN_STATES,
                  {v: c["state"] for v, c in vms.items()})
    yield one_hot("xdpgw_vm_health", "Each VM's health by its checks (1 for the current one)", "vm", "health",
                  HEALTH_STATES, {v: c["health"] for v, c in vms.items()})
    yield counter("xdpgw_drops", "Packets dropped, by reason", ["reason"],
                  (((r,), n) for r, n in counters["drops"].items()))
    yield CounterMetricFamily("xdpgw_flow_table_hits", "Packets of a VIP whose flow-table entry was used",
                              value=stats["flow_hits"])
    yield CounterMetricFamily("xdpgw_flow_table_misses", "Packets of a VIP with no flow-table entry",
                              value=stats["flow_misses"])
    yield CounterMetricFamily("xdpgw_flow_table_reselects", "Packets whose flow's VM was gone or down: re-selected",
                              value=stats["flow_reselect"])
    yield CounterMetricFamily("xdpgw_flow_table_flood_unrecorded", "New flows served but not recorded: more new "
                              "flows per CPU and second than gateway.new_flow_rate_limit",
                              value=stats["flood_unrecorded"])
    if counters["flows"]["entries"] is not None:
        yield GaugeMetricFamily("xdpgw_flow_table_entries", "Entries in the flow table now",
                                value=counters["flows"]["entries"])
    yield GaugeMetricFamily("xdpgw_flow_table_capacity", "Entries the flow table holds at most (LRU)",
                            value=flow_capacity)
    yield CounterMetricFamily("xdpgw_packets_passed", "Packets handed to the kernel untouched (no service matched)",
                              value=stats["pass"])
    yield counter("xdpgw_packets_forwarded", "Packets forwarded, by path: local (VM port), tunnel (VM behind "
                  "IP-in-IP), offload (another data center), icmp_error (to the VM of the quoted flow)", ["path"],
                  (((path,), stats[stat]) for stat, path in FORWARD_PATHS.items()))
    yield GaugeMetricFamily("xdpgw_offloads_active", "(region, service) pairs whose new flows go to another "
                            "data center", value=len(offloads))
    yield gauge("xdpgw_offload", "1 for each active offload", ["region", "service", "endpoint"],
                (([r, s, e], 1.0) for r, s, e in offloads))
    if monitor is not None:
        yield gauge("xdpgw_region_monitor_packets_per_second", "Each region's smoothed packet rate as the "
                    "heavy-region monitor sees it", ["region"], (([r], m["pps"]) for r, m in monitor.items()))
        yield gauge("xdpgw_region_monitor_bytes_per_second", "Each region's smoothed byte rate as the heavy-region "
                    "monitor sees it", ["region"], (([r], m["bps"] / 8) for r, m in monitor.items()))
        yield gauge("xdpgw_region_heavy", "1 while the monitor holds the region heavy", ["region"],
                    (([r], float(m["state"] == "heavy")) for r, m in monitor.items()))
    yield counter("xdpgw_health_probes", "Health probes of each VM, by result (ok, failed)", ["vm", "result"],
                  sorted(events.probes.values().items()))
    yield histogram("xdpgw_health_probe_rtt_seconds", "Round trip of the health probes that got an answer, by "
                    "kind (tcp, http, udp)", ["kind"], events.probe_rtt)
    yield histogram("xdpgw_migration_convergence_seconds", "From a VM's move being seen (its announcement, or "
                    "the call) to every gateway re-pointed", [], events.convergence)
    yield counter("xdpgw_maglev_rebuilds", "Maglev tables rebuilt and swapped in, per service", ["service"],
                  sorted(events.maglev_rebuilds.values().items()))
    yield histogram("xdpgw_maglev_swap_duration_seconds", "One Maglev rebuild: building the changed services' "
                    "tables, writing and swapping them in", [], events.maglev_swap)
    if store is not None:
        yield GaugeMetricFamily("xdpgw_store_degraded", "1 while the shared store does not answer: the gateway "
                                "forwards with what it has and catches up when it answers",
                                value=float(store["state"] == "degraded"))
        if store["revision"] is not None:
            yield GaugeMetricFamily("xdpgw_store_revision", "The store revision whose changes this gateway has "
                                    "applied", value=store["revision"])


class GatewayCollector(Collector):
    """The gateway daemon's metrics, read from the gateway (and the region monitor) at scrape time."""

    def __init__(self, gateway, monitor=None, store: Callable[[], dict | None] | None = None) -> None:
        self.gateway = gateway
        self.monitor = monitor
        self.store = store

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        counters = gw.counters(count_flows=False)
        with gw.lock:
            offloads = [(r, s, str(e)) for (r, s), e in sorted(gw.offload_targets.items())]
        snapshot = self.monitor.snapshot() if self.monitor is not None else None
        store = self.store() if self.store is not None else None
        return gateway_metrics(counters, gw.events, gw.sizes.flow_entries, offloads, snapshot, store)


class MetricsServer:
    """GET /metrics on `listen` ("ADDR:PORT"), in a thread of its own, until close()."""

    def __init__(self, listen: str, collector: Collector) -> None:
        host, port = parse_listen(listen, "metrics.listen")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError("metrics.listen", f"cannot listen on {listen}: {exc.strerror or exc}") from None
        self.listen = listen

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

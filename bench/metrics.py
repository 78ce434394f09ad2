"""Section metrics: the cost of a Prometheus scrape of a gateway with 1k regions and
1M flows (control/metrics.py), each figure next to a baseline timed in the same run
(interleaved):

* a full GET /metrics over loopback (control.metrics.MetricsServer) against the same
  GET of a gateway with one region and an empty flow table: how the scrape grows
  with regions and flows;
* the collector and the exposition alone (prometheus_client.generate_latest on the
  server's registry, no HTTP) against Gateway.counters(count_flows=False), the map
  reads it is built on;
* the flow-table entry count alone (Dataplane.flow_count: the kernel's element
  count, dataplane/elemcount.py) against one full walk of the table, what counting
  costs without it.

The gateways are the real Gateway façade over a loaded (not attached) program with
private maps: tunnel VMs only, interface lo. The scrape carries the flow-table
entry count, checked against the flows filled in and the walk."""
from __future__ import annotations

import dataclasses
import ipaddress
import urllib.request

import numpy as np

from . import frames as F
from .common import Context, Measurement, median, timed
from .programs import fill_flows, possible_cpus

SECTION = "metrics"
N_VMS = 16


def _config(regions: int, flow_entries: int, maglev_m: int):
    from control.config import Config, GatewayConfig, RegionConfig, ServiceConfig, VMConfig, validate

    ip = ipaddress.ip_address
    # region i: the i-th /26 of 198.18.0.0/16 (config values only; no packet is sent)
    nets = list(ipaddress.ip_network("198.18.0.0/16").subnets(new_prefix=26))[:regions]
    vms = tuple(VMConfig(name=f"vm{i}", tunnel=ip(f"198.18.200.{i}")) for i in range(1, N_VMS + 1))
    return validate(Config(
        gateway=GatewayConfig(name="bench", interface="lo", tunnel_source=ip("198.18.0.1"),
                              next_hop_mac="02:00:00:00:00:01", flow_table_size=flow_entries,
                              maglev_table_size=maglev_m, max_regions=max(regions, 16)),
        regions=tuple(RegionConfig(name=f"r{i}", prefixes=(net,)) for i, net in enumerate(nets, start=1)),
        services=(ServiceConfig(name="web", vip=ip(F.VIP4), port=F.WEB_PORT, protocol="tcp",
                                vms=tuple(v.name for v in vms)),),
        vms=vms))


def _gateway(config):
    """The Gateway façade over a loaded, programmed program with private (unpinned) maps."""
    from control.gateway import Gateway
    from dataplane.maps import Dataplane
    from dataplane.program import load

    gw = Gateway(config)
    gw.sizes = dataclasses.replace(gw.sizes, pin_dir=None)
    bpf, gw.fn = load(gw.sizes)
    gw.dataplane = Dataplane(bpf, gw.sizes)
    gw.program()
    return gw


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def run(ctx: Context) -> dict:
    from prometheus_client import generate_latest

    from control.metrics import GatewayCollector, MetricsServer

    regions = ctx.size(1000, 16)
    cap = ctx.size(1 << 20, 1 << 13)
    n_flows = ctx.size(1_000_000, 8000)
    m = ctx.size(65537, 4099)
    runs = ctx.size(20, 3)
    results: list[Measurement] = []
    info: dict = {}
    ctx.progress(f"loading a gateway with {regions} regions and a {cap}-entry flow table")
    big = _gateway(_config(regions, cap, m))
    small = _gateway(_config(1, 1024, m))
    servers = []
    try:
        ctx.progress(f"filling {n_flows} flow entries")
        keys = F.flow_keys4(F.SRC["fill"], 0, n_flows)
        fill_flows(big.dataplane._fd("flow_table4"), keys, np.arange(n_flows, dtype=np.uint32) % N_VMS + 1,
                   big.service_ids["web"], possible_cpus())
        walk_s, (walked, _) = timed(big.dataplane.flows_array)
        resident = big.dataplane.flow_count()          # loads the iterator once: not timed
        info.update(flows_resident=resident, flow_count_walk_ms=walk_s * 1e3)

        urls = []
        for gw in (big, small):
            port = _free_port()
            servers.append(MetricsServer(f"127.0.0.1:{port}", GatewayCollector(gw)))
            urls.append(f"http://127.0.0.1:{port}/metrics")
        lines = _get(urls[0]).decode().splitlines()
        n_samples = sum(1 for line in lines if not line.startswith("#"))
        region_series = sum(1 for line in lines if line.startswith("xdpgw_region_packets_total{"))
        scraped_entries = [float(line.split()[1]) for line in lines if line.startswith("xdpgw_flow_table_entries ")]

        ctx.progress(f"timing {runs} scrapes of each, interleaved")
        scrape_big, scrape_small, collect_big, counters_big, count_big = [], [], [], [], []
        registry = servers[0].registry
        for _ in range(runs):
            scrape_big.append(timed(lambda: _get(urls[0]))[0])
            scrape_small.append(timed(lambda: _get(urls[1]))[0])
            collect_big.append(timed(lambda: generate_latest(registry))[0])
            counters_big.append(timed(lambda: big.counters(count_flows=False))[0])
            count_big.append(timed(big.dataplane.flow_count)[0])
    finally:
        for server in servers:
            server.close()
        for gw in (big, small):
            gw.dataplane.bpf.cleanup()
    params = {"regions": regions, "flows": resident, "flow_table": cap, "vms": N_VMS, "runs": runs,
              "samples": n_samples, "flow_count_walk_ms": walk_s * 1e3,
              "min_ms": min(scrape_big) * 1e3}
    checks = {"region_series": region_series, "flow_table_entries": scraped_entries,
              "ok": region_series == regions + 1 and resident == walked.size == min(n_flows, cap)
              and scraped_entries == [resident]}
    results.append(Measurement(
        SECTION, "scrape", f"GET /metrics: {regions} regions, {resident} flows",
        median(scrape_big) * 1e3, "ms", "GET /metrics: 1 region, empty flow table", median(scrape_small) * 1e3,
        f"median of {runs}, interleaved, over loopback", params=params, checks=checks))
    results.append(Measurement(
        SECTION, "collect", f"collector + exposition alone: {regions} regions, {resident} flows",
        median(collect_big) * 1e3, "ms", "Gateway.counters(count_flows=False)", median(counters_big) * 1e3,
        f"median of {runs}, interleaved (prometheus_client.generate_latest)", params=params, checks=checks))
    results.append(Measurement(
        SECTION, "entries", f"flow-table entry count (kernel element count): {resident} flows",
        median(count_big) * 1e3, "ms", "one full walk of the flow table (batch reads)", walk_s * 1e3,
        f"median of {runs}, interleaved with the scrapes", params=params,
        checks={"walked": int(walked.size), "ok": resident == walked.size}))
    return {"results": results, "info": info}

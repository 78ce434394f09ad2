"""The gateway daemon's /metrics, live: `xdpgw run` in the testbed with `[metrics] listen`
on the gateway namespace's loopback (the daemon runs in that namespace, so its
metrics port is there: every scrape is made from inside it).

* promtool (Debian's `prometheus` package) accepts a live scrape;
* the region and service counters, and the flow table's entries, grow by exactly
  what a client sent (UDP echo datagrams and raw TCP segments);
* a real Prometheus server, started here in the gateway's namespace with a
  temporary config and data directory (both removed, the process stopped by
  pid), scrapes the daemon while traffic flows, and its query API gives back the
  region's rate and the exact counter values."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from control.config import HealthConfig, MetricsConfig, MonitorConfig
from testbed.addresses import VIP4
from testbed.config import ECHO_PORT, WEB_PORT
from testbed.config import testbed_config as make_config
from testbed.kit import start_server, udp_exchange, vm_binds, vm_health_binds
from testbed.topology import Testbed
from tests.e2e.conftest import running_testbed, unique_prefix
from tests.prom import Samples, samples, value
from tests.waiting import wait_for

PREFIX = unique_prefix("xgm")
# loopback of the gateway's namespace, which this module's testbed created: nothing else listens there
METRICS = "127.0.0.1:9417"
PROMETHEUS = "127.0.0.1:9090"
PROMETHEUS_BIN = "/usr/bin/prometheus"
ETH, IP4, UDP, TCP = 14, 20, 8, 20

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None or not Path(PROMETHEUS_BIN).exists(),
                                reason="needs Debian's prometheus package (make setup installs it)")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def scrape_text(tb: Testbed) -> str:
    """GET /metrics from inside the gateway's namespace."""
    return tb.run("gw", http_get, f"http://{METRICS}/metrics")


def scrape(tb: Testbed) -> Samples:
    return samples(scrape_text(tb))


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xdpgw-metrics")
    with running_testbed(PREFIX) as bed:
        tb = bed.tb
        config = make_config(PREFIX, health={"web": HealthConfig(kind="tcp", interval=0.5, timeout=0.5)},
                             monitor=MonitorConfig(heavy_pps=1e9))
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds() + vm_health_binds(tb, vm.name))
        bed.launch(dataclasses.replace(config, metrics=MetricsConfig(listen=METRICS)), tmp / "xdpgw.toml")
        yield tb


def quiet(tb: Testbed, region: str = "r1", tries: int = 20) -> Samples:
    """A scrape once the region's counters stand still (bounded)."""
    prev = scrape(tb)
    for _ in range(tries):
        time.sleep(0.15)
        now = scrape(tb)
        if value(now, "xdpgw_region_packets_total", region=region) == \
                value(prev, "xdpgw_region_packets_total", region=region):
            return now
        prev = now
    pytest.fail(f"region {region} counters never stood still")


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def udp_echoes(tb: Testbed, sizes: list[int], flows: int) -> tuple[int, int]:
    """Datagrams from c1 to the echo service, each answered; returns (packets, frame bytes) sent."""
    c1 = tb.client("c1")
    socks = []
    try:
        for _ in range(flows):
            s = tb.socket("c1", socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2.0)
            s.bind((c1.ip, 0))
            socks.append(s)
        n = nbytes = 0
        for size in sizes:
            for s in socks:
                payload = b"m" * size
                reply = udp_exchange(s, payload, (VIP4, ECHO_PORT))
                assert reply is not None and reply.endswith(b":" + payload), reply
                n, nbytes = n + 1, nbytes + ETH + IP4 + UDP + size
        return n, nbytes
    finally:
        for s in socks:
            s.close()


def tcp_acks(src: str, dst: str, dport: int, sports: list[int], per_flow: int) -> list[bytes]:
    """Bare ACK segments (TCP header, checksum included) of flows from `src`'s `sports`."""
    from scapy.layers.inet import IP, TCP

    return [bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="A", seq=seq, ack=1))[IP4:]
            for sport in sports for seq in range(per_flow)]


def send_raw_tcp(dst: str, segments: list[bytes]) -> int:
    """Send TCP segments through a raw socket (the kernel adds the IP header); runs
    inside the client's namespace. No connection exists: the VM answers with a
    reset, which goes back without crossing the gateway's uplink."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        for segment in segments:
            s.sendto(segment, (dst, 0))
    return len(segments)


# ----------------------------------------------------------------------- tests

def test_promtool_accepts_a_live_scrape(tb):
    def probed() -> bool:
        got = scrape(tb)
        return all(("xdpgw_health_probes_total", (("result", "ok"), ("vm", vm))) in got for vm in ("vm1", "vm2", "vm3"))

    # every family has samples once each VM's health check answered
    wait_for(probed, timeout=20, step=0.3, what="a good health probe of every VM in /metrics")
    text = scrape_text(tb)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
    got = samples(text)
    for vm in ("vm1", "vm2", "vm3"):
        assert value(got, "xdpgw_vm_state", vm=vm, state="active") == 1
        assert value(got, "xdpgw_health_probes_total", vm=vm, result="ok") > 0
    assert value(got, "xdpgw_maglev_swap_duration_seconds_count") >= 1
    assert value(got, "xdpgw_region_heavy", region="r1") == 0
    assert value(got, "xdpgw_flow_table_capacity") == 65536


def test_counters_match_what_was_sent(tb):
    c1 = tb.client("c1")
    before = quiet(tb)
    udp_n, udp_bytes = udp_echoes(tb, sizes=[1, 100, 700, 1400], flows=3)
    sports = list(range(41000, 41005))
    tcp_n = tb.run("c1", send_raw_tcp, VIP4, tcp_acks(c1.ip, VIP4, WEB_PORT, sports, 4))
    tcp_bytes = tcp_n * (ETH + IP4 + TCP)
    after = wait_for(lambda: (lambda s: s if delta(s, before, "xdpgw_service_packets_total", service="web")
                              >= tcp_n else None)(scrape(tb)), timeout=5, what="the TCP segments counted")
    assert delta(after, before, "xdpgw_region_packets_total", region="r1") == udp_n + tcp_n
    assert delta(after, before, "xdpgw_region_bytes_total", region="r1") == udp_bytes + tcp_bytes
    assert delta(after, before, "xdpgw_region_packets_total", region="r2") == 0
    assert delta(after, before, "xdpgw_service_packets_total", service="echo") == udp_n
    assert delta(after, before, "xdpgw_service_bytes_total", service="echo") == udp_bytes
    assert delta(after, before, "xdpgw_service_new_flows_total", service="echo") == 3
    assert delta(after, before, "xdpgw_service_packets_total", service="web") == tcp_n
    assert delta(after, before, "xdpgw_service_bytes_total", service="web") == tcp_bytes
    assert delta(after, before, "xdpgw_service_new_flows_total", service="web") == len(sports)
    vm_packets = sum(delta(after, before, "xdpgw_vm_packets_total", vm=vm) for vm in ("vm1", "vm2", "vm3"))
    assert vm_packets == udp_n + tcp_n
    assert delta(after, before, "xdpgw_flow_table_misses_total") == 3 + len(sports)
    assert delta(after, before, "xdpgw_flow_table_entries") == 3 + len(sports)     # each new flow recorded
    assert delta(after, before, "xdpgw_flow_table_hits_total") == udp_n + tcp_n - 3 - len(sports)
    assert delta(after, before, "xdpgw_packets_forwarded_total", path="local") == udp_n + tcp_n


PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: xdpgw
    static_configs:
      - targets: ["{target}"]
"""


def prometheus_query(tb: Testbed, query: str, at: float | None = None) -> list:
    """An instant query through Prometheus's HTTP API (from inside the gateway's namespace)."""
    params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
    reply = json.loads(tb.run("gw", http_get, f"http://{PROMETHEUS}/api/v1/query?{urllib.parse.urlencode(params)}"))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def prometheus_value(tb: Testbed, query: str, at: float | None = None) -> float | None:
    result = prometheus_query(tb, query, at)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_gateway_and_reads_the_region_rate(tb):
    workdir = tempfile.mkdtemp(prefix=f"{PREFIX}-prometheus-")
    proc = None
    try:
        config = Path(workdir) / "prometheus.yml"
        config.write_text(PROMETHEUS_CONFIG.format(target=METRICS))
        proc = tb.popen("gw", [PROMETHEUS_BIN, f"--config.file={config}", f"--storage.tsdb.path={workdir}/data",
                               f"--web.listen-address={PROMETHEUS}", "--log.level=warn"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        series = 'xdpgw_region_packets_total{region="r1",job="xdpgw"}'

        def prometheus_has(expected: float):
            def check():
                assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
                try:
                    return prometheus_value(tb, series) == expected
                except OSError:           # not listening yet
                    return False
            return check

        x0 = value(quiet(tb), "xdpgw_region_packets_total", region="r1")
        wait_for(prometheus_has(x0), timeout=60, step=0.5, what="Prometheus scraping the gateway")
        t0 = time.time()
        sent = 0
        for _ in range(20):                  # ~ 5 s of traffic, in bursts
            sent += udp_echoes(tb, sizes=[64] * 10, flows=2)[0]
            time.sleep(0.25)
        x1 = value(quiet(tb), "xdpgw_region_packets_total", region="r1")
        assert x1 - x0 == sent
        wait_for(prometheus_has(x1), timeout=30, step=0.5, what="Prometheus seeing the traffic's end")
        t1 = time.time()
        window = math.ceil(t1 - t0) + 5      # from a sample before the traffic to one after it
        rate = prometheus_value(tb, f"rate({series}[{window}s])", at=t1)
        assert rate is not None and rate > 0
        # the samples in the window rose by exactly `sent`; rate() extrapolates to the window's edges
        assert sent <= rate * window <= 2 * sent, (rate, window, sent)
        # what Prometheus stored is what the gateway counted
        assert (prometheus_value(tb, series, at=t0), prometheus_value(tb, series, at=t1)) == (x0, x1)
    finally:
        if proc is not None:
            tb.stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)

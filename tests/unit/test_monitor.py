"""Heavy-region detection: rates from cumulative counters, EWMA smoothing, K-interval
hysteresis, per-region overrides; the [monitor]/[center]/[agent] config checks; the
center link (events -> center calls, retries, 4xx not retried). No time is asserted:
the monitor is driven with explicit timestamps."""
from __future__ import annotations


import pytest

from control.config import ConfigError, parse_config
from control.offload.link import OffloadLink
from control.offload.monitor import Event, Monitor

BASE = """
[gateway]
name = "gw1"
interface = "eth0"
[[region]]
name = "r1"
prefixes = ["198.18.1.0/24"]
{r1}
[[region]]
name = "r2"
prefixes = ["198.18.2.0/24"]
[[service]]
name = "web"
vip = "198.19.0.10"
port = 8080
protocol = "tcp"
vms = ["vm1"]
[[vm]]
name = "vm1"
port = "gwv1"
mac = "02:00:00:00:00:01"
{extra}
"""


def cfg(monitor: str = 'heavy_pps = 1000\nintervals = 2\nsmoothing = 1.0', r1: str = "", extra: str = ""):
    return parse_config(BASE.format(r1=r1, extra=f"[monitor]\n{monitor}\n{extra}" if monitor is not None else extra))


def feed(mon: Monitor, pps_r1: list[float], pps_r2: float = 0.0, size: int = 100):
    """One update per entry, 1 s apart; returns the events of each."""
    p1 = p2 = 0
    out = [mon.update({"r1": {"packets": 0, "bytes": 0}, "r2": {"packets": 0, "bytes": 0}}, now=0.0, wall=0.0)]
    for i, rate in enumerate(pps_r1, start=1):
        p1 += int(rate)
        p2 += int(pps_r2)
        out.append(mon.update({"r1": {"packets": p1, "bytes": p1 * size}, "r2": {"packets": p2, "bytes": p2 * size}},
                              now=float(i), wall=float(i)))
    return out[1:]


def test_heavy_after_k_intervals_and_calm_after_k_below():
    mon = Monitor(cfg())
    events = feed(mon, [100, 2000, 2000, 2000, 400, 600, 400, 400, 400])
    kinds = [[(e.kind, e.region) for e in ev] for ev in events]
    assert kinds == [[], [], [("heavy", "r1")], [], [], [], [], [("calm", "r1")], []]
    heavy = events[2][0]
    assert heavy.crossed_at == 2.0 and heavy.at == 3.0       # crossed at interval 2, heavy at 3 (K = 2)
    assert mon.snapshot()["r2"]["state"] == "normal"


def test_a_dip_restarts_the_streak():
    mon = Monitor(cfg())
    events = feed(mon, [2000, 100, 2000, 100, 2000, 2000])
    assert [e.kind for ev in events for e in ev] == ["heavy"]
    assert events[5][0].crossed_at == 5.0


def test_hysteresis_between_clear_and_heavy():
    """Between clear (default heavy/2 = 500) and heavy a heavy region stays heavy."""
    mon = Monitor(cfg())
    events = feed(mon, [2000, 2000] + [700] * 10)
    assert [e.kind for ev in events for e in ev] == ["heavy"]
    assert mon.snapshot()["r1"]["state"] == "heavy"


def test_smoothing_delays_detection():
    mon = Monitor(cfg('heavy_pps = 1000\nintervals = 1\nsmoothing = 0.5'))
    events = feed(mon, [0, 1500, 1500, 1500])
    # EWMA: 0, 750, 1125 -> heavy at the third interval
    assert [i for i, ev in enumerate(events) if ev] == [2]


def test_bps_threshold_and_per_region_override():
    mon = Monitor(cfg('heavy_bps = 1e6\nintervals = 1\nsmoothing = 1.0', r1="heavy_pps = 50"))
    t = mon.snapshot()
    assert t["r1"]["thresholds"] == {"heavy_pps": 50.0, "heavy_bps": 1e6, "clear_pps": 25.0, "clear_bps": 5e5}
    assert t["r2"]["thresholds"]["heavy_pps"] is None
    events = feed(mon, [60], pps_r2=2000, size=100)         # r1 over its pps; r2: 2000*100*8 = 1.6 Mbit/s
    assert sorted(e.region for e in events[0]) == ["r1", "r2"]


def test_counter_reset_is_not_negative():
    mon = Monitor(cfg())
    mon.update({"r1": {"packets": 10_000, "bytes": 0}}, now=0.0)
    mon.update({"r1": {"packets": 5, "bytes": 0}}, now=1.0)
    assert mon.snapshot()["r1"]["raw_pps"] == 0


@pytest.mark.parametrize("monitor, r1, extra, message", [
    ("intervals = 2", "", "", "monitor: no threshold"),
    ("heavy_pps = -1", "", "", "monitor.heavy_pps: -1 is not a positive rate"),
    ("heavy_pps = 10\nclear_pps = 20", "", "", "monitor.clear_pps: 20 is above heavy_pps (10)"),
    ("heavy_pps = 10\nintervals = 0", "", "", "monitor.intervals: 0 is out of range 1..100"),
    ("heavy_pps = 10\nsmoothing = 2", "", "", "monitor.smoothing"),
    ("heavy_pps = 10\nservices = [\"mail\"]", "", "", 'monitor.services[0]: unknown service "mail"'),
    ("heavy_pps = 10\nbogus = 1", "", "", "monitor.bogus: unknown key"),
    ("heavy_pps = 10", "clear_bps = 5", "", 'region[0] "r1".clear_bps: set without a heavy_bps'),
    ("heavy_pps = 10", "heavy_pps = \"x\"", "", 'region[0] "r1".heavy_pps: expected a number'),
    (None, "heavy_pps = 10", "", 'region[0] "r1".heavy_pps: needs a [monitor] table'),
    ("heavy_pps = 10", "", "[center]\nurl = \"ftp://x\"\ntoken = \"t\"", "center.url"),
    ("heavy_pps = 10", "", "[center]\nurl = \"http://198.18.0.1:7300\"\ntoken = \"\"", "center.token: must not be empty"),
    ("heavy_pps = 10", "", "[agent]\nlisten = \"198.18.0.2\"\ntoken = \"t\"", "agent.listen"),
    ("heavy_pps = 10", "", "[agent]\nlisten = \"host:80\"\ntoken = \"t\"", "agent.listen"),
    ("heavy_pps = 10", "", "[agent]\nlisten = \"198.18.0.2:7301\"\ntoken = \"t\"\ntls_cert = \"/x\"", "agent.tls_key"),
])
def test_config_errors(monitor, r1, extra, message):
    with pytest.raises(ConfigError) as exc:
        cfg(monitor, r1, extra)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_config_round_trip():
    c = cfg('heavy_pps = 10\nintervals = 2', r1="heavy_bps = 1e6",
            extra='[center]\nurl = "http://198.18.0.1:7300/"\ntoken = "t"\n'
                  '[agent]\nlisten = "[2001:db8::2]:7301"\ntoken = "a"\ninsecure = true')
    assert c.center.url == "http://198.18.0.1:7300"
    assert parse_config(c.to_toml()) == c


def test_offload_link_calls_center_and_retries():
    calls = []
    fails = {"n": 2}

    class Refused(Exception):
        status = 404

    def call(method, path, body):
        calls.append((method, path, body))
        if body.get("region") == "r9":
            raise Refused("404: unknown region 'r9'")
        if fails["n"]:
            fails["n"] -= 1
            raise ConnectionError("center down")
        return {"id": 1, "state": "requested"}

    c = cfg(extra='[center]\nurl = "http://198.18.0.1:7300"\ntoken = "t"')
    link = OffloadLink(c, ["web"], call=call, retry_s=0.01)
    link._deliver(Event("heavy", "r1", 2000.0, 1e6, 1.0, 2.0))
    assert [p for _, p, _ in calls] == ["/v1/requests"] * 3
    assert calls[-1][2] == {"gateway": "gw1", "region": "r1", "service": "web", "pps": 2000.0, "bps": 1e6,
                            "crossed_at": 1.0, "heavy_at": 2.0}
    assert link.snapshot()["r1"]["ok"]
    link._deliver(Event("calm", "r1", 10.0, 0.0, None, 3.0))
    assert calls[-1][:2] == ("POST", "/v1/requests/clear")
    n = len(calls)
    link._deliver(Event("heavy", "r9", 2000.0, 1e6, 1.0, 2.0))
    assert len(calls) == n + 1 and not link.snapshot()["r9"]["ok"]        # a 4xx is not retried


def test_stats_view_shows_rates_and_states():
    from control.stats_view import monitor_lines

    mon = Monitor(cfg())
    feed(mon, [2000, 2000])
    lines = monitor_lines({"interval": 1.0, "intervals": 2, "regions": mon.snapshot(),
                           "center": {"r1": {"event": "heavy", "ok": True, "error": None}}})
    assert lines[0] == "monitor: every 1 s, 2 intervals to change state"
    assert "region r1" in lines[1] and "HEAVY" in lines[1] and "2000.0 pps" in lines[1]
    assert "region r2" in lines[2] and "normal" in lines[2]
    assert lines[3] == "  center: region r1 heavy -> ok"
    assert monitor_lines({}) == []

import threading

from control.rates import RateTracker, Sampler
from control.stats_view import render


def _counters(packets: int, nbytes: int) -> dict:
    c = {"packets": packets, "bytes": nbytes}
    return {"regions": {"r1": c}, "services": {"web": {**c, "new_flows": 1}}, "vms": {"vm1": {**c, "state": "active"}},
            "drops": {"ip4_trunc": 0, "l4_trunc": 3}, "flows": {"entries": 1, "hits": 2, "misses": 1}}


def test_rates_are_deltas_over_the_interval():
    t = RateTracker()
    assert t.rates() == {}
    t.sample(_counters(100, 10_000), now=10.0)
    t.sample(_counters(300, 30_000), now=12.0)
    r = t.rates()
    assert r["regions"]["r1"] == {"pps": 100.0, "bps": 80_000.0}
    assert r["vms"]["vm1"]["pps"] == 100.0


def test_render_shows_counters_rates_and_only_nonzero_drops():
    t = RateTracker()
    t.sample(_counters(0, 0), now=0.0)
    t.sample(_counters(50, 5_000), now=1.0)
    text = render({**_counters(50, 5_000), "rates": t.rates()})
    assert "region r1" in text and "50.0" in text
    assert "drops: l4_trunc 3" in text and "ip4_trunc" not in text
    assert "flows: 1 entries, 2 hits, 1 misses" in text


def test_sampler_reads_once_for_consumers_due_together():
    reads: list[int] = []
    got: dict[str, list[int]] = {"stats": [], "monitor": [], "slow": []}

    def read() -> dict:
        reads.append(len(reads))
        return {"n": reads[-1]}

    stop = threading.Event()
    sampler = Sampler(read)
    sampler.every(0.05, lambda c, at: got["stats"].append(c["n"]))
    sampler.every(0.05, lambda c, at: got["monitor"].append(c["n"]))
    sampler.every(0.1, lambda c, at: (got["slow"].append(c["n"]), len(got["slow"]) == 4 and stop.set()))
    runner = threading.Thread(target=sampler.run, args=(stop,))
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive()
    # the two equal-interval consumers got the very same reads; the slower one a subset of them
    assert got["stats"] == got["monitor"] and len(got["stats"]) >= 7
    assert set(got["slow"]) <= set(got["stats"]) and len(got["slow"]) == 4
    assert len(reads) == len(got["stats"])


def test_sampler_skips_a_failed_read():
    calls = []
    stop = threading.Event()

    def read() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("map gone")
        return {"ok": True}

    sampler = Sampler(read)
    sampler.every(0.02, lambda c, at: (c == {"ok": True}) and stop.set())
    runner = threading.Thread(target=sampler.run, args=(stop,))
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive() and len(calls) == 2

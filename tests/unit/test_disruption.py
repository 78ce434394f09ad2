"""control/disruption.py: the disruption of k of N VMs failing, with the real Maglev
builder and flow hash (issue 5, item 6). Fractions are asserted, times are not."""
from __future__ import annotations

import numpy as np

from bench import disruption
from dataplane.flowhash import maglev_slot


def test_one_percent_of_a_thousand_vms_fail():
    r = disruption.measure(n=1000, m=65537, k=10, trials=3, flows=100_000)
    own, beyond, changed = (r[k]["mean"] for k in ("entries_failed_own", "entries_changed_beyond_failed",
                                                  "entries_changed"))
    assert abs(own - 0.01) < 0.001                       # the failed VMs held their share of slots
    assert abs(changed - (own + beyond)) < 1e-9
    assert 0.01 < beyond < 0.04                          # Maglev's churn: the paper reports about 2.3 %
    # with the flow table exactly the failed VMs' flows move; without state, the churn shows
    assert r["flows_moved_with_flow_table"] == r["flows_on_failed_vms"]
    assert r["healthy_flows_moved_with_flow_table"] == 0
    assert r["flows_moved_without_state"]["mean"] > r["flows_moved_with_flow_table"]["mean"] + 0.005


def test_trial_is_deterministic_and_uses_the_dataplane_hash():
    a = disruption.trial(200, 4093, 4, seed=5, flows=2000)
    b = disruption.trial(200, 4093, 4, seed=5, flows=2000)
    assert a == {**b, "build_ms": a["build_ms"]}
    addrs, sports, dports, protos = disruption.random_flows(5, np.random.default_rng(1))
    from dataplane.flowhash import flow_hash_many
    slots = flow_hash_many(addrs, sports, dports, protos, 0) % 4093
    for i in range(5):
        src = ".".join(str(int(x)) for x in addrs[i, 12:])
        assert src.startswith("198.1") and maglev_slot(src, int(sports[i]), 8080, 6, 0, 4093) == slots[i]


def test_command_line(capsys):
    assert disruption.main(["--vms", "200", "--m", "4093", "--trials", "2", "--flows", "1000"]) == 0
    out = capsys.readouterr().out
    assert "N = 200 VMs, M = 4093, k = 2 fail (1.0 %)" in out
    assert "beyond the failed VMs' own" in out and "Maglev paper" in out and "with the flow table" in out

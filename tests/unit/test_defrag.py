"""The defragmentation planner (control/defrag/planner.py) on synthetic traffic matrices."""
import random

from hypothesis import given, settings, strategies as st

from control.defrag import planner as defrag


def test_matrix_from_counters():
    pairs = {("02:00:00:00:00:01", "198.18.102.2"): 100, ("02:00:00:00:00:02", "198.18.101.2"): 50,
             ("02:00:00:00:00:02", "2001:db8:101::2"): 25,       # to a's other address: a's too
             ("02:00:00:00:00:01", "198.18.1.2"): 999,           # not a VM: dropped
             ("02:00:00:00:00:09", "198.18.101.2"): 7}           # unknown sender: dropped
    m = defrag.traffic_matrix(pairs, {"a": "02:00:00:00:00:01", "b": "02:00:00:00:00:02"},
                              {"a": ("198.18.101.2", "2001:db8:101::2"), "b": ("198.18.102.2",)})
    assert m == {("a", "b"): 100, ("b", "a"): 75}


def test_fragmentation_counts_only_intra_tenant_pairs():
    m = {("a", "b"): 100, ("b", "a"): 100, ("a", "c"): 50, ("c", "x"): 1000}
    tenants = {"a": "t1", "b": "t1", "c": "t1", "x": "t2"}
    f = defrag.fragmentation(m, {"a": "h1", "b": "h2", "c": "h1", "x": "h2"}, tenants)
    assert f["tenants"]["t1"] == {"total": 250, "cross": 200, "share": 0.8}
    assert "t2" not in f["tenants"]
    assert f["all"]["share"] == 0.8


def test_plan_brings_a_chatty_pair_together():
    m = {("a", "b"): 1000, ("b", "a"): 1000, ("a", "c"): 10}
    tenants = {"a": "t", "b": "t", "c": "t"}
    placement = {"a": "h1", "b": "h2", "c": "h1"}
    p = defrag.plan(m, placement, tenants, {"h1": 2, "h2": 2})
    assert [(mv.vm, mv.src, mv.dst) for mv in p["moves"]] == [("a", "h1", "h2")]
    assert p["share_before"] > 0.99 and p["share_after"] < 0.01
    assert p["reduction"] == 2000 - 10


def test_plan_respects_capacity_and_leaves_other_tenants_alone():
    m = {("a", "b"): 1000, ("x", "y"): 5000}
    tenants = {"a": "t", "b": "t", "x": "u", "y": "u"}
    placement = {"a": "h1", "b": "h2", "x": "h2", "y": "h1"}
    # both hosts full (2 each): only swaps could help, and none is executable without a spare slot
    p = defrag.plan(m, placement, tenants, {"h1": 2, "h2": 2})
    for mv in p["moves"]:
        assert mv.vm in placement
    load = {"h1": 2, "h2": 2}
    for mv in p["moves"]:
        load[mv.src] -= 1
        load[mv.dst] += 1
        assert load[mv.dst] <= 2
    # with a third, empty host the two pairs come together
    p3 = defrag.plan(m, placement, tenants, {"h1": 2, "h2": 2, "h3": 2})
    assert p3["share_after"] == 0.0


def test_nothing_to_gain_means_no_moves():
    m = {("a", "b"): 10}
    p = defrag.plan(m, {"a": "h1", "b": "h1"}, {"a": "t", "b": "t"}, {"h1": 4, "h2": 4})
    assert p["moves"] == [] and p["reduction"] == 0


def test_max_moves_bounds_the_plan():
    m = {(f"v{i}", f"w{i}"): 100 + i for i in range(6)}
    tenants = {**{f"v{i}": "t" for i in range(6)}, **{f"w{i}": "t" for i in range(6)}}
    placement = {**{f"v{i}": "h1" for i in range(6)}, **{f"w{i}": "h2" for i in range(6)}}
    p = defrag.plan(m, placement, tenants, {"h1": 12, "h2": 12}, max_moves=2)
    assert len(p["moves"]) == 2
    assert {mv.vm for mv in p["moves"]} <= {"v5", "w5", "v4", "w4"}      # the heaviest pairs first


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_plan_never_worsens_and_never_overfills(seed):
    rnd = random.Random(seed)
    vms = [f"vm{i}" for i in range(rnd.randint(2, 12))]
    hosts = [f"h{i}" for i in range(rnd.randint(2, 4))]
    capacity = {h: rnd.randint(2, 6) for h in hosts}
    slots = [h for h in hosts for _ in range(capacity[h])]
    if len(slots) < len(vms):
        return
    rnd.shuffle(slots)
    placement = dict(zip(vms, slots))
    tenants = {v: rnd.choice(["t1", "t2"]) for v in vms}
    m = {(a, b): rnd.randint(1, 1000) for a in vms for b in vms if a != b and rnd.random() < 0.4}
    p = defrag.plan(m, placement, tenants, capacity)
    assert p["share_after"] <= p["share_before"] and p["reduction"] >= 0
    load = {h: sum(1 for v in placement.values() if v == h) for h in hosts}
    place = dict(placement)
    for mv in p["moves"]:
        assert place[mv.vm] == mv.src
        load[mv.src] -= 1
        load[mv.dst] += 1
        place[mv.vm] = mv.dst
        assert load[mv.dst] <= capacity[mv.dst]
    assert len({mv.vm for mv in p["moves"]}) == len(p["moves"])
    f = defrag.fragmentation(m, place, tenants)
    assert f["all"]["share"] == p["share_after"]

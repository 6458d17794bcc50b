"""Tests of the ballast_eplb Python module (built into build/python; see scripts/test.sh)."""
import json
import os

import numpy as np
import pytest

import ballast_eplb as eplb

README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "eplb", "fixtures", "deepseek_reference.json")


def check_consistent(phy2log, log2phy, logcnt, L, E, P):
    assert phy2log.shape == (L, P) and logcnt.shape == (L, E)
    assert log2phy.shape[:2] == (L, E) and log2phy.shape[2] == logcnt.max()
    for a in (phy2log, log2phy, logcnt):
        assert a.dtype == np.int64
    for l in range(L):
        assert np.array_equal(np.bincount(phy2log[l], minlength=E), logcnt[l])
        for e in range(E):
            slots = log2phy[l, e]
            assert np.all(slots[logcnt[l, e]:] == -1)
            assert np.all(phy2log[l, slots[:logcnt[l, e]]] == e)


@pytest.mark.parametrize("convert", [lambda w: w, np.array, lambda w: np.array(w, dtype=np.float32),
                                     lambda w: np.array(w, dtype=np.int32), lambda w: tuple(map(tuple, w))])
def test_readme_example(convert):
    phy2log, log2phy, logcnt = eplb.rebalance_experts(convert(README_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    check_consistent(phy2log, log2phy, logcnt, 2, 12, 16)


def test_ballast_shapes_and_balance():
    rng = np.random.default_rng(0)
    w = rng.lognormal(0, 1, size=(3, 64)) * 100
    p, l2p, cnt = eplb.rebalance_experts_ballast(w, 96, 16)
    check_consistent(p, l2p, cnt, 3, 64, 96)
    # never two replicas of one expert on one GPU
    for layer in p:
        for g in range(16):
            on_gpu = layer[g * 6:(g + 1) * 6]
            assert len(set(on_gpu.tolist())) == 6
    ds, _, _ = eplb.rebalance_experts(w, 96, 1, 1, 16)
    assert eplb.balancedness(p, w, 16).mean() >= eplb.balancedness(ds, w, 16).mean() - 1e-12
    bound = eplb.lower_bound(w, 96, 16)
    assert np.all(eplb.rank_loads(p, w, 16).max(axis=1) >= bound * (1 - 1e-12))


def test_ballast_time_slices_and_current():
    rng = np.random.default_rng(1)
    trace = rng.poisson(rng.lognormal(2, 1, size=(1, 2, 32)), size=(40, 2, 32))
    p, _, cnt = eplb.rebalance_experts_ballast(trace, 48, 8, slices=4)
    assert p.shape == (2, 48) and cnt.sum(axis=1).tolist() == [48, 48]
    # with a current placement and a high migration weight, the result stays close to it
    p2, _, _ = eplb.rebalance_experts_ballast(trace, 48, 8, current=p, migration_weight=10.0)
    assert np.array_equal(p2, p)


def test_metrics():
    phy2log = np.array(README_PHY2LOG)
    ev = eplb.evaluate(phy2log, README_WEIGHT, 8)
    assert ev["balancedness"].shape == (2,)
    assert ev["mean_balancedness"] == pytest.approx(ev["balancedness"].mean())
    loads = eplb.rank_loads(phy2log, README_WEIGHT, 8)
    assert loads.shape == (2, 8)
    assert loads.sum(axis=1) == pytest.approx(np.sum(README_WEIGHT, axis=1))
    assert np.allclose(eplb.balancedness(phy2log, README_WEIGHT, 8), loads.mean(axis=1) / loads.max(axis=1))
    assert np.all(ev["max_load"] >= ev["lower_bound"])
    trace = np.stack([np.array(README_WEIGHT)] * 3)
    for d in ("static", "random", "balanced"):
        per_pass = eplb.evaluate_passes(phy2log, trace, 8, dispatch=d)
        assert per_pass.shape == (3,) and np.all((per_pass > 0) & (per_pass <= 1))
    assert np.all(eplb.evaluate_passes(phy2log, trace, 8, dispatch="balanced") >=
                  eplb.evaluate_passes(phy2log, trace, 8, dispatch="static") - 1e-12)


@pytest.mark.parametrize("weight,args,message", [
    ([[1, 2, 3], [4, 5]], (4, 1, 1, 2), "ragged"),
    ([[1, 2, [3]]], (4, 1, 1, 2), "ragged"),
    ([[1, -2, 3, 4]], (4, 1, 1, 2), "finite and >= 0"),
    ([[1, float("nan"), 3, 4]], (4, 1, 1, 2), "finite and >= 0"),
    ([[1, "a", 3, 4]], (4, 1, 1, 2), "not a number"),
    ([1, 2, 3, 4], (4, 1, 1, 2), "dimensions"),
    ([[1, 2, 3, 4]], (6, 1, 1, 4), "not divisible by num_gpus"),
    ([[1, 2, 3, 4]], (2, 1, 1, 2), "smaller than the number of logical experts"),
    ([[1, 2, 3, 4]], (4, 3, 3, 2), "groups"),
    ([[1, 2, 3, 4]], (4, 1, 1, 0), "num_gpus must be positive"),
    (np.array([["a", "b"]]), (2, 1, 1, 1), "numbers"),
])
def test_bad_input_raises(weight, args, message):
    with pytest.raises(eplb.EplbError, match=message):
        eplb.rebalance_experts(weight, *args)
    assert issubclass(eplb.EplbError, ValueError)


def test_bad_input_ballast_and_metrics():
    w = [[1, 2, 3, 4]]
    with pytest.raises(ValueError, match="not divisible"):
        eplb.rebalance_experts_ballast(w, 6, 4)
    with pytest.raises(ValueError, match="smaller than"):
        eplb.rebalance_experts_ballast(w, 2, 2)
    with pytest.raises(ValueError, match="migration_weight"):
        eplb.rebalance_experts_ballast(w, 4, 2, migration_weight=-1)
    with pytest.raises(ValueError, match="slices"):
        eplb.rebalance_experts_ballast(w, 4, 2, slices=0)
    with pytest.raises(ValueError, match="current"):
        eplb.rebalance_experts_ballast(w, 4, 2, current=[[0, 1, 2, 7]])
    with pytest.raises(ValueError, match="no replica"):
        eplb.balancedness([[0, 1, 2, 2]], w, 2)
    with pytest.raises(ValueError, match="layers"):
        eplb.balancedness([[0, 1, 2, 3], [0, 1, 2, 3]], w, 2)
    with pytest.raises(ValueError, match="dispatch"):
        eplb.evaluate_passes([[0, 1, 2, 3]], [w], 2, dispatch="nope")


@pytest.mark.parametrize("name", ["deepseek_reference.json", "deepseek_reference_distinct.json"])
def test_parity_with_original_fixtures(name):
    """Cases computed by the original deepseek-ai/EPLB eplb.py (tools/eplb_reference.py): identical
    phy2log, log2phy and logcnt on every case, ties included (see docs/eplb.md, "Ties")."""
    path = os.path.join(os.path.dirname(FIXTURE), name)
    with open(path) as f:
        cases = json.load(f)["cases"]
    assert len(cases) == 240
    for i, c in enumerate(cases):
        phy2log, log2phy, logcnt = eplb.rebalance_experts(np.array(c["weight"], dtype=np.float64), c["num_replicas"],
                                                          c["num_groups"], c["num_nodes"], c["num_gpus"])
        assert phy2log.tolist() == c["phy2log"], f"{name} case {i}"
        assert log2phy.tolist() == c["log2phy"], f"{name} case {i}"
        assert logcnt.tolist() == c["logcnt"], f"{name} case {i}"


def test_ballast_planned_for_balanced_dispatch():
    # Planned for balanced dispatch, the replicas link all GPUs (one component) and per-pass
    # balance under balanced dispatch beats the placement planned for static dispatch.
    rng = np.random.default_rng(3)
    popularity = rng.lognormal(0, 1, size=(1, 2, 64))
    trace = rng.poisson(popularity / popularity.sum() * 4096, size=(60, 2, 64)).astype(np.int64)
    window, later = trace[:30], trace[30:]
    for_static, _, _ = eplb.rebalance_experts_ballast(window, 80, 16)
    for_balanced, _, _ = eplb.rebalance_experts_ballast(window, 80, 16, dispatch="balanced")
    assert eplb.replica_graph_components(for_balanced, 16, 64).tolist() == [1, 1]
    assert eplb.replica_graph_components(for_static, 16, 64).max() > 1
    ours = eplb.evaluate_passes(for_balanced, later, 16, dispatch="balanced").mean()
    static_plan = eplb.evaluate_passes(for_static, later, 16, dispatch="balanced").mean()
    assert ours > static_plan
    with pytest.raises(ValueError, match="dispatch"):
        eplb.rebalance_experts_ballast(window, 80, 16, dispatch="greedy")

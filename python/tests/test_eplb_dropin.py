"""The drop-in API of ballast_eplb for users of deepseek-ai/EPLB, SGLang and vLLM (numpy only; the
torch paths are in test_eplb_torch.py). Each test checks a behaviour those projects' own tests and
code rely on, with our own cases."""
import numpy as np
import pytest

import ballast_eplb as eplb

README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_error_is_value_error_and_assertion_error():
    assert issubclass(eplb.EplbError, ValueError) and issubclass(eplb.EplbError, AssertionError)
    # Code written against the originals catches the AssertionError of their asserts.
    with pytest.raises(AssertionError, match="not divisible by num_gpus"):
        eplb.rebalance_experts([[10, 20, 30, 40]], 7, 2, 2, 4)
    with pytest.raises(ValueError):
        eplb.rebalance_experts([[10, 20, 30, 40]], 7, 2, 2, 4)


class _Unreadable:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("cannot\nbe read")


@pytest.mark.parametrize("call", [
    lambda: eplb.rebalance_experts(_Unreadable(), 4, 1, 1, 2),
    lambda: eplb.rebalance_experts([[1, -2, 3, 4]], 4, 1, 1, 2),
    lambda: eplb.rebalance_experts([[1, 2, 3], [4, 5]], 4, 1, 1, 2),
    lambda: eplb.rebalance_experts([[1, 2, 3, 4]], 4, 3, 2, 2, enable_hierarchical=True),
    lambda: eplb.compute_logical_maps([[0, 1, 9]], 3),
    lambda: eplb.rebalance_experts_vllm([[1, 2, 3, 4]], 4, 1, 1, 2, old_global_expert_indices=[[0, 1, 2, 5]]),
    lambda: eplb.measured_balancedness([[1, float("inf")]]),
])
def test_messages_are_one_line(call):
    with pytest.raises(eplb.EplbError) as e:
        call()
    assert "\n" not in str(e.value) and str(e.value)


def test_unreadable_input_names_the_argument_without_traceback():
    with pytest.raises(eplb.EplbError, match=r"^weight cannot be read as an array \(_Unreadable\): cannot$"):
        eplb.rebalance_experts(_Unreadable(), 4, 1, 1, 2)


def test_three_dimensional_weight_is_summed_over_passes():
    rng = np.random.default_rng(5)
    passes = rng.integers(0, 50, size=(6, 2, 12))
    for args in [(16, 4, 2, 8), (16, 1, 1, 4)]:
        got = eplb.rebalance_experts(passes, *args)
        want = eplb.rebalance_experts(passes.sum(axis=0), *args)
        for g, w in zip(got, want):
            assert np.array_equal(g, w)


def test_enable_hierarchical():
    hier = eplb.rebalance_experts(README_WEIGHT, 16, 4, 2, 8, enable_hierarchical=True)[0]
    assert hier.tolist() == README_PHY2LOG
    flat = eplb.rebalance_experts(README_WEIGHT, 16, 4, 2, 8, enable_hierarchical=False)[0]
    assert np.array_equal(flat, eplb.rebalance_experts(README_WEIGHT, 16, 1, 1, 8)[0])
    assert not np.array_equal(flat, hier)
    # SGLang refuses a hierarchical request whose groups do not divide over the nodes ...
    with pytest.raises(AssertionError, match="3 expert groups are not divisible over 2 nodes"):
        eplb.rebalance_experts(np.ones((1, 6)), 8, 3, 2, 4, enable_hierarchical=True)
    # ... where the original's rule (None) falls back to the global policy, as vLLM's tests expect.
    fallback = eplb.rebalance_experts(np.arange(1, 7)[None], 8, 3, 2, 4)[0]
    assert np.array_equal(fallback, eplb.rebalance_experts(np.arange(1, 7)[None], 8, 1, 1, 4)[0])
    # SGLang passes num_groups=None to the global policy.
    assert np.array_equal(eplb.rebalance_experts(README_WEIGHT, 16, None, 2, 8, enable_hierarchical=False)[0], flat)


def greedy_packing(w, m):
    """Heaviest first into the lightest pack with room, lower pack on ties (distinct weights)."""
    n = len(w)
    per = n // m
    load, count = [0.0] * m, [0] * m
    pack, rank = [0] * n, [0] * n
    for i in sorted(range(n), key=lambda i: -w[i]):
        p = min((p for p in range(m) if count[p] < per), key=lambda p: load[p])
        pack[i], rank[i] = p, count[p]
        load[p] += w[i]
        count[p] += 1
    return pack, rank


def test_balanced_packing():
    rng = np.random.default_rng(7)
    w = rng.permutation(np.arange(1, 25, dtype=np.float32) * 3.5).reshape(2, 12)
    pack, rank = eplb.balanced_packing(w, 4)
    assert pack.shape == rank.shape == (2, 12) and pack.dtype == np.int64
    for layer in range(2):
        assert (pack[layer].tolist(), rank[layer].tolist()) == greedy_packing(w[layer].tolist(), 4)
        assert np.all(np.bincount(pack[layer], minlength=4) == 3)
        assert len(set(zip(pack[layer].tolist(), rank[layer].tolist()))) == 12
    # [9, 1, 1, 1] into 2 packs: {9, 1} and {1, 1}
    pack, _ = eplb.balanced_packing([[9.0, 1.0, 1.0, 1.0]], 2)
    assert sorted(np.bincount(pack[0], weights=[9, 1, 1, 1]).tolist()) == [2.0, 10.0]
    # one item per pack: the identity
    pack, rank = eplb.balanced_packing(rng.random((2, 6)), 6)
    assert pack.tolist() == [list(range(6))] * 2 and not rank.any()
    with pytest.raises(AssertionError, match="not divisible into 4 packs"):
        eplb.balanced_packing(np.ones((1, 6)), 4)


def test_replicate_experts():
    w = np.array([[1000.0, 1, 1, 1, 1, 1, 1, 1], [5, 40, 20, 10, 1, 2, 3, 4]])
    phy2log, rank, logcnt = eplb.replicate_experts(w, 12)
    assert phy2log.shape == rank.shape == (2, 12) and logcnt.shape == (2, 8)
    assert np.all(phy2log[:, :8] == np.arange(8)) and not rank[:, :8].any()
    assert logcnt[0].tolist() == [5, 1, 1, 1, 1, 1, 1, 1]
    for layer in range(2):
        assert np.array_equal(np.bincount(phy2log[layer], minlength=8), logcnt[layer])
        # each further replica goes to the largest load per replica at that moment
        cnt = np.ones(8)
        for i in range(8, 12):
            e = int(np.argmax(w[layer] / cnt))
            assert phy2log[layer, i] == e and rank[layer, i] == cnt[e]
            cnt[e] += 1
    with pytest.raises(AssertionError, match="fewer than"):
        eplb.replicate_experts(w, 6)


def test_compute_logical_maps():
    # -1 marks an empty slot (vLLM after scale-up): not a replica of anything
    log2phy, logcnt = eplb.compute_logical_maps([[0, 1, -1, 2, 3, -1], [3, -1, 2, 1, 0, -1]], 4)
    assert logcnt.tolist() == [[1, 1, 1, 1]] * 2
    assert log2phy[:, :, 0].tolist() == [[0, 1, 3, 4], [4, 3, 2, 0]]
    one_l2p, one_cnt = eplb.compute_logical_maps([0, 1, 0, 2], 3)
    assert one_l2p.tolist() == [[0, 2], [1, -1], [3, -1]] and one_cnt.tolist() == [2, 1, 1]
    # The one order: slots ascending. ballast's own log2phy is exactly this ...
    rng = np.random.default_rng(2)
    w = rng.lognormal(0, 1, size=(3, 32)) * 100
    p, l2p, cnt = eplb.rebalance_experts_ballast(w, 48, 8)
    want_l2p, want_cnt = eplb.compute_logical_maps(p, 32)
    assert np.array_equal(l2p, want_l2p) and np.array_equal(cnt, want_cnt)
    # ... and rebalance_experts (the original's order: by replica rank) lists the same slots.
    p, l2p, cnt = eplb.rebalance_experts(w, 48, 1, 1, 8)
    want_l2p, want_cnt = eplb.compute_logical_maps(p, 32)
    assert np.array_equal(cnt, want_cnt)
    assert np.array_equal(np.sort(np.where(l2p < 0, 1 << 30, l2p), axis=-1),
                          np.sort(np.where(want_l2p < 0, 1 << 30, want_l2p), axis=-1))


def check_preserved(old, new, post, ranks):
    k = old.shape[1] // ranks
    for g in range(ranks):
        o, n, q = (a[0, g * k:(g + 1) * k].tolist() for a in (old, new, post))
        assert sorted(q) == sorted(n), "a GPU keeps the experts of the new placement"
        for e in set(o) & set(n):
            assert q[o.index(e)] == e, f"expert {e} stays in its old slot on GPU {g}"


@pytest.mark.parametrize("ranks,old,new", [
    (2, [[0, 1, 2, 3, 4, 5, 6, 7]], [[1, 5, 0, 4, 6, 2, 7, 3]]),
    (2, [[0, 1, 0, 2, 3, 4, 5, 6, 1, 2]], [[0, 5, 4, 0, 1, 6, 2, 3, 2, 1]]),
    (3, [[0, 1, 2, 3] * 3], [[0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 0]]),
])
def test_preserve_intragpu_slots(ranks, old, new):
    old, new = np.array(old), np.array(new)
    post = eplb.preserve_intragpu_slots(new, ranks, old)
    assert post.shape == new.shape
    check_preserved(old, new, post, ranks)
    assert eplb.slots_kept(old, post)[0] >= eplb.slots_kept(old, new)[0]
    # different slots per GPU: unchanged, as vLLM's
    assert np.array_equal(eplb.preserve_intragpu_slots(new, 4, old) if new.shape[1] % 4 else new, new)


def drifting_window(seed, passes, layers, experts, trend):
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0, 1, size=(layers, experts))
    direction = rng.normal(size=(layers, experts))
    t = np.arange(passes)[:, None, None] / passes
    popularity = base * np.exp(trend * direction * t)
    popularity /= popularity.sum(axis=-1, keepdims=True)
    return rng.poisson(popularity * 8192)


def test_vllm_policy_interface():
    w = drifting_window(1, 40, 3, 64, 0.0).sum(axis=0)
    old = eplb.DeepseekPolicy.rebalance_experts(w, 96, 8, 2, 16)
    assert np.array_equal(old, eplb.rebalance_experts(w, 96, 8, 2, 16)[0])  # vLLM's rule: hierarchical here
    later = drifting_window(2, 40, 3, 64, 0.0).sum(axis=0)
    ds = eplb.DeepseekPolicy.rebalance_experts(later, 96, 8, 2, 16, old_global_expert_indices=old)
    plain = eplb.rebalance_experts(later, 96, 8, 2, 16)[0]
    assert np.array_equal(ds, eplb.preserve_intragpu_slots(plain, 16, old))
    ours = eplb.BallastPolicy.rebalance_experts(later, 96, 8, 2, 16, old_global_expert_indices=old)
    assert ours.shape == (3, 96) and ours.dtype == np.int64
    for layer in ours:  # every expert placed, never twice on one GPU
        assert set(layer.tolist()) == set(range(64))
        assert all(len(set(layer[g * 6:(g + 1) * 6].tolist())) == 6 for g in range(16))
    # migration-aware: it keeps more slots than vLLM's post-pass on deepseek's plan, at a small cost
    assert eplb.slots_kept(old, ours).sum() > eplb.slots_kept(old, ds).sum()
    assert eplb.balancedness(ours, later, 16).mean() >= eplb.balancedness(ds, later, 16).mean() - 0.02
    # an old placement with empty slots (-1) is not a current placement, but slots are still kept
    holey = old.copy()
    holey[:, 0] = -1
    assert eplb.rebalance_experts_vllm(later, 96, 8, 2, 16, old_global_expert_indices=holey).shape == (3, 96)
    with pytest.raises(ValueError, match="unknown algorithm"):
        eplb.rebalance_experts_vllm(later, 96, 8, 2, 16, algorithm="greedy")
    # vLLM's replicate_experts returns (phy2log, logcnt)
    phy2log, logcnt = eplb.DeepseekPolicy.replicate_experts(w, 80)
    assert phy2log.shape == (3, 80) and logcnt.sum() == 240


def test_measured_balancedness():
    m = eplb.measured_balancedness([[100, 0, 0, 0], [100, 0, 0, 0]])
    assert (m["avg_tokens"], m["max_tokens"], m["balancedness"]) == (50.0, 200.0, 0.25)
    m = eplb.measured_balancedness([[10, 10], [30, 10], [0, 0]])
    assert m["balancedness"] == pytest.approx(30 / 40)  # vLLM: sum of means / sum of maxes
    assert m["per_layer"].tolist() == [1.0, pytest.approx(2 / 3), 1.0]
    assert m["mean_balancedness"] == pytest.approx((1 + 2 / 3 + 1) / 3)  # SGLang: mean over layers
    assert eplb.measured_balancedness([[0, 0]])["balancedness"] == 0.0
    per_pass = eplb.measured_balancedness(np.array([[[100, 0, 0, 0]], [[25, 25, 25, 25]]]))
    assert per_pass["balancedness"].tolist() == [0.25, 1.0] and per_pass["per_layer"].shape == (2, 1)
    # from a placement's rank loads it is the placement's balancedness
    loads = eplb.rank_loads(np.array(README_PHY2LOG), README_WEIGHT, 8)
    assert np.allclose(eplb.measured_balancedness(loads)["per_layer"],
                       eplb.balancedness(np.array(README_PHY2LOG), README_WEIGHT, 8))


def test_ballast_node_hierarchy():
    rng = np.random.default_rng(4)
    w = rng.lognormal(0, 1, size=(2, 64)) * 100
    p, _, cnt = eplb.rebalance_experts_ballast(w, 96, 16, num_groups=8, num_nodes=2)
    assert cnt.sum(axis=1).tolist() == [96, 96]
    for layer in p:
        # each expert group lives on one node (48 slots each), replicas included
        node_of_group = {}
        for slot, e in enumerate(layer.tolist()):
            assert node_of_group.setdefault(e // 8, slot // 48) == slot // 48
        assert len(set(node_of_group.values())) == 2
    # as good as deepseek's hierarchical policy on the same problem
    ds = eplb.rebalance_experts(w, 96, 8, 2, 16, enable_hierarchical=True)[0]
    assert eplb.balancedness(p, w, 16).mean() >= eplb.balancedness(ds, w, 16).mean() - 1e-9
    with pytest.raises(AssertionError, match="4 expert groups are not divisible over 8 nodes"):
        eplb.rebalance_experts_ballast(w, 96, 16, num_groups=4, num_nodes=8)


def test_forecast_follows_a_drift():
    # Popularity moving steadily: the plan for the forecast of the next passes beats the plan for
    # the window on those passes, with balanced dispatch.
    trace = drifting_window(9, 120, 2, 64, 3.0)
    window, later = trace[:60], trace[60:]
    past = eplb.rebalance_experts_ballast(window, 80, 16, dispatch="balanced", forecast=False)[0]
    ahead = eplb.rebalance_experts_ballast(window, 80, 16, dispatch="balanced", forecast=True)[0]
    assert (eplb.evaluate_passes(ahead, later, 16, dispatch="balanced").mean() >
            eplb.evaluate_passes(past, later, 16, dispatch="balanced").mean())


def test_forecast_is_the_default_and_keeps_stationary_plans():
    # The forecast is on by default; a window whose layers do not trend is planned exactly as
    # without it, and a trending one is not.
    still = drifting_window(11, 120, 2, 64, 0.0)
    default = eplb.rebalance_experts_ballast(still, 80, 16, dispatch="balanced")[0]
    assert np.array_equal(default, eplb.rebalance_experts_ballast(still, 80, 16, dispatch="balanced", forecast=True)[0])
    assert np.array_equal(default, eplb.rebalance_experts_ballast(still, 80, 16, dispatch="balanced", forecast=False)[0])
    moving = drifting_window(9, 60, 2, 64, 3.0)
    assert np.array_equal(eplb.rebalance_experts_ballast(moving, 80, 16, dispatch="balanced")[0],
                          eplb.rebalance_experts_ballast(moving, 80, 16, dispatch="balanced", forecast=True)[0])
    assert not np.array_equal(eplb.rebalance_experts_ballast(moving, 80, 16, dispatch="balanced")[0],
                              eplb.rebalance_experts_ballast(moving, 80, 16, dispatch="balanced", forecast=False)[0])


def random_walk_window(seed, passes, layers, experts, step):
    # Log-popularity random-walking (no trend), sampled as a multinomial of 8192 choices per pass.
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(layers, experts)) + np.cumsum(rng.normal(scale=step, size=(passes, layers, experts)), axis=0)
    popularity = np.exp(z)
    popularity /= popularity.sum(axis=-1, keepdims=True)
    return rng.poisson(popularity * 8192)


def test_static_plan_expects_the_recent_level():
    # Static dispatch, popularity random-walking: by default the plan is also balanced for the level
    # of the window's last quarter (better on the passes that follow), while the window keeps a
    # balance at least deepseek's; expect_recent_level=False or forecast=False plan for the window
    # alone, and balanced dispatch never uses the level.
    trace = random_walk_window(14, 2000, 4, 64, 0.006)
    window, later = trace[:1000], trace[1000:]
    default = eplb.rebalance_experts_ballast(window, 80, 16)[0]
    alone = eplb.rebalance_experts_ballast(window, 80, 16, expect_recent_level=False)[0]
    assert np.array_equal(alone, eplb.rebalance_experts_ballast(window, 80, 16, forecast=False)[0])
    assert not np.array_equal(default, alone)
    ds = eplb.rebalance_experts(window.sum(axis=0), 80, 1, 1, 16)[0]
    assert (eplb.balancedness(default, window.sum(axis=0), 16) >= eplb.balancedness(ds, window.sum(axis=0), 16) - 1e-12).all()
    recent = window[750:].sum(axis=0)[None]
    assert (eplb.evaluate_passes(default, recent, 16, dispatch="static").mean() >
            eplb.evaluate_passes(alone, recent, 16, dispatch="static").mean())
    assert (eplb.evaluate_passes(default, later, 16, dispatch="static").mean() >
            eplb.evaluate_passes(alone, later, 16, dispatch="static").mean())
    assert np.array_equal(eplb.rebalance_experts_ballast(window, 80, 16, dispatch="balanced")[0],
                          eplb.rebalance_experts_ballast(window, 80, 16, dispatch="balanced", expect_recent_level=False)[0])


def test_rebalance_experts_log2phy_order():
    # "replica" (default) is the original's order; "slot" the order of every other function.
    rng = np.random.default_rng(5)
    w = rng.lognormal(0, 1, size=(4, 32)) * 100
    for args in ((48, 1, 1, 8), (48, 4, 2, 8)):
        p, l2p, cnt = eplb.rebalance_experts(w, *args)
        ps, l2ps, cnts = eplb.rebalance_experts(w, *args, log2phy_order="slot")
        assert np.array_equal(p, ps) and np.array_equal(cnt, cnts)
        want, _ = eplb.compute_logical_maps(p, 32)
        assert np.array_equal(l2ps, want)
        # the original's order: replica r of expert e sits at slot l2p[l, e, r], phy2log agrees
        for layer in range(4):
            for e in range(32):
                for r in range(cnt[layer, e]):
                    assert p[layer, l2p[layer, e, r]] == e
    # with these weights the original's order is not ascending somewhere: the option matters
    p, l2p, cnt = eplb.rebalance_experts(w, 48, 1, 1, 8)
    assert not np.array_equal(l2p, eplb.compute_logical_maps(p, 32)[0])
    with pytest.raises(AssertionError, match="log2phy_order"):
        eplb.rebalance_experts(w, 48, 1, 1, 8, log2phy_order="rank")

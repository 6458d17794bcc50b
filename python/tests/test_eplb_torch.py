"""torch tensors through ballast_eplb: any dtype (bf16, f16 included), requires_grad, non-contiguous,
any device in; int64 tensors out on the input's device. Skipped where torch is not installed
(scripts/setup.sh installs Debian's python3-torch)."""
import numpy as np
import pytest

import ballast_eplb as eplb

torch = pytest.importorskip("torch")

README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def variants(device):
    """The README weights as tensors of every kind planning must accept (exact in each dtype)."""
    base = torch.tensor(README_WEIGHT, device=device)
    wide = torch.zeros(2, 24, device=device, dtype=torch.float32)
    wide[:, ::2] = base.float()
    yield "int64", base
    yield "float32", base.float()
    yield "bfloat16", base.to(torch.bfloat16)
    yield "float16", base.half()
    yield "requires_grad", base.float().requires_grad_(True)
    yield "non-contiguous", wide[:, ::2]
    yield "transposed", base.float().t().contiguous().t()


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_in_int64_tensors_out_on_the_device(device):
    for name, w in variants(device):
        phy2log, log2phy, logcnt = eplb.rebalance_experts(w, 16, 4, 2, 8)
        for t in (phy2log, log2phy, logcnt):
            assert isinstance(t, torch.Tensor) and t.dtype == torch.int64, name
            assert t.device == w.device, name
        assert phy2log.tolist() == README_PHY2LOG, name
        assert logcnt.cpu().tolist() == [np.bincount(r, minlength=12).tolist() for r in README_PHY2LOG], name


@pytest.mark.parametrize("device", DEVICES)
def test_every_function_takes_and_returns_tensors(device):
    w = torch.tensor(README_WEIGHT, device=device, dtype=torch.bfloat16)
    p, l2p, cnt = eplb.rebalance_experts_ballast(w, 16, 8)
    assert p.device == w.device and p.dtype == torch.int64
    l2p2, cnt2 = eplb.compute_logical_maps(p, 12)
    assert torch.equal(l2p2, l2p) and torch.equal(cnt2, cnt)
    pack, rank = eplb.balanced_packing(w.float(), 4)
    assert pack.shape == (2, 12) and pack.device == w.device
    phy2log, r, logcnt = eplb.replicate_experts(w, 16)
    assert logcnt.sum().item() == 32
    old = torch.tensor(README_PHY2LOG, device=device)
    for policy in (eplb.DeepseekPolicy, eplb.BallastPolicy):
        new = policy.rebalance_experts(w, 16, 4, 2, 8, old_global_expert_indices=old)
        assert isinstance(new, torch.Tensor) and new.device == w.device and new.shape == (2, 16)
    assert eplb.slots_kept(old, old).tolist() == [16, 16]
    loads = eplb.rank_loads(old, w, 8)
    assert loads.dtype == torch.float64 and loads.device == w.device
    m = eplb.measured_balancedness(loads)
    assert m["balancedness"] == pytest.approx(loads.mean(1).sum().item() / loads.max(1).values.sum().item())
    # SGLang's [passes, layers, experts], summed over the passes
    passes = torch.stack([w.float(), w.float()])
    assert eplb.rebalance_experts(passes, 16, 4, 2, 8)[0].tolist() == README_PHY2LOG


def test_bad_tensors_refused_in_one_line():
    for bad, message in [(torch.ones(2, 4, dtype=torch.bool), "tensor dtype torch.bool"),
                         (torch.ones(2, 4, dtype=torch.complex64), "tensor dtype torch.complex64"),
                         (torch.tensor([[1.0, float("nan"), 1.0, 1.0]]), "finite and >= 0"),
                         (torch.ones(4), "2 to 3 dimensions")]:
        with pytest.raises(AssertionError, match=message) as e:
            eplb.rebalance_experts(bad, 4, 1, 1, 2)
        assert "\n" not in str(e.value)

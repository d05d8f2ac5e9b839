"""DPD loss terms on hand-computed examples, both ends of the divergence mix, micro-batch invariance."""
from __future__ import annotations

import math

import pytest
import torch

from stages.dpd_loss import DPDWeights, StepCounts, dpd_loss, dpo_terms, kd_terms, topk_partition

LOG = math.log


def test_dpo_term_by_hand():
    # margin = (-1 - -2) - (-3 - -2) = 2; beta 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    got = dpo_terms(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert got.item() == pytest.approx(LOG(1 + math.exp(-1)), abs=1e-7)
    # a policy that prefers the positive less than the reference pays more than log 2
    worse = dpo_terms(torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert worse.item() > LOG(2) > got.item()


T = torch.tensor([[LOG(0.5), LOG(0.3)]])      # teacher top-2, rest 0.2
S = torch.tensor([[LOG(0.25), LOG(0.25)]])    # student at the teacher's ids, rest 0.5
FORWARD = 0.5 * LOG(0.5 / 0.25) + 0.3 * LOG(0.3 / 0.25) + 0.2 * LOG(0.2 / 0.5)
REVERSE = 0.25 * LOG(0.25 / 0.5) + 0.25 * LOG(0.25 / 0.3) + 0.5 * LOG(0.5 / 0.2)


def test_topk_partition_keeps_the_rest_mass():
    assert topk_partition(T).exp().tolist()[0] == pytest.approx([0.5, 0.3, 0.2])


@pytest.mark.parametrize("lam, expected", [(0.0, FORWARD), (1.0, REVERSE), (0.5, 0.5 * FORWARD + 0.5 * REVERSE),
                                           (0.25, 0.75 * FORWARD + 0.25 * REVERSE)])
def test_kd_divergence_by_hand_including_both_ends(lam, expected):
    assert kd_terms(T, S, lam).item() == pytest.approx(expected, abs=1e-6)


def test_kd_mix_is_continuous_at_both_ends_and_zero_when_equal():
    assert kd_terms(T, S, 1e-7).item() == pytest.approx(FORWARD, abs=1e-6)
    assert kd_terms(T, S, 1 - 1e-7).item() == pytest.approx(REVERSE, abs=1e-6)
    for lam in (0.0, 0.5, 1.0):
        assert kd_terms(T, T.clone(), lam).item() == pytest.approx(0.0, abs=1e-7)
    assert FORWARD > 0.1 and REVERSE > 0.1   # neither end is a silent ~0


def test_kd_gradient_reaches_the_student_only():
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    kd_terms(t, s, 0.3).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_weights_are_validated():
    with pytest.raises(ValueError, match="kd_reverse_weight"):
        DPDWeights(kd_reverse_weight=1.5)
    with pytest.raises(ValueError, match="beta"):
        DPDWeights(beta=0.0)


def _batch(seed: int, pairs: int = 4, t: int = 6, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    logp = lambda *shape: torch.log_softmax(torch.randn(*shape, k + 2, generator=g), -1)[..., :k]
    mask = lambda: (torch.rand(pairs, t, generator=g) > 0.3).float()
    return dict(pol_pos_tok=-torch.rand(pairs, t, generator=g), pol_neg_tok=-torch.rand(pairs, t, generator=g),
                pos_mask=mask(), neg_mask=mask(), ref_pos=-torch.rand(pairs, generator=g) * 3,
                ref_neg=-torch.rand(pairs, generator=g) * 3, teacher_pos_topk=logp(pairs, t),
                student_pos_topk=logp(pairs, t), teacher_neg_topk=logp(pairs, t), student_neg_topk=logp(pairs, t))


def test_loss_does_not_change_with_micro_batch_size():
    b = _batch(0)
    counts = StepCounts(pairs=4, pos_tokens=int(b["pos_mask"].sum()), neg_tokens=int(b["neg_mask"].sum()))
    w = DPDWeights(beta=0.2, w_dpo=1.0, w_pos=0.5, w_neg=0.25, kd_reverse_weight=0.5)
    whole, _ = dpd_loss(**b, w=w, counts=counts)
    for size in (1, 2):
        parts = sum(dpd_loss(**{k: v[i:i + size] for k, v in b.items()}, w=w, counts=counts)[0]
                    for i in range(0, 4, size))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)

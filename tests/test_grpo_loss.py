"""GRPO loss maths (megads/rl/grpo_loss.py) against hand computations on small explicit tensors."""

import math

import pytest
import torch

from megads.rl.grpo_loss import (AGGREGATIONS, Normalizer, aggregate, group_advantages, grpo_token_terms, k3_kl,
                                 zero_variance_groups)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


# ------------------------------------------------------------------------------ advantages

def test_advantages_sample_std_g4():
    # mean 0.25, deviations (.75, -.25, -.25, -.25), sum of squares .75, sample var .75/3 = .25, std .5
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    close(adv, [[1.5, -0.5, -0.5, -0.5]])
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=1e-6)
    close(adv, [[0.75 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6)]])


def test_advantages_g2_is_sample_not_population_std():
    # rewards {0, 1}: mean .5, sample std sqrt(.5) -> +-1/sqrt(2) (population std would give +-1)
    adv = group_advantages(torch.tensor([[0.0, 1.0], [3.0, 1.0]]), eps=0.0)
    s = 1 / math.sqrt(2)
    close(adv, [[-s, s], [s, -s]])


def test_advantages_without_std_dr_grpo():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 1.0]]), scale_by_std=False)
    close(adv, [[0.75, -0.25, -0.25, -0.25], [1.0, -1.0, 0.0, 0.0]])


def test_zero_variance_group_exactly_zero_and_flagged():
    # float32: mean of seven 0.1s is 0.1 - 7.5e-9 and the std 8e-9, so without an explicit zero the
    # "equal" group would get advantages of -0.007 (eps 1e-6) or -0.93 (eps 0)
    rewards = torch.tensor([[0.1] * 7, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0] * 7, [0.3] * 7])
    assert zero_variance_groups(rewards).tolist() == [True, False, True, True]
    for scale in (True, False):
        for eps in (0.0, 1e-6):
            adv = group_advantages(rewards, scale_by_std=scale, eps=eps)
            assert torch.isfinite(adv).all()
            assert (adv[[0, 2, 3]] == 0).all()
            assert (adv[1] != 0).all()


def test_advantages_integer_rewards_and_bad_shapes():
    close(group_advantages(torch.tensor([[1, 0]]), scale_by_std=False), [[0.5, -0.5]])
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0]))


# ------------------------------------------------------------------------------ aggregation

VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                       [10.0, 20.0, 30.0, 40.0],
                       [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[1, 1, 1, 0],
                     [1, 0, 0, 0],
                     [0, 0, 0, 0]], dtype=torch.bool)  # lengths 3, 1, 0 (empty)


def test_aggregate_hand_values():
    norm = Normalizer(tokens=4, sequences=3, max_length=5)
    # token-mean: (1+2+3 + 10) / 4
    close(aggregate(VALUES, MASK, "token-mean", norm), 16 / 4)
    # seq-mean-token-mean: (6/3 + 10/1 + 0) / 3
    close(aggregate(VALUES, MASK, "seq-mean-token-mean", norm), (2 + 10) / 3)
    # seq-mean-token-sum-norm: (6/5 + 10/5 + 0) / 3
    close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm), (6 / 5 + 10 / 5) / 3)
    # float mask gives the same numbers as a bool mask
    for mode in AGGREGATIONS:
        close(aggregate(VALUES, MASK.float(), mode, norm), aggregate(VALUES, MASK, mode, norm))


def test_aggregate_masked_garbage_does_not_leak():
    values = VALUES.clone()
    values[0, 3] = float("nan")
    values[2, 0] = float("inf")
    norm = Normalizer.of(MASK, max_length=5)
    assert norm == Normalizer(tokens=4.0, sequences=3.0, max_length=5)
    close(aggregate(values, MASK, "token-mean", norm), 4.0)
    for mode in AGGREGATIONS:
        assert torch.isfinite(aggregate(values, MASK, mode, norm))


def test_aggregate_empty_batch_is_zero_not_nan():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGGREGATIONS:
        assert aggregate(torch.ones(2, 3), mask, mode, Normalizer.of(mask)).item() == 0.0


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        aggregate(VALUES, MASK, "seq-mean-token-sum", Normalizer.of(MASK))


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_partition_property(mode):
    g = torch.Generator().manual_seed(0)
    B, T = 7, 6
    values = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 0, 4, 3, 6, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    norm = Normalizer.of(mask, max_length=8)  # global, shared by every shard
    whole = aggregate(values, mask, mode, norm)
    (whole_grad,) = torch.autograd.grad(whole, values)
    for cuts in ([(0, 3), (3, 7)], [(0, 2), (2, 3), (3, 7)], [(0, 1), (1, 5), (5, 7)]):
        shards = [aggregate(values[a:b], mask[a:b], mode, norm) for a, b in cuts]
        total = sum(shards)
        torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(total, values)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ token terms

def test_first_iteration_ratio_one_and_gradient():
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, -0.7]], requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    terms = grpo_token_terms(logp, logp.detach(), adv, eps_low=0.2, eps_high=0.28)
    assert (terms.ratio == 1).all()
    assert (terms.ppo_kl == 0).all()
    assert not terms.clipped.any()
    assert terms.kl_ref is None
    close(terms.loss, -adv[:, None].expand(2, 3))
    norm = Normalizer.of(mask)
    loss = aggregate(terms.loss, mask, "token-mean", norm)
    close(loss, (-1.5 * 2 + 0.5 * 3) / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, -adv[:, None] * mask / 5, rtol=1e-7, atol=0)


def test_clip_higher_hand_cases():
    eps_low, eps_high = 0.2, 0.28  # clip range [0.8, 1.28]
    ratios = torch.tensor([[1.5, 1.25, 1.1, 0.5, 0.75],    # A = +1
                           [0.5, 0.75, 0.85, 1.25, 1.5]])  # A = -1
    old = torch.tensor([[-1.0, -2.0, -0.3, -0.9, -1.7], [-0.4, -1.1, -2.2, -0.6, -1.3]])
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    terms = grpo_token_terms(logp, old, adv, eps_low, eps_high)
    close(terms.ratio, ratios)
    # A > 0: only rho > 1 + eps_high clips (1.25 would clip with a symmetric 0.2; low side never does)
    # A < 0: only rho < 1 - eps_low clips (0.75 would not clip with a symmetric 0.28; high side never does)
    expected_clipped = [[True, False, False, False, False], [True, True, False, False, False]]
    assert terms.clipped.tolist() == expected_clipped
    close(terms.loss, [[-1.28, -1.25, -1.1, -0.5, -0.75], [0.8, 0.8, 0.85, 1.25, 1.5]])
    close(terms.ppo_kl, -ratios.log())
    (grad,) = torch.autograd.grad(terms.loss.sum(), logp)
    # d(-rho A)/d logp = -rho A where unclipped, 0 where clipped
    expected_grad = torch.where(torch.tensor(expected_clipped), torch.zeros(()), -ratios * adv[:, None])
    close(grad, expected_grad)
    assert (grad[torch.tensor(expected_clipped)] == 0).all()


def test_tie_on_clip_bound_keeps_full_gradient():
    # eps_high = 0 puts rho = 1 exactly on the upper bound: both terms are equal, the unclipped one is
    # taken with its full gradient -rho A (torch.minimum would split it in half)
    logp = torch.tensor([[-0.7]], requires_grad=True)
    terms = grpo_token_terms(logp, logp.detach(), torch.tensor([2.0]), eps_low=0.2, eps_high=0.0)
    assert not terms.clipped.any()
    (grad,) = torch.autograd.grad(terms.loss.sum(), logp)
    assert grad.item() == -2.0


def test_huge_log_ratio_stays_finite():
    logp = torch.tensor([[0.0, -200.0]], requires_grad=True)
    old = torch.tensor([[-200.0, 0.0]])
    for a in (1.0, -1.0):
        terms = grpo_token_terms(logp, old, torch.tensor([a]), 0.2, 0.2, ref_logp=old, beta=0.1)
        (grad,) = torch.autograd.grad(terms.loss.sum(), logp)
        assert torch.isfinite(terms.loss).all() and torch.isfinite(grad).all()


def test_beta_adds_k3_and_needs_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    terms = grpo_token_terms(logp, logp.detach(), torch.tensor([0.5]), 0.2, 0.28, ref_logp=ref, beta=0.04)
    k3 = torch.tensor([[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]])
    close(terms.kl_ref, k3)
    close(terms.loss, -0.5 + 0.04 * k3)
    (grad,) = torch.autograd.grad(terms.loss.sum(), logp)
    close(grad, -0.5 + 0.04 * (1 - torch.exp(ref - logp.detach())))  # d k3 / d logp = 1 - exp(ref - logp)
    # reference given but beta = 0: KL reported, not in the loss
    terms0 = grpo_token_terms(logp, logp.detach(), torch.tensor([0.5]), 0.2, 0.28, ref_logp=ref)
    close(terms0.kl_ref, k3)
    close(terms0.loss, torch.full((1, 2), -0.5))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_token_terms(logp, logp.detach(), torch.tensor([0.5]), 0.2, 0.28, beta=0.04)


# ------------------------------------------------------------------------------ k3

def test_k3_values():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -7.0]])
    assert (k3_kl(logp, logp) == 0).all()
    ref = torch.tensor([[-1.2, -1.0, -0.5], [-0.2, -4.0, -7.0]])
    kl = k3_kl(logp, ref)
    r = ref - logp
    close(kl, torch.exp(r) - r - 1)
    close(kl[0, 0], math.exp(-0.2) + 0.2 - 1)
    equal = r == 0
    assert (kl[~equal] > 0).all() and (kl[equal] == 0).all()


def test_k3_clamped_for_huge_differences():
    logp = torch.tensor([-1000.0, 0.0, -50.0], requires_grad=True)
    ref = torch.tensor([0.0, -1000.0, -20.0])
    kl = k3_kl(logp, ref)
    assert torch.isfinite(kl).all()
    close(kl, [math.exp(20) - 20 - 1, math.exp(-20) + 20 - 1, math.exp(20) - 20 - 1])
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert (grad == 0).all()  # saturated beyond the clamp: no gradient


# ------------------------------------------------------------------------------ zero-variance groups

@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_zero_variance_group_has_zero_gradient(mode):
    g = torch.Generator().manual_seed(1)
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.5]])  # P = 2, G = 3 -> B = 6 sequences
    adv = group_advantages(rewards).reshape(-1)
    B, T = 6, 5
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)  # not the first iteration: ratios != 1
    ref = logp.detach() + 0.5 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    terms = grpo_token_terms(logp, old, adv, 0.2, 0.28, ref_logp=ref, beta=0.0)
    loss = aggregate(terms.loss, mask, mode, Normalizer.of(mask))
    (grad,) = torch.autograd.grad(loss, logp)
    assert (grad[:3] == 0).all()
    assert (grad[3:][mask[3:]] != 0).any()
    assert not terms.clipped[:3].any()


def test_low_precision_inputs_computed_in_float32():
    logp = torch.tensor([[-1.0, -2.5]], dtype=torch.bfloat16, requires_grad=True)
    terms = grpo_token_terms(logp, logp.detach(), torch.tensor([1.0]), 0.2, 0.28,
                             ref_logp=torch.tensor([[-1.5, -2.5]], dtype=torch.bfloat16), beta=0.1)
    assert terms.loss.dtype == terms.ratio.dtype == terms.kl_ref.dtype == torch.float32
    assert (terms.ratio == 1).all()
    close(terms.kl_ref, [[math.exp(-0.5) + 0.5 - 1, 0.0]])

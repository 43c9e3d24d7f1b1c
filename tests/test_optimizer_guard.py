"""The optimizer never applies an update that makes a weight non-finite (issue #12).

Finite gradients do not make a finite AdamW update: a huge lr or weight decay, or a weight near the
FP32 maximum, overflow it. DistributedOptimizer.step asks parallel.adamw.adamw_step_stays_finite
first (a bound, then the exact update on copies where the bound cannot clear a tensor) and skips
the step on every rank, changing nothing, when any rank's answer is no.

- adamw_step_stays_finite against what adamw_step then really does, case by case, and that it
  changes nothing;
- single process: lr = inf, lr = 1e38 and a huge weight decay skip the step bit for bit; a normal
  step is bit-identical to torch.optim.AdamW's fused update, and healthy training never
  needs the exact pass;
- multi-rank (gloo): a weight near the FP32 maximum in one rank's shard only (a dense shard under
  dp2, an expert-data-parallel shard under dp4-ep2) skips the step on every rank, and the run
  continues as if the skipped attempt had never happened.
"""

from __future__ import annotations

import pytest
import torch

import parallel.adamw as adamw
from parallel.adamw import adamw_step, adamw_step_stays_finite
from parallel.zero1 import NONFINITE_UPDATE, DistributedOptimizer
from test_data_parallel import BETAS, EPS, SMALL_BUCKET, Layout, _clone_state, _states_equal, full_model, snapshot
from tools.harness.distributed import run_distributed

HUGE = 3.35e38  # a weight near the FP32 maximum (3.40e38): finite, but an outward step of 1e37 overflows it
KW = dict(betas=BETAS, eps=EPS)


def _seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ============================================================================ adamw_step_stays_finite


def _state(n=50, seed=0, moments_dtype=torch.float32):
    """Flat master, moments (as after some steps) and gradient."""
    master = _seeded(seed, n)
    exp_avg = (_seeded(seed + 1, n) * 1e-2).to(moments_dtype)
    exp_avg_sq = (_seeded(seed + 2, n).pow(2) * 1e-4).to(moments_dtype)
    return master, exp_avg, exp_avg_sq, _seeded(seed + 3, n) * 1e-2


def _set(t, i, value):
    t = t.clone()
    t[i] = value
    return t


def _cases():
    m, a, v, g = _state()
    bf16_max = torch.finfo(torch.bfloat16).max
    return {
        # name: (master, exp_avg, exp_avg_sq, grad, step kwargs, param dtype, expected)
        "healthy": (m, a, v, g, dict(lr=1e-3, weight_decay=0.1), torch.float32, True),
        "lr inf": (m, a, v, g, dict(lr=float("inf"), weight_decay=0.0), torch.float32, False),
        "lr nan": (m, a, v, g, dict(lr=float("nan"), weight_decay=0.0), torch.float32, False),
        "lr 1e38": (m, a, v, g, dict(lr=1e38, weight_decay=0.0), torch.float32, False),
        "lr 1e36, weights of 1": (m, a, v, g, dict(lr=1e36, weight_decay=0.0), torch.float32, True),
        "huge weight decay": (_set(m, 4, 10.0), a, v, g, dict(lr=1.0, weight_decay=1e38), torch.float32, False),
        "weight decay past FP32": (m, a, v, g, dict(lr=1.0, weight_decay=1e39), torch.float32, False),
        "weight near max, normal lr": (_set(m, 7, HUGE), a, v, g, dict(lr=1e-3, weight_decay=0.1),
                                       torch.float32, True),
        "weight near max, big outward step": (_set(m, 7, HUGE), _set(a, 7, -1.0), _set(v, 7, 1.0), _set(g, 7, -1.0),
                                              dict(lr=1e37, weight_decay=0.0), torch.float32, False),
        "weight near max, big inward step": (_set(m, 7, HUGE), _set(a, 7, 1.0), _set(v, 7, 1.0), _set(g, 7, 1.0),
                                             dict(lr=1e37, weight_decay=0.0), torch.float32, True),
        "nan weight": (_set(m, 2, float("nan")), a, v, g, dict(lr=1e-3, weight_decay=0.1), torch.float32, False),
        "eps 0, a zero gradient": (m, _set(a, 5, 0.0), _set(v, 5, 0.0), _set(g, 5, 0.0),
                                   dict(lr=1e-3, weight_decay=0.1, eps=0.0), torch.float32, False),
        "eps 0, no zero": (m, a, v, g, dict(lr=1e-3, weight_decay=0.1, eps=0.0), torch.float32, True),
        # FP16 weights: the master moves up by ~5 and passes 65520, where FP16 rounds to inf
        "fp16 weight at the top of its range": (_set(m, 1, 65519.0), _set(a, 1, -1.0), _set(v, 1, 1.0),
                                                _set(g, 1, -1.0), dict(lr=1.0, weight_decay=0.0), torch.float16,
                                                False),
        "fp16 weight below it": (_set(m, 1, 65000.0), _set(a, 1, -1.0), _set(v, 1, 1.0), _set(g, 1, -1.0),
                                 dict(lr=1.0, weight_decay=0.0), torch.float16, True),
        # the new exp_avg_sq (3.399e38) is finite in FP32 and inf once stored in BF16
        "bf16 moment rounds to inf": (m, a.bfloat16(), _set(v, 3, bf16_max).bfloat16(), _set(g, 3, 1.8439e19),
                                      dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.1)), torch.float32, False),
        "bf16 moments, healthy": (m, a.bfloat16(), v.bfloat16(), g, dict(lr=1e-3, weight_decay=0.1),
                                  torch.float32, True),
    }


def _really_finite(master, exp_avg, exp_avg_sq, grad, kwargs, dtype, n):
    """Run adamw_step on copies; whether everything it produced (first n elements) is finite."""
    m, a, v = master.clone(), exp_avg.clone(), exp_avg_sq.clone()
    try:
        adamw_step([m], [a], [v], [grad], [[(0, 30)]], step=3, **{**KW, **kwargs})
    except RuntimeError as e:  # a scalar past the FP32 range (an lr of 1e38's step size): torch refuses it
        assert "overflow" in str(e)
        return False
    return all(bool(torch.isfinite(t[:n]).all()) for t in (m, m.to(dtype), a, v))


@pytest.mark.parametrize("name", list(_cases()))
def test_stays_finite_is_what_the_update_does(name):
    master, exp_avg, exp_avg_sq, grad, kwargs, dtype, expected = _cases()[name]
    inputs = [t.clone() for t in (master, exp_avg, exp_avg_sq, grad)]
    n = master.numel()
    assert _really_finite(master, exp_avg, exp_avg_sq, grad, kwargs, dtype, n) == expected  # the case is as named
    answer = adamw_step_stays_finite([master], [exp_avg], [exp_avg_sq], [grad], [[(0, 30)]], step=3,
                                     param_dtypes=[dtype], **{**KW, **kwargs})
    assert answer.dtype == torch.bool and answer.dim() == 0
    assert bool(answer) == expected
    for before, after in zip(inputs, (master, exp_avg, exp_avg_sq, grad)):  # the check changed nothing
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


def test_exact_pass_agrees_where_the_bound_clears():
    """The bound is only a shortcut: where it clears a tensor, the exact pass says finite too."""
    master, exp_avg, exp_avg_sq, grad = _state(n=4000, seed=5)
    for lr, wd in ((1e-3, 0.1), (1.0, 10.0), (1e30, 0.0)):
        c = adamw._coefficients(4, lr, BETAS, EPS, wd)
        (cleared,) = adamw._bounded([(master, exp_avg, exp_avg_sq, grad)], [True], [torch.float32], c)
        exact = adamw._exact_check(master, exp_avg, exp_avg_sq, grad, [(0, 4000)], 4000, torch.float32, c)
        assert cleared and bool(exact), (lr, wd)


def test_padding_does_not_count():
    """Elements past `lengths` are ZeRO padding, never copied anywhere: with eps = 0 their 0 / 0 is NaN."""
    master, exp_avg, exp_avg_sq, grad = (torch.cat([t, torch.zeros(3)]) for t in _state(n=20))
    kwargs = dict(step=1, lr=1e-3, betas=BETAS, eps=0.0, weight_decay=0.0)
    assert not bool(adamw_step_stays_finite([master], [exp_avg], [exp_avg_sq], [grad], [[]], **kwargs))
    assert bool(adamw_step_stays_finite([master], [exp_avg], [exp_avg_sq], [grad], [[]], lengths=[20], **kwargs))


# ============================================================================ single process


def _single(lr=1e-2, weight_decay=0.1):
    model = full_model()
    opt = DistributedOptimizer([(model.dense_parameters(), None), ([model.experts], None)], lr=lr, betas=BETAS,
                               eps=EPS, weight_decay=weight_decay, bucket_size=SMALL_BUCKET)
    return model, opt


def _set_grads(model, opt, seed):
    opt.zero_grad()
    for k, p in enumerate(model.parameters()):
        p.grad.copy_(_seeded(seed * 100 + k, *p.shape) * 0.1)


@pytest.mark.parametrize("lr, weight_decay", [(float("inf"), 0.1), (1e38, 0.1), (1e38, 0.0), (1e-2, 1e42)],
                         ids=["lr-inf", "lr-1e38", "lr-1e38-no-decay", "huge-weight-decay"])
def test_a_nonfinite_update_is_skipped_and_changes_nothing(lr, weight_decay):
    model, opt = _single()
    _set_grads(model, opt, 0)
    assert not opt.step().skipped  # moments and step count are not zero: they must stay what they are
    before, state_before = snapshot(model), _clone_state(opt.state_dict()["shards"])
    for group in opt.param_groups:
        group["lr"], group["weight_decay"] = lr, weight_decay
    _set_grads(model, opt, 1)
    result = opt.step(max_grad_norm=1.0)
    assert result.skipped and result.reason == NONFINITE_UPDATE
    assert torch.isfinite(torch.tensor(result.grad_norm))  # the gradients were finite
    after = snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before), "a skipped step changed parameters"
    assert _states_equal(opt.state_dict()["shards"], state_before), "a skipped step changed the optimizer state"
    assert opt.steps == 1


def test_a_normal_step_is_torch_adamw_bit_for_bit():
    """Not skipped, and exactly torch.optim.AdamW(fused=True)'s update (the maths did not move)."""
    model, opt = _single()
    ref_model = full_model()
    decay = [p for p in ref_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref_model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=BETAS, eps=EPS, fused=True)
    for step in range(3):
        _set_grads(model, opt, step)
        result = opt.step()
        assert not result.skipped and result.reason is None
        for k, p in enumerate(ref_model.parameters()):
            p.grad = _seeded(step * 100 + k, *p.shape) * 0.1
        ref.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name


def test_healthy_training_needs_no_exact_pass(monkeypatch):
    """The bound clears every tensor of ordinary steps: the guard costs four reductions per tensor there."""
    exact_calls = []
    real = adamw._exact_check
    monkeypatch.setattr(adamw, "_exact_check", lambda *a: exact_calls.append(1) or real(*a))
    model, opt = _single()
    for step in range(3):
        _set_grads(model, opt, step)
        assert not opt.step(max_grad_norm=1.0).skipped
    assert exact_calls == []
    with torch.no_grad():
        model.norm[0] = HUGE  # a weight the bound cannot clear: its tensor takes the exact pass, and is finite
    opt.reload_model_params()
    _set_grads(model, opt, 3)
    assert not opt.step(max_grad_norm=1.0).skipped and len(exact_calls) == 1


# ============================================================================ multi-rank


def run_huge_weight_in_one_shard(ep: int, target: str):
    """`target`'s last element (owned by the last rank of its group) is set near the FP32 maximum with
    a gradient that pushes it outward; step 0 (normal lr) is applied, step 1 (lr 1e37) would
    overflow that element only, step 2 (normal lr again) is applied."""
    layout = Layout(ep)

    def setup():
        model = layout.model()
        param = model.get_parameter(target)
        if target != "experts" or layout.ep_rank == ep - 1:  # a replicated weight: the same on its replicas
            with torch.no_grad():
                param.view(-1)[-1] = HUGE
        opt = layout.optimizer(model, SMALL_BUCKET)
        for group in opt.param_groups:
            group["weight_decay"] = 0.0  # with decay, lr 1e37 would overflow every weight, not one
        return model, opt, param

    def step(model, opt, param, data_step, lr):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        for k, p in enumerate(model.parameters()):
            p.grad.copy_(_seeded(1000 * data_step + 10 * layout.rank + k, *p.shape) * 0.1)
        param.grad.view(-1)[-1] = -1.0  # outward: AdamW moves it up by about step_size
        return opt.step()

    model, opt, param = setup()
    assert not step(model, opt, param, 0, 1e-2).skipped
    before, shards_before = snapshot(model), _clone_state(opt.state_dict()["shards"])
    owns_it = any(bool((m.abs() > 1e38).any()) for g in opt.sharded_groups for m in g.master)
    result = step(model, opt, param, 1, 1e37)
    assert result.skipped and result.reason == NONFINITE_UPDATE, f"rank {layout.rank}: {result}"
    after = snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before), "a skipped step changed parameters"
    assert _states_equal(opt.state_dict()["shards"], shards_before), "a skipped step changed the optimizer state"
    assert opt.steps == 1
    result = step(model, opt, param, 2, 1e-2)
    assert not result.skipped and opt.steps == 2
    # The skipped attempt left no trace: the same as the two applied steps alone.
    model_b, opt_b, param_b = setup()
    step(model_b, opt_b, param_b, 0, 1e-2)
    assert step(model_b, opt_b, param_b, 2, 1e-2).grad_norm == result.grad_norm
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return owns_it


@pytest.mark.parametrize("dp, ep, target, owner", [
    pytest.param(2, 1, "w_out.weight", 1, id="dp2-dense-shard"),
    pytest.param(4, 2, "experts", 3, id="dp4-ep2-expert-shard"),
])
def test_nonfinite_update_in_one_shard_skips_the_step_everywhere(dp, ep, target, owner):
    owns = run_distributed(run_huge_weight_in_one_shard, dp, args=(ep, target), timeout_s=60)
    assert owns == [rank == owner for rank in range(dp)]  # one rank's shard only: the others must learn of it

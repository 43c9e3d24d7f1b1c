"""AdamW's update on flat FP32 shards: torch.optim.AdamW's maths, in one place.

`adamw_step` is torch.optim.AdamW's update with fused=True (torch/optim/adam.py, decoupled weight
decay: torch._fused_adamw_, one pass over the four tensors where the single-tensor update makes
seven; ~5x faster on CPU) applied to flat FP32 master tensors, e.g. the shards a ZeRO-1 rank owns
(parallel.zero1.DistributedOptimizer). Weight decay applies to given element ranges only (the
matrices, not norms or biases): those are scaled first, then the kernel runs without decay, which
gives torch's fused AdamW bit for bit. The two moments may be stored in a lower precision
(bfloat16, as DeepSeek-V3 does to halve their memory): the update is computed in FP32 from FP32
copies and the stored moments are rounded from them afterwards.

`adamw_step_stays_finite` answers, without changing anything, whether `adamw_step` with the same
arguments would leave every master weight, every stored moment and every weight cast to
`param_dtypes` finite: a caller that must never apply a non-finite update (DistributedOptimizer
skips the step on every rank) asks first and updates in place only when the answer is yes
everywhere. The answer is exact, not an estimate, and costs a fraction of an update when training
is healthy:

- a bound first: from each tensor's largest |master|, |exp_avg|, exp_avg_sq and |grad| (four
  reductions: one read each, no temporaries) it proves that no value of the update can come near
  overflowing, with a factor of 4 to spare over the few roundings on the way (see `_bounded`);
- a tensor the bound cannot clear (a weight near the format's maximum, a huge lr or weight decay,
  eps = 0, anything already inf or NaN) takes the exact pass: the update's own operations
  (`_update`) on copies, so the same kernels on the same shapes round the same way, and its
  result is checked. One tensor at a time: peak extra memory is a few copies of one tensor.
  Doing this for every tensor would cost two to three updates (measured on CPU): hence the bound.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch


class _Coefficients(NamedTuple):
    """The step's scalars, computed once (in double precision, as torch.optim.AdamW does)."""

    beta1: float
    beta2: float
    eps: float
    decay_factor: float | None  # 1 - lr * weight_decay; None: no weight decay
    step_size: float            # lr / bias_correction1
    bias_correction2_sqrt: float
    lr: float
    step: float


def _coefficients(step: int, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> _Coefficients:
    beta1, beta2 = betas
    step = float(step)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return _Coefficients(beta1, beta2, eps, 1 - lr * weight_decay if weight_decay != 0 else None,
                         lr / bias_correction1, bias_correction2 ** 0.5, lr, step)


def _update(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
            decay: Sequence[tuple[int, int]], c: _Coefficients) -> None:
    """AdamW on one flat FP32 tensor and its FP32 moments, all three in place."""
    if c.decay_factor is not None:
        for a, b in decay:
            master[a:b].mul_(c.decay_factor)
    torch._fused_adamw_([master], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(c.step, device=master.device)],
                        lr=c.lr, beta1=c.beta1, beta2=c.beta2, weight_decay=0.0, eps=c.eps, amsgrad=False,
                        maximize=False)


@torch.no_grad()
def adamw_step(masters: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               exp_avg_sqs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               decay_ranges: Sequence[Sequence[tuple[int, int]]], *, step: int, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW update, in place, of every flat FP32 tensor in `masters` and its moments.

    `masters[i]`, `exp_avgs[i]`, `exp_avg_sqs[i]` and `grads[i]` (FP32) are flat tensors of the same
    length; `decay_ranges[i]` the [a, b) element ranges of `masters[i]` that weight decay applies
    to. `step` counts this update (1 for the first): AdamW's bias correction.
    """
    c = _coefficients(step, lr, betas, eps, weight_decay)
    for master, stored_avg, stored_avg_sq, grad, decay in zip(masters, exp_avgs, exp_avg_sqs, grads, decay_ranges):
        # Low-precision moments: update FP32 copies, step with them, store them rounded.
        exp_avg, exp_avg_sq = stored_avg.float(), stored_avg_sq.float()
        _update(master, exp_avg, exp_avg_sq, grad, decay, c)
        if stored_avg.dtype != torch.float32:
            stored_avg.copy_(exp_avg)
            stored_avg_sq.copy_(exp_avg_sq)


_FP32_MAX = torch.finfo(torch.float32).max


@torch.no_grad()
def adamw_step_stays_finite(masters: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                            exp_avg_sqs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                            decay_ranges: Sequence[Sequence[tuple[int, int]]], *, step: int, lr: float,
                            betas: tuple[float, float], eps: float, weight_decay: float,
                            lengths: Sequence[int] | None = None,
                            param_dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    """Whether `adamw_step` with these arguments leaves everything finite; changes nothing.

    Everything: each new master weight, both new moments as stored (a BF16 moment can round to
    inf where its FP32 value did not), and each new master cast to `param_dtypes[i]` (the dtype of
    the weights it is copied into, FP32 if None: an FP16 weight overflows long before its master).
    `lengths[i]`: how many leading elements of `masters[i]` are weights (default: all); the rest is
    padding that is never copied anywhere (with eps = 0 its 0 / 0 is NaN, harmlessly).

    Returns a 0-dim bool tensor on the masters' device: the caller reduces it across ranks and
    reads it once. The device is read once here too (the bound's reductions, all tensors together),
    not once per tensor, which would add up over thousands of buckets.
    """
    device = masters[0].device if masters else torch.device("cpu")
    lengths = [m.numel() for m in masters] if lengths is None else lengths
    dtypes = param_dtypes or [torch.float32] * len(masters)
    todo = [i for i, n in enumerate(lengths) if n > 0]
    if not todo:
        return torch.tensor(True, device=device)  # no weights: nothing can become non-finite
    c = _coefficients(step, lr, betas, eps, weight_decay)
    # The kernels take these scalars as FP32 (an lr of 1e38 is finite in Python, its step size is not
    # in FP32): torch refuses one past the FP32 range, and an infinite one makes every element it
    # touches inf or NaN.
    if not abs(c.step_size) <= _FP32_MAX or (c.decay_factor is not None and not abs(c.decay_factor) <= _FP32_MAX
                                             and any(b > a for i in todo for a, b in decay_ranges[i])):
        return torch.tensor(False, device=device)
    cleared = _bounded([(masters[i][:lengths[i]], exp_avgs[i][:lengths[i]], exp_avg_sqs[i][:lengths[i]],
                         grads[i][:lengths[i]]) for i in todo],
                       [bool(decay_ranges[i]) for i in todo], [dtypes[i] for i in todo], c)
    stays_finite = torch.tensor(True, device=device)
    for i in (i for i, ok in zip(todo, cleared) if not ok):
        stays_finite &= _exact_check(masters[i], exp_avgs[i], exp_avg_sqs[i], grads[i], decay_ranges[i],
                                     lengths[i], dtypes[i], c)
    return stays_finite


def _bounded(tensors: list[tuple[torch.Tensor, ...]], decays: list[bool], param_dtypes: list[torch.dtype],
             c: _Coefficients) -> list[bool]:
    """For each (master, exp_avg, exp_avg_sq, grad), whether a bound proves its update finite.

    With W, A, G the largest |master|, |exp_avg|, |grad| and V the largest exp_avg_sq, when
    0 <= beta1, beta2 < 1, eps > 0 and exp_avg_sq >= 0, in exact arithmetic:
        |new exp_avg| <= max(A, G)                    (lerp: a convex combination)
        0 <= new exp_avg_sq <= max(V, G^2)            (likewise, of V and G^2)
        denominator = sqrt(new exp_avg_sq) / bias_correction2_sqrt + eps >= eps
        |new master| <= W * max(1, |1 - lr * wd|) + step_size * max(A, G) / min(eps, 1)
    and every intermediate is within twice these (lerp's end - self; min(eps, 1) because addcdiv
    may scale before it divides). Each operation rounds by a
    relative 2^-24 at most, so when every bound is below a quarter of its format's largest finite
    value (FP32, or the moments' and parameters' formats if smaller) nothing can overflow and no
    NaN can arise (no inf - inf, 0 * inf, 0 / 0 or square root of a negative): the update is
    finite. A tensor with an inf or NaN anywhere is not cleared.
    """
    if not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1):
        return [False] * len(tensors)
    eps = float(torch.tensor(c.eps, dtype=torch.float32))  # what the kernel adds (1e-50 is 0 in FP32)
    if not 0 < eps < math.inf:
        return [False] * len(tensors)
    extremes = torch.stack([torch.stack([v.float() for t in group for v in torch.aminmax(t)])
                            for group in tensors]).tolist()  # aminmax propagates NaN
    decay_factor = max(1.0, abs(c.decay_factor)) if c.decay_factor is not None else 1.0
    cleared = []
    for (master, exp_avg, _, _), decays, dtype, (w_lo, w_hi, a_lo, a_hi, v_lo, v_hi, g_lo, g_hi) in zip(
            tensors, decays, param_dtypes, extremes):
        if not all(map(math.isfinite, (w_lo, w_hi, a_lo, a_hi, v_lo, v_hi, g_lo, g_hi))):
            cleared.append(False)  # (and Python's max() would drop a NaN that is not its first argument)
            continue
        moments_limit = min(_FP32_MAX, torch.finfo(exp_avg.dtype).max) / 4
        master_limit = min(_FP32_MAX, torch.finfo(dtype).max) / 4
        largest_avg = max(-a_lo, a_hi, -g_lo, g_hi)
        bound = max(-w_lo, w_hi) * (decay_factor if decays else 1.0) + abs(c.step_size) * largest_avg / min(eps, 1.0)
        cleared.append(v_lo >= 0 and v_hi <= moments_limit and max(-g_lo, g_hi) ** 2 <= moments_limit
                       and largest_avg <= moments_limit and bound <= master_limit)
    return cleared


def _exact_check(master: torch.Tensor, stored_avg: torch.Tensor, stored_avg_sq: torch.Tensor, grad: torch.Tensor,
                 decay: Sequence[tuple[int, int]], n: int, dtype: torch.dtype, c: _Coefficients) -> torch.Tensor:
    """The update of one tensor done on copies (as adamw_step does it), and whether its first n
    elements came out finite: a 0-dim bool tensor."""
    new_master = master.clone()
    exp_avg = stored_avg.to(torch.float32, copy=True)
    exp_avg_sq = stored_avg_sq.to(torch.float32, copy=True)
    _update(new_master, exp_avg, exp_avg_sq, grad, decay, c)
    new_master, exp_avg, exp_avg_sq = new_master[:n], exp_avg[:n], exp_avg_sq[:n]
    # The new exp_avg needs no check of its own in FP32: where it is inf or NaN, so is the new master
    # (inf or NaN divided by any denominator, then scaled, stays inf or NaN).
    checked = [new_master if dtype == torch.float32 else new_master.to(dtype), exp_avg_sq]
    if stored_avg.dtype != torch.float32:
        checked += [exp_avg.to(stored_avg.dtype), exp_avg_sq.to(stored_avg_sq.dtype)]
    return torch.stack([_all_finite(t) for t in checked]).all()


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every element of `t` (not empty) is finite, as a 0-dim bool tensor: its min and max are
    (aminmax propagates NaN; one read and no temporary the size of `t`, unlike isfinite(t).all())."""
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()

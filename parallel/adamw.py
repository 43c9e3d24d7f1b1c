"""AdamW's update on flat FP32 shards: torch.optim.AdamW's maths, in one place.

`adamw_step` is torch.optim.AdamW's single-tensor update (torch/optim/adam.py, decoupled weight
decay) applied to flat FP32 master tensors, e.g. the shards a ZeRO-1 rank owns
(parallel.zero1.DistributedOptimizer). Weight decay applies to given element ranges only (the
matrices, not norms or biases). The two moments may be stored in a lower precision (bfloat16, as
DeepSeek-V3 does to halve their memory): the update is computed in FP32 from FP32 copies and the
stored moments are rounded from them afterwards.
"""

from __future__ import annotations

from typing import Sequence

import torch


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
    beta1, beta2 = betas
    wd = weight_decay
    step = float(step)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    for master, stored_avg, stored_avg_sq, grad, decay in zip(masters, exp_avgs, exp_avg_sqs, grads, decay_ranges):
        if wd != 0:
            for a, b in decay:
                master[a:b].mul_(1 - lr * wd)
        # Low-precision moments: update FP32 copies, step with them, store them rounded.
        exp_avg, exp_avg_sq = stored_avg.float(), stored_avg_sq.float()
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        master.addcdiv_(exp_avg, denom, value=-step_size)
        if stored_avg.dtype != torch.float32:
            stored_avg.copy_(exp_avg)
            stored_avg_sq.copy_(exp_avg_sq)

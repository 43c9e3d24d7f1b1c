"""AdamW over FP32 master weights.

The model's parameters are kept in FP32 and are the master weights; lower-precision compute
(bf16 autocast) casts on the fly, so gradients accumulate and the optimizer updates in FP32.
Weight decay applies to matrices only, not to norms (the 1-D parameters).
"""

import torch

from megads.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for p in decay + no_decay:
        if p.dtype != torch.float32:
            raise TypeError(f"master weights must be FP32, found a {p.dtype} parameter")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=True)

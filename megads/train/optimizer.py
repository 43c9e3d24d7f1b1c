"""AdamW over FP32 master weights, sharded ZeRO-1 style over data-parallel ranks.

The model's parameters are FP32 and lower-precision compute (bf16 autocast) casts on the fly, so
gradients accumulate in FP32. `parallel.zero1.DistributedOptimizer` reduce-scatters the gradients,
keeps master weights and moments only for this rank's shard, and all-gathers the updated
parameters, over the groups of the `ParallelContext`; with every group of size 1 it is plain AdamW.

Which parameters sync over which ranks:
- dense parameters: averaged over the data-parallel group;
- routed experts: each is replicated over the expert-data-parallel group, and its gradient already
  sums the tokens sent by every rank of the expert-parallel group, so the replicas' gradients are
  summed and divided by the data-parallel size (not the expert-data-parallel size);
- for the global gradient norm each element counts once: tensor-parallel shards on every TP rank,
  parameters replicated over TP ranks (norms, low-rank down-projections, router) on TP rank 0 only.
Weight decay applies to matrices only, not to norms (the 1-D parameters).
"""

import torch

from megads.config import TrainConfig
from megads.model.moe import RoutedExperts
from parallel.zero1 import DataParallelParams, DistributedOptimizer
from parallel.context import ParallelContext


def expert_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()]


def tensor_parallel_sharded(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that are tensor-parallel shards (distinct on every TP rank)."""
    return {id(m.weight) for m in model.modules() if getattr(m, "tp_size", 1) > 1 and hasattr(m, "full_shape")}


def build_optimizer(model, cfg: TrainConfig, ctx: ParallelContext | None = None) -> DistributedOptimizer:
    """AdamW for `model` (this rank's ModelStages, or a DeepSeekV3) under `ctx`'s layout.

    Parameters that are pipeline copies of one counted on another rank (`model.duplicated_elsewhere`,
    where the model has it) are left out of the gradient norm."""
    ctx = ctx or ParallelContext.single()
    for p in model.parameters():
        if p.dtype != torch.float32:
            raise TypeError(f"master weights must be FP32, found a {p.dtype} parameter")
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    dense = [p for p in model.parameters() if id(p) not in expert_ids]
    groups = [DataParallelParams(dense, ctx.dp)]
    if experts:
        groups.append(DataParallelParams(experts, ctx.edp, grad_divisor=ctx.dp.size))
    sharded = tensor_parallel_sharded(model) | expert_ids
    return DistributedOptimizer(
        groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
        data_parallel_group=ctx.dp,
        model_parallel_group=ctx.model if ctx.pp.size > 1 else ctx.tp,
        replicated_in_model_parallel=lambda p: ctx.tp.size > 1 and id(p) not in sharded,
        tensor_parallel_group=ctx.tp, duplicated_elsewhere=getattr(model, "duplicated_elsewhere", None),
        moments_dtype=torch.bfloat16 if cfg.adam_moments == "bf16" else torch.float32)

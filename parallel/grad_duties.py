"""Gradient duties, declared where they arise and performed by one generic pass.

Some parameters are replicated over a group of ranks but each rank's gradient holds only part of
the sum: the MoE router under tensor parallelism (each TP rank routes different tokens), and under
sequence parallelism every TP-replicated parameter used on sequence chunks (norms, MLA's low-rank
down-projections, MTP's eh_proj). The code that creates such a parameter declares it,

    declare_partial_grad(router.weight, "tp")                  # always partial over TP
    declare_sequence_parallel_replica(norm.weight, ctx)        # partial over TP under SP only

which sets ``param.partial_grad_over`` to the name of a `ParallelContext` group, and after the
backward `sum_partial_grads(params, ctx)` sums every declared gradient over its group, before
clipping and the optimizer. The trainer names no model internals.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from parallel.data_parallel import allreduce_gradients

PARTIAL_GRAD_OVER = "partial_grad_over"


def declare_partial_grad(param: nn.Parameter, group_name: str) -> nn.Parameter:
    """`param`'s gradient on a rank is a partial sum over the context group `group_name` ("tp", ...)."""
    setattr(param, PARTIAL_GRAD_OVER, group_name)
    return param


def declare_sequence_parallel_replica(param: nn.Parameter, ctx) -> nn.Parameter:
    """`param` is replicated over TP and used on sequence chunks: partial over TP when `ctx` has SP on."""
    if ctx.sequence_parallel:
        declare_partial_grad(param, "tp")
    return param


def partial_grad_group(param: torch.Tensor):
    """The context group name `param` declared, or None."""
    return getattr(param, PARTIAL_GRAD_OVER, None)


@torch.no_grad()
def sum_partial_grads(params: Iterable[nn.Parameter], ctx) -> None:
    """Sum the `.grad` of every declared parameter over its group (a collective of those groups:
    every rank calls it with the same parameters in the same order). No-op at group size 1."""
    by_group: dict[str, list[nn.Parameter]] = {}
    for p in params:
        name = partial_grad_group(p)
        if name is not None and p.requires_grad:
            by_group.setdefault(name, []).append(p)
    for name, group_params in by_group.items():
        group = getattr(ctx, name)
        if group.size > 1:
            allreduce_gradients(group_params, group, grad_divisor=1)

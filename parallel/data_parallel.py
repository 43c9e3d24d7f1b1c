"""Data parallelism: which parameters are replicated where, and gradient averaging across replicas.

Device-agnostic (gloo on CPU, NCCL on GPU): buffers live on the parameters' device.

Which parameters are replicated where
-------------------------------------
Every data-parallel (DP) rank holds a replica of the model and runs its own share of the global
batch. Parameters come in two kinds:

- dense parameters (attention, shared experts, norms, router, embeddings) are replicated over
  the DP group;
- routed-expert parameters are sharded by expert parallelism (EP): an EP group of ranks splits
  the experts, so an expert is replicated only over the expert-data-parallel (EDP) group, the
  ranks that hold the same experts (DP = EP x EDP when EP is folded into DP, as in Megatron).

The caller says which parameters go with which group: `param_groups` (of
parallel.zero1.DistributedOptimizer) is a list of `DataParallelParams(params, group, grad_divisor)`
or plain `(params, group)` / `(params, group, grad_divisor)` tuples. Groups are
`parallel.group.Group`s (a `ParallelContext`'s ``dp`` / ``edp``, ...), through whose methods every
collective here is issued; None stands for a Group of size 1 (no communication, and
torch.distributed need not be initialised).

Gradient averaging
------------------
Within a rank, autograd sums the gradients of its micro-batches (the caller divides each
micro-batch loss by the number of micro-batches, so the rank's loss is the mean over its own
micro-batches). Across DP ranks gradients are *averaged*: the global loss is the mean over the
global batch, and with equal shares that is (1/dp) * sum over DP ranks of each rank's loss,
because each rank's loss is already a mean over its own share. Summing instead would scale the
gradient (and so the learning rate) with dp.

The divisor is the number of data-parallel replicas of the batch, dp, for every parameter. For
dense parameters that is the size of their group. For expert parameters it is NOT the EDP size:
the expert all-to-all already brings into an expert's local gradient the contributions of every
rank of its EP group, so summing over EDP gives the sum over all dp ranks' losses, and dividing
by dp is the average (Megatron's `expert_gradient_scaling_factor`). Pass `grad_divisor=dp` for
the expert group; it defaults to the group's size.

Two ways to apply it
--------------------
`allreduce_gradients(params, group)` (here) is the plain one without ZeRO: bucketed all-reduce
and average of `.grad`, after which any optimizer runs replicated. `parallel.zero1.DistributedOptimizer`
reduce-scatters instead and keeps the optimizer state sharded (ZeRO-1).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from parallel.group import Group

DEFAULT_BUCKET_BYTES = 25 * 2**20  # bytes per all-reduce bucket (torch DDP's default)


def as_group(group: Group | None, what: str = "group") -> Group:
    """`group` itself, or a size-1 Group for None; anything else (a raw ProcessGroup) is an error."""
    if group is None:
        return Group(None)
    if not isinstance(group, Group):
        raise TypeError(f"{what} must be a parallel.group.Group (or None for size 1), got {type(group).__name__}: "
                        "wrap a process group as Group(pg, name), or pass a ParallelContext's group.")
    return group


def unique_trainable(params: Iterable[torch.Tensor], what: str) -> list[nn.Parameter]:
    """The parameters that require grad, each once, in first-appearance order (`what` names them in errors)."""
    out, seen = [], set()
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what} must contain tensors, found {type(p).__name__}.")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def allreduce_gradients(params: Iterable[nn.Parameter], group: Group | None,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES, grad_divisor: int | None = None) -> None:
    """Average `.grad` of `params` over `group` (sum, then divide by grad_divisor, default the group size).

    Call after the backward passes of all micro-batches, before clipping and the optimizer step;
    every rank of the group must call it with the same parameters in the same order. Gradients
    are packed into flat buffers of at most `bucket_bytes` (one all-reduce each; a parameter
    larger than that gets a buffer of its own). A parameter whose `.grad` is None on this rank
    counts as zero and has a `.grad` afterwards (other ranks may have contributed to it).
    For expert parameters pass their EDP group and grad_divisor=dp (see the module docstring).
    """
    params = unique_trainable(params, "params")
    group = as_group(group)
    size = group.size
    divisor = size if grad_divisor is None else grad_divisor
    if divisor < 1:
        raise ValueError(f"grad_divisor must be at least 1, got {divisor}.")
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if size == 1:
        if divisor != 1:
            for p in params:
                p.grad.div_(divisor)
        return
    by_kind: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for kind_params in by_kind.values():
        bucket: list[nn.Parameter] = []
        nbytes = 0
        for p in kind_params:
            size_p = p.grad.numel() * p.grad.element_size()
            if bucket and nbytes + size_p > bucket_bytes:
                _allreduce_bucket(bucket, group, divisor)
                bucket, nbytes = [], 0
            bucket.append(p)
            nbytes += size_p
        if bucket:
            _allreduce_bucket(bucket, group, divisor)


def _allreduce_bucket(params: list[nn.Parameter], group: Group, divisor: int) -> None:
    # torch.cat copies into a new contiguous buffer: gloo reduces a strided tensor's memory as if
    # it were contiguous, and a flat buffer is one collective instead of one per parameter.
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    group.all_reduce(flat)
    if divisor != 1:
        flat.div_(divisor)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


"""Tensor- and sequence-parallel communication as autograd mappings (Megatron-style).

Each mapping is a pair of conjugate collectives: the backward of a communication is the
communication that moves gradients the other way. All take a `parallel.group.Group` and are
identities at size 1 (no autograd node is added then); none has a learnable state.

Shards are contiguous blocks in group-rank order: rank r of a group of size t holds rows (or
columns) [r*n/t, (r+1)*n/t) (`shard_for_rank`).

Sequence-parallel convention
----------------------------
Activations are [batch, seq, hidden] everywhere in the model, so the sequence dimension is 1
(`SEQUENCE_DIM`). Under sequence parallelism (SP), outside TP regions (norms, residual adds, the
replicated down-projections of MLA) each rank holds the contiguous sequence chunk
[r*S/t, (r+1)*S/t) of every sequence in the batch: [batch, seq/t, hidden]. A column-parallel
layer all-gathers that into the full sequence and a row-parallel layer (or the embedding)
reduce-scatters its partial sums back into chunks; that replaces the all-reduce of plain TP with an
all-gather plus a reduce-scatter (same bytes) and divides activation memory outside TP regions by
t. Collectives work on the leading dimension of contiguous tensors, so the sequence dimension is
moved to the front (a copy, free when batch == 1) before communicating and back afterwards.

Two things are the caller's job under SP: (1) position-dependent computation on sequence chunks
must use global positions (rank r's first token is position r*S/t), and (2) parameters that are
replicated across the TP group but used on sequence chunks (norm weights, MLA's
down-projections) get gradients from this rank's tokens only: they declare it where they are
created (`parallel.grad_duties`), and the trainer's one generic pass sums them over TP.

Autograd Functions keep the Group given to them and issue their backward collective on it again,
so that an overlapped F&B pair's backward half communicates on the group's twin
(`parallel.twin_groups`).
"""

from __future__ import annotations

import torch

from parallel.group import Group

SEQUENCE_DIM = 1  # activations are [batch, seq, hidden]


def divide(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor-parallel size ({parts}).")
    return total // parts


def shard_for_rank(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s block of `full` split into `size` equal contiguous blocks along `dim` (a view)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a group of size {size}.")
    dim = dim % full.dim()
    block = divide(full.shape[dim], size, f"dimension {dim} of the full tensor")
    return full.narrow(dim, rank * block, block)


def _all_gather_along_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenation along `dim` of every rank's `x` (same shape on all ranks), in group-rank order."""
    front = x.movedim(dim, 0).contiguous()  # collectives concatenate along the leading dim
    out = front.new_empty((group.size * front.shape[0], *front.shape[1:]))
    group.all_gather_into(out, front)
    # contiguous: callers (and model code doing .view) should not see a strided result
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_along_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum of `x` over the group, of which this rank keeps its block along `dim`."""
    front = x.movedim(dim, 0).contiguous()
    block = divide(front.shape[0], group.size, f"dimension {dim} of the reduce-scattered tensor")
    out = front.new_empty((block, *front.shape[1:]))
    group.reduce_scatter_into(out, front)
    return out.movedim(0, dim).contiguous()


def _split_along_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's block of `x` along `dim` (no communication)."""
    return shard_for_rank(x, dim, group.rank, group.size).contiguous()


def gather_along_dim(shard: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """The full tensor from every rank's shard along `dim` (not differentiable; for weights and checks).

    A collective: every rank of the group must call it. Returns a copy of `shard` at size 1.
    """
    with torch.no_grad():
        if group.size == 1:
            return shard.detach().clone()
        return _all_gather_along_dim(shard.detach(), dim % shard.dim(), group)


# ============================================================================ autograd mappings
#
# Each mapping is a pair of conjugate collectives: the backward of a communication is the
# communication that moves gradients the other way. All are identities at TP size 1 (no autograd
# node is added then), and none has a learnable state.


class _CopyToTPRegion(torch.autograd.Function):
    """Forward identity; backward all-reduce (every rank's branch contributes to the input's gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.sum(grad), None


class _ReduceFromTPRegion(torch.autograd.Function):
    """Forward all-reduce (sum of partial results); backward identity (the sum's gradient is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return group.sum(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTPRegion(torch.autograd.Function):
    """Forward: keep this rank's block of the last dim; backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_along_dim(grad, grad.dim() - 1, ctx.group), None


class _GatherFromTPRegion(torch.autograd.Function):
    """Forward: all-gather the last dim; backward: keep this rank's block of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_along_dim(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_along_dim(grad, -1, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's sequence chunk; backward: all-gather the sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_dim(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_along_dim(grad, SEQUENCE_DIM, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather the sequence. Backward: reduce-scatter when every rank's use of the full
    sequence contributes a partial gradient (it feeds a TP region), else just keep this rank's chunk
    (it feeds computation replicated on every rank, whose gradients are already complete)."""

    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group = group
        ctx.grad_is_partial = grad_is_partial
        return _all_gather_along_dim(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter_along_dim(grad, SEQUENCE_DIM, ctx.group), None, None
        return _split_along_dim(grad, SEQUENCE_DIM, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: sum partial results over ranks, keeping this rank's sequence chunk; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_along_dim(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_along_dim(grad, SEQUENCE_DIM, ctx.group), None


class _AllReduceSumOfShares(torch.autograd.Function):
    """Forward all-reduce; backward all-reduce (see `all_reduce_sum_of_shares`)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.sum(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.sum(grad), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of the gradient backward."""
    return x if group.size == 1 else _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    return x if group.size == 1 else _ReduceFromTPRegion.apply(x, group)


def all_reduce_sum_of_shares(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of every rank's `x` on every rank, for a quantity that each rank's loss holds a *share* of.

    Use it when each rank adds only its 1/t share of a term to its own loss (the objective is the
    sum of the ranks' losses; e.g. the sequence-wise balance loss under SP, built from per-sequence
    statistics summed over the sequence chunks of the TP group). The gradient of the objective
    with respect to rank r's addend is then the sum over all ranks of each rank's gradient with
    respect to the total, so backward all-reduces too. Contrast `reduce_from_tp_region` (identity
    backward): right when every rank's loss holds the whole term (a replicated loss, counted once).
    """
    return x if group.size == 1 else _AllReduceSumOfShares.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Replicated [..., n] -> this rank's block [..., n/t] of the last dim; backward all-gathers."""
    return x if group.size == 1 else _ScatterToTPRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sharded [..., n/t] -> full [..., n] on every rank (rank order); backward keeps this rank's block."""
    return x if group.size == 1 else _GatherFromTPRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Replicated [B, S, H] -> this rank's chunk [B, S/t, H]; backward all-gathers the sequence."""
    return x if group.size == 1 else _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group,
                                         grad_is_partial: bool = True) -> torch.Tensor:
    """Chunks [B, S/t, H] -> full sequence [B, S, H]; backward reduce-scatters the gradient.

    Pass grad_is_partial=False when the gathered sequence feeds computation replicated on every
    rank (not a TP region): its gradient is then already complete, and backward only splits it.
    """
    if group.size == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Partial sums [B, S, H] -> summed chunk [B, S/t, H]; backward all-gathers the sequence."""
    return x if group.size == 1 else _ReduceScatterToSequenceParallelRegion.apply(x, group)


class _SplitBatch(torch.autograd.Function):
    """Forward: keep this rank's block of the batch (dim 0); backward: all-gather it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_along_dim(grad, 0, ctx.group), None


class _GatherBatch(torch.autograd.Function):
    """Forward: all-gather the batch (dim 0); backward: keep this rank's block (the consumer is
    replicated on every rank, so its gradient is already complete)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_along_dim(grad, 0, ctx.group), None


def split_batch_across_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Replicated [B, ...] -> this rank's sequences [B/t, ...] (used to run MoE layers on disjoint
    tokens per TP rank: routed experts are not tensor-split); backward all-gathers."""
    return x if group.size == 1 else _SplitBatch.apply(x, group)


def gather_batch_across_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's sequences [B/t, ...] -> all of them [B, ...] on every rank; backward splits."""
    return x if group.size == 1 else _GatherBatch.apply(x, group)

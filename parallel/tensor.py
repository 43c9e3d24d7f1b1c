"""Tensor-parallel building blocks (Megatron-style), device-agnostic (gloo on CPU, NCCL on GPU).

The model builds every linear layer that tensor parallelism will split from these classes, so the
parallel runtime can shard them without the model files changing:

- ColumnParallelLinear: output features split across TP ranks (q_b_proj, kv_b_proj, gate/up, lm_head).
- RowParallelLinear: input features split, partial outputs summed across TP ranks (o_proj, down_proj).
- VocabParallelEmbedding: vocabulary rows split across TP ranks.
- vocab_parallel_cross_entropy: cross-entropy over vocabulary-split logits without gathering them.

Every layer takes `tp_group: ProcessGroup | None`. None (the default) is tensor-parallel size 1:
the layer is exactly the ordinary PyTorch layer (same parameter shapes and names, same default
initialisation and random-number use, same forward and backward) and torch.distributed need not be
initialised. Constructor sizes are always the *full* sizes; parameters hold this rank's shard.

Shards are contiguous blocks in group-rank order: rank r of a group of size t holds rows (or
columns) [r*n/t, (r+1)*n/t). `shard_for_rank` takes a shard from a full tensor, the layers'
`load_full_weight(full)` / `full_weight()` move between full and sharded weights, and the default
initialisation draws the *full* weight and keeps the shard, so a seeded run builds the same full
model at any TP size (all ranks of a TP group must then have the same RNG state).

Sequence-parallel convention
----------------------------
Activations are [batch, seq, hidden] everywhere in the model, so the sequence dimension is 1
(`SEQUENCE_DIM`). Under sequence parallelism (SP), outside TP regions (norms, residual adds, the
replicated down-projections of MLA) each rank holds the contiguous sequence chunk
[r*S/t, (r+1)*S/t) of every sequence in the batch: [batch, seq/t, hidden]. A ColumnParallelLinear
all-gathers that into the full sequence and a RowParallelLinear (or the embedding) reduce-scatters
its partial sums back into chunks; that replaces the all-reduce of plain TP with an all-gather plus
a reduce-scatter (same bytes) and divides activation memory outside TP regions by t. Collectives
work on the leading dimension of contiguous tensors, so the sequence dimension is moved to the
front (a copy, free when batch == 1) before communicating and back afterwards.

Two things are the caller's job under SP: (1) position-dependent computation on sequence chunks
must use global positions (rank r's first token is position r*S/t), and (2) parameters that are
replicated across the TP group but used on sequence chunks (norm weights, the router, MLA's
down-projections) get gradients from this rank's tokens only; `allreduce_sequence_parallel_grads`
sums them over the TP group before the optimizer step. Without SP those gradients are already
complete on every rank (the inputs of TP regions carry the all-reduced gradient).

Every collective here resolves its group through `parallel.lanes.lane_group` when it is issued
(autograd Functions keep the group given to them and resolve it again in backward), so that an
overlapped F&B pair's backward half communicates on twin groups (parallel/lanes.py).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.lanes import lane_group

ProcessGroup = dist.ProcessGroup

SEQUENCE_DIM = 1  # activations are [batch, seq, hidden]

# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor in favour of the *_single
# names (same semantics); use the new names where they exist so every call does not warn.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ============================================================================ group and shard helpers


def tp_size(group: ProcessGroup | None) -> int:
    """Number of ranks in the TP group; 1 for None (no tensor parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: ProcessGroup | None) -> int:
    """This process's rank *within* the TP group (not its global rank); 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor-parallel size ({parts}).")
    return total // parts


def shard_for_rank(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s block of `full` split into `size` equal contiguous blocks along `dim` (a view)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a group of size {size}.")
    dim = dim % full.dim()
    block = _divide(full.shape[dim], size, f"dimension {dim} of the full tensor")
    return full.narrow(dim, rank * block, block)


def _all_gather_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """Concatenation along `dim` of every rank's `x` (same shape on all ranks), in group-rank order."""
    size = tp_size(group)
    front = x.movedim(dim, 0).contiguous()  # collectives concatenate along the leading dim
    out = front.new_empty((size * front.shape[0], *front.shape[1:]))
    _all_gather_single(out, front, group=lane_group(group))
    # contiguous: callers (and model code doing .view) should not see a strided result
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """Sum of `x` over the group, of which this rank keeps its block along `dim`."""
    size = tp_size(group)
    front = x.movedim(dim, 0).contiguous()
    block = _divide(front.shape[0], size, f"dimension {dim} of the reduce-scattered tensor")
    out = front.new_empty((block, *front.shape[1:]))
    _reduce_scatter_single(out, front, group=lane_group(group))
    return out.movedim(0, dim).contiguous()


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum of `x` over the group, in a new tensor.

    Copies first because the tensor handed in may be used elsewhere: in backward, autograd can pass
    one gradient tensor to several functions, so reducing it in place would corrupt the others. The
    copy is contiguous: gloo silently reduces a strided tensor's memory as if it were contiguous.
    """
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=lane_group(group))
    return out


def _split_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """This rank's block of `x` along `dim` (no communication)."""
    return shard_for_rank(x, dim, tp_rank(group), tp_size(group)).contiguous()


def gather_along_dim(shard: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """The full tensor from every rank's shard along `dim` (not differentiable; for weights and checks).

    A collective: every rank of the group must call it. Returns a copy of `shard` for group None.
    """
    with torch.no_grad():
        if tp_size(group) == 1:
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
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    """Forward all-reduce (sum of partial results); backward identity (the sum's gradient is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

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
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of the gradient backward."""
    return x if tp_size(group) == 1 else _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    return x if tp_size(group) == 1 else _ReduceFromTPRegion.apply(x, group)


def all_reduce_sum_of_shares(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum of every rank's `x` on every rank, for a quantity that each rank's loss holds a *share* of.

    Use it when each rank adds only its 1/t share of a term to its own loss (the objective is the
    sum of the ranks' losses; e.g. the sequence-wise balance loss under SP, built from per-sequence
    statistics summed over the sequence chunks of the TP group). The gradient of the objective
    with respect to rank r's addend is then the sum over all ranks of each rank's gradient with
    respect to the total, so backward all-reduces too. Contrast `reduce_from_tp_region` (identity
    backward): right when every rank's loss holds the whole term (a replicated loss, counted once).
    """
    return x if tp_size(group) == 1 else _AllReduceSumOfShares.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Replicated [..., n] -> this rank's block [..., n/t] of the last dim; backward all-gathers."""
    return x if tp_size(group) == 1 else _ScatterToTPRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sharded [..., n/t] -> full [..., n] on every rank (rank order); backward keeps this rank's block."""
    return x if tp_size(group) == 1 else _GatherFromTPRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Replicated [B, S, H] -> this rank's chunk [B, S/t, H]; backward all-gathers the sequence."""
    return x if tp_size(group) == 1 else _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None,
                                         grad_is_partial: bool = True) -> torch.Tensor:
    """Chunks [B, S/t, H] -> full sequence [B, S, H]; backward reduce-scatters the gradient.

    Pass grad_is_partial=False when the gathered sequence feeds computation replicated on every
    rank (not a TP region): its gradient is then already complete, and backward only splits it.
    """
    if tp_size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Partial sums [B, S, H] -> summed chunk [B, S/t, H]; backward all-gathers the sequence."""
    return x if tp_size(group) == 1 else _ReduceScatterToSequenceParallelRegion.apply(x, group)


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


def split_batch_across_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Replicated [B, ...] -> this rank's sequences [B/t, ...] (used to run MoE layers on disjoint
    tokens per TP rank: routed experts are not tensor-split); backward all-gathers."""
    return x if tp_size(group) == 1 else _SplitBatch.apply(x, group)


def gather_batch_across_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """This rank's sequences [B/t, ...] -> all of them [B, ...] on every rank; backward splits."""
    return x if tp_size(group) == 1 else _GatherBatch.apply(x, group)


def allreduce_sequence_parallel_grads(params: Iterable[nn.Parameter], group: ProcessGroup | None) -> None:
    """Sum over the TP group the gradients of replicated parameters used on sequence chunks.

    Under SP a norm weight (say) sees only this rank's tokens, so its .grad is a partial sum. Call
    after backward, before gradient clipping and the optimizer step. No-op for group None.
    """
    if tp_size(group) == 1:
        return
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_contiguous():
            # .grad is owned by the parameter: in place is safe
            dist.all_reduce(p.grad, group=lane_group(group))
        else:
            # gloo reduces a strided tensor's underlying memory as if it were contiguous (silently
            # wrong), so reduce a contiguous copy.
            p.grad.copy_(_all_reduce(p.grad, group))


# ============================================================================ layers


class _ShardedWeightMixin:
    """Full-tensor views of a weight split along `partition_dim` of a TP group (shared by the layers)."""

    weight: nn.Parameter
    tp_group: ProcessGroup | None
    partition_dim: int
    full_shape: tuple[int, ...]

    @property
    def tp_size(self) -> int:
        return tp_size(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return tp_rank(self.tp_group)

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Copy this rank's shard of the full (unsharded) weight into the parameter."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"{type(self).__name__}.load_full_weight expects the full weight of shape "
                             f"{list(self.full_shape)}, got {list(full.shape)}.")
        self.weight.copy_(shard_for_rank(full, self.partition_dim, self.tp_rank, self.tp_size))

    def full_weight(self) -> torch.Tensor:
        """The full (unsharded) weight, a new tensor. A collective: every rank of the TP group must call it."""
        return gather_along_dim(self.weight, self.partition_dim, self.tp_group)

    @torch.no_grad()
    def _init_from_full(self, init_fn) -> None:
        """Run `init_fn` on the full weight and keep this rank's shard.

        Drawing the full tensor (rather than the shard) makes the random numbers used, and so the
        full model built from one seed, independent of the TP size. At size 1 the parameter itself
        is initialised, exactly as the ordinary layer does.
        """
        if self.tp_size == 1:
            init_fn(self.weight)
            return
        full = torch.empty(self.full_shape, dtype=self.weight.dtype, device=self.weight.device)
        init_fn(full)
        self.weight.copy_(shard_for_rank(full, self.partition_dim, self.tp_rank, self.tp_size))


def _linear_default_init(weight: torch.Tensor) -> None:
    # nn.Linear.reset_parameters for the weight (fan_in from the full tensor it is given)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class ColumnParallelLinear(_ShardedWeightMixin, nn.Linear):
    """y = x W^T with W's output rows split across TP ranks (no bias: DeepSeek-V3 uses none).

    weight: [out_features / t, in_features]. Input [..., in_features] replicated on the TP group
    (or, with sequence_parallel, this rank's sequence chunk [B, S/t, in_features], all-gathered
    here). Output: this rank's features [..., out_features / t], or with gather_output=True all
    features [..., out_features] on every rank.

    disable_grad_reduce=True (SP inside a block that gathers the sequence once for several layers):
    the input is the caller's already-gathered full sequence, used as is, and its gradient is left
    partial (this rank's output features only): no all-reduce. The caller's
    gather_from_sequence_parallel_region(grad_is_partial=True) sums the ranks' partial gradients
    in its reduce-scatter, so every other consumer of that gathered tensor must leave its gradient
    partial too.

    It is an nn.Linear so code that looks for linear layers still finds it; `in_features` and
    `out_features` are the full sizes, `output_size_per_partition` the local one.
    """

    partition_dim = 0

    def __init__(self, in_features: int, out_features: int, tp_group: ProcessGroup | None = None,
                 gather_output: bool = False, sequence_parallel: bool = False, disable_grad_reduce: bool = False,
                 device=None, dtype=None):
        if sequence_parallel and disable_grad_reduce:
            raise ValueError("ColumnParallelLinear: sequence_parallel (gather the sequence here) and "
                             "disable_grad_reduce (the caller already gathered it) exclude each other.")
        # nn.Linear.__init__ is bypassed: it would size the weight from the full feature counts.
        nn.Module.__init__(self)
        self.tp_group = tp_group
        self.in_features = in_features
        self.out_features = out_features
        self.output_size_per_partition = _divide(out_features, tp_size(tp_group), "ColumnParallelLinear out_features")
        self.full_shape = (out_features, in_features)
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.disable_grad_reduce = disable_grad_reduce
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_from_full(_linear_default_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group)
        elif not self.disable_grad_reduce:
            x = copy_to_tp_region(x, self.tp_group)
        y = F.linear(x, self.weight)
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}, "
                f"disable_grad_reduce={self.disable_grad_reduce}, bias=False")


class RowParallelLinear(_ShardedWeightMixin, nn.Linear):
    """y = x W^T with W's input columns split across TP ranks and the partial outputs summed.

    weight: [out_features, in_features / t]. Input: this rank's features [..., in_features / t]
    (input_is_parallel=True, what a ColumnParallelLinear produces), or all features, split here.
    Output: the sum over the TP group, replicated [..., out_features], or with sequence_parallel
    this rank's sequence chunk [B, S/t, out_features] (reduce-scatter instead of all-reduce).
    """

    partition_dim = 1

    def __init__(self, in_features: int, out_features: int, tp_group: ProcessGroup | None = None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, device=None, dtype=None):
        nn.Module.__init__(self)  # see ColumnParallelLinear
        self.tp_group = tp_group
        self.in_features = in_features
        self.out_features = out_features
        self.input_size_per_partition = _divide(in_features, tp_size(tp_group), "RowParallelLinear in_features")
        self.full_shape = (out_features, in_features)
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_from_full(_linear_default_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        return reduce_from_tp_region(partial, self.tp_group)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}, "
                f"bias=False")


class VocabParallelEmbedding(_ShardedWeightMixin, nn.Embedding):
    """Token embedding whose vocabulary rows are split across TP ranks.

    weight: [num_embeddings / t, embedding_dim], rows [r*V/t, (r+1)*V/t) on TP rank r. Input ids
    [B, S] are the same on every rank; each rank looks up the ids it owns (zero for the others)
    and the sum over ranks is the embedding: replicated [B, S, dim], or with sequence_parallel this
    rank's chunk [B, S/t, dim]. At TP size > 1 an id outside [0, num_embeddings) embeds to zero
    rather than raising (checking would cost a device sync every step).
    """

    partition_dim = 0

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, device=None, dtype=None):
        nn.Module.__init__(self)  # nn.Embedding.__init__ is bypassed: it would allocate all rows
        self.tp_group = tp_group
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # nn.Embedding's options, at the values the model uses, for code that reads them
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self.num_embeddings_per_partition = _divide(num_embeddings, tp_size(tp_group),
                                                    "VocabParallelEmbedding num_embeddings")
        self.vocab_start = tp_rank(tp_group) * self.num_embeddings_per_partition
        self.full_shape = (num_embeddings, embedding_dim)
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                               device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_from_full(nn.init.normal_)  # nn.Embedding's default, N(0, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        not_mine = (local < 0) | (local >= self.num_embeddings_per_partition)
        # Look up row 0 for ids another rank owns, then zero those rows: the sum over ranks is exact.
        out = F.embedding(local.masked_fill(not_mine, 0), self.weight)
        out = out.masked_fill(not_mine.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        return reduce_from_tp_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp_size={self.tp_size}, "
                f"sequence_parallel={self.sequence_parallel}")


# ============================================================================ cross-entropy


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of vocabulary-sharded fp32 logits [N, V/t] against global labels [N].

    loss_i = log(sum_v exp(z_iv - m_i)) - (z_i,label_i - m_i), with m_i the global max. Three
    numbers per token cross the group (the max, then the sum of exponentials and the target logit,
    which share one all-reduce); the logits never do. The gradient is softmax - onehot restricted
    to this rank's shard and needs no communication.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, group):
        vocab_local = logits.shape[-1]
        vocab_start = tp_rank(group) * vocab_local

        # Global max for a numerically stable softmax (a constant shift: no gradient flows through it).
        max_logits = logits.max(dim=-1).values
        dist.all_reduce(max_logits, op=dist.ReduceOp.MAX, group=lane_group(group))
        shifted = logits - max_logits.unsqueeze(-1)

        ignored = labels == ignore_index
        local_labels = labels - vocab_start
        in_shard = (local_labels >= 0) & (local_labels < vocab_local) & ~ignored
        local_labels = local_labels.masked_fill(~in_shard, 0)  # any valid index; masked out below
        target = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1)
        target = torch.where(in_shard, target, torch.zeros_like(target))  # only the owner contributes

        exp = shifted.exp_()  # in place: `shifted` is ours and not needed any more
        sum_exp = exp.sum(dim=-1)
        # One all-reduce for both sums: these collectives are latency-bound (N numbers each).
        stats = torch.stack((sum_exp, target))
        dist.all_reduce(stats, group=lane_group(group))
        sum_exp, target = stats[0], stats[1]

        loss = torch.where(ignored, torch.zeros_like(target), sum_exp.log() - target)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_labels, in_shard, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, in_shard, ignored = ctx.saved_tensors
        scale = torch.where(ignored, torch.zeros_like(grad_loss), grad_loss)  # ignored tokens: no gradient
        grad = softmax * scale.unsqueeze(-1)  # a new tensor: the saved softmax stays valid (retain_graph)
        # d loss_i / d z_iv = softmax_iv - [v == label_i]; the -1 only where this rank owns the label
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), (-scale * in_shard).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                                 tp_group: ProcessGroup | None = None) -> torch.Tensor:
    """Per-token cross-entropy (reduction 'none', fp32) of logits [..., V/t] against labels [...].

    `logits` holds this rank's vocabulary shard (what a ColumnParallelLinear head produces, rank r
    owning ids [r*V/t, (r+1)*V/t)); `labels` are global ids, the same on every rank of the group.
    Positions labelled `ignore_index` get loss 0 and no gradient. The math is fp32 whatever the
    logits' dtype; the gradient returns in the logits' dtype. At size 1 this is F.cross_entropy.
    """
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels of shape {list(labels.shape)} do not match logits of shape {list(logits.shape)}.")
    if tp_size(tp_group) == 1:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=ignore_index, reduction="none").reshape(labels.shape)
    loss = _VocabParallelCrossEntropy.apply(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index, tp_group)
    return loss.reshape(labels.shape)

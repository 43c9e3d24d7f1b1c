"""Tensor-parallel layers (Megatron-style), device-agnostic (gloo on CPU, NCCL on GPU).

The model builds its linear layers and embeddings from these classes, so the parallel runtime can
shard them without the model files changing:

- ColumnParallelLinear: output features split across TP ranks (q_b_proj, kv_b_proj, gate/up, lm_head).
- RowParallelLinear: input features split, partial outputs summed across TP ranks (o_proj, down_proj).
- VocabParallelEmbedding: vocabulary rows split across TP ranks.
- ReplicatedLinear: the same weight on every TP rank (MLA's low-rank down-projections, MTP's eh_proj).

Every layer takes the `ParallelContext` (None: one process). At TP size 1 a layer is exactly the
ordinary PyTorch layer (same parameter shapes and names, same default initialisation and
random-number use, same forward and backward). Constructor sizes are always the *full* sizes;
parameters hold this rank's shard. Under sequence parallelism (``ctx.sequence_parallel``) the
layers take and give sequence chunks as `parallel.tensor.mappings` describes.

Each layer's own GEMM is one method, ``local_linear(x)``, between its collectives: FP8 layers
override that method and nothing else.

The default initialisation draws the *full* weight and keeps the shard, so a seeded run builds the
same full model at any TP size (all ranks of a TP group must then have the same RNG state);
`load_full_weight(full)` / `full_weight()` move between full and sharded weights.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from parallel.context import ParallelContext
from parallel.grad_duties import declare_sequence_parallel_replica
from parallel.tensor.mappings import (copy_to_tp_region, divide, gather_along_dim, gather_from_sequence_parallel_region,
                                      gather_from_tp_region, reduce_from_tp_region,
                                      reduce_scatter_to_sequence_parallel_region, scatter_to_tp_region, shard_for_rank)


def _context(ctx: Optional[ParallelContext]) -> ParallelContext:
    return ParallelContext.single() if ctx is None else ctx


class _ShardedWeightMixin:
    """Full-tensor views of a weight split along `partition_dim` of the TP group (shared by the layers)."""

    weight: nn.Parameter
    partition_dim: int
    full_shape: tuple[int, ...]

    def _set_context(self, ctx: Optional[ParallelContext]) -> None:
        ctx = _context(ctx)
        self.tp = ctx.tp
        self.sequence_parallel = ctx.sequence_parallel

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Copy this rank's shard of the full (unsharded) weight into the parameter."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"{type(self).__name__}.load_full_weight expects the full weight of shape "
                             f"{list(self.full_shape)}, got {list(full.shape)}.")
        self.weight.copy_(shard_for_rank(full, self.partition_dim, self.tp_rank, self.tp_size))

    def full_weight(self) -> torch.Tensor:
        """The full (unsharded) weight, a new tensor. A collective: every rank of the TP group must call it."""
        return gather_along_dim(self.weight, self.partition_dim, self.tp)

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

    weight: [out_features / t, in_features]. Input [..., in_features] replicated on the TP group,
    or under sequence parallelism this rank's sequence chunk [B, S/t, in_features], all-gathered
    here. Output: this rank's features [..., out_features / t], or with gather_output=True all
    features [..., out_features] on every rank.

    input_gathered=True (sequence parallelism inside a block that gathers the sequence once for
    several layers): the input is the caller's already-gathered full sequence, used as is, and its
    gradient is left partial (this rank's output features only): no all-reduce. The caller's
    gather_from_sequence_parallel_region(grad_is_partial=True) sums the ranks' partial gradients
    in its reduce-scatter, so every other consumer of that gathered tensor must leave its gradient
    partial too. Without sequence parallelism the flag changes nothing.

    It is an nn.Linear so code that looks for linear layers still finds it; `in_features` and
    `out_features` are the full sizes, `output_size_per_partition` the local one.
    """

    partition_dim = 0

    def __init__(self, in_features: int, out_features: int, ctx: Optional[ParallelContext] = None,
                 gather_output: bool = False, input_gathered: bool = False, device=None, dtype=None):
        # nn.Linear.__init__ is bypassed: it would size the weight from the full feature counts.
        nn.Module.__init__(self)
        self._set_context(ctx)
        self.in_features = in_features
        self.out_features = out_features
        self.output_size_per_partition = divide(out_features, self.tp_size, "ColumnParallelLinear out_features")
        self.full_shape = (out_features, in_features)
        self.gather_output = gather_output
        self.input_gathered = input_gathered
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_from_full(_linear_default_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            x = copy_to_tp_region(x, self.tp)
        elif not self.input_gathered:
            x = gather_from_sequence_parallel_region(x, self.tp)
        y = self.local_linear(x)
        return gather_from_tp_region(y, self.tp) if self.gather_output else y

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's GEMM, between the collectives: the one method an FP8 layer overrides."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}, "
                f"input_gathered={self.input_gathered}, bias=False")


class RowParallelLinear(_ShardedWeightMixin, nn.Linear):
    """y = x W^T with W's input columns split across TP ranks and the partial outputs summed.

    weight: [out_features, in_features / t]. Input: this rank's features [..., in_features / t]
    (input_is_parallel=True, what a ColumnParallelLinear produces), or all features, split here.
    Output: the sum over the TP group, replicated [..., out_features], or under sequence
    parallelism this rank's sequence chunk [B, S/t, out_features] (reduce-scatter, not all-reduce).
    """

    partition_dim = 1

    def __init__(self, in_features: int, out_features: int, ctx: Optional[ParallelContext] = None,
                 input_is_parallel: bool = True, device=None, dtype=None):
        nn.Module.__init__(self)  # see ColumnParallelLinear
        self._set_context(ctx)
        self.in_features = in_features
        self.out_features = out_features
        self.input_size_per_partition = divide(in_features, self.tp_size, "RowParallelLinear in_features")
        self.full_shape = (out_features, in_features)
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_from_full(_linear_default_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp)
        partial = self.local_linear(x)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.tp)
        return reduce_from_tp_region(partial, self.tp)

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's GEMM (partial sums), between the collectives: the one method an FP8 layer overrides."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}, "
                f"bias=False")


class ReplicatedLinear(nn.Linear):
    """An nn.Linear whose weight every TP rank holds whole (no communication of its own).

    Under sequence parallelism it runs on this rank's sequence chunk, so its weight gradient is a
    partial sum over the TP group: the weight declares that duty (`parallel.grad_duties`).
    """

    def __init__(self, in_features: int, out_features: int, ctx: Optional[ParallelContext] = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        declare_sequence_parallel_replica(self.weight, _context(ctx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_linear(x)

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM: the one method an FP8 layer overrides."""
        return F.linear(x, self.weight, self.bias)


class VocabParallelEmbedding(_ShardedWeightMixin, nn.Embedding):
    """Token embedding whose vocabulary rows are split across TP ranks.

    weight: [num_embeddings / t, embedding_dim], rows [r*V/t, (r+1)*V/t) on TP rank r. Input ids
    [B, S] are the same on every rank; each rank looks up the ids it owns (zero for the others)
    and the sum over ranks is the embedding: replicated [B, S, dim], or under sequence parallelism
    this rank's chunk [B, S/t, dim]. At TP size > 1 an id outside [0, num_embeddings) embeds to
    zero rather than raising (checking would cost a device sync every step).
    """

    partition_dim = 0

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: Optional[ParallelContext] = None,
                 device=None, dtype=None):
        nn.Module.__init__(self)  # nn.Embedding.__init__ is bypassed: it would allocate all rows
        self._set_context(ctx)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # nn.Embedding's options, at the values the model uses, for code that reads them
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self.num_embeddings_per_partition = divide(num_embeddings, self.tp_size, "VocabParallelEmbedding num_embeddings")
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.full_shape = (num_embeddings, embedding_dim)
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
            return reduce_scatter_to_sequence_parallel_region(out, self.tp)
        return reduce_from_tp_region(out, self.tp)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp_size={self.tp_size}, "
                f"sequence_parallel={self.sequence_parallel}")

"""Tensor parallelism: communication mappings, parallel layers, vocabulary-parallel cross-entropy."""

from parallel.tensor.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_entropy
from parallel.tensor.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, VocabParallelEmbedding
from parallel.tensor.mappings import (SEQUENCE_DIM, all_reduce_sum_of_shares, copy_to_tp_region, divide,
                                      gather_along_dim, gather_batch_across_tp, gather_from_sequence_parallel_region,
                                      gather_from_tp_region, reduce_from_tp_region,
                                      reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
                                      scatter_to_tp_region, shard_for_rank, split_batch_across_tp)

__all__ = [
    "ColumnParallelLinear", "ReplicatedLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy", "vocab_parallel_entropy", "SEQUENCE_DIM", "all_reduce_sum_of_shares", "copy_to_tp_region", "divide",
    "gather_along_dim", "gather_batch_across_tp", "gather_from_sequence_parallel_region", "gather_from_tp_region",
    "reduce_from_tp_region", "reduce_scatter_to_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "scatter_to_tp_region", "shard_for_rank", "split_batch_across_tp",
]

"""Tensor-parallel building blocks (Megatron-style).

The model builds every linear layer that tensor parallelism will split from these classes, so the
parallel runtime can shard them without the model files changing. At tensor-parallel size 1
(the only size this module implements so far) each is exactly the ordinary layer:

- ColumnParallelLinear: output features split across TP ranks (q_b_proj, kv_b_proj, gate/up).
- RowParallelLinear: input features split, outputs summed across TP ranks (o_proj, down_proj).
- VocabParallelEmbedding: vocabulary rows split across TP ranks.
- vocab_parallel_cross_entropy: cross-entropy over vocabulary-split logits without gathering them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ColumnParallelLinear(nn.Linear):
    """y = x W^T with W's output rows split across TP ranks (no bias: DeepSeek-V3 uses none)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)


class RowParallelLinear(nn.Linear):
    """y = x W^T with W's input columns split across TP ranks and the partial outputs summed."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)


class VocabParallelEmbedding(nn.Embedding):
    """Token embedding whose vocabulary rows are split across TP ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Per-token cross-entropy (reduction 'none', fp32) of logits [N, V] against labels [N]."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")

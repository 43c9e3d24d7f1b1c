"""SwiGLU feed-forward network: the dense FFN of the first layers and the shared experts."""

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor import ColumnParallelLinear, RowParallelLinear


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up split by columns and down by rows under TP."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp_group=None):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp_group)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp_group)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

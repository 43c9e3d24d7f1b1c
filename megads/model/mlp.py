"""SwiGLU feed-forward network: the dense FFN of the first layers and the shared experts."""

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor import ColumnParallelLinear, RowParallelLinear, gather_from_sequence_parallel_region, tp_size


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up split by columns and down by rows under TP.

    With sequence_parallel (and TP > 1) the input and output are this rank's sequence chunk
    [B, S/t, hidden]: the chunk is all-gathered once for both gate and up (whose input gradients
    stay partial; the gather's backward reduce-scatters their sum), and down reduce-scatters.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and tp_size(tp_group) > 1
        sp = self.sequence_parallel
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp_group, disable_grad_reduce=sp)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp_group, disable_grad_reduce=sp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp_group, sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group, grad_is_partial=True)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

"""SwiGLU feed-forward network: the dense FFN of the first layers and the shared experts."""

import torch
import torch.nn.functional as F
from torch import nn

from megads.model import recompute
from parallel.context import ParallelContext
from parallel.tensor import ColumnParallelLinear, RowParallelLinear, gather_from_sequence_parallel_region


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up split by columns and down by rows under TP.

    Under sequence parallelism the input and output are this rank's sequence chunk [B, S/t, hidden]:
    the chunk is all-gathered once for both gate and up (whose input gradients stay partial; the
    gather's backward reduce-scatters their sum), and down reduce-scatters.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, ctx: ParallelContext | None = None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        self.tp, self.sequence_parallel = ctx.tp, ctx.sequence_parallel
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, ctx, input_gathered=True)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, ctx, input_gathered=True)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp, grad_is_partial=True)
        # DeepSeek-V3 (section 3.3.2) caches the SwiGLU's input and recomputes its output in backward.
        return self.down_proj(recompute.selective(swiglu, self.gate_proj(x), self.up_proj(x)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up

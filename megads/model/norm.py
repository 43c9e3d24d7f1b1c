"""RMSNorm, computed in FP32 whatever the activation dtype (as DeepSeek-V3 and `transformers` do).

Under sequence parallelism a norm runs on this rank's sequence chunk, so its weight's gradient is
a partial sum over the TP group; the weight declares it (`parallel.grad_duties`).

Under selective activation recomputation (megads.model.recompute) every RMSNorm is recomputed in
backward, as in DeepSeek-V3: neither its output nor its intermediates are kept, only its input.
"""

import torch
from torch import nn

from megads.model import recompute
from parallel.grad_duties import declare_sequence_parallel_replica


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, ctx=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        if ctx is not None:
            declare_sequence_parallel_replica(self.weight, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recompute.selective(self.normalize, x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

"""RMSNorm, computed in FP32 whatever the activation dtype (as DeepSeek-V3 and `transformers` do).

Under sequence parallelism a norm runs on this rank's sequence chunk, so its weight's gradient is
a partial sum over the TP group; the weight declares it (`parallel.grad_duties`).

Under selective activation recomputation (megads.model.recompute) every RMSNorm is recomputed in
backward, as in DeepSeek-V3: neither its output nor its intermediates are kept, only its input.

FP32 input and weight (the usual case, also under bf16 autocast: the residual stream stays FP32) go
through one autograd Function: the forward's operations are autograd's in the same order (the same
numbers), its backward is the closed form  dx = rstd (g w - x_hat mean(g w x_hat)),  dw = sum g x_hat
(a float reordering of what autograd's chain of pow/mean/rsqrt/mul backwards computes, in a third of
the passes over the activations). Other dtypes take the plain operations.
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
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return _RMSNormFP32.apply(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _RMSNormFP32(torch.autograd.Function):
    """weight * x * rsqrt(mean(x^2) + eps) for FP32 x and weight, with a closed-form backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normalized = x * rstd
        ctx.save_for_backward(normalized, weight, rstd)
        return weight * normalized

    @staticmethod
    def backward(ctx, grad):
        normalized, weight, rstd = ctx.saved_tensors
        grad_weight = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normalized).reshape(-1, normalized.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            grad_normalized = grad * weight
            dot = (grad_normalized * normalized).mean(-1, keepdim=True)
            grad_x = torch.addcmul(grad_normalized, normalized, dot, value=-1).mul_(rstd)
        return grad_x, grad_weight, None

"""Token-level cross-entropy for the output head (main model and MTP depths).

`linear_cross_entropy(hidden, head_weight, labels)` is mean_i CE(hidden_i W^T, label_i) over the
positions whose label is not IGNORE_INDEX (0, not NaN, when there are none). On a single
(unsharded) head it runs fused and chunked over tokens: each chunk's logits are formed, turned
into the loss and, in the same pass, into the gradients (softmax - onehot), then dropped. The full
[tokens, vocab] logits tensor never exists, and the backward pass only scales the gradients
already computed, which saves several full passes over the largest activation of a small model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.tensor import vocab_parallel_cross_entropy

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024


def masked_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp=None) -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] (or this TP rank's vocabulary shard [..., V/t]) over
    non-ignored labels; 0 if there are none."""
    per_token = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), IGNORE_INDEX,
                                             tp)
    return per_token.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        count = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            valid = (y != IGNORE_INDEX).float()
            target = y.clamp(min=0).unsqueeze(1)
            logits = F.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(mean loss)/d(logits) = (softmax - onehot(target)) * valid / count, built in place.
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
            grad_logits.scatter_add_(1, target, -torch.ones_like(valid).unsqueeze(1))
            grad_logits.mul_((valid / count).unsqueeze(1))
            grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad_logits @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output if grad_hidden is not None else None,
                grad_weight * grad_output if grad_weight is not None else None,
                None, None)


def linear_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of hidden @ head_weight^T against labels, fused and chunked (see the module doc)."""
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head_weight, labels.reshape(-1),
                                          CHUNK_TOKENS)

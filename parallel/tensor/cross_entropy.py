"""Cross-entropy over vocabulary-split logits, without gathering them (Megatron's vocab-parallel CE).

`vocab_parallel_cross_entropy(logits, labels, ignore_index, tp)` takes this TP rank's vocabulary
shard of the logits (what a ColumnParallelLinear head produces) and global labels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.group import Group


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
        vocab_start = group.rank * vocab_local

        # Global max for a numerically stable softmax (a constant shift: no gradient flows through it).
        max_logits = logits.max(dim=-1).values
        group.all_reduce(max_logits, op=dist.ReduceOp.MAX)
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
        group.all_reduce(stats)
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
                                 tp: Optional[Group] = None) -> torch.Tensor:
    """Per-token cross-entropy (reduction 'none', fp32) of logits [..., V/t] against labels [...].

    `logits` holds this rank's vocabulary shard (what a ColumnParallelLinear head produces, rank r
    owning ids [r*V/t, (r+1)*V/t)); `labels` are global ids, the same on every rank of the group.
    Positions labelled `ignore_index` get loss 0 and no gradient. The math is fp32 whatever the
    logits' dtype; the gradient returns in the logits' dtype. At size 1 this is F.cross_entropy.
    """
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels of shape {list(labels.shape)} do not match logits of shape {list(logits.shape)}.")
    if tp is None or tp.size == 1:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=ignore_index, reduction="none").reshape(labels.shape)
    loss = _VocabParallelCrossEntropy.apply(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index, tp)
    return loss.reshape(labels.shape)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, tp: Optional[Group] = None) -> torch.Tensor:
    """Entropy of softmax(logits) per position, [...] (fp32), from this rank's vocabulary shard
    [..., V/t]: H = log(sum exp z) - sum(p z), with the max, the sum of exponentials and the sum of
    exp(z) z all-reduced (three numbers per position cross the group; never the logits). No gradient."""
    z = logits.float()
    max_z = z.max(dim=-1).values
    if tp is not None and tp.size > 1:
        tp.all_reduce(max_z, op=dist.ReduceOp.MAX)
    shifted = z - max_z.unsqueeze(-1)
    exp = shifted.exp()
    stats = torch.stack((exp.sum(dim=-1), (exp * shifted).sum(dim=-1)))
    if tp is not None and tp.size > 1:
        tp.all_reduce(stats)
    sum_exp, weighted = stats[0], stats[1]
    return sum_exp.log() - weighted / sum_exp

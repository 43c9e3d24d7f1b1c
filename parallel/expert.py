"""Expert-parallel token dispatch: permute tokens by expert, (exchange,) compute, combine.

The routed experts of a MoE layer see their tokens sorted by expert id, so each expert's tokens
form one contiguous slice and the expert FFNs run as a grouped GEMM. This module owns the
permutation and, under expert parallelism, the all-to-all exchange; at expert-parallel size 1 no
communication happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchState:
    """What combine() needs to undo dispatch()."""

    inverse_order: torch.Tensor  # position of each (token, k) slot in the sorted order
    num_tokens: int
    top_k: int


class LocalTokenDispatcher:
    """Dispatcher for all experts on this rank (expert-parallel size 1)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, hidden: torch.Tensor, topk_idx: torch.Tensor):
        """hidden [T, H], topk_idx [T, K] -> (tokens sorted by expert [T*K, H], tokens per expert [E], state)."""
        num_tokens, top_k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)
        # Stable sort keeps each expert's tokens in their original order (deterministic results).
        order = torch.argsort(flat_expert, stable=True)
        tokens_per_expert = torch.bincount(flat_expert, minlength=self.num_experts)
        sorted_tokens = hidden.index_select(0, order // top_k)
        inverse_order = torch.empty_like(order)
        inverse_order[order] = torch.arange(order.numel(), device=order.device)
        return sorted_tokens, tokens_per_expert, DispatchState(inverse_order, num_tokens, top_k)

    def combine(self, expert_out: torch.Tensor, gates: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """expert_out [T*K, H] in sorted order, gates [T, K] -> gate-weighted sum per token [T, H]."""
        per_slot = expert_out.index_select(0, state.inverse_order).view(state.num_tokens, state.top_k, -1)
        return torch.einsum("tkh,tk->th", per_slot, gates.to(per_slot.dtype))

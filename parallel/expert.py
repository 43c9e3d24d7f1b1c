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

    token_of_slot: torch.Tensor  # for each sorted (token, expert) slot, the token it came from
    num_tokens: int


class LocalTokenDispatcher:
    """Dispatcher for all experts on this rank (expert-parallel size 1)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, hidden: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor):
        """hidden [T, H], topk_idx and gates [T, K] -> tokens sorted by expert [T*K, H], their gates
        [T*K], tokens per expert [E], and the state combine() needs."""
        num_tokens, top_k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)
        # Stable sort keeps each expert's tokens in their original order (deterministic results).
        order = torch.argsort(flat_expert, stable=True)
        tokens_per_expert = torch.bincount(flat_expert, minlength=self.num_experts)
        token_of_slot = order // top_k
        sorted_tokens = hidden.index_select(0, token_of_slot)
        sorted_gates = gates.reshape(-1).index_select(0, order)
        return sorted_tokens, sorted_gates, tokens_per_expert, DispatchState(token_of_slot, num_tokens)

    def combine(self, expert_out: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """expert_out [T*K, H] (already gate-weighted) in sorted order -> per-token sum [T, H].

        index_add_ on one device adds each token's K contributions in a fixed (sorted) order, so
        the result is deterministic.
        """
        out = expert_out.new_zeros(state.num_tokens, expert_out.shape[-1])
        return out.index_add(0, state.token_of_slot, expert_out)

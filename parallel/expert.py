"""Expert-parallel token dispatch: permute tokens by expert, (exchange,) compute, combine.

The routed experts of a MoE layer see their tokens sorted by expert id, so each expert's tokens
form one contiguous slice and the expert FFNs run as a grouped GEMM. This module owns the
permutation and, under expert parallelism, the all-to-all exchange; at expert-parallel size 1 no
communication happens.

Compressed dispatch: a dispatcher's ``codec`` (None: tokens travel as they are) encodes the tokens
of the forward dispatch into byte rows before the all-to-all and decodes them after it (DeepSeek-V3
sends the MoE up-projection inputs in FP8: megads.fp8.dispatch.Fp8DispatchCodec, injected by
megads.fp8.convert_to_fp8, so that this package knows nothing of FP8). Only the forward dispatch is
encoded: the gradient going back to the tokens, the gates and the combine (both directions) stay
in high precision. Autograd treats encode-then-decode as the identity (straight-through): the
gradient reaching the decoded tokens is passed unchanged to the tokens that were encoded. The
local dispatcher (expert-parallel size 1) has nothing to send but applies the same round trip, so
a run's numbers do not depend on the expert-parallel size.

Every collective here goes through the EP `parallel.group.Group` (the exchanges' backward issues on
``ctx.group`` again), so that an overlapped F&B pair's backward half communicates on the group's
twin (parallel/twin_groups.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from parallel.group import Group


class TokenCodec(Protocol):
    """How tokens travel in the forward dispatch: one uint8 row per token, decoded after the exchange.

    encode(tokens [N, H]) -> uint8 [N, row_bytes] (rows independent of each other, so a row can be
    sent anywhere on its own); decode(rows [N, row_bytes], hidden=H, dtype) -> [N, H] in dtype.
    decode(encode(x)) is what the experts see; it must be deterministic.
    """

    def encode(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def decode(self, rows: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor: ...


class _CodecRoundTrip(torch.autograd.Function):
    """decode(encode(x)) forward, identity backward (straight-through): the local dispatcher's stand-in
    for the encoded exchange, so that numerics match expert parallelism."""

    @staticmethod
    def forward(ctx, x, codec):
        return codec.decode(codec.encode(x), x.shape[-1], x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@dataclass
class DispatchState:
    """What combine() needs to undo dispatch()."""

    token_of_slot: torch.Tensor  # for each sorted (token, expert) slot, the token it came from
    num_tokens: int


class LocalTokenDispatcher:
    """Dispatcher for all experts on this rank (expert-parallel size 1)."""

    def __init__(self, num_experts: int, codec: TokenCodec | None = None):
        self.num_experts = num_experts
        self.codec = codec

    def dispatch(self, hidden: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor):
        """hidden [T, H], topk_idx and gates [T, K] -> tokens sorted by expert [T*K, H], their gates
        [T*K], tokens per expert [E], and the state combine() needs.

        With a codec the tokens are encoded and decoded first (see the module doc): once per token
        here, which gives the same rows as encoding each (token, expert) slot, since rows are
        encoded independently.
        """
        if self.codec is not None:
            hidden = _CodecRoundTrip.apply(hidden, self.codec)
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


# ============================================================================ expert parallelism
#
# Under expert parallelism (EP) the E routed experts are split across the ranks of an EP group in
# contiguous blocks: group rank r holds experts [r*E/ep, (r+1)*E/ep) ("local experts", numbered
# 0..E/ep-1 on that rank). Every rank routes its own tokens; dispatch sends each (token, expert)
# slot to the rank owning the expert, combine brings the gate-weighted expert outputs back.
#
# Communication lives only in the autograd Functions below; the permutations around them are
# ordinary differentiable index_select / index_add, so gradients reach the hidden states, the
# gates and the expert weights. Every backward collective runs on every rank in the same order:
# the autograd engine runs a graph's nodes in reverse creation order, the dispatch exchange is one
# node (tokens then gates, in forward and backward), and combine keeps the dispatch node reachable
# on ranks whose local experts received no token (see _CombineAllToAll).


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Group) -> torch.Tensor:
    """all_to_all_single along dim 0 with uneven splits: rows input_splits[i] go to group rank i,
    output_splits[i] rows come from group rank i. Zero-row tensors and zero splits are fine."""
    x = x.contiguous()  # gloo reads a strided tensor's memory as if it were contiguous
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    group.all_to_all(out, x, output_splits, input_splits)
    return out


class _DispatchAllToAll(torch.autograd.Function):
    """Forward: send tokens [N, H] and their gates [N] to the expert owners (uneven all-to-all).
    Backward: the same exchange with the splits swapped sends the gradients home.

    Tokens and gates travel in one node so that their two collectives are always issued in the same
    order on every rank (gates keep their own dtype: FP32 router output next to BF16 tokens).
    With a codec the tokens travel encoded (byte rows) and are decoded to their own dtype on
    arrival; the gates and the backward exchange are not encoded (see the module doc).
    """

    @staticmethod
    def forward(ctx, tokens, gates, output_splits, input_splits, group, codec):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        if codec is None:
            recv_tokens = _all_to_all(tokens, output_splits, input_splits, group)
        else:
            rows = _all_to_all(codec.encode(tokens), output_splits, input_splits, group)
            recv_tokens = codec.decode(rows, tokens.shape[-1], tokens.dtype)
        return recv_tokens, _all_to_all(gates, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_tokens, grad_gates):
        # Grads are materialised (zeros) when an output got none, so both collectives always run.
        output_splits, input_splits = ctx.splits
        return (_all_to_all(grad_tokens, input_splits, output_splits, ctx.group),
                _all_to_all(grad_gates, input_splits, output_splits, ctx.group), None, None, None, None)


class _CombineAllToAll(torch.autograd.Function):
    """Forward: send expert outputs back to the ranks their tokens came from; backward: the reverse.

    `anchors` (the dispatched tokens and gates, passed only when this rank's local experts received
    no slot, so they have zero rows) get zero gradients. They keep the dispatch exchange reachable
    from the loss when the expert computation skipped empty inputs and returned a constant (as
    grouped_swiglu does): otherwise this rank would skip that exchange's backward collectives while
    its peers wait in them.
    """

    @staticmethod
    def forward(ctx, expert_out, output_splits, input_splits, group, *anchors):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        ctx.anchor_shapes = [(a.shape, a.dtype, a.device) for a in anchors]
        return _all_to_all(expert_out, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        # Always communicate, even when expert_out needs no gradient here: peers take part too.
        grad_in = _all_to_all(grad, input_splits, output_splits, ctx.group)
        anchor_grads = tuple(torch.zeros(shape, dtype=dtype, device=device)
                             for shape, dtype, device in ctx.anchor_shapes)
        return (grad_in if ctx.needs_input_grad[0] else None, None, None, None, *anchor_grads)


@dataclass
class AllToAllDispatchState:
    """What AllToAllTokenDispatcher.combine() needs to undo dispatch(), plus load statistics."""

    permutation: DispatchState  # this rank's slots sorted by global expert (the local dispatcher's step)
    send_splits: list[int]  # slots this rank sent to each EP rank
    recv_splits: list[int]  # slots this rank received from each EP rank
    unsort: torch.Tensor | None  # [local expert][source] order -> received [source][local expert]; None: identity
    anchors: tuple  # see _CombineAllToAll
    # This rank's own slots per GLOBAL expert [E] (no communication; not summed over the EP group).
    local_tokens_per_expert: torch.Tensor
    # Slots received per (source EP rank, local expert) [ep, E/ep].
    recv_tokens_per_expert: torch.Tensor


class AllToAllTokenDispatcher:
    """Expert-parallel dispatcher: same dispatch/combine interface as LocalTokenDispatcher.

    This rank (group rank r of the EP group of size ep) holds experts [r*E/ep, (r+1)*E/ep).
    dispatch(hidden [T, H], topk_idx [T, K] (global expert ids), gates [T, K]) returns

    - tokens [N, H] and gates [N]: the slots of ALL EP ranks routed to this rank's experts, sorted
      by local expert and, within an expert, by source rank then by the source's token order (the
      order a single process holding everyone's tokens, rank-major, would see);
    - tokens_per_expert [E/ep]: their count per LOCAL expert (summed over source ranks);
    - the state combine() needs.

    so the same grouped GEMM runs on the local experts' weights (stacked [E/ep, ...]). combine(
    expert_out [N, H] gate-weighted, state) -> [T, H] this rank's tokens' outputs.

    Load statistics: `state.local_tokens_per_expert` [E] counts this rank's slots per global expert
    (free); `global_tokens_per_expert(state)` sums that over the EP group (one all-reduce, a
    collective: every EP rank must call it). For the router-bias update, accumulating
    state.local_tokens_per_expert over micro-batches and summing once per step over every rank that
    shares the router (the DP x EP ranks; `update_router_biases(reduce_loads=...)`) is cheaper and
    gives the same loads.

    Every rank of the EP group must call dispatch and combine (and backward) the same number of
    times in the same order, also when it has no token (T = 0) or sends none.

    codec (optional, see the module doc): how the tokens travel in the forward dispatch. Every rank
    of the EP group must use the same one (rows of one codec are not readable by another).
    """

    def __init__(self, num_experts: int, ep: Group, codec: TokenCodec | None = None):
        self.num_experts = num_experts
        self.codec = codec
        self.ep = ep
        self.ep_size = ep.size
        self.ep_rank = ep.rank
        if num_experts % self.ep_size != 0:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel size "
                             f"({self.ep_size}).")
        self.num_local_experts = num_experts // self.ep_size
        self.local_expert_start = self.ep_rank * self.num_local_experts
        # Sorting this rank's slots by global expert, and summing them back per token, is exactly
        # what the single-rank dispatcher does; the exchange happens in between.
        self._permute = LocalTokenDispatcher(num_experts)

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds."""
        return range(self.local_expert_start, self.local_expert_start + self.num_local_experts)

    def dispatch(self, hidden: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor):
        ep, nle = self.ep_size, self.num_local_experts

        # 1. Permute this rank's slots by global expert id (stable: token order within an expert).
        permuted_tokens, permuted_gates, local_counts, permutation = self._permute.dispatch(hidden, topk_idx, gates)

        # 2. Exchange counts: rank s sends rank d its counts for d's experts; received [source, local expert].
        recv_counts = torch.empty_like(local_counts)
        self.ep.all_to_all(recv_counts, local_counts.contiguous())
        recv_counts = recv_counts.view(ep, nle)
        # One host sync for both split lists.
        splits = torch.cat([local_counts.view(ep, nle).sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = splits[:ep], splits[ep:]

        # 3. Tokens and gates to the expert owners, received in [source rank][local expert] order.
        recv_tokens, recv_gates = _DispatchAllToAll.apply(permuted_tokens, permuted_gates, recv_splits,
                                                          send_splits, self.ep, self.codec)

        # 4. Re-sort to [local expert][source rank] (stable: source order, then token order).
        num_recv = sum(recv_splits)
        unsort = None
        if nle > 1 and ep > 1:
            chunk_expert = torch.arange(nle, device=recv_counts.device).repeat(ep)
            row_expert = torch.repeat_interleave(chunk_expert, recv_counts.reshape(-1), output_size=num_recv)
            resort = torch.argsort(row_expert, stable=True)
            unsort = torch.empty_like(resort).scatter_(0, resort, torch.arange(num_recv, device=resort.device))
            recv_tokens = recv_tokens.index_select(0, resort)
            recv_gates = recv_gates.index_select(0, resort)

        anchors = (recv_tokens, recv_gates) if num_recv == 0 else ()
        state = AllToAllDispatchState(permutation, send_splits, recv_splits, unsort, anchors, local_counts,
                                      recv_counts)
        return recv_tokens, recv_gates, recv_counts.sum(0), state

    def combine(self, expert_out: torch.Tensor, state: AllToAllDispatchState) -> torch.Tensor:
        """expert_out [N, H] (gate-weighted, in dispatch's order) -> this rank's per-token sums [T, H].

        Each token's K contributions are added in global-expert order, as LocalTokenDispatcher does.
        """
        if state.unsort is not None:
            expert_out = expert_out.index_select(0, state.unsort)
        anchors = tuple(a for a in state.anchors if a.requires_grad)
        back = _CombineAllToAll.apply(expert_out, state.send_splits, state.recv_splits, self.ep, *anchors)
        return self._permute.combine(back, state.permutation)

    def global_tokens_per_expert(self, state: AllToAllDispatchState) -> torch.Tensor:
        """Slots per global expert [E] summed over the EP group's ranks (a collective; not differentiable)."""
        return self.ep.sum(state.local_tokens_per_expert)


def make_token_dispatcher(num_experts: int, ep: Group | None = None, codec: TokenCodec | None = None):
    """LocalTokenDispatcher when `ep` is None or has one rank, else AllToAllTokenDispatcher.

    Both take a ``codec`` (None: tokens as they are); it can also be set later (``dispatcher.codec``)."""
    if ep is None or ep.size == 1:
        return LocalTokenDispatcher(num_experts, codec)
    return AllToAllTokenDispatcher(num_experts, ep, codec)

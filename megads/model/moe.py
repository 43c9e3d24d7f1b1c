"""DeepSeekMoE (DeepSeek-V3 report section 2.1.2): fine-grained routed experts plus shared experts.

    h' = h + sum_i FFN_shared_i(h) + sum_{i in TopK} g_i FFN_routed_i(h)

Routing (DeepSeek-V3, `topk_method: noaux_tc`):
    s_i = sigmoid(u . e_i)                         affinity (DeepSeek-V2: softmax over experts)
    selection: top-K_r of s_i + b_i, restricted to the best `topk_group` of `n_group` groups,
               a group scored by the sum of its two best biased affinities
    g_i = s_i / sum_{selected} s_j  (when norm_topk_prob)  x routed_scaling_factor

The per-expert bias b (`e_score_correction_bias`) steers selection only; the gates come from the
raw affinities. It is not trained by gradients: after each optimizer step it moves by +-gamma
toward balance (auxiliary-loss-free load balancing), from the loads this module counted.

The sequence-wise balance loss  L = alpha sum_i f_i P_i  (f_i: fraction of the sequence's tokens
routed to expert i, times N_r/K_r; P_i: mean normalised affinity) keeps single sequences from
collapsing onto few experts; alpha is small (1e-4 in DeepSeek-V3).

No token is dropped: every token reaches all of its K_r experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megads.config import ModelConfig
from megads.model import recompute
from megads.model.mlp import SwiGLU
from megads.model.pass_state import RoutingTape
from parallel.context import ParallelContext
from parallel.expert import make_token_dispatcher
from parallel.grad_duties import declare_partial_grad
from parallel.group import Group
from parallel.tensor import all_reduce_sum_of_shares, gather_batch_across_tp, split_batch_across_tp


class Router(nn.Module):
    """Token-to-expert affinities and top-k selection. Always computed in FP32.

    Under tensor parallelism each TP rank routes different tokens (see MoE), so the router weight's
    gradient is a partial sum over the TP group, which it declares (`parallel.grad_duties`).
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.scoring_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, cfg.hidden_size))
        if ctx is not None and ctx.tp.size > 1:
            declare_partial_grad(self.weight, "tp")
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: torch.Tensor, chosen: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (selected expert ids [T, K], gates [T, K], affinities [T, E]), FP32.

        `chosen` [T, K] (routing replay): use these experts instead of selecting (rows of -1: select as
        usual); the gates still come from this forward's affinities, so the router keeps its gradient."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        topk_idx = self.select(scores)
        if chosen is not None:
            topk_idx = torch.where(chosen >= 0, chosen, topk_idx)
        gates = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, gates * self.routed_scaling_factor, scores

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The top-K experts per token from the affinities (biased, group-limited; module doc)."""
        choice = scores + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores
        if self.n_group > 1 and self.topk_method != "greedy":
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            top_groups = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        return choice.topk(self.top_k, dim=-1).indices


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
    """x [N, K] sorted by expert, weight [E, out, K] -> [N, out]: each expert's rows times its weight^T.

    One GEMM per expert that has tokens (forward, and two per expert backward), never a loop over
    tokens; each writes its rows of the output (its slice of the weight gradient) in place, so no
    per-expert outputs are concatenated, nor per-expert weight gradients stacked. Under autocast the
    GEMMs run in the autocast dtype, as F.linear's would. No tokens at all: a constant of zeros (no
    GEMM, no gradient).
    """
    if sum(tokens_per_expert) == 0:
        return x.new_zeros(x.shape[0], weight.shape[1])
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return _GroupedLinear.apply(x, weight, tuple(tokens_per_expert))


class _GroupedLinear(torch.autograd.Function):
    """grouped_linear's GEMMs, each writing its own rows (forward, input gradient) or its expert's
    weight-gradient slice (the slices of experts without tokens are zero)."""

    @staticmethod
    def forward(ctx, x, weight, tokens_per_expert):
        ctx.save_for_backward(x, weight)
        ctx.tokens_per_expert = tokens_per_expert
        out = x.new_empty(x.shape[0], weight.shape[1])
        for expert, rows in _expert_rows(tokens_per_expert):
            torch.mm(x[rows], weight[expert].t(), out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = weight.new_empty(weight.shape)
            for expert, count in enumerate(ctx.tokens_per_expert):
                if count == 0:
                    grad_weight[expert].zero_()
        for expert, rows in _expert_rows(ctx.tokens_per_expert):
            if grad_x is not None:
                torch.mm(grad[rows], weight[expert], out=grad_x[rows])
            if grad_weight is not None:
                torch.mm(grad[rows].t(), x[rows], out=grad_weight[expert])
        return grad_x, grad_weight, None


def _expert_rows(tokens_per_expert):
    """(expert, its slice of rows) for every expert that has tokens, rows sorted by expert."""
    start = 0
    for expert, count in enumerate(tokens_per_expert):
        if count:
            yield expert, slice(start, start + count)
        start += count


def grouped_swiglu(tokens: torch.Tensor, gates: torch.Tensor, tokens_per_expert: list[int],
                   gate_up: torch.Tensor, down: torch.Tensor, linear=grouped_linear) -> torch.Tensor:
    """Gate-weighted expert SwiGLU over tokens sorted by expert: g * (silu(a) * b) W_down, [a; b] = x W_gate_up.

    tokens [N, H] (expert-contiguous), gates [N], gate_up [E, 2I, H], down [E, H, I]. The gating
    weight scales the expert's hidden activation, the narrower I-dim tensor. `linear` is the
    expert-grouped GEMM (FP8 layers pass their own).
    """
    projected = linear(tokens, gate_up, tokens_per_expert)
    # DeepSeek-V3 (section 3.3.2) caches the SwiGLU's input and recomputes its output in backward.
    hidden = recompute.selective(_GatedSwiGLU.apply, projected, gates.to(projected.dtype))
    return linear(hidden, down, tokens_per_expert)


class _GatedSwiGLU(torch.autograd.Function):
    """[a; b] [N, 2I], g [N] -> silu(a) * b * g: autograd's own operations in its order (the same
    numbers), but the gradients of a and b are written into one [N, 2I] tensor, not concatenated."""

    @staticmethod
    def forward(ctx, projected, gates):
        gate, up = projected.chunk(2, dim=-1)
        activated = F.silu(gate)
        product = activated * up
        ctx.save_for_backward(projected, gates, activated, product)
        return product * gates.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad):
        projected, gates, activated, product = ctx.saved_tensors
        gate, up = projected.chunk(2, dim=-1)
        grad_gates = (grad * product).sum(dim=-1) if ctx.needs_input_grad[1] else None
        grad_projected = None
        if ctx.needs_input_grad[0]:
            grad_product = grad * gates.unsqueeze(-1)
            grad_projected = torch.empty_like(projected)
            grad_gate, grad_up = grad_projected.chunk(2, dim=-1)
            torch.mul(grad_product, activated, out=grad_up)
            torch.ops.aten.silu_backward.grad_input(grad_product * up, gate, grad_input=grad_gate)
        return grad_projected, grad_gates


class RoutedExperts(nn.Module):
    """This rank's share of the N_r fine-grained SwiGLU experts, stacked for grouped GEMMs.

    Under expert parallelism of size ep, rank r holds experts [r N_r/ep, (r+1) N_r/ep).
    """

    def __init__(self, total_experts: int, hidden_size: int, intermediate_size: int, ep: Group | None = None):
        super().__init__()
        self.ep = ep or Group(None, "ep")
        self.total_experts = total_experts
        self.num_experts = total_experts // self.ep.size
        self.first_expert = self.ep.rank * self.num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden_size, intermediate_size))

    def forward(self, sorted_tokens: torch.Tensor, sorted_gates: torch.Tensor,
                tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(sorted_tokens, sorted_gates, tokens_per_expert.tolist(), self.gate_up_proj,
                              self.down_proj, self.expert_linear)

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """The expert-grouped GEMM of both projections: the one method an FP8 layer overrides."""
        return grouped_linear(x, weight, tokens_per_expert)


class MoE(nn.Module):
    """Shared experts on every token plus routed experts on their selected tokens.

    Parallel layout (injected): the shared experts are tensor-parallel like a dense FFN. Routed
    experts are never tensor-split; instead each tensor-parallel rank routes its own share of the
    batch's sequences, and expert parallelism spreads the experts over ranks (the dispatcher
    exchanges tokens). Counts of tokens per expert are kept for all experts (this rank's tokens).

    Under sequence parallelism (TP > 1) the input is already disjoint per TP rank (this rank's
    chunk of every sequence, [B, S/t, hidden]), so the routed experts take it as is (no batch
    split) and the shared experts gather / reduce-scatter the sequence. The sequence-wise balance
    loss then needs whole-sequence statistics: see `sequence_balance_loss`.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.tp, self.sequence_parallel = ctx.tp, ctx.sequence_parallel
        self.gate = Router(cfg, ctx)
        self.dispatcher = make_token_dispatcher(cfg.n_routed_experts, ctx.ep)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, ctx.ep)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ctx)
                               if cfg.n_shared_experts > 0 else None)
        # Tokens routed to each expert since the last router-bias update (summed over micro-batches).
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None  # this forward's sequence-wise balance loss

    def forward(self, x: torch.Tensor, tape: RoutingTape | None = None) -> torch.Tensor:
        """`tape` (megads.model.pass_state): record this forward's expert choices, or replay recorded ones."""
        if self.sequence_parallel:
            routed = self.routed(x, tape)  # tokens are already split across TP ranks, by sequence chunk
        else:
            routed = gather_batch_across_tp(self.routed(split_batch_across_tp(x, self.tp), tape), self.tp)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed

    def routed(self, x: torch.Tensor, tape: RoutingTape | None = None) -> torch.Tensor:
        """sum_{i in TopK} g_i FFN_i(x) for x [B, S, hidden] (this rank's sequences, or under SP this
        rank's chunk of every sequence)."""
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        # Activation recomputation reruns this forward in backward (megads.model.recompute): the rerun
        # routes every token as the forward did, and leaves the tape, the loads and the loss alone.
        rerun = recompute.recomputing()
        if rerun:
            replayed = recompute.remembered(self)
        else:
            replayed = tape.replay(batch, seq).reshape(-1, self.top_k) if tape is not None and tape.replaying else None
        topk_idx, gates, scores = self.gate(flat, replayed)
        recompute.remember(self, topk_idx)
        if tape is not None and replayed is None:
            tape.record(topk_idx.view(batch, seq, -1).detach())
        sorted_tokens, sorted_gates, local_tokens_per_expert, state = self.dispatcher.dispatch(flat, topk_idx, gates)
        expert_out = self.experts(sorted_tokens, sorted_gates, local_tokens_per_expert)
        out = self.dispatcher.combine(expert_out, state).to(x.dtype)

        balance_loss = None
        if self.training:
            if not rerun:
                self.tokens_per_expert += torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts).to(
                    self.tokens_per_expert.dtype)
            if self.aux_loss_alpha > 0:
                # Each TP rank holds 1/t of the loss: without SP its 1/t of the sequences (its share of
                # the batch mean is scaled by 1/t); under SP every rank computes the whole loss from
                # whole-sequence statistics and keeps 1/t of it, so that the sum over TP ranks (the
                # trainer's report, and the gradient through all_reduce_sum_of_shares) counts it once.
                balance_loss = self.sequence_balance_loss(
                    scores.view(batch, seq, -1), topk_idx.view(batch, seq, -1),
                    self.tp if self.sequence_parallel else None) / self.tp.size
        if not rerun:        # a rerun computes the loss again only for what its backward saves
            self.balance_loss = balance_loss
        return out.view(batch, seq, hidden)

    def sequence_balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor,
                              sequence_group=None) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged over the batch's sequences (report eq. 17-20).

        `sequence_group` (SP): the ranks holding the other chunks of each sequence. The per-sequence
        expert counts and sums of normalised affinities are summed over it before f and P are formed,
        so every rank gets the whole-sequence loss. The sums go through all_reduce_sum_of_shares
        (backward all-reduces too): each rank keeps 1/t of the loss, so the gradient reaching rank
        r's affinities is the sum of the ranks' 1/t shares, i.e. that of the loss counted once.
        """
        batch, seq, num_experts = scores.shape
        counts = torch.zeros(batch, num_experts, device=scores.device)
        counts.scatter_add_(1, topk_idx.reshape(batch, -1), torch.ones(batch, seq * self.top_k, device=scores.device))
        normalised = scores / scores.sum(dim=-1, keepdim=True)
        if sequence_group is None or sequence_group.size == 1:
            p = normalised.mean(dim=1)
        else:
            seq = seq * sequence_group.size  # whole-sequence length
            counts = all_reduce_sum_of_shares(counts, sequence_group)  # no gradient (counts are constants)
            p = all_reduce_sum_of_shares(normalised.sum(dim=1), sequence_group) / seq
        f = counts * num_experts / (self.top_k * seq)
        return self.aux_loss_alpha * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, speed: float, loads: torch.Tensor | None = None) -> torch.Tensor:
        """b_i += speed * sign(mean load - load_i); returns the loads used and resets the counters.

        This is the DeepSeek-V3 report's rule as written (no re-centring of b, unlike TorchTitan).
        `loads` lets the caller pass counts already summed over data/expert-parallel ranks.
        """
        loads = self.tokens_per_expert.clone() if loads is None else loads
        if speed > 0 and loads.sum() > 0:
            self.gate.e_score_correction_bias += speed * torch.sign(loads.mean() - loads)
        self.tokens_per_expert.zero_()
        return loads

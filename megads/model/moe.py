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
from megads.model.mlp import SwiGLU
from parallel.expert import make_token_dispatcher
from parallel.tensor import all_reduce_sum_of_shares, gather_batch_across_tp, split_batch_across_tp
from parallel.tensor import tp_rank as group_rank
from parallel.tensor import tp_size as group_size


class Router(nn.Module):
    """Token-to-expert affinities and top-k selection. Always computed in FP32."""

    def __init__(self, cfg: ModelConfig):
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
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (selected expert ids [T, K], gates [T, K], affinities [T, E]), FP32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

        with torch.no_grad():
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
            topk_idx = choice.topk(self.top_k, dim=-1).indices

        gates = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, gates * self.routed_scaling_factor, scores


def grouped_swiglu(tokens: torch.Tensor, gates: torch.Tensor, tokens_per_expert: list[int],
                   gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Gate-weighted expert SwiGLU over tokens sorted by expert: one GEMM pair per expert with tokens.

    tokens [N, H] (expert-contiguous), gates [N], gate_up [E, 2I, H], down [E, H, I]. The gating
    weight scales the expert's hidden activation (g * (silu(a) * b)) W_down = g * FFN(x), on the
    narrower I-dim tensor. The loop is over experts, never over tokens; the stacked weights are
    unbound once, so backward writes each expert's gradient slice instead of one zero-filled
    full-size tensor per expert.
    """
    gate_up_weights, down_weights = gate_up.unbind(0), down.unbind(0)
    outputs = []
    for expert, (chunk, chunk_gates) in enumerate(zip(tokens.split(tokens_per_expert), gates.split(tokens_per_expert))):
        if chunk.shape[0] == 0:
            continue
        gate, up = F.linear(chunk, gate_up_weights[expert]).chunk(2, dim=-1)
        hidden = F.silu(gate) * up * chunk_gates.unsqueeze(-1).to(up.dtype)
        outputs.append(F.linear(hidden, down_weights[expert]))
    if not outputs:
        return tokens.new_zeros(tokens.shape[0], down.shape[1])
    return torch.cat(outputs)


class RoutedExperts(nn.Module):
    """This rank's share of the N_r fine-grained SwiGLU experts, stacked for grouped GEMMs.

    Under expert parallelism of size ep, rank r holds experts [r N_r/ep, (r+1) N_r/ep).
    """

    def __init__(self, total_experts: int, hidden_size: int, intermediate_size: int, ep_group=None):
        super().__init__()
        self.ep_group = ep_group
        self.total_experts = total_experts
        self.num_experts = total_experts // group_size(ep_group)
        self.first_expert = group_rank(ep_group) * self.num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden_size, intermediate_size))

    def forward(self, sorted_tokens: torch.Tensor, sorted_gates: torch.Tensor,
                tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(sorted_tokens, sorted_gates, tokens_per_expert.tolist(), self.gate_up_proj,
                              self.down_proj)


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

    def __init__(self, cfg: ModelConfig, tp_group=None, ep_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.gate = Router(cfg)
        self.dispatcher = make_token_dispatcher(cfg.n_routed_experts, ep_group)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, ep_group)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, tp_group,
                                      self.sequence_parallel)
                               if cfg.n_shared_experts > 0 else None)
        # Tokens routed to each expert since the last router-bias update (summed over micro-batches).
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None  # this forward's sequence-wise balance loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            routed = self.routed(x)  # tokens are already split across TP ranks, by sequence chunk
        else:
            routed = gather_batch_across_tp(self.routed(split_batch_across_tp(x, self.tp_group)), self.tp_group)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """sum_{i in TopK} g_i FFN_i(x) for x [B, S, hidden] (this rank's sequences, or under SP this
        rank's chunk of every sequence)."""
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        topk_idx, gates, scores = self.gate(flat)
        sorted_tokens, sorted_gates, local_tokens_per_expert, state = self.dispatcher.dispatch(flat, topk_idx, gates)
        expert_out = self.experts(sorted_tokens, sorted_gates, local_tokens_per_expert)
        out = self.dispatcher.combine(expert_out, state).to(x.dtype)

        self.balance_loss = None
        if self.training:
            self.tokens_per_expert += torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts).to(
                self.tokens_per_expert.dtype)
            if self.aux_loss_alpha > 0:
                # Each TP rank holds 1/t of the loss: without SP its 1/t of the sequences (its share of
                # the batch mean is scaled by 1/t); under SP every rank computes the whole loss from
                # whole-sequence statistics and keeps 1/t of it, so that the sum over TP ranks (the
                # trainer's report, and the gradient through all_reduce_sum_of_shares) counts it once.
                self.balance_loss = self.sequence_balance_loss(
                    scores.view(batch, seq, -1), topk_idx.view(batch, seq, -1),
                    self.tp_group if self.sequence_parallel else None) / group_size(self.tp_group)
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
        if group_size(sequence_group) == 1:
            p = normalised.mean(dim=1)
        else:
            seq = seq * group_size(sequence_group)  # whole-sequence length
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

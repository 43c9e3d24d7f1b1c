"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Keys and values are compressed into one latent vector per token,

    c_kv = RMSNorm(W_DKV h)                         [kv_lora_rank]   (cached at inference)
    k_rope = RoPE(W_KR h)                           [qk_rope_head_dim], shared by all heads (cached)
    k_nope_i, v_i = W_UK_i c_kv, W_UV_i c_kv         per head

and queries optionally too (q_lora_rank), c_q = RMSNorm(W_DQ h), q_i = W_UQ_i c_q, with a decoupled
rope part q_rope_i = RoPE(W_QR_i c_q). Each head attends with [q_nope_i; q_rope_i] . [k_nope_i; k_rope].

Parameter names are DeepSeek-V3's: W_DKV and W_KR are the one projection `kv_a_proj_with_mqa`,
W_UK and W_UV are `kv_b_proj`; W_DQ is `q_a_proj`, W_UQ and W_QR are `q_b_proj`. Under tensor
parallelism the heads are split (q_b_proj / q_proj and kv_b_proj by columns, o_proj by rows) while
the low-rank down-projections stay replicated.

Generation (a `LatentCache`, megads.model.pass_state): the cache holds per token only the
normalised latent c_kv and the rotated shared rope key. The first call (the prompt) runs the
training computation and fills the cache; later calls (decode) use the absorbed form of DeepSeek-V3's
inference code: W_UK is folded into the query (q_nope W_UK: a query in latent space, scored
directly against the cached c_kv) and W_UV into the output (the attention-weighted latent times
W_UV), so keys and values are never expanded per head.

Sequence parallelism (SP, TP > 1; Megatron-core's MLA layout): the input and output are this rank's
sequence chunk [B, S/t, hidden]. The per-token low-rank part (q_a_proj + q_a_layernorm,
kv_a_proj_with_mqa + kv_a_layernorm, the rope key before rotation) runs on the chunk, and only its
outputs [c_q; c_kv; k_rope] (q_lora_rank + kv_lora_rank + qk_rope_head_dim features, under a third
of DeepSeek-V3's hidden size) are all-gathered to the full sequence, in one collective. Every
consumer of the gathered tensor leaves its gradient partial (this rank's heads' share): q_b_proj /
kv_b_proj do not all-reduce their input gradient and neither does the shared rope key; the gather's
backward reduce-scatters the sum into complete chunk gradients, as plain TP's all-reduce would. The
replicated low-rank weights and norms then see only this rank's tokens (partial weight gradients,
which they declare, like the block norms: `parallel.grad_duties`). Without q_lora_rank, q_proj gathers the hidden
chunk itself (a second gather). o_proj reduce-scatters to chunks. RoPE is unchanged: attention runs
on the full sequence, positions 0..S-1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megads.config import ModelConfig
from megads.model import recompute
from megads.model.norm import RMSNorm
from megads.model.pass_state import LatentCache
from megads.model.rope import RotaryEmbedding, softmax_scale
from parallel.context import ParallelContext
from parallel.tensor import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, copy_to_tp_region,
                             gather_from_sequence_parallel_region)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        self.tp, self.sequence_parallel = ctx.tp, ctx.sequence_parallel
        self.num_heads = cfg.num_attention_heads // ctx.tp.size  # this rank's heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        heads = cfg.num_attention_heads

        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, heads * self.qk_head_dim, ctx)
        else:
            self.q_a_proj = ReplicatedLinear(cfg.hidden_size, self.q_lora_rank, ctx)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps, ctx)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * self.qk_head_dim, ctx, input_gathered=True)
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, ctx)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps, ctx)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim),
                                              ctx, input_gathered=True)
        self.o_proj = RowParallelLinear(heads * self.v_head_dim, cfg.hidden_size, ctx)

        self.rope = RotaryEmbedding(self.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_interleave)
        self.softmax_scale = softmax_scale(self.qk_head_dim, cfg.rope_scaling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None) -> torch.Tensor:
        """Causal self-attention over x [B, S, hidden]; cos/sin from RotaryEmbedding for the positions
        of x (0..S-1, or the next S positions after the cached ones).

        Under SP, x and the output are this rank's chunk [B, S/t, hidden] (cos/sin still cover 0..S-1).
        With a `cache` holding earlier tokens, the new tokens attend to those too (absorbed decode).
        """
        if cache is not None and cache.length > 0:
            return self._decode(x, cos, sin, cache)
        if self.sequence_parallel:
            q_latent, kv_latent, k_rope = self._gathered_latents(x)
        else:
            q_latent = None if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
            compressed_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim],
                                                                     dim=-1)
            kv_latent = self.kv_a_layernorm(compressed_kv)
            # The shared rope key feeds only this rank's heads: its gradient is summed over TP ranks.
            k_rope = copy_to_tp_region(k_rope, self.tp)
        batch, seq, _ = kv_latent.shape  # the full sequence
        k_rope = self.rope.rotate(k_rope.unsqueeze(2), cos, sin)  # one rope key shared by all heads
        if cache is not None:
            cache.append(kv_latent, k_rope.squeeze(2))
        # Without q_lora_rank the query is a full projection of the hidden state, not an up-projection.
        q_input = self.q_proj(x) if self.q_lora_rank is None else q_latent
        # DeepSeek-V3 recomputes the up-projections in backward (selective recomputation): only the
        # latents are kept, not the per-head queries, keys and values built from them.
        q, k, v = recompute.selective(self.up_project, q_input, kv_latent, k_rope, cos, sin)
        out = causal_attention(q, k, v, self.softmax_scale)[..., :self.v_head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.v_head_dim))

    def up_project(self, q_input: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q = [W_UQ c_q; RoPE(W_QR c_q)], k = [W_UK c_kv; k_rope], v = W_UV c_kv as [B, heads, S, d]
        for attention (`q_input` is c_q, or the projected query without q_lora_rank; `k_rope` rotated).

        The values are zero-padded to the query/key dim (`pad_values`), so that what attention keeps
        for its backward is built here, where a recomputation rebuilds it."""
        batch, seq, _ = kv_latent.shape
        q = q_input if self.q_lora_rank is None else self.q_b_proj(q_input)
        q = q.view(batch, seq, self.num_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        kv = self.kv_b_proj(kv_latent)
        kv = kv.view(batch, seq, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        q = torch.cat((q_nope, self.rope.rotate(q_rope, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, self.num_heads, -1)), dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), pad_values(v.transpose(1, 2), self.qk_head_dim)

    def _decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """The new tokens x [B, S, hidden] attending to the cached ones and to each other (causally),
        in the absorbed form (module doc). Inference only: no sequence parallelism."""
        batch, seq, _ = x.shape
        q_latent_in = None if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        compressed_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = self.rope.rotate(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        latent, rope_key = cache.append(self.kv_a_layernorm(compressed_kv), k_rope)   # [B, L, c], [B, L, r]

        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(q_latent_in)
        q = q.view(batch, seq, self.num_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = self.rope.rotate(q_rope, cos, sin)
        # kv_b_proj's weight is [heads x (nope + v), c]: per head W_UK [nope, c] then W_UV [v, c].
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_in_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk.to(q_nope.dtype))
        scores = (torch.einsum("bshc,btc->bsht", q_in_latent, latent.to(q_nope.dtype))
                  + torch.einsum("bshr,btr->bsht", q_rope, rope_key.to(q_rope.dtype))) * self.softmax_scale
        past = latent.shape[1] - seq
        if seq > 1:   # the new tokens see the cache and the new tokens before them
            allowed = torch.arange(latent.shape[1], device=x.device) <= past + torch.arange(seq, device=x.device)[:, None]
            scores = scores.masked_fill(~allowed[None, :, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(latent.dtype)
        out_latent = torch.einsum("bsht,btc->bshc", probs, latent)
        out = torch.einsum("bshc,hvc->bshv", out_latent, w_uv.to(out_latent.dtype))
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.v_head_dim).to(x.dtype))

    def _gathered_latents(self, x: torch.Tensor):
        """SP: (c_q or None, c_kv, k_rope) of the full sequence from this rank's hidden chunk.

        Computed on the chunk and all-gathered in one collective whose backward reduce-scatters the
        partial gradients of this rank's heads (see the module doc).
        """
        compressed_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        parts = [self.kv_a_layernorm(compressed_kv), k_rope]
        if self.q_lora_rank is not None:
            parts.insert(0, self.q_a_layernorm(self.q_a_proj(x)))
        dtypes = [part.dtype for part in parts]  # the norms return FP32 under bf16 autocast, k_rope bf16
        gathered = gather_from_sequence_parallel_region(torch.cat(parts, dim=-1), self.tp, grad_is_partial=True)
        parts = [part.to(dtype) for part, dtype in
                 zip(gathered.split([part.shape[-1] for part in parts], dim=-1), dtypes)]
        return (None, *parts) if self.q_lora_rank is None else tuple(parts)


def pad_values(v: torch.Tensor, qk_dim: int) -> torch.Tensor:
    """Values [..., v_head_dim] zero-padded to the query/key dim.

    MLA's value dim (v_head_dim) is usually smaller than its query/key dim (nope + rope); fused
    attention kernels need them equal, so values are zero-padded (the extra output columns are
    zero: the caller drops them). Without padding PyTorch falls back to the unfused path, which
    materialises the [S, S] scores and skips no masked blocks.
    """
    return F.pad(v, (0, qk_dim - v.shape[-1])) if v.shape[-1] < qk_dim else v


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for [B, heads, S, dim] tensors (v padded: `pad_values`)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

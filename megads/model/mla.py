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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megads.config import ModelConfig
from megads.model.norm import RMSNorm
from megads.model.rope import RotaryEmbedding, softmax_scale
from parallel.tensor import ColumnParallelLinear, RowParallelLinear, copy_to_tp_region, tp_size


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        self.tp_group = tp_group
        self.num_heads = cfg.num_attention_heads // tp_size(tp_group)  # this rank's heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        heads = cfg.num_attention_heads

        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, heads * self.qk_head_dim, tp_group)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * self.qk_head_dim, tp_group)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim),
                                              tp_group)
        self.o_proj = RowParallelLinear(heads * self.v_head_dim, cfg.hidden_size, tp_group)

        self.rope = RotaryEmbedding(self.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_interleave)
        self.softmax_scale = softmax_scale(self.qk_head_dim, cfg.rope_scaling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, S, hidden]; cos/sin from RotaryEmbedding for positions 0..S-1."""
        batch, seq, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, seq, self.num_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(compressed_kv))
        kv = kv.view(batch, seq, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        # The shared rope key feeds only this rank's heads: its gradient is summed over TP ranks.
        k_rope = copy_to_tp_region(k_rope, self.tp_group)
        q_rope = self.rope.rotate(q_rope, cos, sin)
        k_rope = self.rope.rotate(k_rope.unsqueeze(2), cos, sin)  # one rope key shared by all heads

        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, self.num_heads, -1)), dim=-1)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.v_head_dim))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for [B, heads, S, dim] tensors.

    MLA's value dim (v_head_dim) is usually smaller than its query/key dim (nope + rope); fused
    attention kernels need them equal, so values are zero-padded (the extra output columns are
    zero and dropped). Without padding PyTorch falls back to the unfused path, which materialises
    the [S, S] scores and skips no masked blocks.
    """
    v_dim, qk_dim = v.shape[-1], q.shape[-1]
    if v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[..., :v_dim] if v_dim < qk_dim else out

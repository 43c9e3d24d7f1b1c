"""One pre-norm transformer block: MLA attention, then a dense SwiGLU FFN or DeepSeekMoE.

Under sequence parallelism the block's input and output (the residual stream) and its norms work on
this rank's sequence chunk [B, S/t, hidden]; the attention and FFN gather and reduce-scatter.
"""

import torch
from torch import nn

from megads.config import ModelConfig
from parallel.context import ParallelContext
from megads.model.mla import MultiHeadLatentAttention
from megads.model.mlp import SwiGLU
from megads.model.moe import MoE
from megads.model.norm import RMSNorm


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, ctx: ParallelContext | None = None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        self.layer_index = layer_index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.self_attn = MultiHeadLatentAttention(cfg, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.mlp = (MoE(cfg, ctx) if cfg.is_moe_layer(layer_index)
                    else SwiGLU(cfg.hidden_size, cfg.intermediate_size, ctx))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

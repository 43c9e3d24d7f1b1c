"""One pre-norm transformer block: MLA attention, then a dense SwiGLU FFN or DeepSeekMoE.

Under sequence parallelism the block's input and output (the residual stream) and its norms work on
this rank's sequence chunk [B, S/t, hidden]; the attention and FFN gather and reduce-scatter.
"""

import torch
from torch import nn

from megads.config import ModelConfig
from megads.model import recompute
from parallel.context import ParallelContext
from megads.model.mla import MultiHeadLatentAttention
from megads.model.mlp import SwiGLU
from megads.model.moe import MoE
from megads.model.norm import RMSNorm
from megads.model.pass_state import PassState


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, ctx: ParallelContext | None = None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        self.layer_index = layer_index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.self_attn = MultiHeadLatentAttention(cfg, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.is_moe = cfg.is_moe_layer(layer_index)
        self.mlp = MoE(cfg, ctx) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size, ctx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                state: PassState | None = None) -> torch.Tensor:
        """`state` (generation, routing replay): this layer's KV cache and routing tape live there.

        Under full activation recomputation (megads.model.recompute) the block keeps only its input
        and reruns this forward in backward (not a pass that fills a KV cache: it would fill it twice)."""
        if state is not None and state.capacity is not None:
            return self.compute(x, cos, sin, state)
        return recompute.full(self.compute, x, cos, sin, state)

    def compute(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                state: PassState | None = None) -> torch.Tensor:
        cache = tape = None
        if state is not None:
            cache = state.cache(self.layer_index)
            tape = state.tape(self.layer_index) if self.is_moe else None
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, tape) if self.is_moe else self.mlp(h))

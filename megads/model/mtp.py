"""Multi-token prediction (DeepSeek-V3 report section 2.2).

MTP module k (k = 1..D) predicts token t_{i+k+1} at position i. It combines the previous depth's
representation h^{k-1}_i (h^0: the main model's last block output) with the embedding of token
t_{i+k}:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]
    h^k    = TRM_k(h'^k)                 one transformer block
    P^k    = OutHead(h^k)                the main model's output head, behind the module's own norm

The embedding and the output head are the main model's (shared, not copied): the module receives
them at call time. Parameter names follow DeepSeek-V3's checkpoint (layer `num_hidden_layers + k - 1`):
`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, and the block's own weights. The concatenation
puts the embedding first, as DeepSeek's released weights (and vLLM/SGLang loading them) expect.

Under sequence parallelism both inputs, the norms, `eh_proj` (replicated: its gradient is partial
over TP, which it declares) and the output are on this rank's sequence chunk [B, S/t, hidden].
"""

import torch
from torch import nn

from megads.config import ModelConfig
from megads.model.block import TransformerBlock
from megads.model.norm import RMSNorm
from parallel.context import ParallelContext
from parallel.tensor import ReplicatedLinear


class SharedHeadNorm(nn.Module):
    """Holds the MTP module's own final norm under DeepSeek's name `shared_head.norm`."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, ctx: ParallelContext | None = None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.eh_proj = ReplicatedLinear(2 * cfg.hidden_size, cfg.hidden_size, ctx)
        self.block = TransformerBlock(cfg, layer_index, ctx)
        self.shared_head = SharedHeadNorm(cfg, ctx)

    def forward(self, previous_hidden: torch.Tensor, next_token_embedding: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Returns h^k (before the head); the caller applies `shared_head.norm` and the shared head."""
        combined = torch.cat((self.enorm(next_token_embedding), self.hnorm(previous_hidden)), dim=-1)
        return self.block(self.eh_proj(combined), cos, sin)

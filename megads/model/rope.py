"""Rotary position embedding with YaRN context extension, as DeepSeek-V2/V3 use it.

MLA applies RoPE only to the decoupled rope part of queries and to the one shared rope key
(`qk_rope_head_dim` dims). YaRN (Peng et al. 2023) interpolates the low frequencies by `factor`,
keeps the high ones, and blends in between over the dimensions whose wavelength falls between
`beta_fast` and `beta_slow` rotations of the original context. DeepSeek's variant adds two
magnitudes ("mscale"):

- cos/sin are multiplied by  m(factor, mscale) / m(factor, mscale_all_dim)  (1 for DeepSeek-V3,
  whose config sets both to 1), and
- the softmax scale is multiplied by  m(factor, mscale_all_dim)^2,

where m(s, a) = 0.1 a ln(s) + 1 for s > 1 (else 1).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, original_len: int,
                           truncate: bool) -> tuple[float, float]:
    """The band of rotary dims (pair indices) between full extrapolation and full interpolation."""

    def dim_for_rotations(num_rotations: float) -> float:
        return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(dim: int, theta: float, rope_scaling: Optional[dict]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin magnitude for RoPE (optionally YaRN-scaled)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (theta ** exponents)
    if not rope_scaling:
        return inv_freq, 1.0
    factor = float(rope_scaling["factor"])
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1
    low, high = _yarn_correction_range(beta_fast, beta_slow, dim, theta,
                                       rope_scaling["original_max_position_embeddings"],
                                       rope_scaling.get("truncate", True))
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    if rope_scaling.get("attention_factor") is not None:
        magnitude = float(rope_scaling["attention_factor"])
    elif rope_scaling.get("mscale") and rope_scaling.get("mscale_all_dim"):
        magnitude = yarn_mscale(factor, rope_scaling["mscale"]) / yarn_mscale(factor, rope_scaling["mscale_all_dim"])
    else:
        magnitude = yarn_mscale(factor)
    return inv_freq, magnitude


def softmax_scale(qk_head_dim: int, rope_scaling: Optional[dict]) -> float:
    """1/sqrt(d_qk), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = qk_head_dim ** -0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rope_scaling["factor"]), rope_scaling["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, and their application to rope dims.

    With `interleave` (DeepSeek's weight layout) the rotated pairs are (x0, x1), (x2, x3), ...;
    the result is returned de-interleaved (all pair-firsts, then all pair-seconds), which changes
    nothing for q.k as long as queries and keys get the same layout, and saves a copy.
    Without it, the pairs are (x_i, x_{i+d/2}) as in GPT-NeoX / Llama.
    """

    def __init__(self, dim: int, theta: float, rope_scaling: Optional[dict], interleave: bool):
        super().__init__()
        inv_freq, magnitude = rope_frequencies(dim, theta, rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.magnitude = magnitude
        self.interleave = interleave

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] or [B, S] -> cos, sin of shape [..., S, dim/2] (FP32)."""
        angles = positions[..., None].float() * self.inv_freq
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, heads, dim]; cos/sin [S, dim/2] or [B, S, dim/2]."""
        cos = cos.unsqueeze(-2).to(x.dtype)
        sin = sin.unsqueeze(-2).to(x.dtype)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

"""FP8 expert dispatch: quantize tokens before the all-to-all, dequantize after it.

DeepSeek-V3 sends the MoE up-projection inputs across the expert-parallel all-to-all in FP8, with
1x128 tile scales that are powers of two. A power-of-two scale is exactly an E8M0 byte (its FP32
exponent field), so a token of hidden size H travels as H code bytes plus ceil(H/128) scale bytes,
about a quarter of its FP32 size, and ``pack_for_dispatch`` lays both out in one uint8 row per
token so that a single ``all_to_all_single`` over rows (uneven splits allowed) moves them.

Dequantization is exact (code * 2^e), and quantizing the dequantized tokens again with
power-of-two 1x128 scales gives back the same values: the expert GEMM may re-quantize them
without any further loss. A non-finite tile travels as NaN scale byte 0xFF and dequantizes to NaN.
"""

from __future__ import annotations

import torch

from megads.fp8.format import E4M3
from megads.fp8.quantize import BLOCK, DEFAULT_EPS, ceil_div, quantize_tiles
from megads.fp8.stats import Fp8Stats

_E8M0_NAN = 0xFF


def scale_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two FP32 scales -> E8M0 bytes (the FP32 exponent field; NaN -> 0xFF)."""
    bits = scale.float().contiguous().view(torch.int32)
    e = (bits >> 23) & 0xFF
    return torch.where(torch.isnan(scale), torch.full_like(e, _E8M0_NAN), e).to(torch.uint8)


def e8m0_to_scale(e: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> FP32 powers of two 2^(e - 127) (0xFF -> NaN)."""
    ei = e.to(torch.int32)
    s = (ei << 23).view(torch.float32)
    return torch.where(ei == _E8M0_NAN, torch.full_like(s, float("nan")), s)


def quantize_for_dispatch(x: torch.Tensor, *, eps: float = DEFAULT_EPS,
                          stats: Fp8Stats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (codes uint8 [T, H], scale exponents uint8 [T, ceil(H/128)]); ``stats`` counts the tiles."""
    q = quantize_tiles(x, pow2=True, eps=eps)
    if stats is not None:
        stats.record(q)
    return q.data.view(torch.uint8), scale_to_e8m0(q.scale)


def dequantize_after_dispatch(codes: torch.Tensor, scale_e8m0: torch.Tensor,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_for_dispatch: [T, H] values code * 2^(e - 127)."""
    T, H = codes.shape
    kb = ceil_div(H, BLOCK)
    vals = torch.nn.functional.pad(codes.view(E4M3).float(), (0, kb * BLOCK - H)).view(T, kb, BLOCK)
    out = (vals * e8m0_to_scale(scale_e8m0).unsqueeze(-1)).view(T, kb * BLOCK)[:, :H]
    return out.to(dtype)


def pack_for_dispatch(x: torch.Tensor, *, eps: float = DEFAULT_EPS, stats: Fp8Stats | None = None) -> torch.Tensor:
    """x [T, H] -> one uint8 row per token: H code bytes, then ceil(H/128) scale bytes."""
    codes, exps = quantize_for_dispatch(x, eps=eps, stats=stats)
    return torch.cat([codes, exps], dim=1)


def unpack_after_dispatch(buf: torch.Tensor, hidden: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of pack_for_dispatch for rows of a token of size ``hidden``."""
    return dequantize_after_dispatch(buf[:, :hidden], buf[:, hidden:], dtype)


def dispatch_row_bytes(hidden: int) -> int:
    """Bytes per token row of pack_for_dispatch: H codes + ceil(H/128) E8M0 scales (FP32 takes 4H)."""
    return hidden + ceil_div(hidden, BLOCK)


class Fp8DispatchCodec:
    """The FP8 dispatch as a parallel.expert.TokenCodec: pack_for_dispatch / unpack_after_dispatch.

    Given to a token dispatcher (``dispatcher.codec``; megads.fp8.convert_to_fp8 does it when
    ``Fp8Config.dispatch`` is set), the forward expert dispatch sends one uint8 row per token.
    ``stats`` (an Fp8Stats, optional) counts the tiles quantized and any inf/NaN met, so that a
    non-finite token is reported like one met by an FP8 layer; convert_to_fp8 passes the routed
    experts' own stats, since these are the tokens their up-projection consumes. The scales are
    always powers of two (E8M0 holds nothing else), whatever Fp8Config.pow2_scales says.
    """

    def __init__(self, eps: float = DEFAULT_EPS, stats: Fp8Stats | None = None):
        self.eps = eps
        self.stats = stats

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return pack_for_dispatch(tokens, eps=self.eps, stats=self.stats)

    def decode(self, rows: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        return unpack_after_dispatch(rows, hidden, dtype)

    def __repr__(self) -> str:
        return f"Fp8DispatchCodec(eps={self.eps:g})"

"""Fine-grained online quantization to E4M3 (DeepSeek-V3 report, section 3.3.2).

Two tile shapes, both along the GEMM's inner (contraction) dimension K:

* activations and activation gradients: one scale per **1x128 tile** (one row, 128 consecutive
  elements of K), so an outlier token only coarsens its own tiles;
* weights: one scale per **128x128 block**, so the transposed weight of the input-gradient GEMM
  reuses the same codes and scales: the blocks transpose exactly.

Scale (the *dequantization* factor, x ~= code * s):

    s = max(amax, eps) / 448                                 (FP32 division)

so each tile's largest magnitude maps to +-448. With ``pow2=True`` s is rounded *up* to a power of
two by bit operations on its FP32 pattern (clear the mantissa, bump the exponent if any mantissa
bit was set): then s/2 < amax/448 <= s, dequantization is exact, and re-quantizing a dequantized
tensor gives back the same values. (torch's cast to ``float8_e8m0fnu`` rounds to nearest, which
would push the tile maximum past 448.) The FP32 quotient amax/448 never rounds down onto a power
of two (the smallest possible excess over 2^k is 0.57 ulp), so the bit rounding gives exactly the
smallest power of two >= the real amax/448.

Codes are ``to_e4m3(x / s)``: an FP32 division, then the explicitly clamped cast. ``eps`` keeps an
all-zero tile's scale finite (its codes are then zero); ``eps`` = 1e-12 is small enough that a
gradient tile of magnitude 1e-8 still uses the full E4M3 range.

Ragged shapes: K (and for weights N) are zero padded to a multiple of 128 for the amax reduction
only; codes keep the logical shape. A padded zero never raises a tile's amax.

Non-finite input: a tile whose amax is inf or NaN gets a NaN scale, so its codes and its
dequantized values are NaN and whatever it feeds turns NaN instead of silently saturating to
+-448; and ``Fp8Tensor.nonfinite`` (a 0-dim bool tensor, no host sync) records the detection for
the trainer to skip and report the step.

One canonical scale layout: FP32 ``[rows, ceil(K/128)]`` for 1x128 tiles (rows = all leading
dimensions flattened), ``[..., ceil(N/128), ceil(K/128)]`` for 128x128 blocks, row-major. Backends
convert it to their own layout at their edge (megads.fp8.backends).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megads.fp8.format import E4M3_MAX, to_e4m3

BLOCK = 128
DEFAULT_EPS = 1e-12

TILE_1x128 = (1, BLOCK)
BLOCK_128x128 = (BLOCK, BLOCK)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s, for positive normal FP32 s, by bit operations.

    A positive normal FP32 number is 2^(e-127) * (1 + m/2^23); it is a power of two iff m = 0.
    Otherwise adding 1 to the exponent field and clearing m gives the next power of two up.
    Non-finite values (inf, NaN) pass through unchanged.
    """
    bits = s.float().contiguous().view(torch.int32)
    exp_field = bits & 0x7F800000
    has_mantissa = (bits & 0x007FFFFF) != 0
    up = torch.where(has_mantissa, exp_field + 0x00800000, exp_field).view(torch.float32)
    return torch.where(torch.isfinite(s), up, s.float())


def compute_scale(amax: torch.Tensor, *, pow2: bool = False, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Dequantization scale max(amax, eps) / 448 in FP32, optionally rounded up to a power of two.

    NaN amax stays NaN (torch's clamp propagates NaN); inf amax becomes a NaN scale too, so that a
    non-finite tile dequantizes to NaN rather than to finite garbage.
    """
    a = amax.float()
    s = a.clamp_min(eps) / E4M3_MAX
    if pow2:
        s = round_up_pow2(s)
    return torch.where(torch.isfinite(a), s, torch.full_like(s, float("nan")))


@dataclass
class Fp8Tensor:
    """E4M3 codes with their FP32 scales in the canonical layout.

    data:  ``float8_e4m3fn`` [rows, K] for 1x128 tiles, [..., N, K] for 128x128 blocks.
    scale: FP32 [rows, ceil(K/128)] or [..., ceil(N/128), ceil(K/128)].
    block: (1, 128) or (128, 128).
    nonfinite: 0-dim bool tensor, True if an input tile held inf or NaN.
    clamped: 0-dim int64 tensor, the number of tiles whose amax fell below eps (all-zero tiles).
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    nonfinite: torch.Tensor | None = None
    clamped: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def num_tiles(self) -> int:
        return self.scale.numel()

    def dequantize(self) -> torch.Tensor:
        """FP32 values code * scale (one FP32 multiplication per element; exact for pow2 scales)."""
        if self.block == TILE_1x128:
            return _dequantize_tiles(self.data, self.scale)
        return _dequantize_blocks(self.data, self.scale)

    def t(self) -> "Fp8Tensor":
        """Transpose of a 128x128-block tensor: codes and scale grid both transposed, exactly.

        A 1x128 tensor cannot be transposed this way (its tiles would become 128x1); re-quantize
        the high-precision source along the other axis instead.
        """
        if self.block != BLOCK_128x128:
            raise ValueError("only 128x128-block tensors transpose exactly; re-quantize 1x128 tensors")
        return Fp8Tensor(self.data.transpose(-2, -1).contiguous(), self.scale.transpose(-2, -1).contiguous(),
                         self.block, self.nonfinite, self.clamped)

    def rows(self, start: int, end: int) -> "Fp8Tensor":
        """Rows [start, end) of a 1x128 tensor (its tiles never span rows, so this is a plain slice)."""
        if self.block != TILE_1x128:
            raise ValueError("row slices are defined for 1x128 tiles only")
        return Fp8Tensor(self.data[start:end], self.scale[start:end], self.block, self.nonfinite, self.clamped)

    def __getitem__(self, index: int) -> "Fp8Tensor":
        """One matrix of a stacked [E, N, K] block tensor (e.g. one expert's weight)."""
        if self.block != BLOCK_128x128 or self.data.dim() < 3:
            raise ValueError("indexing selects one matrix of a stacked 128x128-block tensor")
        return Fp8Tensor(self.data[index], self.scale[index], self.block, self.nonfinite, self.clamped)


def _pad_last(x: torch.Tensor, multiple: int, dim: int = -1) -> torch.Tensor:
    size = x.shape[dim]
    pad = ceil_div(size, multiple) * multiple - size
    if pad == 0:
        return x
    pads = [0, 0] * (x.dim() - (dim % x.dim()) - 1) + [0, pad]
    return F.pad(x, pads)


def quantize_tiles(x: torch.Tensor, *, pow2: bool = False, eps: float = DEFAULT_EPS) -> Fp8Tensor:
    """Quantize x [..., K] per 1x128 tile along its last dimension; returns [rows, K] codes.

    Leading dimensions are flattened into rows. K need not be a multiple of 128: the last tile of
    each row is zero padded for the amax only.
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    rows = x2.shape[0]
    kb = ceil_div(K, BLOCK)
    xp = _pad_last(x2, BLOCK).view(rows, kb, BLOCK)
    amax = xp.abs().amax(dim=-1)                     # NaN propagates through amax
    scale = compute_scale(amax, pow2=pow2, eps=eps)
    codes = to_e4m3(xp / scale.unsqueeze(-1)).view(rows, kb * BLOCK)[:, :K]
    return Fp8Tensor(codes.contiguous(), scale, TILE_1x128,
                     nonfinite=(~torch.isfinite(amax)).any(), clamped=(amax < eps).sum())


def quantize_blocks(w: torch.Tensor, *, pow2: bool = False, eps: float = DEFAULT_EPS) -> Fp8Tensor:
    """Quantize w [..., N, K] per 128x128 block (leading dimensions: a stack, e.g. experts)."""
    *lead, N, K = w.shape
    w3 = w.reshape(-1, N, K)
    if w3.dtype != torch.float32:
        w3 = w3.float()
    nb, kb = ceil_div(N, BLOCK), ceil_div(K, BLOCK)
    wp = _pad_last(_pad_last(w3, BLOCK, -1), BLOCK, -2).view(-1, nb, BLOCK, kb, BLOCK)
    amax = wp.abs().amax(dim=(2, 4))                 # [E, nb, kb]
    scale = compute_scale(amax, pow2=pow2, eps=eps)
    codes = to_e4m3(wp / scale[:, :, None, :, None]).view(-1, nb * BLOCK, kb * BLOCK)[:, :N, :K]
    return Fp8Tensor(codes.reshape(*lead, N, K).contiguous(), scale.reshape(*lead, nb, kb), BLOCK_128x128,
                     nonfinite=(~torch.isfinite(amax)).any(), clamped=(amax < eps).sum())


def _dequantize_tiles(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, K = codes.shape
    kb = scale.shape[-1]
    v = _pad_last(codes.float(), BLOCK).view(rows, kb, BLOCK) * scale.unsqueeze(-1)
    return v.view(rows, kb * BLOCK)[:, :K]


def _dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    *lead, N, K = codes.shape
    nb, kb = scale.shape[-2:]
    c = _pad_last(_pad_last(codes.reshape(-1, N, K).float(), BLOCK, -1), BLOCK, -2)
    v = c.view(-1, nb, BLOCK, kb, BLOCK) * scale.reshape(-1, nb, 1, kb, 1)
    return v.view(-1, nb * BLOCK, kb * BLOCK)[:, :N, :K].reshape(*lead, N, K)


def expand_tile_scales(scale: torch.Tensor, K: int) -> torch.Tensor:
    """Per-element view of 1x128 scales: [rows, kb] -> [rows, K] (for references and tests)."""
    return scale.repeat_interleave(BLOCK, dim=-1)[..., :K]

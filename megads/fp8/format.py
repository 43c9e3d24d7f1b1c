"""The E4M3 format (``torch.float8_e4m3fn``): constants, the saturating cast, code tables.

E4M3 has 1 sign bit, 4 exponent bits (bias 7) and 3 mantissa bits. The ``fn`` variant has no
infinities: the only special codes are the two NaNs 0x7F and 0xFF (exponent and mantissa all ones).
So the largest finite value is 1.75 * 2^8 = 448, the smallest normal 2^-6 and the smallest
subnormal 2^-9. Every FP8 operand in megads is E4M3, forward and backward (DeepSeek-V3 uses no
E5M2: its fine-grained scaling keeps gradients inside E4M3's range).

A cast of an FP32 value above 448 to ``float8_e4m3fn`` is *not* portable: depending on the torch
version and device it saturates to 448 or produces NaN (there is no infinity to round to), and
values in [464, 480) round down to 448 while [480, inf) have nowhere to go. So every cast here
clamps to [-448, 448] first; then the cast only ever rounds a value inside the format's range
(round to nearest, ties to even), and inf maps to +-448. NaN passes through the clamp and stays NaN.
"""

from __future__ import annotations

import functools

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_EMIN = -6                  # exponent of the smallest normal number
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_MIN_SUBNORMAL = 2.0 ** -9
E4M3_MANTISSA_BITS = 3
E4M3_NAN_CODES = (0x7F, 0xFF)

# Exponent given to zero in the exponent tables: far below any real exponent, so that a sum of two
# of them stays far below too and a zero product never wins a block maximum (int16 safe).
ZERO_EXPONENT = -1000


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast to ``float8_e4m3fn``.

    Values are clamped to [-448, 448] in FP32 before the cast (torch versions differ in what an
    out-of-range cast gives), so 448, 479.99, 1e4 and inf all become 448; NaN stays NaN.
    """
    x = x.float() if x.dtype != torch.float32 else x
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def all_codes() -> torch.Tensor:
    """The 256 E4M3 bit patterns as a uint8 tensor, in code order."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8)


def finite_codes() -> torch.Tensor:
    """The 254 finite E4M3 bit patterns (every code but the two NaNs), uint8."""
    codes = all_codes()
    return codes[(codes & 0x7F) != 0x7F]


def decode(codes: torch.Tensor) -> torch.Tensor:
    """FP32 value of each E4M3 bit pattern (uint8 tensor), computed from the bits.

    Independent of torch's own float8 conversion, so tests can check that conversion against it:
    exponent field 0 is subnormal (m * 2^-9), otherwise (8 + m) * 2^(e - 10); 0x7F/0xFF are NaN.
    """
    c = codes.to(torch.int32)
    sign = torch.where((c & 0x80) != 0, -1.0, 1.0)
    e = (c >> 3) & 0xF
    m = (c & 0x7).float()
    sub = m * 2.0 ** -9
    norm = (8.0 + m) * torch.exp2((e - 10).float())
    v = sign * torch.where(e == 0, sub, norm)
    return torch.where((c & 0x7F) == 0x7F, torch.full_like(v, float("nan")), v)


def exponent_table() -> torch.Tensor:
    """int16 table over the 256 codes: floor(log2|v|) clamped below at emin = -6.

    This is the exponent a tensor core uses to align a product: a subnormal input counts with the
    exponent -6 and a denormalised significand. Zero codes get ``ZERO_EXPONENT`` (excluded from
    every block maximum). NaN codes get the exponent of their bit pattern (never used: non-finite
    inputs are detected before any GEMM and refused by the hopper model).
    """
    c = all_codes().to(torch.int32)
    e = (c >> 3) & 0xF
    m = c & 0x7
    exp = torch.where(e == 0, torch.full_like(e, E4M3_EMIN), e - 7)
    exp = torch.where((e == 0) & (m == 0), torch.full_like(e, ZERO_EXPONENT), exp)
    return exp.to(torch.int16)


def code_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32 [256], exponents int16 [256]) on ``device``, cached."""
    return _code_tables(str(device))


@functools.lru_cache(maxsize=None)
def _code_tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return decode(all_codes()).to(device), exponent_table().to(device)

"""Accumulation models of an FP8 GEMM: Hopper's limited-precision tensor-core chain, FP32 promotion.

**The tensor-core chain** (Hopper FP8 WGMMA, as cuBLAS's FP8 kernels use it; the ``hopper``
preset of Khattak & Mikaitis' model, validated bit for bit on an H100 by mmaemu). A dot product
over K is evaluated 32 products at a time, feeding the result back as the accumulator c:

    E   = max(max_i (e(a_i) + e(b_i)), e(c))         the block's alignment exponent
    d   = trunc(c * 2^(13-E)) + sum_i trunc(a_i b_i * 2^(13-E))      exact integer sum
    acc = trunc_13(d * 2^(E-13))                      keep 13 fraction bits of the result

* e(v) = floor(log2|v|), with E4M3 inputs clamped below at -6 (a subnormal input keeps a
  denormalised significand); zero products and a zero accumulator take no part in the maximum;
* every product and the accumulator itself are aligned to 2^E and truncated toward zero to 13
  fraction bits below it: bits of small terms next to a large one are simply lost;
* the block's sum is truncated toward zero to 13 fraction bits of its own exponent;
* a zero result is +0.

Because the accumulator takes part in the alignment, once it is large every new product is
truncated on its grid: about 14 bits survive, and a long chain of same-signed products loses
a growing fraction of each (K = 4096: errors of order 1e-2; DeepSeek-V3 reports up to ~2%).

**Promotion** (DeepSeek-V3 section 3.3.2, DeepGEMM): the chain is restarted every
``promote_every`` (default 128) elements of K, and each partial sum is promoted to FP32 with its
scales by CUDA-core FMAs:

    y = fma(acc * s_a, s_b, y)                       (FP32, one rounding in the fma)

Every chain covers at most one 128-wide scale block, so the scales factor out of it exactly.

Implementation. Products of two E4M3 values have at most 8 significant bits and lie in
[2^-18, 2^18): exact in FP32. Truncating p * 2^(13-E) is one exact division by a power of two and
a truncation; each term is below 2^15 and a block's sum below 2^21, so FP32 sums of these
integers are exact in any order. The result's truncation to 13 fraction bits is a mask on its
FP32 mantissa (every nonzero value here is a normal FP32 number: multiples of 2^-53 or more).
All chains of a GEMM run at once, vectorised over (M, N, chain); the loop is over the
``promote_every / 32`` blocks of one chain, so promoted GEMMs with large K stay fast.
"""

from __future__ import annotations

import torch

from megads.fp8.format import E4M3, code_tables

HOPPER_BLOCK = 32          # products aligned together (one block FMA step)
HOPPER_FRAC_BITS = 13      # fraction bits kept below the block's alignment exponent
DEFAULT_PROMOTE_EVERY = 128

# Floor of the alignment exponent. The smallest nonzero term is a product of two subnormals
# (exponent sum -12), and every accumulator value is a multiple of 2^(-12-13); with E floored at
# -40 the grid 2^(E-13) stays a normal FP32 number and no nonzero result is affected.
_E_FLOOR = -40
_MASK_13 = ~((1 << (23 - HOPPER_FRAC_BITS)) - 1)     # clears the 10 low mantissa bits
_TARGET_ELEMENTS = 1 << 22                            # products materialised per slab of chains


def _pow2_from_exponent(e: torch.Tensor) -> torch.Tensor:
    """2^e as FP32 for integer e in the normal range, built from the bit pattern (exact)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def _fp32_exponent(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of normal FP32 x from its exponent bits; a very negative number for zero."""
    e = ((x.view(torch.int32) >> 23) & 0xFF) - 127
    return torch.where(x == 0, torch.full_like(e, -10000), e)


def _chain_blocks(pa: torch.Tensor, ea: torch.Tensor, pb: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """Run chains over their blocks. pa/ea: [M, C, nblk, 32] values/exponents of a; pb/eb: [N, C, nblk, 32].

    Returns the FP32 chain results [M, N, C], each chain started from +0.
    """
    M, C, nblk, _ = pa.shape
    N = pb.shape[0]
    acc = torch.zeros(M, N, C, dtype=torch.float32, device=pa.device)
    for j in range(nblk):
        a_j, b_j = pa[:, None, :, j, :], pb[None, :, :, j, :]        # [M,1,C,32], [1,N,C,32]
        prod = a_j * b_j                                             # exact in FP32
        e_prod = (ea[:, None, :, j, :] + eb[None, :, :, j, :]).amax(dim=-1).to(torch.int32)
        E = torch.maximum(e_prod, _fp32_exponent(acc)).clamp_min(_E_FLOOR)
        grid = _pow2_from_exponent(E - HOPPER_FRAC_BITS)             # 2^(E-13)
        terms = torch.div(prod, grid.unsqueeze(-1), rounding_mode="trunc").sum(dim=-1)
        total = terms + torch.div(acc, grid, rounding_mode="trunc")  # exact integers < 2^21
        d = total * grid                                             # exact: power-of-two scaling
        acc = (d.view(torch.int32) & _MASK_13).view(torch.float32) + 0.0   # trunc to 13 bits; -0 -> +0
    return acc


def hopper_chains(a: torch.Tensor, b: torch.Tensor, chain_len: int | None) -> torch.Tensor:
    """Tensor-core chain results of a [M, K] x b [N, K]^T (E4M3 codes), restarted every chain_len.

    Returns FP32 [M, N, C] with C = ceil(K / chain_len) (C = 1 when chain_len is None): chain c
    covers K-elements [c*chain_len, (c+1)*chain_len). chain_len must be a multiple of 32. K is
    zero padded to whole blocks, which changes nothing (zero products are excluded from the
    alignment and add zero). Inputs must be finite (the model does not propagate NaN/inf).
    """
    if a.dtype != E4M3 or b.dtype != E4M3:
        raise TypeError("hopper_chains takes float8_e4m3fn codes")
    M, K = a.shape
    N, K2 = b.shape
    if K != K2:
        raise ValueError(f"K mismatch: {tuple(a.shape)} x {tuple(b.shape)}")
    if chain_len is None:
        chain_len = -(-K // HOPPER_BLOCK) * HOPPER_BLOCK
    if chain_len <= 0 or chain_len % HOPPER_BLOCK:
        raise ValueError(f"chain length must be a positive multiple of {HOPPER_BLOCK}, got {chain_len}")
    C = -(-K // chain_len)
    Kp = C * chain_len
    values, exponents = code_tables(a.device)
    ia = torch.nn.functional.pad(a.view(torch.uint8), (0, Kp - K)).long()
    ib = torch.nn.functional.pad(b.view(torch.uint8), (0, Kp - K)).long()
    nblk = chain_len // HOPPER_BLOCK
    pa, ea = values[ia].view(M, C, nblk, HOPPER_BLOCK), exponents[ia].view(M, C, nblk, HOPPER_BLOCK)
    pb, eb = values[ib].view(N, C, nblk, HOPPER_BLOCK), exponents[ib].view(N, C, nblk, HOPPER_BLOCK)
    # Slabs of chains keep the [M, N, C, 32] temporaries bounded.
    per_chain = max(1, M * N * HOPPER_BLOCK)
    step = max(1, _TARGET_ELEMENTS // per_chain)
    out = [_chain_blocks(pa[:, c:c + step], ea[:, c:c + step], pb[:, c:c + step], eb[:, c:c + step])
           for c in range(0, C, step)]
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Correctly rounded FP32 fused multiply-add a * b + c (one rounding), on any device.

    a * b of two FP32 numbers is exact in FP64 (48 significant bits). The FP64 sum s = p + c is
    rounded, so it is corrected to *round-to-odd* with the exact TwoSum error (nudged one FP64 ulp
    toward the error when it is nonzero and s is even); an FP64 value rounded to odd and then to
    FP32 (53 >= 24 + 2 bits) is the correctly rounded FP32 result, with no double rounding.
    """
    p = a.double() * b.double()
    c64 = c.double()
    s = p + c64
    p_virtual = s - c64                           # TwoSum (Knuth): err = (p + c) - s exactly
    c_virtual = s - p_virtual
    err = (p - p_virtual) + (c64 - c_virtual)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where((err != 0) & even & torch.isfinite(s), torch.nextafter(s, toward), s)
    return s.float()


def promote(chains: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """FP32 promotion y = fma(acc_c * s_a[c], s_b[c], y) over chains c in order, y starting at +0.

    chains [M, N, C]; scale_a [M, C]; scale_b [N, C] (the scales of each chain's K-range).
    """
    M, N, C = chains.shape
    y = torch.zeros(M, N, dtype=torch.float32, device=chains.device)
    for c in range(C):
        y = fma_f32(chains[:, :, c] * scale_a[:, c:c + 1], scale_b[None, :, c], y)
    return y

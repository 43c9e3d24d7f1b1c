"""Accumulation models (megads.fp8.accumulate, megads.fp8.gemm's emulated backend).

The independent reference for Hopper's FP8 accumulation chain is mmaemu (PyPI, 0.1.0): its
``accumulate(a, b, use_fast_accum=True, profile="hopper-ws0")`` returns the FP32 accumulator of one
tensor-core chain over all of K as cuBLAS computes it on an H100 PCIe (fast accumulation: one
chain; workspace 0: never split-K). Composed per 128-element K-block with the FP32 promotion
y = fma(acc * s_a, s_b, y), computed here exactly with fractions, it must equal megads' hopper
model bit for bit.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch

from megads.fp8.accumulate import fma_f32, hopper_chains
from megads.fp8.format import to_e4m3
from megads.fp8.gemm import EmulatedBackend, fp8_gemm, fp8_grouped_gemm, hopper_gemm
from megads.fp8.quantize import TILE_1x128, Fp8Tensor, quantize_blocks, quantize_tiles

import mmaemu  # the independent Hopper reference: a test extra (setup.py), required, never skipped



def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.float().contiguous().view(torch.int32), b.float().contiguous().view(torch.int32))


def round_f32(q: Fraction) -> np.float32:
    """The FP32 number nearest to the rational q, ties to even (exact, by comparing candidates)."""
    f = np.float32(float(q))
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        d = abs(Fraction(float(c)) - q)
        even = (np.array(c).view(np.int32) & 1) == 0
        if best is None or d < best[0] or (d == best[0] and even):
            best = (d, c)
    return best[1]


def fma_exact(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded FP32 a * b + c, element by element, in rational arithmetic."""
    out = np.empty(a.shape, dtype=np.float32)
    for i, (x, y, z) in enumerate(zip(a.flat, b.flat, c.flat)):
        out.flat[i] = round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
    return out


def reference_gemm(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    """mmaemu's Hopper chain per 128-block of K, promoted with an exact FP32 fma."""
    M, K = a.shape
    sb = b.scale if b.block == TILE_1x128 else b.scale.repeat_interleave(128, dim=0)[: b.shape[0]]
    y = np.zeros((M, b.shape[0]), dtype=np.float32)
    for kb, k0 in enumerate(range(0, K, 128)):
        acc = mmaemu.accumulate(a.data[:, k0:k0 + 128].contiguous(), b.data[:, k0:k0 + 128].contiguous(),
                                use_fast_accum=True, profile="hopper-ws0")
        scaled = (acc * a.scale[:, kb:kb + 1]).numpy()            # FP32 multiply
        y = fma_exact(scaled, np.broadcast_to(sb[:, kb].numpy()[None, :], scaled.shape), y)
    return torch.from_numpy(y)


def outlier_tiles(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows with a few huge entries: the rest of an outlier's tile lands in E4M3's
    subnormal range or flushes to zero, and products span the full exponent range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    idx = torch.randint(0, rows * cols, (rows * cols // 50,), generator=g)
    x.view(-1)[idx] *= 1e4
    x[0, :] *= 1e-3
    return x


# ---------------------------------------------------------------------------------------------
# bit-exact against mmaemu


@pytest.mark.parametrize("case", ["random", "outliers", "ragged", "token-axis"])
def test_hopper_model_is_bitwise_mmaemu(case):
    g = torch.Generator().manual_seed(7)
    if case == "random":
        a, b = quantize_tiles(torch.randn(16, 512, generator=g)), quantize_blocks(torch.randn(24, 512, generator=g))
    elif case == "outliers":
        a, b = quantize_tiles(outlier_tiles(16, 512, 1)), quantize_blocks(outlier_tiles(24, 512, 2))
    elif case == "ragged":                                         # K = 300: the last block is 44 wide
        a, b = quantize_tiles(outlier_tiles(5, 300, 3)), quantize_blocks(torch.randn(7, 300, generator=g))
    else:                                                          # 1x128 x 1x128, pow2 scales
        a = quantize_tiles(torch.randn(12, 384, generator=g), pow2=True)
        b = quantize_tiles(outlier_tiles(10, 384, 4), pow2=True)
    ours = hopper_gemm(a, b, promote_every=128)
    assert same_bits(ours, reference_gemm(a, b))
    # and the chains themselves, before promotion
    chains = hopper_chains(a.data, b.data, 128)
    for c, k0 in enumerate(range(0, a.shape[1], 128)):
        ref = mmaemu.accumulate(a.data[:, k0:k0 + 128].contiguous(), b.data[:, k0:k0 + 128].contiguous(),
                                use_fast_accum=True, profile="hopper-ws0")
        assert same_bits(chains[..., c], ref)


def test_one_chain_without_promotion_is_bitwise_mmaemu():
    a = to_e4m3(outlier_tiles(8, 1024, 5) * 10)
    b = to_e4m3(torch.rand(9, 1024) * 400)
    ref = mmaemu.accumulate(a, b, use_fast_accum=True, profile="hopper-ws0")
    assert same_bits(hopper_chains(a, b, None)[..., 0], ref)


# ---------------------------------------------------------------------------------------------
# hand vectors


def test_hand_vectors_448_plus_255_times_2_to_minus_6():
    """a = [448, then 255 copies of 2^-6] (K = 256, all exact E4M3 values), b = 1, scales 1.

    Exact sum: 448 + 255 * 2^-6 = 451.984375.
    One chain: the first block is aligned to 448's exponent (8), so 2^-6 falls below the 13
    fraction bits kept (grid 2^-5) and truncates to zero; from then on the accumulator (448)
    takes part in every alignment and each later 2^-6 is lost too: 448.0.
    Promotion every 128: the first chain gives 448; the second chain starts from +0 and adds
    its 128 copies of 2^-6 exactly (2.0); the FP32 promotion adds the two: 450.0.
    FP32 accumulation keeps everything: 451.984375.
    """
    av = torch.tensor([[448.0] + [2.0 ** -6] * 255])
    a = Fp8Tensor(to_e4m3(av), torch.ones(1, 2), TILE_1x128)
    b = Fp8Tensor(to_e4m3(torch.ones(1, 256)), torch.ones(1, 2), TILE_1x128)
    assert torch.equal(a.data.float(), av)                         # the inputs are exact codes
    assert hopper_gemm(a, b, promote_every=None).item() == 448.0
    assert hopper_gemm(a, b, promote_every=128).item() == 450.0
    assert fp8_gemm(a, b, accumulation="fp32").item() == 451.984375
    assert (av.double() @ torch.ones(256, 1, dtype=torch.float64)).item() == 451.984375
    # the independent reference agrees on both chain lengths
    assert mmaemu.accumulate(a.data, b.data, use_fast_accum=True, profile="hopper-ws0").item() == 448.0
    assert reference_gemm(a, b).item() == 450.0


# ---------------------------------------------------------------------------------------------
# promotion


@pytest.mark.parametrize("K", [512, 1024, 2048, 4096, 8192, 16384])
def test_promotion_every_128_keeps_error_below_1e_3(K):
    g = torch.Generator().manual_seed(K)
    a = quantize_tiles(torch.rand(32, K, generator=g), pow2=True)      # uniform positive: the worst case
    b = quantize_tiles(torch.rand(32, K, generator=g), pow2=True)
    ref = a.dequantize().double() @ b.dequantize().double().t()
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()   # noqa: E731
    assert err(hopper_gemm(a, b, promote_every=128)) <= 1e-3
    no_promotion = err(hopper_gemm(a, b, promote_every=None))
    if K >= 4096:
        assert no_promotion > 1e-3                                     # the same test must fail
    assert no_promotion > err(hopper_gemm(a, b, promote_every=128))


def test_promotion_also_holds_on_gaussian_inputs_with_fine_grained_scales():
    g = torch.Generator().manual_seed(11)
    a = quantize_tiles(outlier_tiles(24, 4096, 6))
    b = quantize_blocks(torch.randn(40, 4096, generator=g))
    ref = a.dequantize().double() @ b.dequantize().double().t()
    y = hopper_gemm(a, b)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-3
    with pytest.raises(ValueError, match="equal scales"):
        hopper_gemm(a, b, promote_every=None)        # chains spanning differently scaled blocks


def test_shorter_and_longer_chains():
    g = torch.Generator().manual_seed(12)
    a = quantize_tiles(torch.randn(6, 256, generator=g), pow2=True)
    b = quantize_tiles(torch.rand(5, 256, generator=g) * 0.9 + 0.1, pow2=True)
    chains = hopper_chains(a.data, b.data, 64)
    for c in range(4):
        k = slice(64 * c, 64 * (c + 1))
        ref = mmaemu.accumulate(a.data[:, k].contiguous(), b.data[:, k].contiguous(), use_fast_accum=True,
                                profile="hopper-ws0")
        assert same_bits(chains[..., c], ref)
    ref = a.dequantize().double() @ b.dequantize().double().t()
    for every in (32, 64, 128):
        assert ((hopper_gemm(a, b, every).double() - ref).norm() / ref.norm()) < 1e-3
    for every in (0, 48, 96, 160):
        with pytest.raises(ValueError, match="promote_every"):
            hopper_gemm(a, b, every)


def test_fma_is_correctly_rounded():
    # 1 + 2^-11 + 2^-24 is halfway between two FP32 numbers; + 2^-80 decides upward. A float64
    # sum followed by a cast rounds twice and lands on the even neighbour below.
    a = torch.tensor([1 + 2.0 ** -12])
    c = torch.tensor([2.0 ** -80])
    assert fma_f32(a, a, c).item() == 1 + 2.0 ** -11 + 2.0 ** -23
    assert (a.double() * a.double() + c.double()).float().item() == 1 + 2.0 ** -11
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2000, generator=g), torch.randn(2000, generator=g)
    z = torch.randn(2000, generator=g) * torch.exp2(torch.randint(-30, 30, (2000,), generator=g).float())
    assert same_bits(fma_f32(x, y, z), torch.from_numpy(fma_exact(x.numpy(), y.numpy(), z.numpy())))


# ---------------------------------------------------------------------------------------------
# the emulated backend


def test_fp32_accumulation_matches_float64():
    g = torch.Generator().manual_seed(5)
    a, b = quantize_tiles(torch.randn(20, 300, generator=g)), quantize_blocks(torch.randn(30, 300, generator=g))
    ref = a.dequantize().double() @ b.dequantize().double().t()
    y = fp8_gemm(a, b)
    assert y.dtype == torch.float32 and ((y.double() - ref).norm() / ref.norm()) < 1e-6
    assert fp8_gemm(a, b, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_grouped_gemm_equals_one_gemm_per_group():
    g = torch.Generator().manual_seed(6)
    sizes = [3, 0, 10, 5]
    a = quantize_tiles(torch.randn(18, 260, generator=g))
    w = quantize_blocks(torch.randn(4, 40, 260, generator=g))
    for backend in (EmulatedBackend("fp32"), EmulatedBackend("hopper")):
        y = fp8_grouped_gemm(a, w, sizes, backend=backend)
        start = 0
        for e, n in enumerate(sizes):
            if n:
                assert same_bits(y[start:start + n], backend.gemm(a.rows(start, start + n), w[e]))
            start += n


def test_hopper_gemm_poisons_nonfinite_rows():
    x = torch.randn(4, 256)
    x[2, 7] = float("inf")
    a, b = quantize_tiles(x), quantize_blocks(torch.randn(6, 256))
    y = hopper_gemm(a, b)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()
    assert torch.isnan(fp8_gemm(a, b)[2]).all()

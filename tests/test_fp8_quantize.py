"""E4M3 format and fine-grained quantization (megads.fp8.format, .quantize, .dispatch).

References here are written independently: per-tile Python loops, float64 arithmetic and
math.frexp; nothing but the function under test comes from megads.
"""

import math

import pytest
import torch

from megads.fp8.dispatch import (
    dequantize_after_dispatch,
    pack_for_dispatch,
    quantize_for_dispatch,
    unpack_after_dispatch,
)
from megads.fp8.format import E4M3, decode, finite_codes, to_e4m3
from megads.fp8.quantize import (
    BLOCK_128x128,
    DEFAULT_EPS,
    TILE_1x128,
    compute_scale,
    quantize_blocks,
    quantize_tiles,
    round_up_pow2,
)



def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


def varied(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values with magnitudes varying by orders of magnitude between rows and columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return x * torch.exp2(torch.randint(-20, 20, (rows, 1), generator=g).float()) \
        * torch.exp2(torch.randint(-3, 3, (1, cols), generator=g).float())


# ---------------------------------------------------------------------------------------------
# format


def test_every_finite_code_round_trips_bit_for_bit():
    codes = finite_codes()
    assert codes.numel() == 254
    values = codes.view(E4M3).float()
    # torch's own decoding agrees with decoding the bits by hand
    assert torch.equal(values, decode(codes))
    assert torch.equal(to_e4m3(values).view(torch.uint8), codes)      # -0 (0x80) included


def test_saturating_cast():
    x = torch.tensor([448.0, 479.99, 1e4, float("inf"), -448.0, -479.99, -1e4, float("-inf")])
    assert to_e4m3(x).float().tolist() == [448.0] * 4 + [-448.0] * 4
    assert torch.isnan(to_e4m3(torch.tensor([float("nan")])).float()).all()
    # inside the range the cast rounds to nearest, ties to even (the grid is 1/16 in [0.5, 1)):
    # 0.53125 lies halfway between 0.5 and 0.5625, 0.59375 between 0.5625 and 0.625
    assert to_e4m3(torch.tensor([0.53125, 0.59375, 0.59, 2.0 ** -10])).float().tolist() == [0.5, 0.625, 0.5625, 0.0]


# ---------------------------------------------------------------------------------------------
# scales


def test_scale_is_amax_over_448_within_one_ulp():
    x = varied(40, 300)
    q = quantize_tiles(x)
    for r in range(40):
        for t in range(3):
            amax = x[r, 128 * t:128 * (t + 1)].abs().max().double().item()
            s = q.scale[r, t]
            ulp = (torch.nextafter(s, torch.tensor(math.inf)) - s).item()
            assert abs(s.item() - amax / 448) <= ulp


def test_power_of_two_scales():
    x = varied(40, 300, seed=1)
    q = quantize_tiles(x, pow2=True)
    for r in range(40):
        for t in range(3):
            ratio = x[r, 128 * t:128 * (t + 1)].abs().max().double().item() / 448
            s = q.scale[r, t].item()
            mantissa, _ = math.frexp(s)
            assert mantissa == 0.5, s                                  # an exact power of two
            assert s / 2 < ratio <= s


def test_round_up_pow2_by_bits_is_not_round_to_nearest():
    s = torch.tensor([1.0, 1.4, 1.6, 3.0, 2.0 ** -30 * 1.0001, 2.0 ** 20 * 1.75, 7.5e-9])
    expected = [2.0 ** math.ceil(math.log2(v)) for v in s.double().tolist()]
    assert round_up_pow2(s).tolist() == expected
    # what a cast to float8_e8m0fnu would give (nearest): 1.4 -> 1 would push a tile past 448
    assert round_up_pow2(torch.tensor([1.4])).item() == 2.0
    assert torch.isnan(round_up_pow2(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("pow2", [False, True])
def test_tile_maximum_and_relative_error(pow2):
    x = varied(33, 300, seed=2)
    q = quantize_tiles(x, pow2=pow2)
    deq = q.dequantize()
    codes = q.data.float()
    for r in range(33):
        for t in range(3):
            sl = slice(128 * t, 128 * (t + 1))
            i = x[r, sl].abs().argmax()
            if pow2:
                assert 224 <= codes[r, sl][i].abs().item() <= 448
            else:
                assert codes[r, sl][i].abs().item() == 448.0           # each tile's max maps to +-448
    normal = (x / q.scale.repeat_interleave(128, dim=1)[:, :300]).abs() >= 2.0 ** -6
    err = (deq.double() - x.double()).abs()
    assert normal.float().mean() > 0.9
    assert (err[normal] <= 2.0 ** -4 * x.double().abs()[normal]).all()


def test_ragged_shapes_against_a_per_tile_loop():
    x = varied(5, 300, seed=3)
    q = quantize_tiles(x)
    assert q.block == TILE_1x128 and q.data.dtype == E4M3
    assert tuple(q.data.shape) == (5, 300) and tuple(q.scale.shape) == (5, 3)
    for r in range(5):
        for t, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
            tile = x[r, lo:hi]
            s = tile.abs().max() / 448
            assert q.scale[r, t] == s
            assert torch.equal(bits(q.data[r, lo:hi]), bits(to_e4m3(tile / s)))

    w = varied(200, 300, seed=4)
    qw = quantize_blocks(w)
    assert qw.block == BLOCK_128x128 and tuple(qw.scale.shape) == (2, 3)
    for i, (r0, r1) in enumerate([(0, 128), (128, 200)]):
        for j, (c0, c1) in enumerate([(0, 128), (128, 256), (256, 300)]):
            blk = w[r0:r1, c0:c1]
            s = blk.abs().max() / 448
            assert qw.scale[i, j] == s
            assert torch.equal(bits(qw.data[r0:r1, c0:c1]), bits(to_e4m3(blk / s)))
    assert torch.equal(qw.dequantize()[130:140, 260:270], qw.data[130:140, 260:270].float() * qw.scale[1, 2])


def test_canonical_layout_flattens_leading_dims():
    x = torch.randn(2, 3, 260)
    q = quantize_tiles(x)
    assert tuple(q.data.shape) == (6, 260) and tuple(q.scale.shape) == (6, 3) and q.scale.is_contiguous()
    w = torch.randn(4, 130, 260)
    stacked = quantize_blocks(w)                                 # e.g. one weight per expert
    assert tuple(stacked.scale.shape) == (4, 2, 3)
    single = quantize_blocks(w[2])
    assert torch.equal(bits(stacked[2].data), bits(single.data)) and torch.equal(stacked[2].scale, single.scale)


def test_weight_blocks_transpose_exactly():
    w = varied(200, 300, seed=5)
    for pow2 in (False, True):
        a, b = quantize_blocks(w, pow2=pow2).t(), quantize_blocks(w.t().contiguous(), pow2=pow2)
        assert torch.equal(bits(a.data), bits(b.data)) and torch.equal(a.scale, b.scale)
    with pytest.raises(ValueError):
        quantize_tiles(w).t()


def test_all_zero_tile_has_finite_scale_and_zero_codes():
    x = torch.randn(4, 384)
    x[1, 128:256] = 0
    x[3] = 0
    q = quantize_tiles(x)
    assert torch.isfinite(q.scale).all()
    assert q.scale[1, 1].item() == pytest.approx(DEFAULT_EPS / 448)
    assert (q.data[1, 128:256].float() == 0).all() and (q.data[3].float() == 0).all()
    assert (q.dequantize()[3] == 0).all()
    assert q.clamped.item() == 4 and not q.nonfinite.item()
    assert torch.isfinite(compute_scale(torch.zeros(3), pow2=True)).all()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input_is_detected(bad):
    x = torch.randn(3, 300)
    x[1, 200] = bad
    q = quantize_tiles(x)
    assert q.nonfinite.item() and q.nonfinite.dim() == 0
    deq = q.dequantize()
    assert torch.isnan(deq[1, 128:256]).all()                    # the whole tile, not a saturated 448
    assert torch.isfinite(deq[0]).all() and torch.isfinite(deq[1, :128]).all()
    assert not quantize_tiles(torch.randn(3, 300)).nonfinite.item()
    w = torch.randn(130, 140)
    w[129, 5] = bad
    assert quantize_blocks(w).nonfinite.item()


# ---------------------------------------------------------------------------------------------
# FP8 expert dispatch


def test_dispatch_round_trip_is_exact_and_idempotent():
    x = varied(50, 300, seed=6)
    buf = pack_for_dispatch(x)
    assert buf.dtype == torch.uint8 and tuple(buf.shape) == (50, 300 + 3)
    y = unpack_after_dispatch(buf, 300)
    assert torch.equal(y, quantize_tiles(x, pow2=True).dequantize())
    codes, exps = quantize_for_dispatch(x)
    assert torch.equal(dequantize_after_dispatch(codes, exps), y)
    assert (y.double() - x.double()).abs().max() <= (2.0 ** -4 * x.double().abs()).max()
    # quantizing the received tokens again (as the expert GEMM does) loses nothing more
    assert torch.equal(quantize_tiles(y, pow2=True).dequantize(), y)
    assert unpack_after_dispatch(buf, 300, torch.bfloat16).dtype == torch.bfloat16


def test_dispatch_carries_nonfinite_tiles_as_nan():
    x = torch.randn(2, 256)
    x[0, 3] = float("inf")
    y = unpack_after_dispatch(pack_for_dispatch(x), 256)
    assert torch.isnan(y[0, :128]).all() and torch.isfinite(y[0, 128:]).all() and torch.isfinite(y[1]).all()

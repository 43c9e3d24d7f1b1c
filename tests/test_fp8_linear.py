"""Fp8Linear, the expert-grouped FP8 linear, backend selection and non-finite detection.

Accuracy is measured against the unquantized FP32 layer with DeepGEMM's calc_diff,
1 - 2<x,y> / (|x|^2 + |y|^2), which is about half the squared relative error.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megads.fp8 import (
    Fp8BackendUnavailable,
    Fp8Config,
    Fp8Linear,
    Fp8Stats,
    backend_status,
    collect_stats,
    found_nonfinite,
    fp8_grouped_linear,
    get_backend,
    reset_stats,
)
from test_fp8_model import calc_diff



def inputs(kind: str, T: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    if kind == "outliers":                      # a few tokens three orders of magnitude larger
        x[::37] *= 1000.0
    return x


def run_both(fp8: nn.Module, ref: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = fp8(x1)
    y1.backward(dy)
    grads1 = [p.grad.clone() for p in fp8.parameters()]
    fp8.zero_grad()
    y2 = ref(x2)
    y2.backward(dy)
    grads2 = [p.grad.clone() for p in ref.parameters()]
    ref.zero_grad()
    return (y1, x1.grad, grads1), (y2, x2.grad, grads2)


@pytest.mark.parametrize("accumulation", ["fp32", "hopper"])
@pytest.mark.parametrize("kind", ["random", "outliers"])
def test_forward_and_all_gradients_within_1e_3(accumulation, kind):
    torch.manual_seed(0)
    ref = nn.Linear(320, 200)
    fp8 = Fp8Linear.from_linear(ref, Fp8Config(accumulation=accumulation))
    x = inputs(kind, 256, 320, seed=1)
    dy = torch.randn(256, 200, generator=torch.Generator().manual_seed(2))
    (y1, dx1, (dw1, db1)), (y2, dx2, (dw2, db2)) = run_both(fp8, ref, x, dy)
    for got, want in ((y1, y2), (dx1, dx2), (dw1, dw2), (db1, db2)):
        assert calc_diff(got, want) <= 1e-3
    assert fp8.fp8_stats.gemms == 3 and fp8.fp8_stats.nonfinite == 0


def test_cache_activations_saves_fp8_and_changes_no_number():
    torch.manual_seed(0)
    base = nn.Linear(256, 130, bias=False)
    x = torch.randn(3, 50, 256)
    dy = torch.randn(3, 50, 130)
    results = {}
    for cache in (True, False):
        layer = Fp8Linear.from_linear(base, Fp8Config(cache_activations=cache))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            xi = x.clone().requires_grad_()
            y = layer(xi)
        y.backward(dy)
        results[cache] = (y, xi.grad, base.weight.grad.clone())
        base.zero_grad()
        big_fp32 = [t for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()]
        if cache:
            assert not big_fp32                                       # no high-precision activation
            assert any(t.dtype == torch.float8_e4m3fn and t.numel() == x.numel() for t in saved)
        else:
            assert big_fp32
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


def test_drop_in_for_nn_linear():
    torch.manual_seed(0)
    layer = Fp8Linear(64, 48, bias=True)
    ref = nn.Linear(64, 48)
    assert layer.weight.dtype == torch.float32
    assert set(layer.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 64)
    y = layer(x)
    assert y.shape == (2, 5, 48) and calc_diff(y, ref(x)) < 1e-3
    shared = Fp8Linear.from_linear(ref)
    assert shared.weight is ref.weight and shared.bias is ref.bias
    assert "backend=emulated" in repr(shared)
    # autocast does not reach inside (the FP32 matmul of the emulated backend stays FP32);
    # a bf16 input gives a bf16 output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), y)
        yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and calc_diff(yb, y) < 1e-3
    with torch.no_grad():                          # the inference path gives the same numbers
        assert torch.equal(layer(x), y)


def test_nonfinite_detection_for_the_trainer():
    torch.manual_seed(0)
    model = nn.Sequential(Fp8Linear(128, 64), nn.ReLU(), Fp8Linear(64, 32))
    model(torch.randn(8, 128)).sum().backward()
    assert not found_nonfinite(model)
    x = torch.randn(8, 128)
    x[3, 5] = float("inf")
    y = model(x)
    assert found_nonfinite(model)
    assert torch.isnan(y[3]).all() and torch.isfinite(y[[0, 1, 2, 4, 5, 6, 7]]).all()
    stats = collect_stats(model)
    assert stats["nonfinite"] >= 1
    assert stats["gemms"] == (2 + 3) + 2          # first step: fwd + dW, fwd + dx + dW; then 2 fwd
    reset_stats(model)
    assert not found_nonfinite(model) and collect_stats(model)["tiles"] == 0
    # a NaN gradient is caught in backward
    x = torch.randn(8, 128, requires_grad=True)
    out = model(x)
    assert not found_nonfinite(model)
    out.backward(torch.full_like(out, float("nan")))
    assert found_nonfinite(model)


def test_clamped_tiles_are_counted():
    layer = Fp8Linear(256, 16, bias=False)
    x = torch.randn(4, 256)
    x[1] = 0                                       # two all-zero tiles
    with torch.no_grad():
        layer(x)
    assert layer.fp8_stats.clamped_tiles == 2 and layer.fp8_stats.nonfinite == 0
    assert layer.fp8_stats.tiles == 4 * 2 + 1 * 2      # x tiles + weight blocks
    layer.fp8_stats.reset()
    layer(x).sum().backward()                          # + x^T along the 4 tokens, dy^T
    assert layer.fp8_stats.tiles == 4 * 2 + 1 * 2 + 256 + 16 and layer.fp8_stats.clamped_tiles == 2


def test_empty_batch():
    layer = Fp8Linear(256, 16)
    x = torch.zeros(0, 256, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert (layer.weight.grad == 0).all() and (layer.bias.grad == 0).all() and x.grad.shape == (0, 256)


# ---------------------------------------------------------------------------------------------
# expert-grouped linear


def test_grouped_linear_equals_one_fp8_linear_per_expert():
    torch.manual_seed(0)
    sizes = [70, 0, 200, 30]
    w = torch.randn(4, 96, 160) * 0.05
    x = torch.randn(sum(sizes), 160)
    dy = torch.randn(sum(sizes), 96)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    stats = Fp8Stats()
    y = fp8_grouped_linear(xg, wg, sizes, stats=stats)
    y.backward(dy)
    assert stats.nonfinite == 0 and stats.gemms == 3 * 3
    start = 0
    for e, n in enumerate(sizes):
        if n == 0:
            assert (wg.grad[e] == 0).all()
            continue
        layer = Fp8Linear(160, 96, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w[e])
        xe = x[start:start + n].clone().requires_grad_()
        ye = layer(xe)
        ye.backward(dy[start:start + n])
        assert torch.equal(y[start:start + n], ye)
        assert torch.equal(xg.grad[start:start + n], xe.grad)
        assert torch.equal(wg.grad[e], layer.weight.grad)
        start += n


@pytest.mark.parametrize("kind", ["random", "outliers"])
def test_grouped_linear_against_fp32(kind):
    torch.manual_seed(0)
    sizes = [130, 0, 60, 66]
    w = torch.randn(4, 72, 192) * 0.05
    x = inputs(kind, sum(sizes), 192, seed=3)
    dy = torch.randn(sum(sizes), 72)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    fp8_grouped_linear(xg, wg, sizes, Fp8Config(pow2_scales=True)).backward(dy)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ys = [F.linear(xe, wr[e]) for e, xe in enumerate(xr.split(sizes))]
    y_ref = torch.cat(ys)
    y_ref.backward(dy)
    with torch.no_grad():
        y = fp8_grouped_linear(x, w, sizes)
    assert calc_diff(y, y_ref) <= 1e-3
    assert calc_diff(xg.grad, xr.grad) <= 1e-3
    for e in (0, 2, 3):
        assert calc_diff(wg.grad[e], wr.grad[e]) <= 1e-3


# ---------------------------------------------------------------------------------------------
# backends


def test_backends_are_probed_and_refuse_clearly_without_a_gpu():
    status = backend_status()
    assert set(status) == {"emulated", "te", "torch"} and status["emulated"] is None
    if torch.cuda.is_available():
        pytest.skip("GPU present: availability depends on the device")
    for name in ("te", "torch"):
        assert "CUDA" in status[name]
        with pytest.raises(Fp8BackendUnavailable, match=f"'{name}' is unavailable: no CUDA device"):
            get_backend(name)
        with pytest.raises(Fp8BackendUnavailable):
            Fp8Linear(128, 128, config=Fp8Config(backend=name))
    with pytest.raises(ValueError, match="unknown FP8 backend"):
        get_backend("cutlass")
    with pytest.raises(ValueError, match="accumulation"):
        get_backend("emulated", accumulation="bf16")
    assert get_backend("emulated") is get_backend("emulated")                   # probed once

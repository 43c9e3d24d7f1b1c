"""FP8 linear layers: the FP8 local GEMM, ``Fp8Linear`` (drop-in for nn.Linear), the expert-grouped linear.

    Fp8LocalGemm        mixin defining ``local_linear(x)``, the one GEMM hook a linear layer's forward
                        calls (megads.fp8.convert puts it in front of the parallel layers)
    Fp8Linear           Fp8LocalGemm + nn.Linear, forward = local_linear
    fp8_grouped_linear  expert-grouped GEMM (the routed experts' ``expert_linear`` hook)

The configuration is megads.config.Fp8Config (the ``fp8`` YAML section): its backend, accumulation
and promote_every pick the GEMM backend (megads.fp8.gemm.backend_for), its pow2_scales and eps
the scales of every quantization here.

The FP32 master weight stays the parameter; every forward quantizes it online per 128x128 block
and the input per 1x128 tile (megads.fp8.quantize), and all three GEMMs run in E4M3:

    forward      y  = x . W^T          x: 1x128 along K,   W: 128x128
    input grad   dx = dy . W           dy: 1x128 along N,  W^T: the same blocks, transposed
    weight grad  dW = dy^T . x         dy^T and x^T: 1x128 along the token axis, re-quantized
                                       from the high-precision source

The weight-gradient operands are quantized from the high-precision tensors (x in forward, dy in
backward). With ``cache_activations`` (the default) forward quantizes x a second time, along the
token axis, and saves only that FP8 copy with its scales (a quarter of FP32) for the weight
gradient, as Transformer Engine does with its "columnwise" copy; without it the FP32 input is
saved and quantized the same way in backward. Both give the same numbers. (DeepSeek-V3 instead
dequantizes its cached 1x128 tiles and re-quantizes them transposed, report 3.5.2; that second
rounding of x lifts the weight gradient's calc_diff from about 6.6e-4 to 1.0e-3 on Gaussian data
with non-power-of-two scales, so megads avoids it.)

Biases, if any, stay in high precision and are added after the GEMM.

Autocast is switched off inside: the emulated backend's FP32 matmul of dequantized operands
must not be silently downcast to bf16.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from megads.config import Fp8Config
from megads.fp8.format import E4M3
from megads.fp8.gemm import backend_for
from megads.fp8.quantize import (
    BLOCK,
    BLOCK_128x128,
    TILE_1x128,
    Fp8Tensor,
    ceil_div,
    quantize_blocks,
    quantize_tiles,
)
from megads.fp8.stats import Fp8Stats


def _tiles(cfg: Fp8Config, x: torch.Tensor) -> Fp8Tensor:
    """x quantized per 1x128 tile with the config's scales (pow2_scales, eps)."""
    return quantize_tiles(x, pow2=cfg.pow2_scales, eps=cfg.eps)


def _blocks(cfg: Fp8Config, w: torch.Tensor) -> Fp8Tensor:
    """w quantized per 128x128 block with the config's scales (pow2_scales, eps)."""
    return quantize_blocks(w, pow2=cfg.pow2_scales, eps=cfg.eps)


def _token_axis(cfg: Fp8Config, x: torch.Tensor, sizes: Sequence[int],
                stats: Fp8Stats) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] quantized per group along the token axis: (codes [K, T], scales [K, sum_g ceil(T_g/128)]).

    Group g's tiles are 1x128 along its own tokens only (no tile spans two experts); the groups'
    codes and scale columns are concatenated in group order.
    """
    codes, scales, start = [], [], 0
    for size in sizes:
        if size:
            q = _tiles(cfg, x[start:start + size].t())
            stats.record(q)
            codes.append(q.data)
            scales.append(q.scale)
        start += size
    if not codes:
        return (torch.zeros(x.shape[1], 0, dtype=E4M3, device=x.device),
                torch.zeros(x.shape[1], 0, device=x.device))
    return torch.cat(codes, dim=1), torch.cat(scales, dim=1)


def _token_axis_groups(codes: torch.Tensor, scales: torch.Tensor, sizes: Sequence[int]):
    """Yield (group, token start, Fp8Tensor [K, T_g]) from the concatenated token-axis layout."""
    start = kstart = 0
    for g, size in enumerate(sizes):
        if size:
            kb = ceil_div(size, BLOCK)
            yield g, start, Fp8Tensor(codes[:, start:start + size].contiguous(), scales[:, kstart:kstart + kb],
                                      TILE_1x128)
            kstart += kb
        start += size


def _save(ctx, cfg: Fp8Config, stats: Fp8Stats, x2: torch.Tensor, wq: Fp8Tensor, sizes: Sequence[int]) -> None:
    """Save what backward needs: the quantized weight and the weight-gradient form of x."""
    if not ctx.needs_input_grad[1]:                  # no weight gradient: x is not needed
        ctx.save_for_backward(None, None, wq.data, wq.scale)
    elif cfg.cache_activations:
        xt_codes, xt_scales = _token_axis(cfg, x2, sizes, stats)
        ctx.save_for_backward(xt_codes, xt_scales, wq.data, wq.scale)
    else:
        ctx.save_for_backward(x2, None, wq.data, wq.scale)
    ctx.sizes = tuple(sizes)


def _load(ctx, cfg: Fp8Config) -> tuple[torch.Tensor, torch.Tensor, Fp8Tensor]:
    """(token-axis codes [K, T], scales, quantized weight), quantizing x now if it was saved in FP32."""
    a, b, w_data, w_scale = ctx.saved_tensors
    wq = Fp8Tensor(w_data, w_scale, BLOCK_128x128)
    if cfg.cache_activations or a is None:
        return a, b, wq
    codes, scales = _token_axis(cfg, a, ctx.sizes, ctx.stats)
    return codes, scales, wq


class Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with all three GEMMs in FP8; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg: Fp8Config, stats: Fp8Stats):
        backend = backend_for(cfg)
        K = x.shape[-1]
        N = weight.shape[0]
        x2 = x.reshape(-1, K)
        xq, wq = _tiles(cfg, x2), _blocks(cfg, weight)
        stats.record(xq)
        stats.record(wq)
        y = backend.gemm(xq, wq, torch.float32)
        stats.gemms += 1
        if bias is not None:
            y = y + bias.float()
        _save(ctx, cfg, stats, x2, wq, (x2.shape[0],))
        ctx.cfg, ctx.stats, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = cfg, stats, x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y.to(x.dtype).view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        cfg, stats = ctx.cfg, ctx.stats
        backend = backend_for(cfg)
        with torch.autocast(dy.device.type, enabled=False):
            xt_codes, xt_scales, wq = _load(ctx, cfg)
            N = wq.shape[0]
            dy2 = dy.reshape(-1, N).float()
            dx = dw = db = None
            if ctx.needs_input_grad[0]:
                dyq = _tiles(cfg, dy2)                                  # 1x128 along N
                stats.record(dyq)
                dx = backend.gemm(dyq, wq.t(), torch.float32).to(ctx.x_dtype).view(ctx.x_shape)
                stats.gemms += 1
            if ctx.needs_input_grad[1]:
                dw = torch.zeros(wq.shape, dtype=ctx.w_dtype, device=dy.device)
                for _, _, xt in _token_axis_groups(xt_codes, xt_scales, ctx.sizes):   # one group (none if T = 0)
                    dyt = _tiles(cfg, dy2.t())                          # 1x128 along the tokens
                    stats.record(dyt)
                    dw = backend.gemm(dyt, xt, torch.float32).to(ctx.w_dtype)
                    stats.gemms += 1
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2.sum(dim=0).to(ctx.b_dtype)
        return dx, dw, db, None, None


def fp8_linear_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Fp8Config,
                         stats: Fp8Stats) -> torch.Tensor:
    """The forward GEMM alone (no autograd, nothing saved): the same numbers as the training path."""
    K, N = x.shape[-1], weight.shape[0]
    xq, wq = _tiles(cfg, x.reshape(-1, K)), _blocks(cfg, weight)
    stats.record(xq)
    stats.record(wq)
    y = backend_for(cfg).gemm(xq, wq, torch.float32)
    stats.gemms += 1
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], N)


class Fp8LocalGemm:
    """Mixin: the layer's local GEMM, ``local_linear(x)``, runs in E4M3 (all three GEMMs, see above).

    The one method FP8 overrides in a linear layer. Put before an nn.Linear (sub)class whose
    forward calls ``self.local_linear(x)`` for its GEMM: Fp8Linear's forward is that call alone;
    ColumnParallelLinear's and RowParallelLinear's run their collectives around it
    (megads.fp8.convert). Uses the layer's ``weight`` (this rank's shard), its ``bias`` if it has
    one, and the ``config`` (Fp8Config) and ``fp8_stats`` (Fp8Stats) an FP8 layer carries.
    """

    config: Fp8Config
    fp8_stats: Fp8Stats

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, "bias", None)
        with torch.autocast(x.device.type, enabled=False):
            if not torch.is_grad_enabled():
                return fp8_linear_inference(x, self.weight, bias, self.config, self.fp8_stats)
            return Fp8LinearFunction.apply(x, self.weight, bias, self.config, self.fp8_stats)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, backend={c.backend}, accumulation={c.accumulation}, "
                f"pow2_scales={c.pow2_scales}, cache_activations={c.cache_activations}")


class Fp8Linear(Fp8LocalGemm, nn.Linear):
    """nn.Linear whose forward and backward GEMMs run in E4M3 with fine-grained scales.

    Same constructor, parameters, initialisation and state_dict as nn.Linear (the weight is the
    FP32 master copy), plus ``config`` (Fp8Config) and ``fp8_stats`` (Fp8Stats: tiles quantized,
    eps-clamped tiles, inf/NaN detections, GEMMs). Its forward is the local GEMM alone.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 config: Fp8Config | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config or Fp8Config()
        backend_for(self.config)                  # probe now: fail at construction, not mid-step
        self.fp8_stats = Fp8Stats()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config | None = None) -> "Fp8Linear":
        """An Fp8Linear sharing ``linear``'s parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.config = config or Fp8Config()
        backend_for(new.config)
        new.fp8_stats = Fp8Stats()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_linear(x)


class Fp8GroupedLinearFunction(torch.autograd.Function):
    """Expert-grouped y_g = x_g W_g^T over tokens sorted by expert, all GEMMs in FP8.

    The 1x128 tiles of x and dy run along K and N and never cross a token, so one quantization
    serves every group; the weight gradient re-quantizes each expert's tokens along the token
    axis on their own, so no tile spans two experts.
    """

    @staticmethod
    def forward(ctx, x, weight, group_sizes: tuple[int, ...], cfg: Fp8Config, stats: Fp8Stats):
        backend = backend_for(cfg)
        xq, wq = _tiles(cfg, x), _blocks(cfg, weight)       # x [T, K]; weight [E, N, K]
        stats.record(xq)
        stats.record(wq)
        y = backend.grouped_gemm(xq, wq, group_sizes, torch.float32)
        stats.gemms += sum(1 for s in group_sizes if s)
        _save(ctx, cfg, stats, x, wq, group_sizes)
        ctx.cfg, ctx.stats, ctx.group_sizes = cfg, stats, group_sizes
        ctx.x_dtype, ctx.w_dtype, ctx.w_shape = x.dtype, weight.dtype, weight.shape
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        cfg, stats, sizes = ctx.cfg, ctx.stats, ctx.group_sizes
        backend = backend_for(cfg)
        with torch.autocast(dy.device.type, enabled=False):
            xt_codes, xt_scales, wq = _load(ctx, cfg)
            dy2 = dy.float()
            dx = dw = None
            if ctx.needs_input_grad[0]:
                dyq = _tiles(cfg, dy2)
                stats.record(dyq)
                dx = backend.grouped_gemm(dyq, wq.t(), sizes, torch.float32).to(ctx.x_dtype)
                stats.gemms += sum(1 for s in sizes if s)
            if ctx.needs_input_grad[1]:
                dw = torch.zeros(ctx.w_shape, dtype=ctx.w_dtype, device=dy.device)
                for g, start, xt in _token_axis_groups(xt_codes, xt_scales, sizes):
                    dyt = _tiles(cfg, dy2[start:start + xt.shape[1]].t())
                    stats.record(dyt)
                    dw[g] = backend.gemm(dyt, xt, torch.float32).to(ctx.w_dtype)
                    stats.gemms += 1
        return dx, dw, None, None, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_sizes: Sequence[int],
                       config: Fp8Config | None = None, stats: Fp8Stats | None = None) -> torch.Tensor:
    """Expert-grouped FP8 linear: x [T, K] sorted by expert, weight [E, N, K] -> [T, N].

    Rows [sum(sizes[:g]), sum(sizes[:g+1])) are multiplied by weight[g]^T. Differentiable in x
    and weight. ``stats`` (optional) collects the quantization counters.
    """
    cfg = config or Fp8Config()
    sizes = tuple(int(s) for s in group_sizes)
    if sum(sizes) != x.shape[0] or len(sizes) != weight.shape[0]:
        raise ValueError(f"group sizes {sizes} do not match x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        return Fp8GroupedLinearFunction.apply(x, weight, sizes, cfg, stats if stats is not None else Fp8Stats())

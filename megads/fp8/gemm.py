"""FP8 GEMMs with fine-grained scales behind one backend interface.

Every GEMM here is ``y = a @ b^T`` with both operands stored K-last (the "TN" layout FP8 tensor
cores require):

* ``a``: [M, K] E4M3 codes with 1x128 tile scales [M, ceil(K/128)];
* ``b``: [N, K] E4M3 codes with either 128x128 block scales [ceil(N/128), ceil(K/128)] (a weight)
  or 1x128 tile scales [N, ceil(K/128)] (the token-axis operands of a weight-gradient GEMM).

The three GEMMs of a linear layer y = x W^T map onto it as

    forward        y  = x(1x128)      . W(128x128)^T           a = x,     b = W
    input grad     dx = dy(1x128)     . (W^T)(128x128)^T       a = dy,    b = W^T  (exact transpose)
    weight grad    dW = dy^T(1x128)   . (x^T)(1x128)^T         a = dy^T,  b = x^T  (token axis)

Backends, chosen by name and probed when first requested (``get_backend``):

* ``emulated``: pure PyTorch, CPU and GPU, the reference. ``accumulation="fp32"`` (the fast
  default for CPU training) dequantizes both operands in FP32 and runs one FP32 matmul: each
  product of E4M3 values is exact in FP32, the scales are applied to the operands (for power-of-
  two scales identical to scaling each 128-partial sum), and the sums are FP32 in BLAS order.
  ``accumulation="hopper"`` computes the Hopper tensor-core chain bit for bit
  (megads.fp8.accumulate), restarted every ``promote_every`` elements of K and promoted to FP32
  with the scales by fma, as DeepGEMM does on an H800.
* ``te``: Transformer Engine >= 2.3 blockwise FP8 GEMM (Float8BlockScaling's kernels), Hopper.
* ``torch``: PyTorch's blockwise scaled matmul (cuBLASLt >= 12.9 on SM90).

The GPU backends live in megads.fp8.backends and import their libraries only when requested; a
CPU install never needs them, and asking for one that cannot run raises
``Fp8BackendUnavailable`` with the reason.
"""

from __future__ import annotations

import functools
import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Sequence

import torch

from megads.fp8.accumulate import DEFAULT_PROMOTE_EVERY, HOPPER_BLOCK, hopper_chains, promote
from megads.fp8.quantize import BLOCK, BLOCK_128x128, TILE_1x128, Fp8Tensor

if TYPE_CHECKING:
    from megads.config import Fp8Config

ACCUMULATIONS = ("fp32", "hopper")


class Fp8BackendUnavailable(RuntimeError):
    """The requested FP8 GEMM backend cannot run here; the message says why."""


class Fp8Backend:
    """Interface of an FP8 GEMM backend. Subclasses implement ``probe`` and ``gemm``."""

    name = "base"

    @classmethod
    def probe(cls) -> str | None:
        """None if the backend can run in this process, else the reason it cannot."""
        raise NotImplementedError

    def gemm(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """a [M, K] (1x128) @ b [N, K]^T (128x128 or 1x128) -> [M, N] in out_dtype."""
        raise NotImplementedError

    def grouped_gemm(self, a: Fp8Tensor, b: Fp8Tensor, group_sizes: Sequence[int],
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert-grouped GEMM: rows of a sorted by group, group g times b[g] (stacked [G, N, K]).

        The default runs one GEMM per non-empty group (a contiguous "m-grouped" layout, as
        DeepGEMM's grouped GEMM takes it). Returns [sum(group_sizes), N].
        """
        check_operands(a, b[0] if len(group_sizes) else b)
        if sum(group_sizes) != a.shape[0]:
            raise ValueError(f"group sizes sum to {sum(group_sizes)}, a has {a.shape[0]} rows")
        N = b.shape[-2]
        out = torch.zeros(a.shape[0], N, dtype=out_dtype, device=a.data.device)
        start = 0
        for g, size in enumerate(group_sizes):
            if size:
                out[start:start + size] = self.gemm(a.rows(start, start + size), b[g], out_dtype)
            start += size
        return out


def check_operands(a: Fp8Tensor, b: Fp8Tensor) -> None:
    """Validate the TN operands of a GEMM (shapes, tile kinds, scale grids)."""
    if a.block != TILE_1x128:
        raise ValueError("operand a must have 1x128 tile scales")
    if b.block not in (TILE_1x128, BLOCK_128x128):
        raise ValueError(f"operand b has unsupported block {b.block}")
    if a.data.dim() != 2 or b.data.dim() != 2:
        raise ValueError(f"expected 2-D operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"K mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}")
    kb = -(-a.shape[1] // BLOCK)
    rows_b = b.shape[0] if b.block == TILE_1x128 else -(-b.shape[0] // BLOCK)
    if tuple(a.scale.shape) != (a.shape[0], kb) or tuple(b.scale.shape) != (rows_b, kb):
        raise ValueError(f"scale grids {tuple(a.scale.shape)}, {tuple(b.scale.shape)} do not match the operands")


def row_scales(t: Fp8Tensor) -> torch.Tensor:
    """Scales per (row, K-block) [rows, kb] of either tile kind (128x128 blocks repeat per row)."""
    if t.block == TILE_1x128:
        return t.scale
    return t.scale.repeat_interleave(BLOCK, dim=0)[: t.shape[0]]


class EmulatedBackend(Fp8Backend):
    """Pure-PyTorch FP8 GEMM; accumulation "fp32" (fast) or "hopper" (bit-exact chain model)."""

    name = "emulated"

    def __init__(self, accumulation: str = "fp32", promote_every: int | None = DEFAULT_PROMOTE_EVERY):
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
        _check_promote_every(promote_every)
        self.accumulation = accumulation
        self.promote_every = promote_every

    @classmethod
    def probe(cls) -> str | None:
        return None

    def gemm(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        check_operands(a, b)
        if self.accumulation == "fp32":
            y = a.dequantize() @ b.dequantize().t()
        else:
            y = hopper_gemm(a, b, self.promote_every)
        return y.to(out_dtype)


def _check_promote_every(promote_every: int | None) -> None:
    """A chain must cover whole 32-product blocks and either fit inside one 128-wide scale block
    (32, 64, 128) or cover whole scale blocks (multiples of 128)."""
    if promote_every is None:
        return
    if promote_every <= 0 or promote_every % HOPPER_BLOCK:
        raise ValueError(f"promote_every must be a positive multiple of {HOPPER_BLOCK} or None, got {promote_every}")
    if (promote_every < BLOCK and BLOCK % promote_every) or (promote_every > BLOCK and promote_every % BLOCK):
        raise ValueError(f"promote_every must divide {BLOCK} or be a multiple of it, got {promote_every}")


def hopper_gemm(a: Fp8Tensor, b: Fp8Tensor, promote_every: int | None = DEFAULT_PROMOTE_EVERY) -> torch.Tensor:
    """FP32 [M, N]: Hopper chains restarted every promote_every elements of K, promoted with fma.

    promote_every=None runs one chain over all of K (no promotion). A chain must lie inside one
    scale block unless the scales it spans are equal (per-tensor or per-row scaling), since the
    hardware applies scales only when it promotes.
    """
    check_operands(a, b)
    _check_promote_every(promote_every)
    K = a.shape[1]
    sa, sb = row_scales(a), row_scales(b)                      # [M, kb], [N, kb]
    # Non-finite codes or scales: compute on sanitised operands, then poison the affected rows
    # and columns with NaN (the chain model is defined on finite values only).
    bad_a = torch.isnan(a.data.float()).any(dim=1) | ~torch.isfinite(sa).all(dim=1)
    bad_b = torch.isnan(b.data.float()).any(dim=1) | ~torch.isfinite(sb).all(dim=1)
    codes_a, codes_b = a.data, b.data
    if bool(bad_a.any()) or bool(bad_b.any()):
        zero = torch.zeros((), dtype=torch.float32, device=a.data.device)
        codes_a = torch.where(bad_a[:, None], zero, codes_a.float()).to(codes_a.dtype)
        codes_b = torch.where(bad_b[:, None], zero, codes_b.float()).to(codes_b.dtype)
        sa = torch.where(bad_a[:, None], torch.ones_like(sa), sa)
        sb = torch.where(bad_b[:, None], torch.ones_like(sb), sb)
    chain_len = promote_every if promote_every is not None else -(-K // HOPPER_BLOCK) * HOPPER_BLOCK
    chains = hopper_chains(codes_a, codes_b, chain_len)        # [M, N, C]
    C = chains.shape[-1]
    if chain_len <= BLOCK:
        idx = torch.arange(C, device=sa.device) * chain_len // BLOCK
        ca, cb = sa[:, idx], sb[:, idx]
    else:
        per = -(-chain_len // BLOCK)                            # scale blocks per chain
        ca, cb = [], []
        for c in range(C):
            blk_a, blk_b = sa[:, c * per:(c + 1) * per], sb[:, c * per:(c + 1) * per]
            if not (torch.equal(blk_a, blk_a[:, :1].expand_as(blk_a))
                    and torch.equal(blk_b, blk_b[:, :1].expand_as(blk_b))):
                raise ValueError("a chain longer than 128 needs equal scales across the blocks it spans; "
                                 "use promote_every <= 128 with fine-grained scales")
            ca.append(blk_a[:, 0])
            cb.append(blk_b[:, 0])
        ca, cb = torch.stack(ca, dim=1), torch.stack(cb, dim=1)
    y = promote(chains, ca, cb)
    if bool(bad_a.any()) or bool(bad_b.any()):
        y = torch.where(bad_a[:, None] | bad_b[None, :], torch.full_like(y, float("nan")), y)
    return y


# ---------------------------------------------------------------------------------------------
# registry

_REGISTRY = MappingProxyType({
    "emulated": "megads.fp8.gemm:EmulatedBackend",
    "te": "megads.fp8.backends:TransformerEngineBackend",
    "torch": "megads.fp8.backends:TorchScaledMMBackend",
})


def _backend_class(name: str) -> type[Fp8Backend]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown FP8 backend {name!r}; choose one of {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def backend_status() -> dict[str, str | None]:
    """Probe every backend: name -> None (usable) or the reason it is not."""
    return {name: _backend_class(name).probe() for name in _REGISTRY}


def get_backend(name: str = "emulated", *, accumulation: str = "fp32",
                promote_every: int | None = DEFAULT_PROMOTE_EVERY) -> Fp8Backend:
    """The backend called ``name``, probed once per process; raises Fp8BackendUnavailable.

    ``accumulation`` and ``promote_every`` configure the emulated backend only. The hardware
    backends accumulate as their GPU does (on Hopper: the tensor-core chain, promoted to FP32 by
    the library), whatever these say; they are still validated so a typo fails everywhere.
    """
    return _configured_backend(name, accumulation, promote_every)


def backend_for(config: Fp8Config) -> Fp8Backend:
    """The backend an Fp8Config names, with its accumulation and promote_every (get_backend)."""
    return get_backend(config.backend, accumulation=config.accumulation, promote_every=config.promote_every)


@functools.lru_cache(maxsize=None)
def _configured_backend(name: str, accumulation: str, promote_every: int | None) -> Fp8Backend:
    """One backend instance per (name, accumulation, promote_every); a failed probe raises and is not cached."""
    cls = _backend_class(name)
    reason = cls.probe()
    if reason is not None:
        raise Fp8BackendUnavailable(f"FP8 backend {name!r} is unavailable: {reason}")
    if name == "emulated":
        backend = cls(accumulation=accumulation, promote_every=promote_every)
    else:
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
        backend = cls()
    return backend


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor, *, out_dtype: torch.dtype = torch.float32,
             backend: str | Fp8Backend = "emulated", **options) -> torch.Tensor:
    """y = a @ b^T for FP8 operands with fine-grained scales (see the module docstring)."""
    be = backend if isinstance(backend, Fp8Backend) else get_backend(backend, **options)
    return be.gemm(a, b, out_dtype)


def fp8_grouped_gemm(a: Fp8Tensor, b: Fp8Tensor, group_sizes: Sequence[int], *,
                     out_dtype: torch.dtype = torch.float32, backend: str | Fp8Backend = "emulated",
                     **options) -> torch.Tensor:
    """Expert-grouped GEMM: a [T, K] rows sorted by expert (1x128), b [E, N, K] stacked weights
    (128x128 blocks); rows of group g are multiplied by b[g]^T. Returns [T, N]."""
    be = backend if isinstance(backend, Fp8Backend) else get_backend(backend, **options)
    if b.data.dim() != 3 or b.shape[0] != len(group_sizes):
        raise ValueError(f"b must stack one [N, K] matrix per group: {tuple(b.shape)} for {len(group_sizes)} groups")
    return be.grouped_gemm(a, b, [int(s) for s in group_sizes], out_dtype)

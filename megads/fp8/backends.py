"""GPU backends of the FP8 GEMM interface: Transformer Engine (``te``) and PyTorch (``torch``).

Neither library is imported before a backend is requested, so a CPU install never needs them.
Each backend probes its requirements once per process (``probe()``, a cached function) and explains
what is missing; on this project's CPU machines both report themselves unavailable. What a probe
learns and a GEMM needs (the output dtype cuBLASLt accepted) and what a GEMM allocates (TE's
workspace) are held by the backend instance (one per configuration, megads.fp8.gemm.get_backend):
this module keeps no mutable state of its own.

NOT RUN HERE: the GEMM calls below follow the documented APIs and the argument checks of
Transformer Engine 2.3+ and of torch 2.13's ``ScaledBlas.cpp``, but no Hopper GPU was available
when they were written, so they have never executed. Check them against the emulated backend
(``accumulation="hopper"``) on an SM90 machine before relying on them.

Layout conversion happens here, at the edge; the rest of megads only knows the canonical
layout (megads.fp8.quantize): FP32 scales [rows, ceil(K/128)] for 1x128 tiles and
[ceil(N/128), ceil(K/128)] for 128x128 blocks, both row-major. Operands are zero padded so that
M, N are multiples of 16 and K a multiple of 128 (zero codes add nothing whatever their scale;
padded scale entries are 1).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megads.fp8.format import E4M3
from megads.fp8.gemm import Fp8Backend, check_operands
from megads.fp8.quantize import BLOCK, BLOCK_128x128, Fp8Tensor, ceil_div


def _round_up(x: int, m: int) -> int:
    return ceil_div(x, m) * m


def _cuda_sm90() -> str | None:
    """None if a CUDA SM90 (Hopper) device is present, else the reason."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False; this torch is " + torch.__version__ + ")"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"needs an SM90 (Hopper) GPU for 1x128/128x128 block scaling; this device is SM{major}{minor}"
    return None


def _version_tuple(v: str | None) -> tuple[int, ...]:
    out = []
    for part in (v or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _pad_operand(t: Fp8Tensor, rows: int, K: int) -> torch.Tensor:
    """Codes zero padded to [rows, K] (uint8 padding, viewed back as E4M3)."""
    u8 = t.data.view(torch.uint8)
    u8 = F.pad(u8, (0, K - u8.shape[1], 0, rows - u8.shape[0]))
    return u8.view(E4M3)


def _padded_tile_scales(t: Fp8Tensor, rows: int) -> torch.Tensor:
    """Canonical 1x128 scales [r, kb] padded with ones to [rows, kb]."""
    return F.pad(t.scale, (0, 0, 0, rows - t.scale.shape[0]), value=1.0)


# ---------------------------------------------------------------------------------------------
# torch: F.scaled_mm / torch._scaled_mm with BlockWise1x128 and BlockWise128x128 recipes


class TorchScaledMMBackend(Fp8Backend):
    """PyTorch's blockwise scaled matmul (cuBLASLt >= 12.9, SM90 only; untested here, see above).

    torch's layouts (ScaledBlas.cpp), for mat_a [M, K] row-major and mat_b [K, N] column-major:
    1x128 scales of a: [M, kb] with strides (1, M) ("outer-dim-major"); 128x128 scales of b:
    [round_up(kb, 4), ceil(N/128)] with strides (1, round_up(kb, 4)); 1x128 scales of b: [N, kb]
    with strides (1, N).
    """

    name = "torch"

    def __init__(self, out_dtype: torch.dtype | None = None):
        # The output type of the library call: the one the probe found cuBLASLt to accept (FP32, or
        # BF16 where a build refuses FP32 output), unless given (the probe gives each in turn).
        self.out_dtype = out_dtype if out_dtype is not None else _probe_torch()[1]

    @classmethod
    def probe(cls) -> str | None:
        return _probe_torch()[0]

    def gemm(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        check_operands(a, b)
        M, K = a.shape
        N = b.shape[0]
        Mp, Np, Kp = _round_up(M, 16), _round_up(N, 16), _round_up(K, BLOCK)
        kb = Kp // BLOCK
        mat_a = _pad_operand(a, Mp, Kp)
        mat_b = _pad_operand(b, Np, Kp).t()                              # [K, N] column-major
        scale_a = _padded_tile_scales(a, Mp).t().contiguous().t()        # [Mp, kb], strides (1, Mp)
        if b.block == BLOCK_128x128:
            kb4 = _round_up(kb, 4)
            scale_b = F.pad(b.scale, (0, kb4 - kb), value=1.0).contiguous().t()   # [kb4, nb], (1, kb4)
            recipe_b = "BlockWise128x128"
        else:
            scale_b = _padded_tile_scales(b, Np).t().contiguous().t()    # [Np, kb], strides (1, Np)
            recipe_b = "BlockWise1x128"
        y = _torch_blockwise_mm(mat_a, mat_b, scale_a, scale_b, recipe_b, self.out_dtype)
        return y[:M, :N].to(out_dtype)


def _torch_blockwise_mm(mat_a, mat_b, scale_a, scale_b, recipe_b: str, out_dtype):
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        ST = F.ScalingType
        return F.scaled_mm(mat_a, mat_b, scale_a, ST.BlockWise1x128, scale_b, getattr(ST, recipe_b),
                           output_dtype=out_dtype)
    # Older torch dispatches on the scale shapes alone.
    return torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, out_dtype=out_dtype)


@functools.lru_cache(maxsize=None)
def _probe_torch() -> tuple[str | None, torch.dtype]:
    """(None if the backend runs here, else the reason; the output dtype cuBLASLt accepted), once per process."""
    reason = _cuda_sm90()
    if reason:
        return reason, torch.float32
    if _version_tuple(torch.version.cuda) < (12, 9):
        return (f"needs CUDA/cuBLASLt >= 12.9 for block scaling; torch was built with CUDA {torch.version.cuda}",
                torch.float32)
    # A live 128x128x128 call is the only reliable check of the runtime cuBLASLt.
    dev = torch.device("cuda")
    a = Fp8Tensor(torch.ones(128, 128, device=dev).to(E4M3), torch.ones(128, 1, device=dev), (1, BLOCK))
    b = Fp8Tensor(torch.ones(128, 128, device=dev).to(E4M3), torch.ones(1, 1, device=dev), BLOCK_128x128)
    errors = []
    for out_dtype in (torch.float32, torch.bfloat16):
        try:
            y = TorchScaledMMBackend(out_dtype).gemm(a, b)
            if torch.allclose(y.float(), torch.full_like(y.float(), 128.0)):
                return None, out_dtype
            errors.append(f"{out_dtype}: wrong result {y.flatten()[0].item()}")
        except Exception as exc:   # noqa: BLE001 - report whatever the library raised
            errors.append(f"{out_dtype}: {type(exc).__name__}: {exc}")
    return "blockwise scaled matmul failed: " + "; ".join(errors), torch.float32


# ---------------------------------------------------------------------------------------------
# te: Transformer Engine's blockwise FP8 tensors and general_gemm


class TransformerEngineBackend(Fp8Backend):
    """Transformer Engine >= 2.3 blockwise FP8 GEMM (Float8BlockScaling's kernels; untested here).

    TE's GEMM-ready scale layouts: 1D (1x128) rowwise scale_inv [kb, round_up(rows, 4)] (the
    transpose of ours), 2D (128x128) rowwise scale_inv [ceil(rows/128), round_up(kb, 4)].
    ``general_gemm(A, B, layout="TN")`` returns B @ A^T, so our (a, b) go in as (b, a).
    """

    name = "te"

    def __init__(self):
        self._workspace: torch.Tensor | None = None     # cuBLASLt workspace, allocated on first use

    @classmethod
    def probe(cls) -> str | None:
        return _probe_te()

    def gemm(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from transformer_engine.pytorch.cpp_extensions import general_gemm

        check_operands(a, b)
        M, K = a.shape
        N = b.shape[0]
        Mp, Np, Kp = _round_up(M, 16), _round_up(N, 16), _round_up(K, BLOCK)
        if self._workspace is None or self._workspace.device != a.data.device:
            # TE's own Hopper workspace size (32 MiB, plus alignment slack)
            self._workspace = torch.empty(32 * 1024 * 1024 + 1024, dtype=torch.uint8, device=a.data.device)
        te_a = _te_tensor(_pad_operand(a, Mp, Kp), _padded_tile_scales(a, Mp), two_d=False)
        if b.block == BLOCK_128x128:
            te_b = _te_tensor(_pad_operand(b, Np, Kp), b.scale, two_d=True)
        else:
            te_b = _te_tensor(_pad_operand(b, Np, Kp), _padded_tile_scales(b, Np), two_d=False)
        out = general_gemm(te_b, te_a, self._workspace, out_dtype=torch.float32,
                           layout="TN", use_split_accumulator=True)[0]
        return out[:M, :N].to(out_dtype)


def _te_tensor(codes: torch.Tensor, scale: torch.Tensor, *, two_d: bool):
    """Wrap canonical codes/scales as a TE blockwise tensor with GEMM-ready rowwise scales."""
    import inspect

    import transformer_engine_torch as tex
    try:   # TE >= 2.8 renamed the storage class
        from transformer_engine.pytorch.tensor.storage.float8_blockwise_tensor_storage import (
            Float8BlockwiseQTensorStorage as Base)
    except ImportError:
        from transformer_engine.pytorch.tensor._internal.float8_blockwise_tensor_base import (
            Float8BlockwiseQTensorBase as Base)
    if two_d:
        kb = scale.shape[1]
        scale_inv = F.pad(scale, (0, _round_up(kb, 4) - kb), value=1.0).contiguous()
    else:
        rows = scale.shape[0]
        scale_inv = F.pad(scale.t(), (0, _round_up(rows, 4) - rows), value=1.0).contiguous()
    kwargs = dict(rowwise_data=codes.view(torch.uint8).contiguous(), rowwise_scale_inv=scale_inv,
                  columnwise_data=None, columnwise_scale_inv=None, fp8_dtype=tex.DType.kFloat8E4M3,
                  quantizer=None, is_2D_scaled=two_d)
    if "data_format" in inspect.signature(Base.__new__).parameters:
        kwargs["data_format"] = tex.Float8BlockScaleTensorFormat.GEMM_READY
    return Base(**kwargs)


@functools.lru_cache(maxsize=None)
def _probe_te() -> str | None:
    reason = _cuda_sm90()
    if reason:
        return reason
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401  (loads the CUDA extension)
    except Exception as exc:   # noqa: BLE001 - ImportError, or a CUDA/ABI failure while loading
        return (f"transformer_engine is not importable ({type(exc).__name__}: {exc}); "
                "install transformer-engine[pytorch] >= 2.3")
    version = getattr(transformer_engine, "__version__", "0")
    if _version_tuple(version) < (2, 3):
        return f"needs Transformer Engine >= 2.3 for Float8BlockScaling; found {version}"
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_block_scaling_support
        ok, why = check_fp8_block_scaling_support()
        if not ok:
            return f"Transformer Engine reports no FP8 block scaling: {why}"
    except ImportError:
        pass
    return None

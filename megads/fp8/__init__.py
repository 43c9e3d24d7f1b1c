"""FP8 training core: DeepSeek-V3's fine-grained E4M3 quantization, emulated and GPU GEMMs.

    format      E4M3 constants, the saturating cast, code tables
    quantize    1x128 tile / 128x128 block quantization, scales, the canonical layout
    accumulate  Hopper's tensor-core accumulation chain and FP32 promotion
    gemm        the backend interface, the emulated backend, (grouped) FP8 GEMMs, backend_for(config)
    backends    Transformer Engine and PyTorch GPU backends (imported lazily)
    linear      Fp8LocalGemm (the FP8 local-GEMM hook of a linear layer), Fp8Linear, the expert-grouped FP8 linear
    dispatch    FP8 expert dispatch (quantize before the all-to-all, dequantize after; the dispatcher's codec)
    stats       counters and the non-finite detection a trainer reads
    convert     convert_to_fp8(model, cfg.fp8): FP8 injected into a built model by overriding the layers'
                GEMM hooks (local_linear, expert_linear), not their forwards; fp8_stats(model) for metrics

The configuration is ``Fp8Config``, defined in megads.config (the ``fp8`` section) and re-exported here.
"""

from megads.config import Fp8Config
from megads.fp8.accumulate import fma_f32, hopper_chains, promote
from megads.fp8.dispatch import (
    Fp8DispatchCodec,
    dequantize_after_dispatch,
    dispatch_row_bytes,
    pack_for_dispatch,
    quantize_for_dispatch,
    unpack_after_dispatch,
)
from megads.fp8.format import E4M3, E4M3_MAX, to_e4m3
from megads.fp8.gemm import (
    EmulatedBackend,
    Fp8Backend,
    Fp8BackendUnavailable,
    backend_for,
    backend_status,
    fp8_gemm,
    fp8_grouped_gemm,
    get_backend,
    hopper_gemm,
)
from megads.fp8.linear import (
    Fp8GroupedLinearFunction,
    Fp8Linear,
    Fp8LinearFunction,
    Fp8LocalGemm,
    fp8_grouped_linear,
)
from megads.fp8.quantize import (
    BLOCK,
    Fp8Tensor,
    compute_scale,
    quantize_blocks,
    quantize_tiles,
    round_up_pow2,
)
from megads.fp8.stats import Fp8Stats, collect_stats, found_nonfinite, reset_stats
from megads.fp8.convert import (
    Fp8ColumnParallelLinear,
    Fp8ConversionSummary,
    Fp8RowParallelLinear,
    Fp8RoutedExperts,
    convert_to_fp8,
    fp8_modules,
    fp8_stats,
    nonfinite_layers,
)

__all__ = [
    "BLOCK", "E4M3", "E4M3_MAX", "EmulatedBackend", "Fp8Backend", "Fp8BackendUnavailable", "Fp8Config",
    "Fp8GroupedLinearFunction", "Fp8Linear", "Fp8LinearFunction", "Fp8LocalGemm", "Fp8Stats", "Fp8Tensor",
    "backend_for", "backend_status",
    "collect_stats", "compute_scale", "dequantize_after_dispatch", "fma_f32", "found_nonfinite", "fp8_gemm",
    "fp8_grouped_gemm", "fp8_grouped_linear", "get_backend", "hopper_chains", "hopper_gemm", "pack_for_dispatch",
    "promote", "quantize_blocks", "quantize_for_dispatch", "quantize_tiles", "reset_stats", "round_up_pow2",
    "to_e4m3", "unpack_after_dispatch",
    "Fp8ColumnParallelLinear", "Fp8ConversionSummary", "Fp8DispatchCodec", "Fp8RoutedExperts",
    "Fp8RowParallelLinear", "dispatch_row_bytes", "convert_to_fp8", "fp8_modules", "fp8_stats",
    "nonfinite_layers",
]

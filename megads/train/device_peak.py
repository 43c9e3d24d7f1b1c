"""The peak FLOP/s a device could do, the denominator of MFU.

GPUs: dense (not 2:4 sparse) tensor-core peaks from NVIDIA's datasheets, keyed by the name
nvidia-ml-py / torch report. CPUs: no datasheet covers "this machine with these threads", so the
FP32 GEMM peak is measured once (a large matmul, best of a few) and cached per CPU model, thread
count and torch version under data.cache_dir; the measured figure is printed.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

# name fragment -> (BF16 dense TFLOP/s, FP8 dense TFLOP/s or None, source). SXM parts; the first
# fragment found in the device name wins, so more specific names come first.
GPU_PEAKS: list[tuple[str, float, Optional[float], str]] = [
    ("H200", 989.4, 1978.9, "NVIDIA H200 datasheet (SXM): 1,979 / 3,958 TFLOPS with sparsity"),
    ("H800", 989.4, 1978.9, "NVIDIA H800 SXM: H100 SXM's tensor-core peaks"),
    ("H100", 989.4, 1978.9, "NVIDIA H100 datasheet (SXM): 1,979 / 3,958 TFLOPS with sparsity"),
    ("B200", 2250.0, 4500.0, "NVIDIA DGX B200 datasheet: 72 PFLOPS FP8 training per 8 GPUs, with sparsity"),
    ("A100", 312.0, None, "NVIDIA A100 datasheet: 312 TFLOPS BF16 dense; no FP8"),
]
_GEMM_SIZE = 1536
_REPEATS = 5


@dataclass
class DevicePeak:
    flops: float        # FLOP/s
    description: str    # what the figure is and where it comes from


def device_peak(device: torch.device, fp8: bool, cache_dir: Optional[str], log=print) -> Optional[DevicePeak]:
    """The peak of `device` for the run's matmuls (FP8 when `fp8`, else BF16 on GPUs, FP32 GEMM
    measured on CPUs); None for a GPU not in the table (MFU is then not reported)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, fp8)
        if peak is None:
            log(f"MFU: {name} is not in megads.train.device_peak.GPU_PEAKS; mfu is not reported")
        return peak
    return _cpu_peak(cache_dir, log)


def gpu_peak(name: str, fp8: bool) -> Optional[DevicePeak]:
    """The table's dense peak for a GPU called `name` (FP8 when asked and the GPU has it, else BF16)."""
    for fragment, bf16, fp8_peak, source in GPU_PEAKS:
        if fragment in name:
            peak = fp8_peak if fp8 and fp8_peak else bf16
            kind = "FP8" if fp8 and fp8_peak else "BF16"
            return DevicePeak(peak * 1e12, f"{name}: {kind} dense peak {peak:,.0f} TFLOP/s ({source})")
    return None


def _cpu_peak(cache_dir: Optional[str], log) -> DevicePeak:
    key = f"{platform.processor() or platform.machine()}|{_cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    cache = Path(cache_dir or "~/.cache/megads").expanduser() / "cpu_gemm_peak.json"
    known = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}  # a damaged cache is measured again
    if key not in known:
        known[key] = measure_cpu_gemm_flops()
        log(f"MFU: measured this CPU's FP32 GEMM peak: {known[key] / 1e9:.1f} GFLOP/s "
            f"({_GEMM_SIZE}^3 matmul, {torch.get_num_threads()} threads, best of {_REPEATS})")
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(known, indent=1))
            except OSError:
                pass  # a read-only cache only costs the measurement next time
    return DevicePeak(known[key], f"CPU FP32 GEMM peak {known[key] / 1e9:.1f} GFLOP/s, measured "
                                  f"({torch.get_num_threads()} threads)")


def measure_cpu_gemm_flops(size: int = _GEMM_SIZE, repeats: int = _REPEATS) -> float:
    """FLOP/s of the best of `repeats` FP32 matmuls of two size x size matrices."""
    generator = torch.Generator().manual_seed(0)  # not the global RNG: a run's randomness stays its own
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    torch.mm(a, b)  # warm-up: allocation, thread pool
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"

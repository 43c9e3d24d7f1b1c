"""What a step's record says about the machine: peak host memory always, the GPU's state when there
is one (via nvidia-ml-py, the optional `gpu` extra). No GPU, or no nvidia-ml-py, is not an error:
the GPU fields are then simply absent."""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path
from typing import Optional

import torch


def peak_host_memory_gb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak for `peak_memory_gb`: the device allocator's peak on a GPU; on CPU the
    process's peak resident set (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the
    current RSS; freed memory the C allocator has not returned first is given back with
    malloc_trim, so that an earlier, larger peak does not linger as resident). Returns False
    where the peak cannot be reset (the peak is then the process's since it started)."""
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)
        return True
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: allocated device memory on a GPU, the resident set on CPU
    (VmHWM; ru_maxrss where /proc is missing)."""
    if device.type != "cpu":
        return torch.accelerator.max_memory_allocated(device) / 1e9
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return peak_host_memory_gb()


class GpuTelemetry:
    """Utilisation, memory used and peak, power, temperature and SM clock of this rank's GPU."""

    def __init__(self, device: torch.device):
        self.handle = None
        self.device = device
        if device.type != "cuda":
            return
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.nvml = pynvml
        except Exception:  # no driver library, no permission: report what torch knows
            self.handle = None

    def sample(self) -> Optional[dict]:
        if self.device.type != "cuda":
            return None
        sample = {"memory_peak_gb": torch.cuda.max_memory_allocated(self.device) / 1e9,
                  "memory_allocated_gb": torch.cuda.memory_allocated(self.device) / 1e9}
        if self.handle is not None:
            nvml = self.nvml
            utilisation = nvml.nvmlDeviceGetUtilizationRates(self.handle)
            sample.update(
                utilization=float(utilisation.gpu),
                memory_used_gb=nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 1e9,
                power_w=nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
                temperature_c=float(nvml.nvmlDeviceGetTemperature(self.handle, nvml.NVML_TEMPERATURE_GPU)),
                sm_clock_mhz=float(nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM)))
        return sample

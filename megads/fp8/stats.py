"""Counters of what FP8 quantization saw, for the trainer to report and to skip bad steps.

Counters that depend on data (eps-clamped tiles, non-finite detections) are kept as device
tensors and only read (one host sync) when asked, so recording them costs no synchronisation in
the training step. ``found_nonfinite(model)`` is the check a trainer runs after backward: if any
FP8 layer saw inf/NaN in an activation, weight or gradient, skip the optimizer step and report it.
"""

from __future__ import annotations

import torch
from torch import nn

from megads.fp8.quantize import Fp8Tensor


class Fp8Stats:
    """Counts for one FP8 layer: tiles quantized, tiles clamped to eps (e.g. all-zero tiles),
    quantizations that found inf/NaN, and GEMMs run."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tiles = 0
        self.gemms = 0
        self._clamped: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None

    @torch.no_grad()
    def record(self, t: Fp8Tensor) -> None:
        """Add one quantization's counts (no host sync)."""
        self.tiles += t.num_tiles
        if t.clamped is not None:
            c = t.clamped.to(torch.int64)
            self._clamped = c.clone() if self._clamped is None else self._clamped + c
        if t.nonfinite is not None:
            n = t.nonfinite.to(torch.int64)
            self._nonfinite = n.clone() if self._nonfinite is None else self._nonfinite + n

    def nonfinite_flag(self) -> torch.Tensor | None:
        """0-dim bool tensor (on the data's device): some quantization saw inf/NaN. No sync."""
        return None if self._nonfinite is None else self._nonfinite > 0

    @property
    def clamped_tiles(self) -> int:
        return 0 if self._clamped is None else int(self._clamped.item())

    @property
    def nonfinite(self) -> int:
        return 0 if self._nonfinite is None else int(self._nonfinite.item())

    def as_dict(self) -> dict[str, int]:
        return {"tiles": self.tiles, "clamped_tiles": self.clamped_tiles, "nonfinite": self.nonfinite,
                "gemms": self.gemms}

    def __repr__(self) -> str:
        return f"Fp8Stats({self.as_dict()})"


def _all_stats(module: nn.Module):
    for m in module.modules():
        s = getattr(m, "fp8_stats", None)
        if isinstance(s, Fp8Stats):
            yield s


def collect_stats(module: nn.Module) -> dict[str, int]:
    """Sum of the counters of every FP8 layer in ``module`` (one host sync per layer)."""
    total = {"tiles": 0, "clamped_tiles": 0, "nonfinite": 0, "gemms": 0}
    for s in _all_stats(module):
        for k, v in s.as_dict().items():
            total[k] += v
    return total


def found_nonfinite(module: nn.Module) -> bool:
    """True if any FP8 layer in ``module`` saw inf/NaN since the last reset (one host sync)."""
    flags = [f for f in (s.nonfinite_flag() for s in _all_stats(module)) if f is not None]
    return bool(torch.stack(flags).any().item()) if flags else False


def reset_stats(module: nn.Module) -> None:
    for s in _all_stats(module):
        s.reset()

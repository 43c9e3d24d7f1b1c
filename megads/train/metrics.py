"""Per-step metrics: `metrics.jsonl` (the public record of a run), TensorBoard and console lines."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional


# Fields of a record that are measured, not computed: they differ between two identical runs (every
# other field is a pure function of config, seed and data). Compare runs without them.
MEASURED_FIELDS = frozenset({"tokens_per_s", "step_time_s", "tflops_per_device", "mfu", "peak_host_memory_gb", "gpu",
                             "time_s", "comm", "pipeline_bubble"})


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step`: steps a crashed run logged after its last checkpoint are redone."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _scalars(prefix: str, value):
    """(tag, number) for every finite number in a record, nested dicts as "key/sub/..." tags."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _scalars(f"{prefix}/{key}" if prefix else str(key), sub)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield prefix, value


class MetricsLogger:
    """Appends one JSON object per optimizer step and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool = True, log=print):
        self.path = output_dir / "metrics.jsonl"
        truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a")
        self._log = log
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                log("tensorboard is not importable; metrics go to metrics.jsonl only")

    def record(self, metrics: dict) -> None:
        """Write one step's record (flushed at once, so a crash loses nothing already logged)."""
        # JSON has no NaN/inf: a skipped step's non-finite values are written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in _scalars("", {k: v for k, v in metrics.items() if k != "step"}):
                self._tb.add_scalar(tag, value, metrics["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class ProgressPrinter:
    """One console line every `every` steps with loss, MTP loss, lr, throughput and ETA."""

    def __init__(self, total_steps: int, every: int, log=print):
        self.total, self.every, self.log = total_steps, every, log
        self.start = time.perf_counter()
        self.first_step: Optional[int] = None

    def __call__(self, m: dict) -> None:
        step = m["step"]
        if self.first_step is None:
            self.first_step = step - 1
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}", f"loss {m['loss']:.4f}"]
        if m.get("mtp_loss") is not None:
            parts.append(f"mtp {m['mtp_loss']:.4f}")
        parts += [f"lr {m['lr']:.2e}", f"grad {m['grad_norm']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s"]
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.0f}%")
        parts.append(f"eta {eta:.0f}s")
        if m.get("skipped"):
            parts.append(f"SKIPPED ({m.get('skip_reason') or 'non-finite'})")
        self.log(" | ".join(parts))

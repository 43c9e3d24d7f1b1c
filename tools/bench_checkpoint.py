"""What a checkpoint save costs, on a config's model (default: the README's tiny.yaml); two tables.

    python tools/bench_checkpoint.py [--config examples/configs/tiny.yaml] [--repeats 7]

1. Checksums: `save_checkpoint` with and without hashing, alternating, medians. "Without" replaces
   the file hash by nothing (sizes are still recorded and every file is still flushed to disk), so
   the difference is what hashing adds to the wall time of a save.
2. The optimizer state's format: each rank's ZeRO-1 shard as it is in memory (torch.save of
   state_dict(): the format before checkpoints were layout-free) against AdamW's moments gathered
   into full tensors by parameter name (now: any layout resumes from them). Save and load time, and
   the resident memory each adds at its peak (+MB), in a fresh process per format (one process:
   per rank, saving the moments holds a parameter-shaped FP32 copy of one moment at a time).
Prints tables; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import megads.train.manifest as manifest
from megads.config import load_config
from megads.train.checkpoint import save_checkpoint
from megads.train.trainer import build_training_model
from parallel.context import ParallelContext


class PeakMemory:
    """The largest resident set size (MB) above the starting one while the block runs, sampled
    from /proc/self/statm every millisecond (ru_maxrss keeps the high-water mark of building the
    model, which hides what a save adds)."""

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.added = self.peak - self.start


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def measure_optimizer_format(config: str, fmt: str) -> dict:
    """In this (fresh) process: save and load the optimizer state in format `fmt` once."""
    from megads.train.checkpoint import write_tensors, load_optimizer_moments
    from parallel.zero1_checkpoint import MOMENTS

    cfg = load_config(config)
    model, optimizer = build_training_model(cfg, ParallelContext.single(), log=lambda *_: None)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "optimizer").mkdir()
        started = time.perf_counter()
        with PeakMemory() as saving:
            if fmt == "shards":
                torch.save(optimizer.state_dict(), directory / "optimizer" / "rank_00000.pt")
            else:
                for moment in MOMENTS:
                    moments = optimizer.parameter_moments((moment,))
                    write_tensors(directory / "optimizer", moment,
                                   model.full_state({k: m[moment] for k, m in moments.items()}))
                    del moments
        save_s = time.perf_counter() - started
        started = time.perf_counter()
        with PeakMemory() as loading:
            if fmt == "shards":
                optimizer.load_state_dict(torch.load(directory / "optimizer" / "rank_00000.pt", weights_only=True))
            else:
                load_optimizer_moments(directory, model, optimizer, {"optimizer_steps": optimizer.steps})
        load_s = time.perf_counter() - started
        size = sum(p.stat().st_size for p in (directory / "optimizer").iterdir())
    return {"save_s": save_s, "load_s": load_s, "save_peak_mb": saving.added, "load_peak_mb": loading.added,
            "mb": size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/configs/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--measure-format", choices=["shards", "moments"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_format:
        print(json.dumps(measure_optimizer_format(args.config, args.measure_format)))
        return

    cfg = load_config(args.config)
    ctx = ParallelContext.single()
    model, optimizer = build_training_model(cfg, ctx, log=lambda *_: None)
    real_checksum = manifest.file_checksum
    times: dict[str, list[float]] = {"without checksums": [], "with xxh3_128": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = Path(tmp)
        for i in range(args.repeats * 2 + 1):
            mode = "with xxh3_128" if i % 2 else "without checksums"
            manifest.file_checksum = real_checksum if i % 2 else (lambda path: "")
            started = time.perf_counter()
            ckpt = save_checkpoint(checkpoints, i + 1, cfg, model, optimizer, {"torch_rng": torch.get_rng_state()},
                                   keep=1, ctx=ctx)
            elapsed = time.perf_counter() - started
            if i > 0:  # the first save warms the page cache and the allocator
                times[mode].append(elapsed)
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    manifest.file_checksum = real_checksum

    base = statistics.median(times["without checksums"])
    print(f"checkpoint of {args.config}: {size / 1e6:.1f} MB, {args.repeats} saves each, medians")
    print(f"{'save':<20}{'seconds':>10}{'vs without':>12}")
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"{mode:<20}{median:>10.3f}{median / base:>11.3f}x")

    print(f"\noptimizer state of {args.config}, one process, best of 3 fresh processes per format")
    print(f"{'format':<34}{'MB':>8}{'save s':>9}{'+MB':>7}{'load s':>9}{'+MB':>7}")
    for fmt, label in (("shards", "per-rank ZeRO-1 shards (before)"), ("moments", "full moments by name (now)")):
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--config", args.config, "--measure-format", fmt],
                                          capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                for _ in range(3)]
        best = {k: min(r[k] for r in runs) for k in runs[0]}
        print(f"{label:<34}{best['mb']:>8.1f}{best['save_s']:>9.3f}{best['save_peak_mb']:>7.0f}{best['load_s']:>9.3f}"
              f"{best['load_peak_mb']:>7.0f}")


if __name__ == "__main__":
    main()

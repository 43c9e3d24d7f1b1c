"""What checksums cost a checkpoint save: `save_checkpoint` of a config's model (default: the README's
tiny.yaml) with and without hashing, alternating, and the median of each.

    python tools/bench_checkpoint.py [--config examples/configs/tiny.yaml] [--repeats 7]

"Without" replaces the file hash by nothing (sizes are still recorded and every file is still
flushed to disk), so the difference is what hashing adds to the wall time of a save. Prints a
table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import megads.train.manifest as manifest
from megads.config import load_config
from megads.train.checkpoint import save_checkpoint
from megads.train.trainer import build_training_model
from parallel.context import ParallelContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/configs/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()

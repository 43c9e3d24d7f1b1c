"""Activation recomputation (`train.recompute`): the memory each mode saves and the time it pays,
on examples/configs/tiny.yaml's model and batch (fp32, one micro-batch of 8 x 256 tokens).

    python tools/bench_recompute.py [--steps 12] [--warmup 2] [--threads 2] [--config PATH] [--set KEY=VALUE ...]

One process, one model per mode (none, selective, full), built from the same seed, each trained by
the trainer's own step (`megads.train.trainer.train_step`: forward, backward, AdamW) on the same
batches; the three give the same losses and gradients, so they stay identical.

* step time: the median of --steps steps after --warmup, the modes interleaved round-robin (step i
  of every mode before step i + 1 of any, each step starting with another mode), so that they share
  the machine's noise; wall-clock, and the process's CPU time (all threads), which other processes
  on a shared machine disturb less. "extra" is against none's median of the same run.
* activation memory: `megads.train.activation_memory.measure_activation_memory` over one forward
  and backward of the step (a separate, slower pass): a dispatch mode counts every storage an op
  allocates in the forward, or in a recomputation in the backward, for as long as anything holds
  it. "kept" is what is alive when the backward starts (what the forward keeps for it); "peak"
  the most alive at once (forward temporaries and recomputed tensors included). Exact bytes, the
  same on any machine. "saved" is kept against none's.

The step time includes the optimizer; on a shared machine, quote the ratios of one run with its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from megads.config import load_config  # noqa: E402
from megads.train.activation_memory import measure_activation_memory  # noqa: E402
from megads.train.data import autocast  # noqa: E402
from megads.train.model_stages import ModelStages  # noqa: E402
from megads.train.optimizer import build_optimizer  # noqa: E402
from megads.train.trainer import train_step  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402

MODES = ("none", "selective", "full")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny.yaml"


def batches(cfg, steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Random token micro-batches for each step (the data does not change the cost)."""
    t, generator = cfg.train, torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_length + 1), generator=generator)
        out.append([(ids[i:i + t.micro_batch_size, :-1], ids[i:i + t.micro_batch_size, 1:])
                    for i in range(0, t.global_batch_size, t.micro_batch_size)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ctx = ParallelContext.single()
    runs = {}
    for mode in MODES:
        cfg = load_config(args.config, [*args.set, f"train.recompute={mode}"])
        model = ModelStages(cfg, ctx).train()
        runs[mode] = (cfg, model, build_optimizer(model, cfg.train, ctx))
    cfg = runs["none"][0]
    data = batches(cfg, args.warmup + args.steps + 1)

    times = {mode: [] for mode in MODES}        # (wall, CPU) seconds per step
    for step in range(args.warmup + args.steps):
        for i in range(len(MODES)):             # each step starts with another mode: no mode always runs first
            mode = MODES[(step + i) % len(MODES)]
            cfg, model, optimizer = runs[mode]
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(model, optimizer, cfg, step, data[step])
            if step >= args.warmup:
                times[mode].append((time.perf_counter() - start, time.process_time() - start_cpu))

    memory = {}              # after the timing: the meter's pass leaves the allocator in another state
    for mode, (cfg, model, optimizer) in runs.items():
        with autocast(cfg, ctx.device):          # train.precision, as train_step runs it
            memory[mode] = measure_activation_memory(lambda: model.run(data[-1]))
        optimizer.zero_grad(set_to_none=True)

    t = cfg.train
    print(f"# {Path(args.config).name}{' ' + ' '.join(args.set) if args.set else ''}: micro-batch "
          f"{t.micro_batch_size} x {t.seq_length}, {t.precision}, {args.threads} threads, median of {args.steps} "
          f"steps after {args.warmup}; load average {os.getloadavg()[0]:.2f}")
    print("| recompute | step time (s) | extra vs none | CPU time (s) | extra vs none | activations kept (MiB) | "
          "saved vs none | peak (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    medians = {mode: [statistics.median(t[k] for t in times[mode]) for k in (0, 1)] for mode in MODES}
    base_kept = memory["none"].kept
    for mode in MODES:
        (wall, cpu), (base_wall, base_cpu), m = medians[mode], medians["none"], memory[mode]
        print(f"| {mode} | {wall:.3f} | {100 * (wall / base_wall - 1):+.1f}% | {cpu:.3f} | "
              f"{100 * (cpu / base_cpu - 1):+.1f}% | {m.kept / 2**20:.1f} | {100 * (1 - m.kept / base_kept):.1f}% | "
              f"{m.peak / 2**20:.1f} |")


if __name__ == "__main__":
    main()

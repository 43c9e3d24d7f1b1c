"""Throughput, memory and communication of the parallel layouts on CPU (gloo), one training step at a time.

    python tools/bench_layouts.py [--layouts 1,tp2,dp2,dp2ep2,tp2ep2,tp2dp2ep4] [--steps 5] [--warmup 2]
                                  [--seq 128] [--global-batch 8] [--micro-batch 4] [--threads N]
                                  [--config examples/configs/tiny.yaml]

Each layout runs `warmup + steps` full optimizer steps (megads.train.trainer.train_step: forward,
backward, ZeRO-1 AdamW, router-bias update) of the config's model (megads.train.model_stages.ModelStages
under the layout's ParallelContext) on fresh gloo ranks
(tools.harness.distributed.run_distributed), all layouts on the same random token batches.
A layout is written as tp<N>dp<N>ep<N> in any order, missing parts 1 ("1" alone: one process,
no torch.distributed groups); world size = tp x dp (pipeline parallelism is not benchmarked).

Per layout it prints: ranks, global tokens/s (global batch tokens / step time), step time (per
step the slowest rank, averaged over the measured steps), the ratio of tokens/s to the 1-rank row
of the same run, peak resident memory per rank (VmHWM after resetting it at process start, minus
the RSS then: what the layout itself allocated; the largest rank), and per collective kind the
bytes per step one rank moves (mean over ranks), counted by parallel.comm_meter.count_collectives
through the context's groups (bytes = the collective's payload as defined there: all-reduce the
tensor, all-gather the output, reduce-scatter the input, all-to-all the input), then the same per
group (tp, dp, ep, edp, stage, ...).

Each rank runs torch.set_num_threads(max(1, cores // ranks)) (--threads N overrides). On a machine
with fewer cores than threads x ranks (or shared with other work) multi-rank layouts are
oversubscribed: their tokens/s measure the overhead of the layout (communication, smaller GEMMs,
Python per rank), not scaling. On a loaded machine a multi-threaded rank can be several times
slower than a single-threaded one (OpenMP threads waiting for each other's time slices), which
makes the 1-rank baseline look bad: compare with --threads 1 before reading anything into "vs 1".
Counting collectives (an observer on each group) costs a few microseconds per call inside the timed region.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from megads.config import config_from_dict, validate  # noqa: E402
from megads.train.model_stages import ModelStages  # noqa: E402
from megads.train.optimizer import build_optimizer  # noqa: E402
from megads.train.trainer import parallel_context, train_step  # noqa: E402
from parallel.comm_meter import CollectiveStats, count_collectives  # noqa: E402
from tools.harness.distributed import run_distributed  # noqa: E402

DEFAULT_LAYOUTS = "1,tp2,dp2,dp2ep2,tp2ep2,tp2dp2ep4"
KINDS = {"all_reduce": "AR MB", "all_gather": "AG MB", "reduce_scatter": "RS MB", "all_to_all": "A2A MB"}
# ^ the byte columns; other kinds (broadcast, p2p, ...) are summed under "other MB"


def parse_layout(text: str) -> tuple[int, int, int]:
    """'tp2dp2ep4' -> (tp, dp, ep); '1' -> (1, 1, 1)."""
    text = text.strip().lower()
    if text in ("1", "single", "tp1dp1ep1"):
        return 1, 1, 1
    parts = re.findall(r"(tp|dp|ep)(\d+)", text)
    if not parts or "".join(f"{k}{v}" for k, v in parts) != text:
        raise SystemExit(f"bad layout {text!r}: write e.g. tp2, dp2ep2, tp2dp2ep4 or 1")
    sizes = {"tp": 1, "dp": 1, "ep": 1}
    for key, value in parts:
        sizes[key] = int(value)
    return sizes["tp"], sizes["dp"], sizes["ep"]


def layout_name(tp: int, dp: int, ep: int) -> str:
    if tp * dp == 1:
        return "1 rank"
    return "+".join(f"{k.upper()}{v}" for k, v in (("tp", tp), ("dp", dp), ("ep", ep)) if v > 1)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_batches(vocab: int, global_batch: int, seq: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (global_batch, seq + 1), generator=gen) for _ in range(count)]


def bench_worker(raw_cfg: dict, tp: int, ep: int, steps: int, warmup: int, threads: int) -> dict:
    """One rank of one layout: build, run warmup + steps train_steps, report times, memory, counts."""
    torch.set_num_threads(threads)
    peak_reset = _reset_peak_rss()
    rss_start_kb = _status_kb("VmRSS")
    raw = {**raw_cfg, "parallel": {"tensor_parallel": tp, "expert_parallel": ep}}
    cfg = config_from_dict(raw)
    ctx = parallel_context(cfg)
    model = ModelStages(cfg, ctx).train()
    optimizer = build_optimizer(model, cfg.train, ctx)
    t = cfg.train
    per_rank = t.global_batch_size // ctx.dp.size
    times, stats = [], CollectiveStats()
    for step, batch in enumerate(make_batches(cfg.model.vocab_size, t.global_batch_size, t.seq_length,
                                              warmup + steps)):
        mine = batch[ctx.dp.rank * per_rank:(ctx.dp.rank + 1) * per_rank]
        micro = [(mine[i:i + t.micro_batch_size, :-1], mine[i:i + t.micro_batch_size, 1:])
                 for i in range(0, per_rank, t.micro_batch_size)]
        ctx.barrier()  # every rank starts the step together (not counted, not timed)
        with count_collectives(ctx) as step_stats:
            started = time.perf_counter()
            record = train_step(model, optimizer, cfg, step, micro)
            elapsed = time.perf_counter() - started
        if step >= warmup:
            times.append(elapsed)
            stats.merge(step_stats)
        if record["skipped"]:
            raise RuntimeError(f"step {step} was skipped ({record['skip_reason']})")
    return {"rank": ctx.rank, "times": times, "stats": stats, "loss": record["loss"],
            "peak_kb": _status_kb("VmHWM"), "rss_start_kb": rss_start_kb, "peak_reset": peak_reset,
            "params": model.num_parameters(), "threads": torch.get_num_threads()}


def run_layout(raw_cfg: dict, tp: int, dp: int, ep: int, steps: int, warmup: int, cores: int,
               timeout_s: float, threads: int | None = None) -> dict:
    world = tp * dp
    threads = threads or max(1, cores // world)
    started = time.perf_counter()
    results = run_distributed(bench_worker, world, args=(raw_cfg, tp, ep, steps, warmup, threads),
                              timeout_s=timeout_s, num_threads=threads)
    wall = time.perf_counter() - started
    step_times = [max(r["times"][i] for r in results) for i in range(steps)]
    step_time = statistics.mean(step_times)
    t = raw_cfg["train"]
    kinds: dict[str, float] = {}
    groups: dict[tuple[str, str], float] = {}
    comm_s = 0.0
    for r in results:
        s: CollectiveStats = r["stats"]
        for kind, v in s.by_kind().items():
            kinds[kind] = kinds.get(kind, 0.0) + v.bytes / steps / world
        for key, v in s.by_group().items():
            groups[key] = groups.get(key, 0.0) + v.bytes / steps / world
        comm_s += s.seconds() / steps / world
    return {
        "name": layout_name(tp, dp, ep), "ranks": world, "threads": threads,
        "tokens_per_s": t["global_batch_size"] * t["seq_length"] / step_time, "step_time": step_time,
        "step_min": min(step_times),
        "peak_mb": max(r["peak_kb"] for r in results) / 1024,
        "delta_mb": max(r["peak_kb"] - r["rss_start_kb"] for r in results) / 1024,
        "peak_reset": all(r["peak_reset"] for r in results),
        "kinds": kinds, "groups": groups, "comm_s": comm_s, "loss": results[0]["loss"], "wall": wall,
        "params": results[0]["params"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "examples/configs/tiny.yaml"))
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma-separated (default {DEFAULT_LAYOUTS})")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per layout")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4,
                    help="sequences per micro-batch (the same in every layout; must divide global/dp)")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                    help="cores to share among ranks (default: this process's CPU affinity)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per rank (default: max(1, cores // ranks))")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per layout before it counts as hung")
    args = ap.parse_args(argv)

    raw = yaml.safe_load(Path(args.config).read_text())
    raw.pop("data", None)  # the benchmark feeds random tokens
    raw.pop("parallel", None)
    raw["train"] = {**raw.get("train", {}), "seq_length": args.seq, "global_batch_size": args.global_batch,
                    "micro_batch_size": args.micro_batch, "max_steps": args.steps + args.warmup,
                    "num_threads": None}
    layouts = [parse_layout(x) for x in args.layouts.split(",") if x.strip()]
    if (1, 1, 1) not in layouts:
        layouts.insert(0, (1, 1, 1))  # the baseline the ratios refer to
    for tp, dp, ep in layouts:  # fail before running anything
        cfg = config_from_dict({**raw, "parallel": {"tensor_parallel": tp, "expert_parallel": ep}})
        validate(cfg, world_size=tp * dp)

    m = raw["model"]
    print(f"model: {Path(args.config).name} (hidden {m.get('hidden_size')}, {m.get('num_hidden_layers')} layers, "
          f"{m.get('n_routed_experts')} routed experts, vocab {m.get('vocab_size')}); seq {args.seq}, global batch "
          f"{args.global_batch}, micro-batch {args.micro_batch}; fp32; {args.warmup} warm-up + {args.steps} measured "
          f"steps per layout; gloo on CPU")
    threads = f"{args.threads} threads" if args.threads else f"max(1, {args.cores} // ranks) threads"
    print(f"cores: {args.cores}; each rank uses {threads}. NOTE: with {args.cores} cores "
          f"multi-rank layouts are oversubscribed (and the machine may be shared): their tokens/s measure the "
          f"overhead of the layout, not its scaling.")
    rows = []
    for tp, dp, ep in layouts:
        row = run_layout(raw, tp, dp, ep, args.steps, args.warmup, args.cores, args.timeout, args.threads)
        rows.append(row)
        print(f"  ran {row['name']:<12} in {row['wall']:.1f} s (loss after the last step {row['loss']:.4f})",
              flush=True)

    base = next(r for r in rows if r["ranks"] == 1 and r["name"] == "1 rank")["tokens_per_s"]
    mb = 1e6
    header = (f"{'layout':<12}{'ranks':>6}{'thr':>4}{'tokens/s':>10}{'vs 1':>7}{'step s':>8}{'peak MB':>9}"
              f"{'+MB':>7}" + "".join(f"{title:>9}" for title in KINDS.values()) + f"{'other MB':>9}"
              f"{'comm s':>8}")
    print()
    print("bytes per step per rank (MB, mean over ranks) by collective kind; 'comm s': time inside collectives "
          "per step per rank; peak MB: max over ranks of VmHWM; +MB: VmHWM minus the RSS at rank start")
    print(header)
    print("-" * len(header))
    for r in rows:
        other = sum(v for k, v in r["kinds"].items() if k not in KINDS)
        print(f"{r['name']:<12}{r['ranks']:>6}{r['threads']:>4}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s'] / base:>7.2f}{r['step_time']:>8.3f}{r['peak_mb']:>9.0f}{r['delta_mb']:>7.0f}"
              + "".join(f"{r['kinds'].get(k, 0.0) / mb:>9.3f}" for k in KINDS) + f"{other / mb:>9.3f}"
              f"{r['comm_s']:>8.3f}")
    if not all(r["peak_reset"] for r in rows):
        print("(VmHWM could not be reset at rank start here: peak MB includes the parent's peak)")
    print()
    print("bytes per step per rank by process group (MB, mean over ranks):")
    for r in rows:
        if not r["groups"]:
            print(f"  {r['name']:<12} no collectives")
            continue
        parts = [f"{kind} [{label}] {v / mb:.3g}" for (kind, label), v in sorted(r["groups"].items()) if v > 0]
        print(f"  {r['name']:<12} " + "; ".join(parts))


if __name__ == "__main__":
    main()

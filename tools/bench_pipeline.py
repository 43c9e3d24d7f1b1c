"""Pipeline schedules on CPU (gloo): step time, measured bubble vs the simulator, activation memory.

    python tools/bench_pipeline.py [--pp 4] [--schedules 1f1b,interleaved-1f1b,zbh1,dualpipe,dualpipev]
                                   [--micro-batches 8] [--micro-batch 1] [--seq 64] [--layers 8]
                                   [--dp 1] [--ep 1] [--overlap auto|on|off] [--steps 3] [--warmup 1]
                                   [--layers-per-stage 1,3,3,1]
                                   [--config examples/configs/tiny.yaml]

Each schedule runs `warmup + steps` full optimizer steps (megads.train.trainer.train_step on
megads.train.model_stages.ModelStages: forward, backward, gradient sums over copies, ZeRO-1 AdamW,
router-bias update) of the config's model cut into pipeline stages, on PP x DP fresh gloo ranks
(one process each, 1 thread each), all schedules on the same random token batches. Per schedule
it prints:

* step s: the slowest rank's `train_step` time, mean over the measured steps.
* pipe s: the slowest rank's pipeline run (`PipelineExecutor.run`: forward and backward only).
* bubble: measured bubble fraction of the pipeline run, mean over ranks: (run time - the rank's
  compute-op time) / run time, the ranks' clocks started together by a barrier.
* sim: the simulator's bubble fraction for *the same op durations*: each op of the measured step
  costs what it took (`MeasuredCosts`), messages cost nothing, a rank waits only for its
  receives (the executor's behaviour, p2p mode "wait-recv"). measured - sim is what the real run
  adds: message latency, Python between ops, and ranks competing for cores.
* act MB: peak bytes of tensors saved for backward that are alive at once on a rank (the max over
  ranks): distinct storages packed by autograd's saved-tensor hooks, released when the last saved
  reference to them is freed. Includes received activations that autograd saved; it does not
  include parameters, gradients and optimizer state.
* sim act: the simulator's peak live (micro-batch, stage) activations on the busiest rank (units
  of one stage's activations for one micro-batch): the schedule's memory shape, for comparison.

--layers-per-stage sets parallel.layers_per_stage for the schedules whose number of stages equals
its length (PP for 1F1B, ZB-H1 and DualPipe), the others keep the even split.

Overlap (DualPipe's F&B pairs): with --overlap auto, the DualPipe(V) rows run once without and once
with `parallel.overlap` (parallel/pipeline/overlap.py: the two halves of an F&B pair run as two
threads, the backward's collectives on twin groups). "both s" is then the time per step, on the
busiest rank, during which both halves ran at once. On a CPU with fewer cores than ranks the two
halves compete for cores (and the GIL) rather than hide communication.

On a machine with fewer cores than ranks the numbers measure the schedules under
oversubscription: a rank that waits for a message frees its core for another rank, so measured
bubbles are smaller than on dedicated devices and op times are inflated. Compare schedules
within one run; read the sim column for the schedule's shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from megads.config import config_from_dict  # noqa: E402
from megads.train.model_stages import ModelStages  # noqa: E402
from megads.train.optimizer import build_optimizer  # noqa: E402
from megads.train.trainer import parallel_context, train_step  # noqa: E402
from parallel.pipeline import Costs, build_schedule, live_activations, simulate  # noqa: E402
from parallel.pipeline.schedules import SCHEDULES  # noqa: E402
from tools.harness.distributed import run_distributed  # noqa: E402


@dataclass(frozen=True)
class MeasuredCosts(Costs):
    """Costs where every op costs what it took in a measured run (keyed by str(op))."""

    durations: Dict[str, float] = field(default_factory=dict, hash=False, compare=False)

    def of(self, op) -> float:
        return self.durations.get(str(op), 0.0) if op.is_compute else 0.0


class SavedActivationMeter:
    """Peak bytes of distinct storages saved for backward and alive at the same time.

    A saved tensor's storage counts from its first pack until the last saved tensor object using
    it is freed (weakref finalizers). Tensors that are parameters (leaves requiring grad) are not
    activations and are skipped."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._refs: Dict[int, list] = {}         # storage pointer -> [bytes, saved references]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def pack(self, t: torch.Tensor):
        if t.is_leaf and t.requires_grad:
            return t
        # Keep a detached alias, not t itself: a saved *output* that is t still points to its grad_fn,
        # a node -> saved tensor -> node cycle that nothing frees when the graph is retained (B/W split).
        saved = t.detach()
        storage = saved.untyped_storage()
        key = storage.data_ptr()
        if key:
            entry = self._refs.setdefault(key, [storage.nbytes(), 0])
            if entry[1] == 0:
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def make_config(raw: dict, args, schedule: str, overlap: bool):
    model = {**raw["model"], "num_hidden_layers": args.layers}
    train = {**raw.get("train", {}), "seq_length": args.seq, "micro_batch_size": args.micro_batch,
             "global_batch_size": args.micro_batches * args.micro_batch * args.dp, "max_steps": 1_000_000,
             "warmup_steps": 0, "precision": "fp32"}
    parallel = {"pipeline_parallel": args.pp, "schedule": schedule, "expert_parallel": args.ep,
                "virtual_stages": 2 if schedule == "interleaved-1f1b" else 1, "overlap": overlap}
    split = [int(n) for n in args.layers_per_stage.split(",")] if args.layers_per_stage else None
    if split and len(split) == build_schedule(schedule, args.pp, args.micro_batches, 2).num_stages:
        parallel["layers_per_stage"] = split
    return config_from_dict({"model": model, "train": train, "parallel": parallel})


def bench_worker(raw: dict, args, schedule: str, overlap: bool):
    torch.manual_seed(0)
    cfg = make_config(raw, args, schedule, overlap)
    ctx = parallel_context(cfg)                   # validates the layout against the world size
    model = ModelStages(cfg, ctx).train()
    model.executor.sync_start = True              # the ranks' clocks start the pipeline run together
    optimizer = build_optimizer(model, cfg.train, ctx)
    gen = torch.Generator().manual_seed(1 + ctx.dp.rank)
    meter = SavedActivationMeter()
    steps, pipes, bubbles, durations, both = [], [], [], [], []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size // ctx.dp.size,
                                                         cfg.train.seq_length + 1), generator=gen)
        mbs = cfg.train.micro_batch_size
        batches = [(tokens[i:i + mbs, :-1], tokens[i:i + mbs, 1:]) for i in range(0, tokens.shape[0], mbs)]
        runner = model.executor.fb_runner
        if runner is not None:
            runner.clear()
        ctx.barrier()
        start = time.perf_counter()
        with meter.hooks():
            train_step(model, optimizer, cfg, step, batches)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            ex = model.executor
            steps.append(elapsed)
            pipes.append((ex.step_start, ex.step_end))
            bubbles.append(ex.measured_bubble())
            durations.append({str(t.op): t.duration for t in ex.timeline})
            both.append(sum(t.overlap for t in runner.timings) if runner is not None else 0.0)
    return {"steps": steps, "pipes": pipes, "bubbles": bubbles, "durations": durations, "both": both,
            "peak_bytes": meter.peak, "pp_rank": ctx.pp.rank, "dp_rank": ctx.dp.rank}


def summarize(results, args, schedule: str) -> dict:
    sched = build_schedule(schedule, args.pp, args.micro_batches, 2)
    pipeline = [r for r in results if r["dp_rank"] == 0]     # one pipeline's ranks
    measured, simulated, pipe_times = [], [], []
    for i in range(args.steps):
        start = min(r["pipes"][i][0] for r in pipeline)
        end = max(r["pipes"][i][1] for r in pipeline)
        makespan = end - start
        pipe_times.append(makespan)
        measured.append(statistics.mean(1 - r["bubbles"][i]["busy"] / makespan for r in pipeline))
        durations = {}
        for r in pipeline:
            durations.update(r["durations"][i])
        sim = simulate(sched, MeasuredCosts(durations=durations), p2p="wait-recv")
        simulated.append(statistics.mean(b / sim.makespan for b in sim.bubble))
    return {
        "step": statistics.mean(max(r["steps"][i] for r in results) for i in range(args.steps)),
        "pipe": statistics.mean(pipe_times),
        "bubble": statistics.mean(measured),
        "sim": statistics.mean(simulated),
        "act_mb": max(r["peak_bytes"] for r in results) / 2**20,
        "sim_act": max(live_activations(sched.ops[r]) for r in range(args.pp)),
        "both": statistics.mean(max(r["both"][i] for r in results) for i in range(args.steps)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "examples/configs/tiny.yaml"))
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--overlap", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--layers-per-stage", default=None, help="e.g. 1,3,3,1 (see above)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())
    runs = []
    for schedule in args.schedules.split(","):
        fused = schedule in ("dualpipe", "dualpipev")
        if args.overlap == "on" and fused:
            modes = [True]
        elif args.overlap == "auto" and fused:
            modes = [False, True]
        else:
            modes = [False]
        for overlap in modes:
            world = args.pp * args.dp
            results = run_distributed(bench_worker, world, args=(raw, args, schedule, overlap), timeout_s=1800)
            row = summarize(results, args, schedule)
            split = make_config(raw, args, schedule, overlap).parallel.layers_per_stage
            row["name"] = schedule + (" +overlap" if overlap else "") + (f" [{','.join(map(str, split))}]" if split else "")
            runs.append(row)
            print(f"  {row['name']}: step {row['step']:.3f} s", file=sys.stderr, flush=True)

    print(f"\nPP {args.pp} x DP {args.dp} (EP {args.ep}), {args.micro_batches} micro-batches of {args.micro_batch} x "
          f"{args.seq} tokens, {args.layers} layers; mean of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'schedule':<30}{'step s':>8}{'pipe s':>8}{'bubble':>8}{'sim':>7}{'act MB':>8}{'sim act':>8}"
          f"{'vs 1f1b':>9}{'both s':>8}")
    base = next((r["step"] for r in runs if r["name"].split(" ")[0] == "1f1b"), runs[0]["step"])
    for r in runs:
        print(f"{r['name']:<30}{r['step']:>8.3f}{r['pipe']:>8.3f}{r['bubble']:>8.1%}{r['sim']:>7.1%}"
              f"{r['act_mb']:>8.1f}{r['sim_act']:>8d}{base / r['step']:>9.2f}"
              + (f"{r['both']:>8.3f}" if r["name"].endswith("+overlap") else f"{'':>8}"))
    print("bubble: measured idle fraction of the pipeline run (mean over ranks); sim: the simulator's for the same "
          "op durations;\nact MB: peak saved-for-backward bytes on a rank; sim act: simulated peak live "
          "activations (stage x micro-batch units); vs 1f1b: step-time speed-up; both s: time with both F&B halves running")


if __name__ == "__main__":
    main()

"""`megads profile CONFIG`: a few training steps of a config under its layout, and one table.

    megads profile examples/configs/tiny.yaml [--set ...] [--steps 5] [--warmup 2] [--top 10]
                   [--vary train.recompute=none,selective,full] [--json FILE]
    torchrun --nproc_per_node 4 -m megads.cli profile CONFIG --set parallel.tensor_parallel=2 ...

The steps are the trainer's own (`megads.train.trainer.step_function`: same model, data, optimizer
and records) in a scratch output directory (nothing is checkpointed, the config's output_dir is
not touched). The first `--warmup` steps are run and dropped (allocations, first-call costs); the
table is over the next `--steps`:

* tokens/s, TFLOP/s per device and MFU (the FLOP model over the measured time: megads.train.flops);
* the step time split into phases (megads.train.step_profile: forward, backward, weight_grad, the
  pipeline wait, gradient sync, optimizer, ...), mean over ranks and steps; here the executor
  synchronizes the device around every op, so on a GPU the split is device time (and overlap of
  compute with communication is removed: read throughput from `megads train`);
* the pipeline bubble per pipeline rank (PP > 1);
* communication per step per collective kind (calls, bytes, seconds; mean over ranks);
* peak memory per rank over the measured steps (device memory on a GPU; the resident set on CPU,
  which also holds the model, optimizer and data, so compare variants by difference);
* activation memory per rank: the bytes one more forward/backward keeps for its backward, and its
  peak, counted allocation by allocation (megads.train.activation_memory; exact on any device), which
  is what train.recompute trades for time;
* with `--top N` (default 10), one more step under torch.profiler and its N operators with the most
  self time on rank 0 (kernels on a GPU).

`--vary KEY=V1,V2,...` profiles the config once per value (same process, fresh model each time)
and prints one column per value, e.g. recompute modes or schedules side by side.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity

from megads.config import Config, ConfigError, apply_overrides, config_from_dict, read_config_file
from megads.train.step_profile import PHASES
from megads.train.telemetry import peak_memory_gb, reset_peak_memory


_SCHEDULE_SPAN = re.compile(r"^(F|B|W|BW|FB) mb\d+ stage\d+$")   # PipelineExecutor's record_function names


@dataclass
class RankProfile:
    """One rank's measured steps: phase seconds and collectives per step (means), its peak memory."""

    rank: int
    time_s: dict[str, float]
    comm: dict[str, dict[str, float]]
    peak_memory_gb: float
    activations_kept_mb: float = 0.0     # one more step's forward/backward, measured (megads.train.activation_memory)
    activations_peak_mb: float = 0.0
    pipeline_bubble: Optional[float] = None


@dataclass
class ProfileResult:
    """One profiled config (a column of the table)."""

    label: str
    layout: str
    device: str
    steps: int
    tokens_per_s: float
    step_time_s: float
    tflops_per_device: float
    mfu: Optional[float]
    losses: list[float]
    ranks: list[RankProfile] = field(default_factory=list)
    top_operators: list[dict] = field(default_factory=list)   # rank 0's, from one more step under torch.profiler

    def mean_time_s(self) -> dict[str, float]:
        """Phase seconds per step, mean over ranks."""
        return mean_time_split([r.time_s for r in self.ranks])

    def mean_comm(self) -> dict[str, dict[str, float]]:
        """Per collective kind: calls, bytes and seconds per step, mean over ranks."""
        return mean_comm([r.comm for r in self.ranks])


def mean_time_split(splits: list[dict[str, float]]) -> dict[str, float]:
    """The mean of several `time_s` splits (steps or ranks); a phase absent from one counts 0 there."""
    phases = {p for split in splits for p in split}
    return {p: statistics.fmean(split.get(p, 0.0) for split in splits) for p in PHASES if p in phases}


def mean_comm(comms: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The mean of several `comm` records (steps or ranks), per kind and field; absent counts 0."""
    kinds = sorted({k for comm in comms for k in comm})
    return {k: {f: statistics.fmean(comm.get(k, {}).get(f, 0.0) for comm in comms)
                for f in ("calls", "bytes", "seconds")} for k in kinds}


def variants(vary: Optional[str]) -> list[tuple[str, list[str]]]:
    """(column label, extra overrides) per value of `--vary KEY=V1,V2,...`; one unlabelled column without."""
    if vary is None:
        return [("", [])]
    key, sep, values = vary.partition("=")
    names = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or not all(names):
        raise ConfigError(f"--vary must look like SECTION.KEY=VALUE1,VALUE2 (e.g. train.recompute=none,selective), "
                          f"got {vary!r}.")
    return [(f"{key.strip()}={name}", [f"{key.strip()}={name}"]) for name in names]


def profile_config(config: Optional[str], overrides: list[str], steps: int, warmup: int,
                   vary: Optional[str] = None, log: Callable[[str], None] = print, top: int = 0
                   ) -> list[ProfileResult]:
    """Profile CONFIG (with `overrides`) once per `--vary` value; returns the columns (on every rank).
    `top` > 0: one more step runs under torch.profiler and its `top` operators by self time are kept."""
    if steps < 1 or warmup < 0 or top < 0:
        raise ConfigError(f"--steps must be at least 1, --warmup and --top not negative, got {steps}, {warmup} and "
                          f"{top}.")
    raw = {} if config is None else read_config_file(config)
    configs = []
    for label, extra in variants(vary):   # every variant is checked before the first one runs
        cfg = config_from_dict(apply_overrides(raw, list(overrides) + extra))
        configs.append((label, cfg))
    with tempfile.TemporaryDirectory(prefix="megads-profile-") as scratch:
        return [_profile_one(label, cfg, Path(scratch) / str(index), steps, warmup, top, log)
                for index, (label, cfg) in enumerate(configs)]


def _profile_one(label: str, cfg: Config, scratch: Path, steps: int, warmup: int, top: int, log) -> ProfileResult:
    from megads.train.trainer import run_job   # imported late: `--help` should not pay for torch

    train = dataclasses.replace(cfg.train, max_steps=warmup + steps + (1 if top else 0), output_dir=str(scratch),
                                eval_every=0, save_every=0, profile_steps=[])
    cfg = dataclasses.replace(cfg, train=train)
    if label:
        log(f"profiling {label}")
    return run_job(cfg, "train", log, lambda ctx, rank_log: _measure(label, cfg, ctx, steps, warmup, top, rank_log))


def top_operators(prof, device: torch.device, count: int) -> list[dict]:
    """The `count` operators (kernels on a GPU) with the most self time in a torch.profiler run: on a
    GPU self device time, on CPU self CPU time. megads' own spans (phases, schedule ops) are left
    out: they contain the operators."""
    on_device = device.type != "cpu"
    rows = []
    for event in prof.key_averages():
        if event.key.startswith("megads.") or _SCHEDULE_SPAN.match(event.key) or event.key.startswith("ProfilerStep"):
            continue
        self_us = event.self_device_time_total if on_device else event.self_cpu_time_total
        if self_us > 0:
            rows.append({"name": event.key, "calls": event.count, "self_ms": self_us / 1e3})
    total = sum(r["self_ms"] for r in rows)
    rows.sort(key=lambda r: -r["self_ms"])
    return [{**r, "share": r["self_ms"] / total} for r in rows[:count]]


def _measure(label: str, cfg: Config, ctx, steps: int, warmup: int, top: int, log) -> ProfileResult:
    from megads.train.data import build_training_data
    from megads.train.device_peak import device_peak
    from megads.train.trainer import build_training_model, layout_description, prepare_output, step_function
    from parallel.group import Group

    out = prepare_output(cfg, ctx)
    data = build_training_data(cfg, ctx, log)
    torch.manual_seed(cfg.train.seed)
    model, optimizer = build_training_model(cfg, ctx, log)
    model.executor.synchronize_timing = True     # device time per op on a GPU (module doc)
    peak = device_peak(ctx.device, cfg.fp8.enabled, cfg.data.cache_dir, log) if ctx.rank == 0 else None
    take_step = step_function(cfg, ctx, model, optimizer, data, peak, out / "profile")
    for step in range(warmup):
        take_step(step)
        log(f"warm-up step {step + 1}/{warmup} done")
    reset_peak_memory(ctx.device)
    records = []
    for step in range(warmup, warmup + steps):
        records.append(take_step(step))
        log(f"step {step + 1 - warmup}/{steps}: {records[-1]['step_time_s'] * 1e3:.1f} ms")

    mean = statistics.fmean
    activations = _activation_memory(cfg, ctx, model, optimizer, data, warmup + steps)
    mine = RankProfile(
        rank=ctx.rank, activations_kept_mb=activations.kept / 1e6, activations_peak_mb=activations.peak / 1e6,
        time_s=mean_time_split([r["time_s"] for r in records]), comm=mean_comm([r["comm"] for r in records]),
        peak_memory_gb=peak_memory_gb(ctx.device),
        pipeline_bubble=mean(r["pipeline_bubble"] for r in records) if ctx.pp.size > 1 else None)
    ranks = Group.world().all_gather_object(mine)
    operators = []
    if top:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            take_step(warmup + steps)
        operators = top_operators(prof, ctx.device, top)
    step_time = mean(r["step_time_s"] for r in records)
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    mfus = [r["mfu"] for r in records if r.get("mfu") is not None]
    layout = f"{layout_description(cfg, ctx, model)}, {cfg.train.precision}{', FP8' if cfg.fp8.enabled else ''}"
    return ProfileResult(label=label, layout=layout, device=ctx.device.type, steps=steps,
                         tokens_per_s=tokens / step_time, step_time_s=step_time,
                         tflops_per_device=mean(r["tflops_per_device"] for r in records),
                         mfu=mean(mfus) if mfus else None, losses=[r["loss"] for r in records], ranks=ranks,
                         top_operators=operators)


def _activation_memory(cfg: Config, ctx, model, optimizer, data, step: int):
    """The activation bytes one more forward/backward of the step's micro-batches keeps for its
    backward and at its peak (this rank), measured by following every allocation
    (megads.train.activation_memory: exact, and slow, so apart from the timed steps). Nothing of
    it reaches the model: its gradients and expert-load counts are dropped."""
    from megads.train.activation_memory import measure_activation_memory
    from megads.train.data import autocast

    batches = data.micro_batches(step, ctx.dp.rank, ctx.dp.size, cfg.train.micro_batch_size)
    optimizer.zero_grad(set_to_none=True)
    with autocast(cfg, ctx.device):
        memory = measure_activation_memory(lambda: model.run(batches))
    optimizer.zero_grad(set_to_none=True)
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
    return memory


def format_table(results: list[ProfileResult], title: str) -> str:
    """The profile as one text table, a column per result."""
    width = max(16, *(len(r.label) + 2 for r in results))
    rows: list[str] = [title]
    if len({r.layout for r in results}) == 1:
        rows.append(f"layout: {results[0].layout}")
    else:
        rows += [f"layout of {r.label}: {r.layout}" for r in results]
    rows.append("")

    def row(name: str, cells: list[str]) -> None:
        rows.append(f"{name:<34}" + "".join(f"{c:>{width}}" for c in cells))

    if len(results) > 1:
        row("", [r.label for r in results])
    row("tokens/s", [f"{r.tokens_per_s:,.0f}" for r in results])
    row("TFLOP/s per device", [f"{r.tflops_per_device:.4g}" for r in results])
    row("MFU", ["-" if r.mfu is None else f"{100 * r.mfu:.1f}%" for r in results])
    row("step time (ms, rank 0)", [f"{1e3 * r.step_time_s:.1f}" for r in results])
    splits = [r.mean_time_s() for r in results]
    rows.append("time per step (ms, % of the step; mean over ranks)")
    for phase in PHASES:
        if any(phase in s for s in splits):
            total = [sum(s.values()) for s in splits]
            row(f"  {phase}", [f"{1e3 * s[phase]:.1f} {100 * s[phase] / t if t else 0:4.1f}%" if phase in s else "-"
                               for s, t in zip(splits, total)])
    if any(rank.pipeline_bubble is not None for r in results for rank in r.ranks):
        rows.append("pipeline bubble (per rank)")
        for index in range(len(results[0].ranks)):
            row(f"  rank {index}", [f"{100 * r.ranks[index].pipeline_bubble:.1f}%"
                                    if r.ranks[index].pipeline_bubble is not None else "-" for r in results])
    comms = [r.mean_comm() for r in results]
    kinds = sorted({k for c in comms for k in c})
    rows.append("communication per step (mean over ranks): calls, MB, ms")
    if not kinds:
        rows.append("  none (one rank)")
    for kind in kinds:
        row(f"  {kind}", [f"{c[kind]['calls']:.0f} {c[kind]['bytes'] / 1e6:.2f} {1e3 * c[kind]['seconds']:.1f}"
                          if kind in c else "-" for c in comms])
    device = "resident set" if results[0].device == "cpu" else "device memory"
    rows.append(f"peak memory (GB, {device}; per rank)")
    for index in range(len(results[0].ranks)):
        row(f"  rank {index}", [f"{r.ranks[index].peak_memory_gb:.3f}" for r in results])
    rows.append("activation memory (MB per rank: kept for the backward / peak of the pass)")
    for index in range(len(results[0].ranks)):
        row(f"  rank {index}", [f"{r.ranks[index].activations_kept_mb:.1f} / {r.ranks[index].activations_peak_mb:.1f}"
                                for r in results])
    for r in results:
        if r.top_operators:
            time_kind = "CPU" if r.device == "cpu" else "device"
            rows += ["", f"top operators by self {time_kind} time, rank 0, one step{' of ' + r.label if r.label else ''}:",
                     f"  {'operator':<60}{'calls':>8}{'ms':>10}{'share':>8}"]
            rows += [f"  {op['name'][:59]:<60}{op['calls']:>8}{op['self_ms']:>10.1f}{100 * op['share']:>7.1f}%"
                     for op in r.top_operators]
    return "\n".join(rows)


def write_json(results: list[ProfileResult], path: Path) -> None:
    """The results as JSON (a list of columns), for scripts."""
    path.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1) + "\n")

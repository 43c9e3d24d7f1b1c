"""The training loop of `megads train`.

One optimizer step: the global batch's micro-batches run forward and backward (gradients
accumulate, each micro-batch's loss divided by their number), a non-finite loss or gradient skips
the step (reported, never trained on), the global gradient norm is clipped, AdamW updates the FP32
master weights, and each MoE layer's routing bias moves toward balance from the step's expert
loads. Every step appends a record to metrics.jsonl; checkpoints are written every `save_every`
steps, at the end, and when the run is interrupted (Ctrl-C / SIGTERM), and a new run in the same
output directory resumes from the latest one.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megads.config import Config, ConfigError, dump_config, validate
from megads.fp8.convert import convert_to_fp8, fp8_stats
from megads.errors import RunFailure
from megads.shards import CheckpointFormatError
from megads.train.checkpoint import (describe_error, list_checkpoints, load_checkpoint, load_model_weights,
                                     read_checkpoint_config, resolve_checkpoint, save_checkpoint, verify_checkpoint)
from megads.train.data import TrainingData, autocast, build_training_data
from megads.train.device_peak import DevicePeak, device_peak
from megads.train.flops import training_flops_per_step
from megads.train.lr_schedule import learning_rate
from megads.train.metrics import ProgressPrinter
from megads.train.model_stages import ModelStages
from megads.train.optimizer import build_optimizer
from megads.train.step_loop import run_steps
from megads.train.step_profile import PhaseClock, profiler_trace, step_profile
from megads.train.telemetry import GpuTelemetry, peak_host_memory_gb
from parallel.comm_meter import count_collectives
from parallel.context import ParallelContext, destroy_distributed, world_size_from_environment
from parallel.group import Group
from parallel.zero1 import DistributedOptimizer


@dataclass
class TrainResult:
    output_dir: Path
    last_step: int
    last_loss: Optional[float]


def check_same_model(cfg: Config, ckpt: Path, advice: str = "use a new train.output_dir or the same model settings"
                     ) -> None:
    """ConfigError naming the model fields in which `ckpt`'s config differs from `cfg`'s."""
    saved = read_checkpoint_config(ckpt)
    if saved.model != cfg.model:
        changed = [k for k in vars(cfg.model) if getattr(saved.model, k) != getattr(cfg.model, k)]
        raise ConfigError(f"The checkpoint {ckpt} was trained with a different model (model.{', model.'.join(changed)} "
                          f"differ); {advice}.")


DataFactory = Callable[[Config, ParallelContext, Callable], TrainingData]


def train(cfg: Config, log=print, data: DataFactory = build_training_data, job: str = "train") -> TrainResult:
    """Run (or resume) training; under torchrun every rank calls this with the same config.

    `data(cfg, ctx, log)` builds what the run reads (default: the text corpus, or the blend of
    data.datasets; `megads sft`: a task's demonstrations); `job` names the command for the config
    rules ("train", "sft").
    The process group is started here if torchrun launched us and none exists, and then also
    destroyed at the end; a caller's own process group is left to the caller."""
    return run_job(cfg, job, log, lambda ctx, rank_log: _train(cfg, ctx, rank_log, data, job))


def run_job(cfg: Config, job: str, log, body: Callable[[ParallelContext, Callable], TrainResult]) -> TrainResult:
    """Validate, start the process groups (if torchrun launched us and none exists: then also
    destroyed at the end; a caller's own process group is left to the caller) and run
    `body(ctx, log)`, the log printing on rank 0 only."""
    started_here = not torch.distributed.is_initialized()
    ctx = parallel_context(cfg, job)
    try:
        return body(ctx, log if ctx.rank == 0 else (lambda *_: None))
    finally:
        if ctx.is_distributed and started_here:
            destroy_distributed()


class OutputDirectoryError(RunFailure):
    """The output or checkpoints directory cannot be written: found before any step is trained."""


def prepare_output(cfg: Config, ctx: ParallelContext) -> Path:
    """What a run sets up first: its threads, and (rank 0) its output directory with config.yaml
    and a checkpoints directory, both checked to be writable so that no step is trained only to be
    lost at the first save (OutputDirectoryError on every rank otherwise)."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    out = Path(cfg.train.output_dir)
    error = None
    if ctx.rank == 0:
        try:
            for directory in (out, out / "checkpoints"):
                directory.mkdir(parents=True, exist_ok=True)
                probe = directory / f".write-test-{os.getpid()}"
                probe.write_bytes(b"megads")
                probe.unlink()
            (out / "config.yaml").write_text(dump_config(cfg))
        except OSError as err:
            error = f"The output directory {out} is not writable ({describe_error(err)}); nothing was trained."
    error = Group.world().first_reported(error)
    if error is not None:
        raise OutputDirectoryError(error)
    return out


def build_training_model(cfg: Config, ctx: ParallelContext, log) -> tuple[ModelStages, DistributedOptimizer]:
    """This rank's stages (converted to FP8 with fp8.enabled) in training mode, and their optimizer."""
    model = ModelStages(cfg, ctx)
    if cfg.fp8.enabled:
        for stage_model in model.models.values():
            convert_to_fp8(stage_model, cfg.fp8, log=log)
    model.train()
    return model, build_optimizer(model, cfg.train, ctx)


def restore(cfg: Config, ctx: ParallelContext, model: ModelStages, optimizer, checkpoints_dir: Path, log,
            init_from: Optional[str] = None) -> Optional[dict]:
    """Resume from the run's latest checkpoint (weights, this rank's optimizer shard, torch's RNG)
    and return the trainer state saved with it; with none, start from the weights of `init_from`
    (a checkpoint or run directory) when given, and return None."""
    existing = list_checkpoints(checkpoints_dir)
    if existing:
        verify_checkpoint(existing[-1], ctx)  # before reading anything from it
        check_same_model(cfg, existing[-1])
        state = load_checkpoint(existing[-1], model, optimizer, ctx, verify=False)
        rng = state.get("torch_rng")
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
            raise CheckpointFormatError(f"Checkpoint file {existing[-1] / 'trainer_state.pt'} has no RNG state.")
        torch.set_rng_state(rng)
        log(f"resumed from {existing[-1]} (step {int(state['step'])})")
        return state
    if init_from is not None:
        source = resolve_checkpoint(init_from)
        verify_checkpoint(source, ctx)
        check_same_model(cfg, source, "set the model section to the checkpoint's")
        load_model_weights(source, model)
        optimizer.reload_model_params()
        log(f"starting from the weights of {source}")
    return None


def layout_description(cfg: Config, ctx: ParallelContext, model: ModelStages) -> str:
    """E.g. "4 ranks = PP 2 (1f1b, stages [0] on pipeline rank 0, 4 micro-batches) x TP 2 (SP) x DP 1 (EP 1)"."""
    sp = " (SP)" if ctx.sequence_parallel else ""
    pp = ""
    if ctx.pp.size > 1:
        pp = (f"PP {ctx.pp.size} ({cfg.parallel.schedule}, stages {model.stage_ids} on pipeline rank 0, "
              f"{model.num_microbatches} micro-batches) x ")
    ranks = f"{ctx.world_size} rank" + ("s" if ctx.world_size > 1 else "")
    return f"{ranks} = {pp}TP {ctx.tp.size}{sp} x DP {ctx.dp.size} (EP {ctx.ep.size})"


def parallel_context(cfg: Config, job: str = "train") -> ParallelContext:
    """Validate the config and the layout against the launcher's world size (before any process
    group exists), then start torch.distributed if needed and build the groups."""
    validate(cfg, world_size=world_size_from_environment(), job=job)
    p = cfg.parallel
    return ParallelContext.create(p.tensor_parallel, p.pipeline_parallel, p.expert_parallel, p.sequence_parallel,
                                  timeout_s=p.collective_timeout_s)


def _train(cfg: Config, ctx: ParallelContext, log, make_data: DataFactory, job: str) -> TrainResult:
    t = cfg.train
    out = prepare_output(cfg, ctx)
    data = make_data(cfg, ctx, log)

    torch.manual_seed(t.seed)
    model, optimizer = build_training_model(cfg, ctx, log)
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters on this rank; layout: "
        f"{layout_description(cfg, ctx, model)}; data: {data.description}")

    peak = device_peak(ctx.device, cfg.fp8.enabled, cfg.data.cache_dir, log) if ctx.rank == 0 else None
    step_flops = training_flops_per_step(cfg)
    log(f"FLOPs: {step_flops:.3e} per step (megads.train.flops), {step_flops / ctx.world_size:.3e} per rank"
        + (f"; MFU against {peak.description}" if peak is not None else ""))

    checkpoints_dir = out / "checkpoints"
    state = restore(cfg, ctx, model, optimizer, checkpoints_dir, log, cfg.rl.init_from if job == "sft" else None)
    start_step = int(state["step"]) if state is not None else 0
    if start_step >= t.max_steps:
        log(f"nothing to do: the latest checkpoint is at step {start_step} >= train.max_steps ({t.max_steps})")
        return TrainResult(out, start_step, None)

    progress = ProgressPrinter(t.max_steps, t.log_every, log=log)

    take_step = step_function(cfg, ctx, model, optimizer, data, peak, out / "profile")

    def save(at_step: int) -> Path:
        return save_checkpoint(checkpoints_dir, at_step, cfg, model, optimizer, {"torch_rng": torch.get_rng_state()},
                               keep=t.keep_checkpoints, ctx=ctx)

    step, record = run_steps(cfg, ctx, start_step, take_step, save, progress, log)
    last_loss = record["loss"]
    log(f"done: {step} steps, final loss {last_loss:.4f}; checkpoints in {checkpoints_dir}")
    return TrainResult(out, step, last_loss)


def step_function(cfg: Config, ctx: ParallelContext, model: ModelStages, optimizer, data: TrainingData,
                  peak: Optional[DevicePeak], trace_dir: Path) -> Callable[[int], dict]:
    """`take_step(step)`: run step `step` + 1 (0-based argument) and return its record: the train
    step's metrics, utilisation (TFLOP/s, MFU, memory, GPU telemetry every log_every steps), the
    validation loss when due, and where the time went (`megads.train.step_profile`); the steps in
    train.profile_steps are traced with torch.profiler into `trace_dir`."""
    t = cfg.train
    step_flops = training_flops_per_step(cfg)
    gpu = GpuTelemetry(ctx.device)

    def take_step(step: int) -> dict:
        clock = PhaseClock(ctx.device)
        traced = step + 1 in t.profile_steps
        with count_collectives(ctx) as comm, (profiler_trace(trace_dir, step + 1, ctx.rank, ctx.device) if traced
                                              else nullcontext()):
            with clock("data"):
                batches = data.micro_batches(step, ctx.dp.rank, ctx.dp.size, t.micro_batch_size)
            record = train_step(model, optimizer, cfg, step, batches, clock)
            if t.eval_every and (step + 1) % t.eval_every == 0:
                with clock("evaluation"):
                    record.update(data.evaluate(model, cfg))
        record.update(utilisation(step_flops, record["step_time_s"], ctx.world_size, peak))
        if (step + 1) % t.log_every == 0 and (sample := gpu.sample()) is not None:
            record["gpu"] = sample
        record.update(step_profile(clock, model.executor.time_by_kind(), record["step_time_s"], comm,
                                   ctx.pp.size > 1))
        return record

    return take_step


def utilisation(step_flops: float, step_time_s: float, world_size: int, peak: Optional[DevicePeak]) -> dict:
    """A step's achieved TFLOP/s per device (the FLOP model's count over the step's time), its MFU
    against the device's peak (when known: rank 0), and this process's peak host memory."""
    achieved = step_flops / step_time_s / world_size
    record = {"tflops_per_device": achieved / 1e12, "peak_host_memory_gb": peak_host_memory_gb()}
    if peak is not None:
        record["mfu"] = achieved / peak.flops
    return record


def train_step(model: ModelStages, optimizer, cfg: Config, step: int,
               batches: list[tuple[torch.Tensor, torch.Tensor]], clock: Optional[PhaseClock] = None) -> dict:
    """One optimizer step over this rank's micro-batches (a collective under parallelism).

    Returns the step's metrics record, averaged over data-parallel ranks; `clock` (if given) times
    its phases (megads.train.step_profile).
    """
    t, ctx = cfg.train, model.ctx
    clock = clock if clock is not None else PhaseClock(ctx.device)
    started = time.perf_counter()
    lr = learning_rate(step, t)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)

    tokens = sum(input_ids.numel() for input_ids, _ in batches)
    with autocast(cfg, ctx.device), clock("schedule"):
        sums = model.run(batches)
    fp8 = fp8_stats(model, reset=True) if cfg.fp8.enabled else None
    if fp8 is not None:
        # Any inf/NaN met while quantizing makes the step non-finite: it is skipped and reported.
        sums["fp8_nonfinite"] = float(fp8["nonfinite"])
    with clock("gradient_sync"):
        model.finish_gradients()
        depths = [v for k, v in sorted(sums.items()) if k.startswith("mtp_loss_depth_")]
        if depths:
            sums["mtp_loss"] = sum(depths) / len(depths)
        sums = _average_metrics(sums, ctx)
    fp8_nonfinite = sums.pop("fp8_nonfinite", 0.0)

    # identical on all ranks (averaged; the optimizer decides alike everywhere)
    grad_norm, skipped, skip_reason = math.nan, True, None
    if not all(math.isfinite(v) for v in sums.values()):
        skip_reason = "non-finite loss"
    elif fp8_nonfinite > 0:
        skip_reason = "non-finite FP8 quantization input"
    else:
        with clock("optimizer"):
            result = optimizer.step(max_grad_norm=t.grad_clip if t.grad_clip > 0 else None)
        grad_norm, skipped, skip_reason = result.grad_norm, result.skipped, result.reason
    if skipped:
        for moe in model.moe_layers():
            moe.tokens_per_expert.zero_()
        loads = {}
    else:
        with clock("router_bias"):
            loads = model.update_router_biases(cfg.model.bias_update_speed, reduce_loads=ctx.stage.sum)
    elapsed = time.perf_counter() - started

    record = {"step": step + 1, "loss": sums.get("loss"), "mtp_loss": sums.get("mtp_loss"), "lr": lr,
              "grad_norm": grad_norm, "tokens_per_s": tokens * ctx.dp.size / elapsed, "step_time_s": elapsed,
              "skipped": skipped, "skip_reason": skip_reason}
    for key in sorted(sums):
        if key.startswith("mtp_loss_depth_") or key == "balance_loss":
            record[key] = sums[key]
    if fp8 is not None:
        record["fp8"] = {"enabled": 1, "clamped_tiles": fp8["clamped_tiles"], "nonfinite": fp8["nonfinite"],
                         "tiles": fp8["tiles"]}
    if loads:
        every = t.log_every if t.expert_load_every is None else t.expert_load_every
        record.update(expert_load_fields(loads, per_expert=bool(every) and (step + 1) % every == 0))
    return record


def expert_load_fields(loads: dict[str, list[float]], per_expert: bool) -> dict:
    """`expert_load_max_over_mean` per MoE layer (tokens of the busiest expert over the mean: 1 is
    perfect balance) and, when `per_expert`, `expert_load`: every expert's tokens over the mean,
    to 4 significant digits (DeepSeek-V3 logs 58 layers x 256 experts)."""
    fields: dict = {"expert_load_max_over_mean": {}}
    if per_expert:
        fields["expert_load"] = {}
    for name, counts in loads.items():
        layer = name.replace(".mlp", "")
        mean = sum(counts) / len(counts)
        fields["expert_load_max_over_mean"][layer] = max(counts) / mean
        if per_expert:
            fields["expert_load"][layer] = [float(f"{c / mean:.4g}") for c in counts]
    return fields


def _average_metrics(sums: dict[str, float], ctx: ParallelContext) -> dict[str, float]:
    """Mean over data-parallel ranks. The balance loss is first summed over TP ranks (each holds 1/t
    of it), and the FP8 non-finite count over the model-parallel ranks (TP x PP): one rank's inf/NaN
    must skip the step on all."""
    if not ctx.is_distributed or not sums:
        return sums
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=ctx.device)
    for key, group in (("balance_loss", ctx.tp), ("fp8_nonfinite", ctx.model)):
        if key in sums:
            i = keys.index(key)
            values[i] = group.sum(values[i:i + 1])[0]
    values = ctx.dp.sum(values) / ctx.dp.size
    return dict(zip(keys, values.cpu().tolist()))

"""Where a training step's time goes: its phases, the pipeline schedule's ops, its collectives, and
torch.profiler traces of chosen steps.

Every record of `megads train` / `sft` carries, for rank 0:

* ``time_s``: seconds per phase, summing to the step's wall time including data loading and
  evaluation (``step_time_s``, the basis of tokens/s, is the sum without ``data`` and ``evaluation``):

  ==================  ==================================================================
  data                reading this rank's micro-batches
  forward             the schedule's F ops (TP/SP/EP collectives inside them included; on an
                      unsharded head the fused head + cross-entropy computes its gradients here)
  backward            B and BW ops (a BW's weight gradients are inside it)
  weight_grad         W ops (the schedules that split B from W: ZB-H1, DualPipe(V))
  forward_backward    FB ops: DualPipe's overlapped F&B pairs, which cannot be split
  pipeline_wait       the rest of the schedule: point-to-point waits and idle (the bubble)
  gradient_sync       tied-embedding, DualPipe-copy and declared TP/SP gradient sums, metrics
  optimizer           clipping, the data-parallel reduce-scatter, AdamW, the all-gather
  router_bias         the auxiliary-loss-free bias update from the step's expert loads
  evaluation          the validation loss, on the steps where it is due
  other               what is left (learning rate, zeroing gradients, the record)
  ==================  ==================================================================

* ``comm``: per collective kind, ``{"calls", "bytes", "seconds"}`` issued by this rank during the
  step (`parallel.comm_meter`; bytes as that module defines them). The seconds lie inside the
  phases above: the collectives of a forward are part of ``forward``.
* ``pipeline_bubble`` (PP > 1): pipeline_wait as a fraction of the schedule's makespan.

On a GPU the phase boundaries synchronize the device, so phases are device time; inside the
schedule the op split is host launch time unless the executor synchronizes every op
(``synchronize_timing``, which `megads profile` sets: it removes overlap, so use it to see where
time goes, not for throughput).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, record_function

from parallel.comm_meter import CollectiveStats

PHASES = ("data", "forward", "backward", "weight_grad", "forward_backward", "pipeline_wait", "gradient_sync",
          "optimizer", "router_bias", "evaluation", "other")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


class PhaseClock:
    """Wall time of named phases of a step: ``with clock("optimizer"): ...`` (phases may repeat and
    add up). Each phase is also a span in torch.profiler traces."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            with record_function(f"megads.{phase}"):
                yield
        finally:
            synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def step_profile(clock: PhaseClock, schedule_split: dict[str, float], step_time_s: float, comm: CollectiveStats,
                 pipeline_parallel: bool) -> dict:
    """A step's `time_s`, `comm` and (under pipeline parallelism) `pipeline_bubble` (module doc).

    `clock` timed the phases, its "schedule" phase (the executor's run) replaced here by the
    executor's split of it (`PipelineExecutor.time_by_kind`); "other" is the rest of `step_time_s`,
    the train step's own wall time (data and evaluation lie outside it)."""
    split = {**schedule_split, **{k: v for k, v in clock.seconds.items() if k != "schedule"}}
    inside_step = sum(v for k, v in split.items() if k not in ("data", "evaluation"))
    split["other"] = max(0.0, step_time_s - inside_step)
    fields = {"time_s": {phase: split[phase] for phase in PHASES if phase in split}, "comm": comm.as_dict()}
    if pipeline_parallel:
        makespan = sum(schedule_split.values())
        fields["pipeline_bubble"] = schedule_split.get("pipeline_wait", 0.0) / makespan if makespan > 0 else 0.0
    return fields


@contextmanager
def profiler_trace(directory: Path, step: int, rank: int, device: torch.device) -> Iterator[None]:
    """Trace the block with torch.profiler (CPU, and CUDA on a GPU; shapes and memory recorded) into
    DIRECTORY/rank{rank}.{step}.pt.trace.json: torch-tb-profiler reads that name as worker
    "rank{rank}", span "{step}" (`tensorboard --logdir OUTPUT_DIR`, run "profile"), and Perfetto or
    chrome://tracing open the file as it is. Written atomically (a partial trace is not left)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        yield
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank{rank}.{step}.pt.trace.json"
    partial = path.with_name(path.name + f".tmp-{os.getpid()}")
    prof.export_chrome_trace(str(partial))
    os.replace(partial, path)

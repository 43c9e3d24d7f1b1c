"""Test and measurement helpers around `parallel.pipeline.executor.PipelineExecutor` (not used by training).

    chunks = make_stage_modules(sched, rank, build_stage)    # {chunk: module of stage_of(rank, chunk)}
    ex = PipelineExecutor(sched, rank, chunks, loss_fn, pp_group, device, activation_meta=...)
    mean = pipeline_mean_loss(ex.run(inputs, targets), sched.num_microbatches, pp_group)
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from parallel.pipeline.ops import Schedule


def make_stage_modules(schedule: Schedule, rank: int, build_stage: Callable[[int], nn.Module]) -> Dict[int, nn.Module]:
    """``{chunk: build_stage(schedule.stage_of(rank, chunk))}``: the modules ``rank`` runs.

    For DualPipe, ``build_stage(s)`` runs on two ranks for every s, and the two copies must start
    with the same parameters (seed the initialisation by stage, or load/broadcast them)."""
    return {c: build_stage(schedule.stage_of(rank, c)) for c in range(schedule.chunks_per_rank)}


def pipeline_mean_loss(losses: Optional[List[Optional[torch.Tensor]]], num_microbatches: int,
                       pp_group=None, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The step's mean loss on every rank of ``pp_group`` (a collective: all ranks call it) from what
    each rank's ``run`` returned."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for loss in losses or ():
        if loss is not None:
            total += loss.to(total)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=pp_group)
    return total / num_microbatches

"""Pipeline parallelism with schedules as data.

A schedule is, per rank, an ordered list of `Op`s (F, B, W, BW, fused FB, sends and receives, with
micro-batch, stage and chunk ids); see `ops.py` for the op vocabulary and the execution contract
an executor follows. `build_schedule` makes the lists for every ``parallel.schedule``;
`simulate` costs any of them; `check_schedule` and `find_deadlock` verify them.

    from parallel.pipeline import build_schedule, simulate, Costs
    sched = build_schedule("dualpipe", num_ranks=8, num_microbatches=32)
    for op in sched.ops[rank]: ...                       # what an executor does
    simulate(sched, Costs(F=1, B=1, W=1)).bubble         # idle time per rank

`PipelineExecutor` (``executor.py``) runs any of them on real modules with torch.distributed (its
B/W split of the backward in ``weight_grad_split.py``), and ``stage_copies.py`` adds the gradients
of DualPipe's two copies of a stage; these need torch and are imported lazily, so that the
schedules and the simulator stay torch-free.
"""

from .dualpipe import dualpipe, dualpipev
from .ops import Kind, Op, RankBuilder, Schedule, message
from .schedules import SCHEDULES, build_schedule, forward_only, interleaved_1f1b, one_f_one_b, zb_h1
from .simulator import (Costs, ScheduleError, SimResult, check_dependencies, check_schedule, find_deadlock,
                        live_activations, simulate)

__all__ = [
    "Kind", "Op", "RankBuilder", "Schedule", "message", "SCHEDULES", "build_schedule", "forward_only", "one_f_one_b",
    "interleaved_1f1b",
    "zb_h1", "dualpipe", "dualpipev", "Costs", "ScheduleError", "SimResult", "simulate", "check_schedule",
    "check_dependencies", "find_deadlock", "live_activations",
    "PipelineExecutor", "OpTiming", "sum_duplicate_stage_grads", "add_peer_tensors",
]

# name -> the submodule that defines it (imported on first access)
_LAZY = {"PipelineExecutor": "executor", "OpTiming": "executor",
         "sum_duplicate_stage_grads": "stage_copies", "add_peer_tensors": "stage_copies"}


def __getattr__(name):
    # These need torch; importing them only when asked keeps `parallel.pipeline` torch-free.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

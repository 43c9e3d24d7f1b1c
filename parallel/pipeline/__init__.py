"""Pipeline parallelism with schedules as data.

A schedule is, per rank, an ordered list of `Op`s (F, B, W, BW, fused FB, sends and receives, with
micro-batch, stage and chunk ids); see `ops.py` for the op vocabulary and the execution contract
an executor follows. `build_schedule` makes the lists for every ``parallel.schedule``;
`simulate` costs any of them; `check_schedule` and `find_deadlock` verify them.

    from parallel.pipeline import build_schedule, simulate, Costs
    sched = build_schedule("dualpipe", num_ranks=8, num_microbatches=32)
    for op in sched.ops[rank]: ...                       # what an executor does
    simulate(sched, Costs(F=1, B=1, W=1)).bubble         # idle time per rank

`PipelineExecutor` (``executor.py``) runs any of them on real modules with torch.distributed;
it and its helpers are imported lazily, so that the schedules and the simulator stay torch-free.
"""

from .dualpipe import dualpipe, dualpipev
from .ops import Kind, Op, RankBuilder, Schedule, message
from .schedules import SCHEDULES, build_schedule, interleaved_1f1b, one_f_one_b, zb_h1
from .simulator import (Costs, ScheduleError, SimResult, check_dependencies, check_schedule, find_deadlock,
                        live_activations, simulate)

__all__ = [
    "Kind", "Op", "RankBuilder", "Schedule", "message", "SCHEDULES", "build_schedule", "one_f_one_b",
    "interleaved_1f1b",
    "zb_h1", "dualpipe", "dualpipev", "Costs", "ScheduleError", "SimResult", "simulate", "check_schedule",
    "check_dependencies", "find_deadlock", "live_activations",
    "PipelineExecutor", "OpTiming", "make_stage_modules", "sum_duplicate_stage_grads", "pipeline_mean_loss",
]

_EXECUTOR_NAMES = ("PipelineExecutor", "OpTiming", "make_stage_modules", "sum_duplicate_stage_grads",
                   "pipeline_mean_loss")


def __getattr__(name):
    # The executor needs torch; importing it only when asked keeps `parallel.pipeline` torch-free.
    if name in _EXECUTOR_NAMES:
        from . import executor
        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The loop around optimizer steps shared by `megads train`, `sft` and `grpo`.

Order within one step, chosen so that a checkpoint and metrics.jsonl always agree:

1. the step itself (forward, backward, optimizer, router-bias update) and, when due, evaluation,
   which all go into the step's record;
2. the record is appended to metrics.jsonl (rank 0) and the progress line printed;
3. the ranks agree whether a stop signal arrived (megads.train.stopping);
4. a checkpoint is saved when due, at the end, or on a stop: `step_N` is saved only after record N.

A run killed outright (kill -9, a node lost) resumes from the latest complete checkpoint and drops
the records logged after it (MetricsLogger truncates them), so records 1..N appear each once.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable, Optional

from megads.config import Config
from megads.train.metrics import MetricsLogger
from megads.train.stopping import Interrupted, StopSignals, TooManySkippedSteps
from parallel.context import ParallelContext


def run_steps(cfg: Config, ctx: ParallelContext, start_step: int, take_step: Callable[[int], dict],
              save: Callable[[int], Path], report: Callable[[dict], None], log: Callable[[str], None]
              ) -> tuple[int, Optional[dict]]:
    """Run steps start_step+1 .. train.max_steps, logging each record to OUTPUT_DIR/metrics.jsonl
    (rank 0); returns the last step and its record.

    `take_step(step)` runs step `step` + 1 (0-based argument) and returns its record, with
    "skipped" true when the update was not applied; `save(step)` writes the checkpoint of `step`;
    `report(record)` prints progress. Raises Interrupted after saving when a signal arrived, and
    TooManySkippedSteps after train.max_skipped_steps skipped steps in a row.
    """
    metrics = MetricsLogger(Path(cfg.train.output_dir), start_step, log=log) if ctx.rank == 0 else None
    try:
        return _run_steps(cfg, ctx, start_step, take_step, save, metrics, report, log)
    finally:
        if metrics is not None:
            metrics.close()


def _run_steps(cfg, ctx, start_step, take_step, save, metrics, report, log) -> tuple[int, Optional[dict]]:
    t = cfg.train
    step, record, skipped_in_a_row = start_step, None, 0
    with StopSignals() as signals:
        while step < t.max_steps:
            record = take_step(step)
            step += 1
            if metrics is not None:
                metrics.record(record)
            report(record)
            signum = signals.agreed(ctx.device)
            checkpoint = None
            if (t.save_every and step % t.save_every == 0) or step == t.max_steps:
                checkpoint = save(step)
                signum = signum or signals.agreed(ctx.device)  # a signal during the save: it is fresh
            if signum is not None:
                log(f"{signal.Signals(signum).name} received: stopping after step {step}"
                    + ("" if checkpoint else ", saving a checkpoint"))
                raise Interrupted(signum, step, checkpoint or save(step))
            skipped_in_a_row = skipped_in_a_row + 1 if record.get("skipped") else 0
            if t.max_skipped_steps and skipped_in_a_row >= t.max_skipped_steps:
                raise TooManySkippedSteps(
                    f"stopped at step {step}: the last {skipped_in_a_row} steps were all skipped (non-finite loss, "
                    f"gradient or update, never applied), train.max_skipped_steps is {t.max_skipped_steps}; "
                    f"lower train.lr or check the data, then resume from the latest checkpoint.")
    return step, record

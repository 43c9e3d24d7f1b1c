"""Stopping a run between optimizer steps: preemption signals, agreement across ranks, exit status.

A signal never interrupts a step. SIGTERM (what SLURM, Kubernetes and torchrun send to preempt a
job) and Ctrl-C (SIGINT) only set a flag; at the end of every step all ranks agree, with one tiny
all-reduce, whether any of them was signalled, and if so all save the same checkpoint and stop.
So a checkpoint `step_N` always holds exactly the state after N steps and metrics.jsonl records
1..N, whatever the moment of the signal (forward, backward, optimizer, evaluation, logging, save),
and a signal that reached one rank only (or the launcher, which forwards it) stops all of them.

A second Ctrl-C aborts at once (KeyboardInterrupt): the latest checkpoint stays the last one.

Exit status of `megads train|sft|grpo` (see the README): 0 done; 1 error; 2 configuration error;
128 + signal number (143 for SIGTERM, 130 for SIGINT) when stopped by a signal after saving.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

import torch

from megads.errors import RunFailure
from parallel.group import Group

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint at `step`; `exit_status` is 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {checkpoint}; "
                         f"run the same command again to resume.")


class TooManySkippedSteps(RunFailure):
    """`train.max_skipped_steps` consecutive steps were skipped (non-finite loss, gradient or update)."""


class StopSignals:
    """Inside `with StopSignals() as signals:` SIGTERM and SIGINT set `signals.received` (the
    previous handlers come back at the end); `signals.agreed(device)` is the signal any rank got."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.received = self.received or signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for signum in HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self, device: torch.device) -> Optional[int]:
        """The signal that reached any rank (the largest number if several), the same on every
        rank; None if none did. A collective of all ranks: call it at the same point on each."""
        world = Group.world()
        if world.size == 1:
            return self.received
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        world.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

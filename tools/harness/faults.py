"""Fault injection at named points of a training step, for tests and tools/fault_injection.py.

A fault is `ACTION@POINT:STEP[:RANK]`, e.g. `sigterm@backward:3` (SIGTERM to this process when
step 3's backward starts) or `kill@save:4:1` (SIGKILL rank 1 while it writes step 4's checkpoint).
Faults are installed by wrapping the functions that mark each point, so the training code carries
no test hooks:

    data         the step's micro-batches are being read           (TrainingData.micro_batches)
    forward      the step's forward passes start                   (ModelStages.run)
    backward     a backward pass starts                            (torch.autograd.backward)
    optimizer    gradients are reduced and clipped, AdamW is next  (parallel.zero1.adamw_step)
    router_bias  the MoE routing biases are about to move          (ModelStages.update_router_biases)
    evaluation   the held-out evaluation starts                    (TrainingData.evaluate)
    logging      the step's metrics.jsonl record is being written  (MetricsLogger.record, rank 0)
    save         the checkpoint's tensors are being written        (checkpoint.write_tensors)

Actions: sigterm, sigint (the signal to this process), kill (SIGKILL: no handler runs), hang
(SIGSTOP: alive but silent, like a stuck rank), crash (a Python exception), term_launcher (SIGTERM to the parent process: torchrun, which forwards it).
Under torchrun a fault fires on the first attempt only (TORCHELASTIC_RESTART_COUNT 0), so that
`--max-restarts` shows the restarted run going through.

Run `megads` with a fault from the environment (what the fault tool and the torchrun tests do):

    MEGADS_FAULT=kill@optimizer:3 python tools/harness/faults.py train CONFIG --set ...
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Optional

POINTS = ("data", "forward", "backward", "optimizer", "router_bias", "evaluation", "logging", "save")
ACTIONS = ("sigterm", "sigint", "kill", "hang", "crash", "term_launcher")
ENV = "MEGADS_FAULT"


class InjectedCrash(RuntimeError):
    """The exception the `crash` action raises."""


@dataclass
class Fault:
    action: str
    point: str
    step: int
    rank: Optional[int] = None

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        try:
            action, rest = spec.split("@")
            point, step, *rank = rest.split(":")
            fault = cls(action, point, int(step), int(rank[0]) if rank else None)
        except ValueError:
            raise ValueError(f"a fault is ACTION@POINT:STEP[:RANK], got {spec!r}") from None
        if fault.action not in ACTIONS or fault.point not in POINTS:
            raise ValueError(f"unknown action or point in {spec!r}: actions {ACTIONS}, points {POINTS}")
        return fault


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


class _Injector:
    def __init__(self, fault: Fault):
        self.fault = fault
        self.step = 0          # the step being computed (1-based), as the wrapped points see it
        self.fired = False
        self.patches: list[tuple] = []

    def reach(self, point: str, step: Optional[int] = None) -> None:
        if step is not None:
            self.step = step
        f = self.fault
        if self.fired or point != f.point or self.step != f.step:
            return
        if f.rank is not None and _rank() != f.rank:
            return
        self.fired = True
        if f.action == "crash":
            raise InjectedCrash(f"injected crash at {point} of step {self.step}")
        target = os.getppid() if f.action == "term_launcher" else os.getpid()
        signum = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "kill": signal.SIGKILL, "hang": signal.SIGSTOP,
                  "term_launcher": signal.SIGTERM}[f.action]
        os.kill(target, signum)

    def wrap(self, owner, name: str, before: Callable) -> None:
        """Make `owner.name` call `before` with its arguments first."""
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        self.patches.append((owner, name, original))

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            before(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def remove(self) -> None:
        """Put every wrapped function back (in-process tests)."""
        for owner, name, original in reversed(self.patches):
            setattr(owner, name, original)
        self.patches.clear()


def install(spec: str) -> Optional[_Injector]:
    """Arm the fault `spec` in this process (None: not on this attempt under torchrun)."""
    fault = Fault.parse(spec)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    import torch

    import megads.train.checkpoint as checkpoint
    import megads.train.trainer as trainer
    import parallel.zero1 as zero1
    from megads.rl.grpo import GRPOTrainer
    from megads.rl.sft import DemonstrationData
    from megads.train.data import BlendedData, CorpusData
    from megads.train.metrics import MetricsLogger
    from megads.train.model_stages import ModelStages

    injector = _Injector(fault)
    reach = injector.reach
    injector.wrap(trainer, "train_step", lambda model, optimizer, cfg, step, *rest: reach("", step + 1))
    injector.wrap(GRPOTrainer, "step", lambda self, step: reach("", step + 1))
    for data_class in (CorpusData, BlendedData, DemonstrationData):
        injector.wrap(data_class, "micro_batches", lambda self, step, *a, **k: reach("data", step + 1))
        injector.wrap(data_class, "evaluate", lambda *a, **k: reach("evaluation"))
    injector.wrap(GRPOTrainer, "evaluate", lambda *a, **k: reach("evaluation"))
    injector.wrap(ModelStages, "run", lambda *a, **k: reach("forward"))
    injector.wrap(torch.autograd, "backward", lambda *a, **k: reach("backward"))
    injector.wrap(zero1, "adamw_step", lambda *a, **k: reach("optimizer"))
    injector.wrap(ModelStages, "update_router_biases", lambda *a, **k: reach("router_bias"))
    injector.wrap(MetricsLogger, "record", lambda *a, **k: reach("logging"))
    injector.wrap(checkpoint, "write_tensors", lambda *a, **k: reach("save"))
    return injector


def main(argv: list[str]) -> int:
    """`megads ARGV` with the fault of $MEGADS_FAULT (if set) armed."""
    if os.environ.get(ENV):
        install(os.environ[ENV])
    from megads.cli import main as megads_main

    return megads_main(argv)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    sys.exit(main(sys.argv[1:]))

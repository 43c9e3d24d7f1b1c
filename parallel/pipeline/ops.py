"""Pipeline schedules as data: the op types and the `Schedule` container.

A schedule is, for every pipeline rank, an ordered list of `Op`s. The executor walks its rank's
list and performs each op in turn; the simulator (`simulator.py`) costs the very same lists. No
schedule has code of its own at run time: 1F1B, interleaved 1F1B, ZB-H1, DualPipe and DualPipeV
differ only in the lists they produce.

Vocabulary
----------
* A micro-batch ``mb`` (0 .. num_microbatches-1) travels through ``num_stages`` *stages*, each a
  contiguous slice of the model's layers, stage 0 first. ``Op.stage`` is that global index, so the
  input of micro-batch ``mb`` is loaded by its stage-0 F and the loss is computed by its
  stage-(num_stages-1) F.
* Each rank holds ``chunks_per_rank`` model chunks (modules). ``Op.chunk`` is the local index of the
  module that runs the op. ``Schedule.locate(mb, stage) -> (rank, chunk)`` and
  ``Schedule.stage_of(rank, chunk)`` give the placement. In DualPipe the placement depends on the
  micro-batch: the first half of the micro-batches enters at rank 0 (chunk 0 holds stage ``rank``),
  the second half at the last rank (chunk 1 holds stage ``PP-1-rank``); the two copies of a stage
  hold the same parameters and their gradients must be summed after the step.

Ops
---
Compute ops (``Op.is_compute``):

``F``   forward of (mb, stage). Stores what the backward needs.
``B``   backward for inputs of (mb, stage): the gradient w.r.t. the stage input, which is what the
        previous stage waits for. The weight-gradient part is queued for a later ``W``.
``W``   backward for weights of (mb, stage), whose ``B`` ran earlier on this rank. W ops of a rank
        always come in the order of their B ops (FIFO), so an executor may keep a queue of
        pending weight-gradient closures (DualPipe's ``WeightGradStore``) and pop the oldest; the
        op names (mb, stage) so the executor can check it.
``BW``  full backward of (mb, stage): inputs and weights in one pass (what plain 1F1B does).
``FB``  the forward of (mb, stage) overlapped with the backward ``Op.backward`` (a ``BW``, or a
        ``B`` whose W comes later) of another micro-batch/chunk: DualPipe's F&B pair. An executor
        without an overlapped kernel may run the forward, then the backward.

Communication ops (``Op.is_comm``), all with ``Op.peer`` = the other rank:

``RECV_F``  receive the input activation of (mb, stage) from ``peer`` (which runs stage-1).
``SEND_F``  send the output activation of (mb, stage) to ``peer`` (which runs stage+1).
``RECV_B``  receive the gradient w.r.t. the output of (mb, stage) from ``peer`` (stage+1).
``SEND_B``  send the gradient w.r.t. the input of (mb, stage) to ``peer`` (stage-1).

Execution contract (what the executor must do, what the checkers verify)
------------------------------------------------------------------------
1. Compute ops run one at a time in list order.
2. A maximal run of consecutive comm ops is one *batch*: the executor posts it with one
   ``torch.distributed.batch_isend_irecv`` (ops in list order) and waits for all of it before the
   next compute op; a trailing batch is waited for at the end of the step. This is exactly how
   DeepSeek's reference DualPipe commits its ``comm_ops``. An executor may instead wait only for
   the batch's receives and collect its send requests at the end of the step: that never
   deadlocks where waiting for everything does not, and it keeps ZB-H1's gain, which waiting on
   sends loses (a rank that finished B would sit in its send instead of running a deferred W;
   see ``simulator.simulate(p2p=...)``).
3. Messages between an ordered pair of ranks match in FIFO order (NCCL/gloo semantics): the k-th
   SEND from a to b meets the k-th RECV on b from a. Every schedule here guarantees that the pair
   carries the same message (`message`), and that blocking batches cannot deadlock
   (`simulator.find_deadlock`).
4. A RECV precedes the compute op that consumes it; a SEND follows the compute op that produced it.
5. Consecutive stages on the same rank (DualPipeV's turn on its last rank) exchange no messages:
   the executor hands the tensor over locally (``detach().requires_grad_()``), which it can tell
   from ``locate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, List, Optional, Tuple


class Kind(str, Enum):
    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    FB = "FB"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    def __str__(self) -> str:
        return self.value


COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.W, Kind.BW, Kind.FB})
COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})


@dataclass(frozen=True)
class Op:
    """One step of a rank's schedule; see the module docstring for the meaning of each kind."""

    kind: Kind
    mb: int
    stage: int
    chunk: int
    peer: Optional[int] = None          # comm ops: the other rank
    backward: Optional["Op"] = None     # FB only: the overlapped backward (a BW or B op)

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    @property
    def is_send(self) -> bool:
        return self.kind in (Kind.SEND_F, Kind.SEND_B)

    def parts(self) -> Tuple["Op", ...]:
        """The elementary compute ops this op performs: (F, backward) for FB, (self,) otherwise."""
        if self.kind is Kind.FB:
            return (Op(Kind.F, self.mb, self.stage, self.chunk), self.backward)
        return (self,)

    def __str__(self) -> str:
        if self.kind is Kind.FB:
            b = self.backward
            return f"FB(F{self.mb}.{self.stage}+{b.kind}{b.mb}.{b.stage})"
        if self.is_comm:
            return f"{self.kind}{self.mb}.{self.stage}@{self.peer}"
        return f"{self.kind}{self.mb}.{self.stage}"


def message(op: Op) -> Tuple[str, int, int, int]:
    """What a comm op carries: (``"act"`` or ``"grad"``, mb, from_stage, to_stage).

    A SEND and the RECV it meets (FIFO per ordered rank pair) must carry the same message.
    """
    if op.kind is Kind.SEND_F:
        return ("act", op.mb, op.stage, op.stage + 1)
    if op.kind is Kind.RECV_F:
        return ("act", op.mb, op.stage - 1, op.stage)
    if op.kind is Kind.SEND_B:
        return ("grad", op.mb, op.stage, op.stage - 1)
    if op.kind is Kind.RECV_B:
        return ("grad", op.mb, op.stage + 1, op.stage)
    raise ValueError(f"{op} is not a communication op")


# How stages are laid out on ranks; see Schedule.locate.
LAYOUTS = ("linear", "interleaved", "dualpipe", "v")


@dataclass
class Schedule:
    """Per-rank op lists plus the placement of stages on (rank, chunk).

    ``num_ranks`` is the number of pipeline ranks (devices). ``num_stages`` is the length of a
    micro-batch's path: PP for 1F1B, ZB-H1 and DualPipe, PP x virtual_stages for interleaved 1F1B,
    2 x ranks for DualPipeV. A ``forward_only`` schedule (`schedules.forward_only`) has F ops only.
    """

    name: str
    layout: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    chunks_per_rank: int
    ops: List[List[Op]] = field(default_factory=list)
    forward_only: bool = False

    def locate(self, mb: int, stage: int) -> Tuple[int, int]:
        """(rank, chunk) that runs ``stage`` for micro-batch ``mb``."""
        R = self.num_ranks
        if self.layout == "linear":
            return stage, 0
        if self.layout == "interleaved":
            return stage % R, stage // R
        if self.layout == "dualpipe":
            if mb < self.num_microbatches // 2:          # enters at rank 0
                return stage, 0
            return R - 1 - stage, 1                       # enters at rank PP-1
        if self.layout == "v":
            return (stage, 0) if stage < R else (2 * R - 1 - stage, 1)
        raise ValueError(f"unknown layout {self.layout!r}")

    def stage_of(self, rank: int, chunk: int) -> int:
        """The model slice (stage index) held by ``chunk`` on ``rank``: what the executor builds."""
        R = self.num_ranks
        if self.layout == "linear":
            return rank
        if self.layout == "interleaved":
            return chunk * R + rank
        if self.layout == "dualpipe":
            return rank if chunk == 0 else R - 1 - rank
        if self.layout == "v":
            return rank if chunk == 0 else 2 * R - 1 - rank
        raise ValueError(f"unknown layout {self.layout!r}")

    def param_fraction(self, rank: int) -> float:
        """Fraction of the model's parameters stored on ``rank`` (each stage = 1/num_stages)."""
        return len({self.stage_of(rank, c) for c in range(self.chunks_per_rank)}) / self.num_stages

    def compute_ops(self, rank: int) -> Iterator[Op]:
        return (op for op in self.ops[rank] if op.is_compute)

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.num_ranks} ranks, {self.num_stages} stages, "
                 f"{self.num_microbatches} micro-batches"]
        for r, ops in enumerate(self.ops):
            lines.append(f"  rank {r}: " + " ".join(str(op) for op in ops if op.is_compute))
        return "\n".join(lines)


class RankBuilder:
    """Appends ops to one rank's list, adding the comm ops a stage boundary needs.

    ``recv_f``/``send_f``/``recv_b``/``send_b`` emit nothing when the neighbouring stage does not
    exist (first/last stage) or lives on this same rank (a local hand-off).
    """

    def __init__(self, schedule: Schedule, rank: int):
        self.s = schedule
        self.rank = rank
        self.ops: List[Op] = []

    def _peer(self, mb: int, stage: int) -> Optional[int]:
        if not 0 <= stage < self.s.num_stages:
            return None
        rank, _ = self.s.locate(mb, stage)
        return None if rank == self.rank else rank

    def _chunk(self, mb: int, stage: int) -> int:
        rank, chunk = self.s.locate(mb, stage)
        assert rank == self.rank, f"stage {stage} of micro-batch {mb} is not on rank {self.rank}"
        return chunk

    def compute(self, kind: Kind, mb: int, stage: int) -> Op:
        op = Op(kind, mb, stage, self._chunk(mb, stage))
        self.ops.append(op)
        return op

    def fused(self, f_mb: int, f_stage: int, b_kind: Kind, b_mb: int, b_stage: int) -> Op:
        back = Op(b_kind, b_mb, b_stage, self._chunk(b_mb, b_stage))
        op = Op(Kind.FB, f_mb, f_stage, self._chunk(f_mb, f_stage), backward=back)
        self.ops.append(op)
        return op

    def _comm(self, kind: Kind, mb: int, stage: int, peer_stage: int) -> None:
        peer = self._peer(mb, peer_stage)
        if peer is not None:
            self.ops.append(Op(kind, mb, stage, self._chunk(mb, stage), peer=peer))

    def recv_f(self, mb: int, stage: int) -> None:
        self._comm(Kind.RECV_F, mb, stage, stage - 1)

    def send_f(self, mb: int, stage: int) -> None:
        self._comm(Kind.SEND_F, mb, stage, stage + 1)

    def recv_b(self, mb: int, stage: int) -> None:
        self._comm(Kind.RECV_B, mb, stage, stage + 1)

    def send_b(self, mb: int, stage: int) -> None:
        self._comm(Kind.SEND_B, mb, stage, stage - 1)

"""DualPipe and DualPipeV as op lists, step for step the structure of DeepSeek's reference
implementation (github.com/deepseek-ai/DualPipe, ``dualpipe.py`` and ``dualpipev.py``).

The reference runs a schedule by calling ``_forward_chunk``, ``_backward_chunk``,
``_forward_backward_chunk`` and ``_weight_chunk`` in eight steps; each call appends irecv/isend
ops to a pending list that is committed (``batch_isend_irecv`` + wait) right before the next
computation. Here each call appends the same ops to the rank's list instead, so consecutive comm
ops are the same batches the reference commits (see the execution contract in ``ops.py``).

Phases. Every rank holds two chunks and the reference names them by *phase*:

* DualPipe (PP ranks, PP stages, micro-batches from both ends). Rank r holds stage r (chunk 0,
  used by the first half of the micro-batches, which enter at rank 0) and stage PP-1-r (chunk 1,
  the second half, which enter at rank PP-1). Phase 0 is the direction whose micro-batches enter
  at the rank's *own* end of the pipeline (chunk 0 on ranks < PP/2, chunk 1 on the others) and
  phase 1 the other one, so ranks r and PP-1-r run mirror-image lists. ``h = min(r, PP-1-r)``.
* DualPipeV (R devices, 2R stages, all micro-batches enter at rank 0). Rank r holds stage r
  (chunk 0 = phase 0, on the way down) and stage 2R-1-r (chunk 1 = phase 1, on the way back up);
  the last rank turns the micro-batch around locally. ``h = r`` and the "half" is R.

Steps on a rank (``half`` = PP/2 for DualPipe, R for DualPipeV; C micro-batches per phase):

1. ``nF0``: 2(half-h-1) forwards of phase 0 (ranks far from the middle start early).
2. ``nF0F1``: h+1 pairs, a phase-0 and a phase-1 forward (the phase-1 stream arrives).
3. ``nB1W1F1``: half-h-1 times: phase-1 input-backward B, a deferred W, phase-1 forward.
4. ``nF0B1F1B0`` (main): C-2*half+h+1 times two overlapped F&B pairs: F0 with the backward
   of phase 1, then F1 with the backward of phase 0. The middle ranks (the last rank in V) run
   their first pair as separate F and B to shorten the bubble.
5. ``nB1F1B0``: half-h-1 times: phase-1 backward, then F1 overlapped with a phase-0 backward.
6. ``nB1B0``: h+1 pairs of backwards; the second half of them (by parity of h) are input-only
   B's whose W's are deferred (zero bubble).
7. ``nWB0``: half-h-1 times: a deferred W, then an input-only phase-0 B.
8. ``nW``: the h+1 remaining W's.

Backwards are full (BW) unless marked input-only; W's run in FIFO order of their B's, like the
reference's ``WeightGradStore``. The fused F&B always carries a full backward.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Tuple

from .ops import Kind, RankBuilder, Schedule
from .schedules import check_positive


class _PhaseBuilder:
    """Mirrors the reference's per-phase chunk counters on top of a `RankBuilder`."""

    def __init__(self, sched: Schedule, rank: int, second_half: bool):
        self.b = RankBuilder(sched, rank)
        self.sched = sched
        self.rank = rank
        self.flip = int(second_half)   # DualPipe: phase ^ is_in_second_half gives the chunk
        self.count = {key: [0, 0] for key in ("f", "b", "send_f", "send_b", "recv_f", "recv_b")}
        self.pending_w: Deque[Tuple[int, int]] = deque()

    def _next(self, key: str, phase: int) -> Tuple[int, int]:
        """(mb, stage) of the next chunk of ``phase`` for counter ``key``."""
        chunk = phase ^ self.flip
        k = self.count[key][chunk]
        self.count[key][chunk] += 1
        s, R, N = self.sched, self.sched.num_ranks, self.sched.num_microbatches
        if s.layout == "dualpipe":
            mb = k + chunk * (N // 2)
            stage = self.rank if chunk == 0 else R - 1 - self.rank
        else:  # "v"
            mb = k
            stage = self.rank if chunk == 0 else 2 * R - 1 - self.rank
        return mb, stage

    # communication (no op when the neighbour stage is absent or on this rank)
    def recv_forward(self, phase: int) -> None:
        self.b.recv_f(*self._next("recv_f", phase))

    def send_forward(self, phase: int) -> None:
        self.b.send_f(*self._next("send_f", phase))

    def recv_backward(self, phase: int) -> None:
        self.b.recv_b(*self._next("recv_b", phase))

    def send_backward(self, phase: int) -> None:
        self.b.send_b(*self._next("send_b", phase))

    # the reference's chunk helpers
    def forward_chunk(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_forward(phase)
        self.b.compute(Kind.F, *self._next("f", phase))
        if send:
            self.send_forward(phase)

    def _backward_kind(self, mb: int, stage: int, zero_bubble: bool) -> Kind:
        if zero_bubble:
            self.pending_w.append((mb, stage))
            return Kind.B
        return Kind.BW

    def backward_chunk(self, phase: int, zero_bubble: bool = False, recv: bool = True,
                       send: bool = True) -> None:
        if recv:
            self.recv_backward(phase)
        mb, stage = self._next("b", phase)
        self.b.compute(self._backward_kind(mb, stage, zero_bubble), mb, stage)
        if send:
            self.send_backward(phase)

    def forward_backward_chunk(self, phase0: int, phase1: int, recv0: bool = True) -> None:
        if recv0:
            self.recv_forward(phase0)
        self.recv_backward(phase1)
        f_mb, f_stage = self._next("f", phase0)
        b_mb, b_stage = self._next("b", phase1)
        self.b.fused(f_mb, f_stage, Kind.BW, b_mb, b_stage)
        self.send_forward(phase0)
        self.send_backward(phase1)

    def weight_chunk(self) -> None:
        self.b.compute(Kind.W, *self.pending_w.popleft())


def _eight_steps(p: _PhaseBuilder, half: int, h: int, per_phase: int, middle: bool) -> None:
    """Steps 1-8 shared by DualPipe and DualPipeV (see the module docstring).

    ``half``: PP/2 (DualPipe) or the number of devices (DualPipeV); ``h``: the rank's distance
    from its end of the pipeline; ``per_phase``: micro-batches per phase; ``middle``: the rank
    where the two streams meet (DualPipe's two middle ranks, DualPipeV's last rank).
    """
    # Step 1: nF0
    for _ in range((half - h - 1) * 2):
        p.forward_chunk(0)

    # Step 2: nF0F1
    p.recv_forward(0)
    for i in range(h + 1):
        p.forward_chunk(0, recv=False, send=middle and p.sched.layout == "dualpipe")
        p.recv_forward(0)
        p.forward_chunk(1, send=(not middle) or i < h)
        if not middle or p.sched.layout == "v":
            p.send_forward(0)

    # Step 3: nB1W1F1 (zero bubble)
    for _ in range(half - h - 1):
        p.backward_chunk(1, zero_bubble=True)
        p.recv_forward(1)
        p.weight_chunk()
        p.forward_chunk(1, recv=False)

    # Step 4 (main): nF0B1F1B0
    for i in range(per_phase - 2 * half + h + 1):
        if i == 0:
            if middle:
                # Not overlapped, to shorten the bubble (as in the reference).
                p.forward_chunk(0, recv=False, send=False)
                p.send_forward(1)
                p.backward_chunk(1, send=False)
                p.send_forward(0)
                p.send_backward(1)
            else:
                p.forward_backward_chunk(0, 1, recv0=False)
        else:
            p.forward_backward_chunk(0, 1)
        p.forward_backward_chunk(1, 0)

    # Step 5: nB1F1B0
    for _ in range(half - h - 1):
        p.backward_chunk(1)
        p.forward_backward_chunk(1, 0)

    # Step 6: nB1B0 (the second half of these use zero bubble)
    zero_bubble = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zero_bubble = True
        p.backward_chunk(1, zero_bubble=zero_bubble)
        if i == (h + 1) // 2 and h % 2 == 0:
            zero_bubble = True
        p.backward_chunk(0, zero_bubble=zero_bubble)

    # Step 7: nWB0 (zero bubble)
    for _ in range(half - h - 1):
        p.weight_chunk()
        p.backward_chunk(0, zero_bubble=True)

    # Step 8: nW
    for _ in range(h + 1):
        p.weight_chunk()
    assert not p.pending_w, "every deferred W must have run"


def dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipe (DeepSeek-V3 report, section 3.2.1): bidirectional, PP ranks, PP stages.

    Rank r holds stages r and PP-1-r; micro-batches 0 .. N/2-1 enter at rank 0 and
    N/2 .. N-1 at rank PP-1. Needs an even ``num_ranks`` and an even ``num_microbatches`` of at
    least 2 x num_ranks (the reference's assertions). Parameters per rank: 2 stages (2x 1F1B).
    """
    check_positive("num_ranks", num_ranks)
    check_positive("num_microbatches", num_microbatches)
    R, N = num_ranks, num_microbatches
    if R % 2:
        raise ValueError(f"dualpipe needs an even num_ranks (pipeline_parallel), got {R}.")
    if N % 2 or N < 2 * R:
        raise ValueError(f"dualpipe needs an even num_microbatches of at least 2 x num_ranks = {2 * R}, "
                         f"got {N}.")
    sched = Schedule("dualpipe", "dualpipe", R, R, N, 2)
    half = R // 2
    for r in range(R):
        p = _PhaseBuilder(sched, r, second_half=r >= half)
        _eight_steps(p, half, min(r, R - 1 - r), N // 2, middle=r in (half - 1, half))
        sched.ops.append(p.b.ops)
    return sched


def dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): R devices, 2R stages in a V.

    Rank r holds stage r (chunk 0) and stage 2R-1-r (chunk 1); every micro-batch enters at rank 0,
    runs down to the last rank, turns there without communication and comes back up, so rank 0
    also computes the loss. Same eight steps as DualPipe with one stream, half the devices for
    the same number of stages. Needs ``num_microbatches`` >= 2 x num_ranks (the reference's
    assertion; odd counts are allowed).
    """
    check_positive("num_ranks", num_ranks)
    check_positive("num_microbatches", num_microbatches)
    R, N = num_ranks, num_microbatches
    if N < 2 * R:
        raise ValueError(f"dualpipev needs num_microbatches of at least 2 x num_ranks = {2 * R}, got {N}.")
    sched = Schedule("dualpipev", "v", R, 2 * R, N, 2)
    for r in range(R):
        p = _PhaseBuilder(sched, r, second_half=False)
        _eight_steps(p, R, r, N, middle=r == R - 1)
        sched.ops.append(p.b.ops)
    return sched

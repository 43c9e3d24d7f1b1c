"""Cost any schedule: timeline, makespan, bubbles and live activations; and the checkers that
every schedule must pass (coverage, message pairing, dependencies, deadlock freedom).

Timing model
------------
Each rank runs its compute ops one at a time in list order. A compute op starts when the rank is
free and its inputs exist:

* F of (mb, s) needs F of (mb, s-1);
* B or BW of (mb, s) needs B of (mb, s+1) (for the last stage: its own F) and its own F;
* W of (mb, s) needs B of (mb, s);
* an FB op needs the inputs of both halves before it starts.

An input made on another rank arrives ``comm`` after the op that made it ends; an input made on
the same rank (DualPipeV's turn) is there at once. How the comm ops themselves behave is the
``p2p`` mode:

* ``"async"`` (the default, *dataflow*): sends and receives never hold a rank up; only the data
  dependencies above do. This is the model behind the DeepSeek table's formulas.
* ``"wait-all"``: each batch of comm ops (see ``ops.py``) blocks its rank like
  ``batch_isend_irecv`` followed by ``wait()`` on every request, with rendezvous semantics (a
  large NCCL/gloo message completes only once both sides have posted): a message is done
  ``comm`` after both its SEND and its RECV are posted, and the batch when all its messages are.
  This is how DeepSeek's reference DualPipe commits its comm ops. A receive posted early, or a
  send whose receiver is still computing, makes the rank wait.
* ``"wait-recv"``: a batch waits only for its receives (the data must have been sent, plus
  ``comm``); sends are posted and left in flight (waited for at the end of the step).

Definitions (costs ``F``, ``B`` = input backward, ``W``, ``BW`` = B + W, ``FB``)
-------------------------------------------------------------------------------
* makespan: the end of the last op on any rank; every rank starts the step at t = 0.
* busy(rank): the sum of its compute op costs.
* bubble(rank) = makespan - busy(rank): the time in [0, makespan] the rank is not computing,
  including the wait for its first input, as in the idle cells of the DeepSeek DualPipe figure.
  This makes 1F1B's bubble exactly (PP-1)(F+BW) on every rank.
* live activations: the activations of (mb, stage) become live when its F starts and are freed
  when its *weight* gradient is done (end of W, BW, or the fused backward). W needs the stored
  layer inputs, so a micro-batch whose W is deferred still holds activations (conservative: B
  frees part of them). Counted in units of one stage's activations for one micro-batch. Peak live
  activations depend only on each rank's op order, not on costs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .ops import Kind, Op, Schedule, message


class ScheduleError(Exception):
    """A schedule breaks the execution contract (coverage, pairing, dependencies, deadlock)."""


@dataclass(frozen=True)
class Costs:
    """Per-op times. ``B`` is the input-gradient backward only; a full backward (BW) costs B + W.

    The DeepSeek table writes B for the *full* backward, i.e. ``B + W`` here. ``FB`` is the fused
    forward+backward pair (its backward is a full BW); None means no overlap, ``F + B + W``. A
    fused pair whose backward is input-only (not produced by the schedules here) costs FB - W.
    ``comm`` is the latency of one point-to-point message between ranks. Costs are per op of one
    stage: for interleaved 1F1B, whose stages are 1/V of a rank's layers, divide them by V.
    """

    F: float = 1.0
    B: float = 1.0
    W: float = 1.0
    FB: Optional[float] = None
    comm: float = 0.0

    @property
    def BW(self) -> float:
        return self.B + self.W

    @property
    def fb(self) -> float:
        return self.F + self.B + self.W if self.FB is None else self.FB

    def of(self, op: Op) -> float:
        if op.kind is Kind.FB:
            if op.backward.kind is Kind.BW:
                return self.fb
            return self.fb - self.W              # a fused pair whose W runs later
        return {Kind.F: self.F, Kind.B: self.B, Kind.W: self.W, Kind.BW: self.BW}.get(op.kind, 0.0)


@dataclass
class Timed:
    op: Op
    start: float
    end: float


@dataclass
class SimResult:
    schedule: Schedule
    costs: Costs
    timeline: List[List[Timed]]          # per rank, compute ops only
    makespan: float
    busy: List[float]
    bubble: List[float]
    peak_activations: List[int]
    comm_wait: List[float] = field(default_factory=list)   # time spent waiting inside comm batches

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def max_activations(self) -> int:
        return max(self.peak_activations)


# ----------------------------------------------------------------------------- dependencies

def _done_key(part: Op) -> List[Tuple[str, int, int]]:
    """What finishing an elementary compute op makes available."""
    if part.kind is Kind.F:
        return [("F", part.mb, part.stage)]
    if part.kind is Kind.B:
        return [("B", part.mb, part.stage)]
    if part.kind is Kind.BW:
        return [("B", part.mb, part.stage), ("W", part.mb, part.stage)]
    if part.kind is Kind.W:
        return [("W", part.mb, part.stage)]
    raise ValueError(part)


def _needs(part: Op, num_stages: int) -> List[Tuple[str, int, int]]:
    """The results an elementary compute op depends on."""
    mb, s = part.mb, part.stage
    if part.kind is Kind.F:
        return [("F", mb, s - 1)] if s > 0 else []
    if part.kind in (Kind.B, Kind.BW):
        return [("F", mb, s)] + ([("B", mb, s + 1)] if s < num_stages - 1 else [])
    if part.kind is Kind.W:
        return [("B", mb, s)]
    raise ValueError(part)


def _rank_of(schedule: Schedule, key: Tuple[str, int, int]) -> int:
    return schedule.locate(key[1], key[2])[0]


# ----------------------------------------------------------------------------- activations

def live_activations(ops: List[Op]) -> int:
    """Peak number of (mb, stage) activations alive on a rank running ``ops`` in order."""
    live = peak = 0
    for op in ops:
        if not op.is_compute:
            continue
        for part in op.parts():                 # allocations happen at the op's start
            if part.kind is Kind.F:
                live += 1
        peak = max(peak, live)
        for part in op.parts():                 # frees at its end
            if part.kind in (Kind.W, Kind.BW):
                live -= 1
    return peak


# ----------------------------------------------------------------------------- simulation

def _channel_positions(schedule: Schedule):
    """For every comm op (rank, index): its FIFO channel (src, dst) and sequence number."""
    pos = {}
    counters: Counter = Counter()
    for r, ops in enumerate(schedule.ops):
        for i, op in enumerate(ops):
            if op.is_comm:
                chan = (r, op.peer) if op.is_send else (op.peer, r)
                side = "send" if op.is_send else "recv"
                pos[(r, i)] = (chan, counters[(chan, side)], side)
                counters[(chan, side)] += 1
    return pos


P2P_MODES = ("async", "wait-all", "wait-recv")


def simulate(schedule: Schedule, costs: Costs = Costs(), p2p: str = "async") -> SimResult:
    """Run ``schedule`` under ``costs`` and the ``p2p`` mode (see the module docstring); raise
    ScheduleError if it cannot finish (deadlock)."""
    if p2p not in P2P_MODES:
        raise ValueError(f"p2p must be one of {', '.join(P2P_MODES)}, got {p2p!r}.")
    blocking = p2p != "async"
    R, S = schedule.num_ranks, schedule.num_stages
    ops = schedule.ops
    idx = [0] * R
    clock = [0.0] * R
    done: Dict[Tuple[str, int, int], float] = {}
    timeline: List[List[Timed]] = [[] for _ in range(R)]
    comm_wait = [0.0] * R
    chan_pos = _channel_positions(schedule) if blocking else {}
    posted: Dict[Tuple, float] = {}              # (chan, seq, side) -> post time
    batch_start: Dict[int, float] = {}           # rank -> post time of its current batch

    def ready_time(rank: int, op: Op) -> Optional[float]:
        t = clock[rank]
        for part in op.parts():
            for key in _needs(part, S):
                if key not in done:
                    return None
                extra = costs.comm if _rank_of(schedule, key) != rank else 0.0
                t = max(t, done[key] + extra)
        return t

    def batch_end(rank: int) -> Tuple[int, Optional[float]]:
        """Post the batch at idx[rank]; return (index after it, its end time or None if stuck)."""
        j = idx[rank]
        while j < len(ops[rank]) and ops[rank][j].is_comm:
            j += 1
        if not blocking:
            return j, clock[rank]
        t_post = batch_start.setdefault(rank, clock[rank])
        for i in range(idx[rank], j):
            chan, seq, side = chan_pos[(rank, i)]
            posted.setdefault((chan, seq, side), t_post)
        end = t_post
        for i in range(idx[rank], j):
            chan, seq, side = chan_pos[(rank, i)]
            if p2p == "wait-recv" and side == "send":
                continue
            other = posted.get((chan, seq, "recv" if side == "send" else "send"))
            if other is None:
                return j, None
            end = max(end, max(t_post, other) + costs.comm)
        return j, end

    remaining = sum(len(o) for o in ops)
    while remaining:
        progress = False
        for r in range(R):
            while idx[r] < len(ops[r]):
                op = ops[r][idx[r]]
                if op.is_comm:
                    j, end = batch_end(r)
                    if end is None:
                        break
                    comm_wait[r] += end - clock[r]
                    clock[r] = end
                    batch_start.pop(r, None)
                    remaining -= j - idx[r]
                    idx[r] = j
                    progress = True
                    continue
                start = ready_time(r, op)
                if start is None:
                    break
                end = start + costs.of(op)
                for part in op.parts():
                    for key in _done_key(part):
                        if key in done:
                            raise ScheduleError(f"rank {r}: {part} runs twice")
                        done[key] = end
                timeline[r].append(Timed(op, start, end))
                clock[r] = end
                idx[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = [f"rank {r} at op {idx[r]} ({ops[r][idx[r]]})" for r in range(R) if idx[r] < len(ops[r])]
            raise ScheduleError(f"{schedule.name} deadlocks (p2p={p2p}): "
                                + "; ".join(stuck))

    makespan = max((t.end for tl in timeline for t in tl), default=0.0)
    busy = [sum(t.end - t.start for t in tl) for tl in timeline]
    return SimResult(schedule, costs, timeline, makespan, busy, [makespan - b for b in busy],
                     [live_activations(o) for o in ops], comm_wait)


def find_deadlock(schedule: Schedule) -> Optional[str]:
    """None if an executor with blocking batched point-to-point (batch_isend_irecv + wait,
    rendezvous: a send completes only once its receive is posted) finishes the schedule;
    otherwise a description of where every rank is stuck. Whether it deadlocks does not depend
    on op costs, only on the op order."""
    try:
        simulate(schedule, Costs(), p2p="wait-all")
    except ScheduleError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- structural checks

def check_schedule(schedule: Schedule) -> None:
    """Raise ScheduleError unless ``schedule`` keeps the execution contract of ``ops.py``:

    * every (mb, stage) has exactly one F, one input backward and one weight backward (a BW or
      an FB's backward covers both), on the rank and chunk ``locate`` names;
    * on each rank F < B <= W for the same (mb, stage), and W's follow their B's in FIFO order;
    * each RECV comes before the compute that needs it and each SEND after the one that made it,
      exactly where a stage boundary crosses ranks (one message per crossing, none locally);
    * per ordered pair of ranks the k-th SEND and the k-th RECV carry the same message.
    """
    R, S, N = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    if len(schedule.ops) != R:
        raise ScheduleError(f"{len(schedule.ops)} op lists for {R} ranks")
    counts: Counter = Counter()
    sends: Dict[Tuple[int, int], List[Op]] = defaultdict(list)
    recvs: Dict[Tuple[int, int], List[Op]] = defaultdict(list)
    for r, ops in enumerate(schedule.ops):
        where: Dict[Tuple[str, int, int], int] = {}
        w_queue: List[Tuple[int, int]] = []
        for i, op in enumerate(ops):
            if not 0 <= op.mb < N or not 0 <= op.stage < S:
                raise ScheduleError(f"rank {r}: {op} is out of range")
            if op.is_comm:
                (sends if op.is_send else recvs)[(r, op.peer) if op.is_send else (op.peer, r)].append(op)
                where[(op.kind.value, op.mb, op.stage)] = i
                continue
            for part in op.parts():
                if schedule.locate(part.mb, part.stage) != (r, part.chunk):
                    raise ScheduleError(f"rank {r}: {part} belongs on {schedule.locate(part.mb, part.stage)}")
                key = (part.mb, part.stage)
                if part.kind is Kind.F:
                    counts[("F",) + key] += 1
                    where[("F",) + key] = i
                elif part.kind in (Kind.B, Kind.BW):
                    counts[("B",) + key] += 1
                    if where.get(("F",) + key, i) >= i:
                        raise ScheduleError(f"rank {r}: {part} before its forward")
                    where[("B",) + key] = i
                    if part.kind is Kind.B:
                        w_queue.append(key)
                    else:
                        counts[("W",) + key] += 1
                elif part.kind is Kind.W:
                    counts[("W",) + key] += 1
                    if not w_queue or w_queue[0] != key:
                        raise ScheduleError(f"rank {r}: {part} is not the oldest pending weight gradient "
                                            f"({w_queue[:1]})")
                    w_queue.pop(0)
                else:
                    raise ScheduleError(f"rank {r}: unexpected compute part {part}")
        if w_queue:
            raise ScheduleError(f"rank {r}: weight gradients never computed for {w_queue}")
        _check_comm_placement(schedule, r, ops, where)
    for mb in range(N):
        for s in range(S):
            for what in ("F", "B", "W"):
                if counts[(what, mb, s)] != 1:
                    raise ScheduleError(f"{what} of micro-batch {mb}, stage {s} runs {counts[(what, mb, s)]} times")
    for chan in set(sends) | set(recvs):
        a, b = sends.get(chan, []), recvs.get(chan, [])
        if len(a) != len(b):
            raise ScheduleError(f"ranks {chan[0]}->{chan[1]}: {len(a)} sends but {len(b)} receives")
        for k, (x, y) in enumerate(zip(a, b)):
            if message(x) != message(y):
                raise ScheduleError(f"ranks {chan[0]}->{chan[1]} message {k}: sent {x} {message(x)} "
                                    f"but received as {y} {message(y)}")


def _check_comm_placement(schedule: Schedule, r: int, ops: List[Op], where) -> None:
    S = schedule.num_stages
    for op in ops:
        if not op.is_compute:
            continue
        for part in op.parts():
            mb, s = part.mb, part.stage
            if part.kind is Kind.F:
                boundaries = [(Kind.RECV_F, s - 1, "before")] if s > 0 else []
                boundaries += [(Kind.SEND_F, s + 1, "after")] if s < S - 1 else []
            elif part.kind in (Kind.B, Kind.BW):
                boundaries = [(Kind.RECV_B, s + 1, "before")] if s < S - 1 else []
                boundaries += [(Kind.SEND_B, s - 1, "after")] if s > 0 else []
            else:
                continue
            for kind, other_stage, side in boundaries:
                crosses = schedule.locate(mb, other_stage)[0] != r
                i = where.get((kind.value, mb, s))
                if crosses and i is None:
                    raise ScheduleError(f"rank {r}: {part} has no {kind}")
                if not crosses and i is not None:
                    raise ScheduleError(f"rank {r}: {kind} for a local hand-off of {part}")
                me = where[("F" if part.kind is Kind.F else "B", mb, s)]
                if i is not None and (i > me if side == "before" else i < me):
                    raise ScheduleError(f"rank {r}: {kind} of {part} must come {side} it")
                if crosses and ops[i].peer != schedule.locate(mb, other_stage)[0]:
                    raise ScheduleError(f"rank {r}: {ops[i]} has the wrong peer")


def check_dependencies(result: SimResult) -> None:
    """Raise ScheduleError if a simulated op starts before its inputs (plus comm) are ready."""
    sched, costs = result.schedule, result.costs
    ends: Dict[Tuple[str, int, int], Tuple[float, int]] = {}
    for r, tl in enumerate(result.timeline):
        for t in tl:
            for part in t.op.parts():
                for key in _done_key(part):
                    ends[key] = (t.end, r)
    for r, tl in enumerate(result.timeline):
        prev_end = 0.0
        for t in tl:
            if t.start < prev_end - 1e-9:
                raise ScheduleError(f"rank {r}: {t.op} overlaps the previous op")
            prev_end = t.end
            for part in t.op.parts():
                for key in _needs(part, sched.num_stages):
                    end, where = ends[key]
                    need = end + (costs.comm if where != r else 0.0)
                    if t.start < need - 1e-9:
                        raise ScheduleError(f"rank {r}: {t.op} starts at {t.start} before {key} is ready at {need}")

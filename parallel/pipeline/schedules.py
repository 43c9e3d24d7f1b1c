"""Single-direction schedules: 1F1B, interleaved 1F1B (virtual stages) and ZB-H1; and
`build_schedule`, the one entry point that maps a config's ``parallel.schedule`` to op lists.

Every builder returns a `Schedule` (see `ops.py`). Comm ops are placed just in time: the RECV a
compute op needs right before it, its SEND right after it, so a SEND of one step and the RECV of
the next form one batch, as Megatron's ``send_forward_recv_backward`` does.
"""

from __future__ import annotations

from collections import deque

from .ops import Kind, RankBuilder, Schedule

SCHEDULES = ("1f1b", "interleaved-1f1b", "zbh1", "dualpipe", "dualpipev")


def check_positive(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _forward(b: RankBuilder, mb: int, stage: int) -> None:
    b.recv_f(mb, stage)
    b.compute(Kind.F, mb, stage)
    b.send_f(mb, stage)


def _backward(b: RankBuilder, kind: Kind, mb: int, stage: int) -> None:
    b.recv_b(mb, stage)
    b.compute(kind, mb, stage)
    b.send_b(mb, stage)


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """Classic 1F1B (PipeDream-flush / Megatron), one stage per rank, full backward (BW).

    Rank r: warm-up with min(PP-r-1, N) forwards; steady state alternates one forward and one
    backward (F of micro-batch i+warmup, then BW of micro-batch i); cool-down runs the remaining
    backwards. Rank r therefore holds at most PP-r live activations, and with zero communication
    cost every rank idles (PP-1)(F+B) (B = full backward).
    """
    check_positive("num_ranks", num_ranks)
    check_positive("num_microbatches", num_microbatches)
    R, N = num_ranks, num_microbatches
    sched = Schedule("1f1b", "linear", R, R, N, 1)
    for r in range(R):
        b = RankBuilder(sched, r)
        warmup = min(R - r - 1, N)
        for i in range(warmup):
            _forward(b, i, r)
        for i in range(N - warmup):
            _forward(b, i + warmup, r)
            _backward(b, Kind.BW, i, r)
        for i in range(N - warmup, N):
            _backward(b, Kind.BW, i, r)
        sched.ops.append(b.ops)
    return sched


def interleaved_1f1b(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B: each rank holds ``virtual_stages`` (V) model chunks.

    The model is cut into PP*V stages; stage s lives on rank s % PP as chunk s // PP, so a
    micro-batch laps the ranks V times. Micro-batches go in groups of PP (N must be a multiple of
    PP, as in Megatron: with a ragged last group the warm-up is too short and the ranks end up
    waiting on each other): a rank runs chunk 0 forwards of the group, then chunk 1 forwards of
    the same group, and so on; backwards follow the same order with chunks reversed. Phases on rank r:
    warm-up with min(2(PP-r-1) + (V-1)PP, N*V) forwards, steady 1F1B (one forward, one backward),
    cool-down backwards. Each op is 1/V of a 1F1B op (simulate with costs divided by V): the bubble
    shrinks by about V at the price of V times more point-to-point messages and more activations
    in flight.
    """
    check_positive("num_ranks", num_ranks)
    check_positive("num_microbatches", num_microbatches)
    check_positive("virtual_stages", virtual_stages, 2)
    R, N, V = num_ranks, num_microbatches, virtual_stages
    if N % R:
        raise ValueError(f"interleaved-1f1b needs num_microbatches to be a multiple of num_ranks ({R}), got {N}: "
                         f"micro-batches go through the chunks in groups of num_ranks.")
    sched = Schedule("interleaved-1f1b", "interleaved", R, R * V, N, V)
    order = []                                   # (mb, chunk) in forward order
    for first in range(0, N, R):
        group = range(first, min(first + R, N))
        order += [(mb, c) for c in range(V) for mb in group]
    total = N * V
    for r in range(R):
        b = RankBuilder(sched, r)
        fwd = [(mb, c * R + r) for mb, c in order]
        bwd = [(mb, (V - 1 - c) * R + r) for mb, c in order]
        warmup = min(2 * (R - r - 1) + (V - 1) * R, total)
        steady = total - warmup
        # Megatron's communication pattern: after each step one batch sends the step's outputs and
        # posts the receives of the next step (send_forward_backward_recv_forward_backward).
        # Receiving one step ahead is what keeps the ring of ranks (stage PP-1 -> PP on rank 0)
        # from deadlocking under blocking point-to-point.
        b.recv_f(*fwd[0])
        for k in range(warmup):
            b.compute(Kind.F, *fwd[k])
            b.send_f(*fwd[k])
            if k + 1 < total:
                b.recv_f(*fwd[k + 1])
            if k == warmup - 1 and steady > 0:
                b.recv_b(*bwd[0])
        if steady == 0:
            b.recv_b(*bwd[0])
        for k in range(steady):
            b.compute(Kind.F, *fwd[k + warmup])
            b.compute(Kind.BW, *bwd[k])
            b.send_f(*fwd[k + warmup])
            b.send_b(*bwd[k])
            if k + warmup + 1 < total:
                b.recv_f(*fwd[k + warmup + 1])
            if k + 1 < total:
                b.recv_b(*bwd[k + 1])
        for k in range(steady, total):
            b.compute(Kind.BW, *bwd[k])
            b.send_b(*bwd[k])
            if k + 1 < total:
                b.recv_b(*bwd[k + 1])
        sched.ops.append(b.ops)
    return sched


def zb_h1(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split into B
    (inputs, on the critical path) and W (weights, deferrable).

    Rank r: warm-up with min(PP-r-1, N) forwards; then steady F, B pairs in which the W of each
    B is queued; as soon as more than r W's are pending the oldest one runs (so after the first r
    steady steps the pattern is F, B, W); cool-down B's, each followed by the oldest W while more
    than r are pending; finally the r deferred W's fill the tail that 1F1B leaves idle. Rank 0
    defers nothing and runs a full BW. In-flight micro-batches (F done, W not) never exceed PP, the
    1F1B peak, and with zero communication cost the bubble is (PP-1)(F+B-W) with B the input
    backward, i.e. (PP-1)(F+B-2W) in the DeepSeek table's notation (B = full backward).
    """
    check_positive("num_ranks", num_ranks)
    check_positive("num_microbatches", num_microbatches)
    R, N = num_ranks, num_microbatches
    sched = Schedule("zbh1", "linear", R, R, N, 1)
    for r in range(R):
        b = RankBuilder(sched, r)
        pending = deque()

        def backward(mb: int) -> None:
            if r == 0:                           # stage 0 sends nothing: B then W is one pass
                _backward(b, Kind.BW, mb, r)
                return
            _backward(b, Kind.B, mb, r)
            pending.append(mb)
            if len(pending) > r:
                b.compute(Kind.W, pending.popleft(), r)

        warmup = min(R - r - 1, N)
        for i in range(warmup):
            _forward(b, i, r)
        for i in range(N - warmup):
            _forward(b, i + warmup, r)
            backward(i)
        for i in range(N - warmup, N):
            backward(i)
        while pending:
            b.compute(Kind.W, pending.popleft(), r)
        sched.ops.append(b.ops)
    return sched


def forward_only(placement: Schedule, num_microbatches: int) -> Schedule:
    """Forward passes only (evaluation, generation), with `placement`'s layout: every micro-batch
    runs through every stage on the ranks that layout gives it (DualPipe's second half of the
    micro-batches enters at the last rank, as in training, so a micro-batch meets the same ranks in
    a forward-only pass and in a training step), each rank doing its F ops in micro-batch order.
    The executor runs it without building autograd graphs and returns the last stage's outputs."""
    check_positive("num_microbatches", num_microbatches)
    sched = Schedule(f"{placement.name} forward-only", placement.layout, placement.num_ranks, placement.num_stages,
                     num_microbatches, placement.chunks_per_rank, forward_only=True)
    for r in range(sched.num_ranks):
        b = RankBuilder(sched, r)
        for mb in range(num_microbatches):
            for stage in range(sched.num_stages):
                if sched.locate(mb, stage)[0] == r:
                    _forward(b, mb, stage)
        sched.ops.append(b.ops)
    return sched


def build_schedule(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """The schedule ``name`` (one of `SCHEDULES`, as in ``parallel.schedule``) for ``num_ranks``
    pipeline ranks and ``num_microbatches`` micro-batches. ``virtual_stages`` (model chunks
    per rank, at least 2) is used by interleaved-1f1b only. For dualpipev the
    ranks are devices: the model is cut into 2 x num_ranks stages.
    """
    from .dualpipe import dualpipe, dualpipev

    if name == "1f1b":
        return one_f_one_b(num_ranks, num_microbatches)
    if name == "interleaved-1f1b":
        return interleaved_1f1b(num_ranks, num_microbatches, virtual_stages)
    if name == "zbh1":
        return zb_h1(num_ranks, num_microbatches)
    if name == "dualpipe":
        return dualpipe(num_ranks, num_microbatches)
    if name == "dualpipev":
        return dualpipev(num_ranks, num_microbatches)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}.")

"""Overlapped F&B: run the forward and the backward halves of a DualPipe(V) ``FB`` op concurrently.

    from parallel.pipeline.overlap import make_overlap_runner
    fb_runner = make_overlap_runner(ctx)              # a collective over the world: every rank calls it
    ex = PipelineExecutor(..., fb_runner=fb_runner)
    ex.run(...)
    fb_runner.timings                                 # per FB op: when each half ran (perf_counter)

DualPipe pairs the forward of one micro-batch with the backward of another so that one's expert
all-to-all (dispatch, combine) travels while the other computes. The executor hands an ``FB`` op
to ``fb_runner(run_forward, run_backward)`` as two closures that do all their own bookkeeping; this
runner executes them at the same time:

* **Two threads.** The backward half runs in a worker thread, the forward half in the calling
  thread, and the caller joins the worker before returning. PyTorch releases the GIL inside its
  ops and while a gloo collective waits, so while one half waits for its all-to-all (or
  all-reduce) to complete the other computes. The forward stays in the calling thread because it
  touches more Python state of the caller (module attributes, metric recording); the backward
  half is autograd calls and the executor's dictionaries.
  The alternative, splitting each half into chunks at its all-to-alls and alternating them in one
  thread (async collectives plus generator-style MoE layers, as DeepSeek's kernel-level
  DualPipe does), needs the model code to be restructured; threads need no model changes and give
  the same overlap on gloo, where an async collective is itself run by a background thread.
* **Twin process groups (lanes).** Ranks must issue a group's collectives in the same order; two
  threads on one group would interleave differently on different ranks. At set-up
  `make_overlap_runner` creates a twin of every group used inside a stage's forward and backward
  (the TP group: column/row-parallel linears, sequence-parallel gathers, the vocabulary-parallel
  loss, the sequence-wise balance loss; the EP group: the MoE token dispatch and combine and their
  counts exchange -- every collective of ``parallel/tensor.py`` and ``parallel/expert.py``), and
  the backward half runs in the backward lane, which uses the twins (``parallel/twin_groups.py``). Each group then
  sees one thread's collectives, in the order all ranks of the group agree on. The pipeline
  group is not twinned: point-to-point sends and receives are separate comm ops, issued from the
  calling thread between compute ops, never during an FB op.
* **Thread-local state.** Grad mode and autocast are thread-local: the worker enters the caller's
  grad mode and the caller's autocast state (enabled, dtype, cache) for the CPU and for the
  device type of ``device``; on CUDA also the caller's current stream. Saved-tensor hooks
  (``torch.autograd.graph.saved_tensors_hooks``, e.g. an activation meter or offloading) are
  thread-local too: they apply to the forward half, which is why it stays in the calling thread;
  the backward half packs nothing (unpacking uses the hooks stored with each saved tensor).
* **Errors.** An exception in either half is re-raised in the caller, with its own type, after
  both halves have finished (a note names the half; if both failed, the forward's is raised, with
  the backward's as its context and in a note). A half that waits in a collective for a peer
  that failed ends with the backend's timeout, as any collective would.

What the two halves share, and why that is safe (the executor runs one op at a time otherwise):

* the executor's dictionaries: the forward inserts and pops the keys (mb, stage) of its
  micro-batch, the backward those of another micro-batch; each ``dict`` operation is atomic
  (under the GIL), and no key is used by both;
* module state written in the forward only: MoE's ``balance_loss`` and its ``tokens_per_expert``
  counts, `PipelineStages`' metric sums, the executor's losses; the backward half neither reads
  nor writes them (a backward that reruns a forward, under activation recomputation, leaves that
  state alone: the model's recomputation skips its bookkeeping in a rerun, and keeps what a rerun
  needs, e.g. the experts chosen, with the rerun's own region, not in module attributes);
* autograd: the backward's split (``_split_input_backward``) hooks nodes of the backward
  micro-batch's graph, which the forward never touches (it builds new nodes); the only shared
  nodes are the parameters' ``AccumulateGrad``, which the engine locks, and a full backward
  (``BW``) accumulating into ``.grad`` while the forward reads the parameters' values is fine;
* the parameters themselves are read by both and written by neither (the optimizer runs after
  the step).

Timing: ``timings`` records, per FB op, the perf_counter interval of each half (`FBTiming`);
`FBTiming.overlap` is the time both ran at once. Kept for the last ``max_records`` FB ops.

When it pays: the two halves need a core each (per rank) and their ops must be large enough that
the GIL, taken back between ops, is not the bottleneck. On a CPU with fewer free cores than ranks
x 2 the halves only compete (a shared 2-core machine running 4 gloo ranks measured DualPipeV
steps 1.3-1.7x slower with overlap than without); the results are bitwise the same either way.

On CUDA the same structure works with one addition for real overlap. The twins are separate NCCL
communicators, so the two halves' collectives run on separate NCCL streams, and two host threads
mean that one half's host syncs (the MoE dispatch reads the token counts) no longer stall the
other's launches. But both halves' compute kernels would share a stream, in launch order, and a
kernel queued behind the other half's wait for its all-to-all would wait too; so each half's
compute needs its own stream. Autograd runs each backward kernel on the stream its forward op
used (and on its own device thread: `Lanes.in_backward_lane` covers that), so the streams must be
chosen at forward time, e.g. alternate two compute streams by micro-batch in ``run_forward`` and
make the worker wait on an event of the caller's stream before starting. Not implemented: there
is no GPU to test it here. A caveat for that step: NCCL documents that communicators used
concurrently can deadlock when their (blocking) kernels are issued in different orders on
different ranks and cannot all be resident on the GPU at once. Each lane keeps its own order,
but the relative order of the two lanes differs between ranks by design, so both lanes' kernels
must be able to run together (DeepSeek's DualPipe reserves SMs for communication for this).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Deque, Iterable, Optional, Union

import torch

from parallel.twin_groups import BACKWARD_LANE, FORWARD_LANE, Lanes, create_twins

__all__ = ["make_overlap_runner", "OverlapRunner", "FBTiming"]


@dataclass
class FBTiming:
    """When the two halves of one FB op ran (``time.perf_counter`` seconds)."""

    forward_start: float
    forward_end: float
    backward_start: float
    backward_end: float

    @property
    def overlap(self) -> float:
        """Seconds during which both halves were running (0 if they did not intersect)."""
        return max(0.0, min(self.forward_end, self.backward_end) - max(self.forward_start, self.backward_start))

    @property
    def duration(self) -> float:
        """From the first half's start to the last half's end."""
        return max(self.forward_end, self.backward_end) - min(self.forward_start, self.backward_start)


class _ThreadState:
    """The caller's thread-local execution state that the backward half must run under."""

    def __init__(self, device: torch.device):
        self.grad_enabled = torch.is_grad_enabled()
        self.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                         for kind in dict.fromkeys(("cpu", device.type))]
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def enter(self, stack: ExitStack) -> None:
        stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
        for kind, enabled, dtype in self.autocast:
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache))
        if self.stream is not None:
            stack.enter_context(torch.cuda.stream(self.stream))


class OverlapRunner:
    """``fb_runner`` for `PipelineExecutor`: the backward half in a worker thread (lane 1), the
    forward half in the calling thread (lane 0), concurrently (module docstring).

    Needs twins of the groups the stages communicate on (`make_overlap_runner` creates them);
    ``lanes`` is the context's lane state, ``device`` the device the stages run on (for the
    thread-local state copied to the worker).
    """

    def __init__(self, lanes: Lanes, device: Union[str, torch.device, None] = None, max_records: int = 4096):
        self.lanes = lanes
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Bounded: a long run would otherwise grow it by one record per FB op forever.
        self.timings: Deque[FBTiming] = deque(maxlen=max_records)

    def clear(self) -> None:
        self.timings.clear()

    def overlapped_ops(self) -> int:
        """How many recorded FB ops had their two halves running at the same time."""
        return sum(1 for t in self.timings if t.overlap > 0)

    def __call__(self, run_forward: Callable[[], None], run_backward: Callable[[], None]) -> None:
        state = _ThreadState(self.device)
        errors: dict = {}
        times: dict = {}

        def backward_half() -> None:
            try:
                with ExitStack() as stack:
                    state.enter(stack)
                    stack.enter_context(self.lanes.use(BACKWARD_LANE))
                    start = time.perf_counter()
                    try:
                        run_backward()
                    finally:
                        times["backward"] = (start, time.perf_counter())
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
                errors["backward"] = exc

        worker = threading.Thread(target=backward_half, name="fb-backward", daemon=True)
        with self.lanes.window():
            worker.start()
            start = time.perf_counter()
            try:
                with self.lanes.use(FORWARD_LANE):
                    run_forward()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the join
                errors["forward"] = exc
            finally:
                times["forward"] = (start, time.perf_counter())
                # Join before leaving: the executor's next op (a comm batch, or another FB) must not
                # start while the backward half still runs.
                worker.join()
        if errors:
            raise _combined(errors)
        (fs, fe), (bs, be) = times["forward"], times["backward"]
        self.timings.append(FBTiming(fs, fe, bs, be))


def _combined(errors: dict) -> BaseException:
    """The exception to raise for the failed half (halves), its type kept so callers can catch it:
    the forward's when both failed (with the backward's as its context and named in a note), each
    with a note saying which half raised it."""
    for half, exc in errors.items():
        where = "the calling thread" if half == "forward" else "worker thread fb-backward"
        exc.add_note(f"(raised by the {half} half of an overlapped F&B pair, in {where})")
    if "forward" not in errors:
        return errors["backward"]
    exc = errors["forward"]
    if "backward" in errors:
        exc.add_note(f"the backward half failed too: {errors['backward']!r}")
        if exc.__context__ is None:
            exc.__context__ = errors["backward"]
    return exc


def make_overlap_runner(ctx, groups: Optional[Iterable] = None, max_records: int = 4096) -> OverlapRunner:
    """An `OverlapRunner` for ``ctx`` (a `parallel.context.ParallelContext`), with twins of the groups
    the stages communicate on: ``groups`` (default: the TP and the EP group; size-1 groups need none).

    A collective over the whole world (it creates process groups): every rank calls it, at the
    same point. In a single process (no torch.distributed) there is nothing to twin.
    """
    groups = [g for g in (groups if groups is not None else (ctx.tp, ctx.ep)) if g.size > 1]
    if ctx.is_distributed:
        create_twins(groups)
    return OverlapRunner(ctx.lanes, ctx.device, max_records=max_records)

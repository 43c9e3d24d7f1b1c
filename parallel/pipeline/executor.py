"""Run any pipeline schedule on real modules: one executor for 1F1B, interleaved 1F1B, ZB-H1,
DualPipe and DualPipeV.

The schedules are data (`ops.py`): per rank an ordered list of `Op`s. `PipelineExecutor` walks its
rank's list and does what each op says, following the execution contract in ``ops.py``; it has no
code specific to any schedule.

    from parallel.pipeline import build_schedule
    from parallel.pipeline.executor import PipelineExecutor
    from parallel.pipeline.stage_copies import sum_duplicate_stage_grads

    sched = build_schedule("dualpipev", num_ranks=pp, num_microbatches=8)
    chunks = {c: build_stage(sched.stage_of(rank, c)) for c in range(sched.chunks_per_rank)}
    ex = PipelineExecutor(sched, rank, chunks, loss_fn, pp_group, device,
                          activation_meta=((mb_size, seq, hidden), torch.bfloat16))
    losses = ex.run(microbatch_inputs, microbatch_targets)   # per-micro-batch losses or None
    sum_duplicate_stage_grads(sched, rank, chunks, pp_group)  # DualPipe only (no-op otherwise)
    ex.measured_bubble()                                       # from the recorded op times

Which module a rank builds (``chunk -> Schedule.stage_of(rank, chunk)``; R pipeline ranks):

=================  ======================  ===============================================
schedule           stages                  rank r holds
=================  ======================  ===============================================
1f1b, zbh1         R                       chunk 0 = stage r
interleaved-1f1b   R x V                   chunk c = stage c*R + r   (c < V)
dualpipe           R (each held twice)     chunk 0 = stage r, chunk 1 = stage R-1-r
dualpipev          2R                      chunk 0 = stage r, chunk 1 = stage 2R-1-r
=================  ======================  ===============================================

Ops
---
* ``F`` runs the chunk's module on the micro-batch's input: stage 0 takes ``microbatch_inputs[mb]``,
  other stages the received (or locally handed-over) activation, made a leaf that requires grad.
  The last stage computes ``loss_fn(output, microbatch_targets[mb]) / num_microbatches`` (so the
  parameter gradients are those of the mean loss over micro-batches) and records the unscaled
  loss. F keeps, for the backward, only the autograd graph (through a `GradientEdge` of the output,
  not the output tensor: like Megatron's ``deallocate_output_tensor``, the output's storage can go
  once its send has completed, unless the graph itself saved it) and the input leaf.
* ``B`` computes the gradient w.r.t. the stage input only and defers the weight gradient to the
  ``W`` that names the same (mb, stage); W's come in the order of their B's (a FIFO, checked).
* ``W`` computes the weight gradients and *accumulates* them into ``.grad`` (through the autograd
  engine, so ``.grad`` accumulation and post-accumulate-grad hooks behave as in a plain
  ``backward``). The executor never zeroes gradients: the caller does, once per step.
* ``BW`` is one full ``torch.autograd.backward`` (input and weight gradients in one pass).
* ``FB`` runs its forward part and then its backward part (see "Overlap" below).
* Communication: a maximal run of consecutive comm ops is posted with one
  ``torch.distributed.batch_isend_irecv``. Only the receives are waited for (before the next
  compute op); send requests, and the tensors they read, are kept until they report completion
  (checked at every batch; gloo's send requests never report it before ``wait()``, so there they
  are kept to the end of ``run``) and all waited for at the end of ``run`` (ops.py, contract
  point 2: this keeps ZB-H1's gain and cannot deadlock where wait-all does not).
  With a backend that coalesces a batch into one request (NCCL) the batch's single request is
  waited for: on a GPU that is a stream dependency, not a host block. Receive buffers are
  allocated from ``activation_meta`` (shape and dtype of every boundary activation, which is
  also the shape of its gradient); sent tensors are checked against it for a clear error.
* When consecutive stages of a micro-batch are on this rank (DualPipeV's turn on the last rank),
  the output is handed over locally (``detach().requires_grad_()``), and so is the gradient.

B/W split
---------
``weight_grad="split"`` (default) splits the backward at the graph level, without knowledge of the
layers: B computes the input gradient only and W the weight gradients only (``weight_grad_split.py``:
how, and what it costs in compute and in memory kept between B and W).

``weight_grad="recompute"`` is the simple alternative: B is ``autograd.grad(output, input,
retain_graph=True)``, W is ``autograd.backward(output, grad, inputs=params)``. W then repeats the
whole activation-gradient chain (it costs B + W) and the *entire* graph plus the received output
gradient stay alive until W. Both modes give the same gradients.

A stage-0 B has no input gradient to compute or send; in both modes it only queues the whole
backward for its W.

Overlap (FB)
------------
DualPipe's F&B pair overlaps the forward of one micro-batch with the backward of another so that
the expert-parallel all-to-all (dispatch/combine) of one hides behind the computation of the
other. Here FB calls ``fb_runner(run_forward, run_backward)`` with two closures; the default runs
the forward, then the backward (no overlap).
An overlapping runner goes there, without touching the executor: split the two halves into
chunks at their all-to-alls (e.g. make the MoE layers generators that ``yield`` after launching
an async ``all_to_all_single(..., async_op=True)`` on a communication stream) and alternate:
launch F's dispatch, compute B's chunk, wait F's dispatch, launch B's combine, compute F's
experts, ... Both closures already do their own bookkeeping (stored activations, hand-overs,
queued sends), so only the interleaving of their kernels changes.
`parallel.pipeline.overlap.make_overlap_runner(topo)` is such a runner: the two halves run in two
threads, and the backward half's TP/EP collectives go on twin process groups (`parallel/twin_groups.py`).

DualPipe's duplicate stages
---------------------------
With ``dualpipe`` every stage lives on two ranks; the executor accumulates each copy's gradients
separately and does **not** sum them: the caller must, before the optimizer step
(`stage_copies.sum_duplicate_stage_grads`, ``stage_copies.py``).

Timing
------
Every compute op gets an `OpTiming` (``time.perf_counter`` at start and end) in ``timeline``, in
execution order, and every comm batch one in ``comm_timeline`` (post to receives done).
`measured_bubble` turns them into the per-rank bubble (step time minus compute time). On a GPU the
host clock measures launches unless ``synchronize_timing=True`` (which synchronizes the device at
every op and so removes any overlap); ``sync_start=True`` puts a barrier at the start of ``run`` so
that the ranks' clocks start together.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.profiler import record_function

from parallel.group import Group

from .ops import Kind, Op, Schedule
from .weight_grad_split import _DeferredWeightGrad, _split_input_backward

__all__ = ["PipelineExecutor", "OpTiming", "WEIGHT_GRAD_MODES"]

WEIGHT_GRAD_MODES = ("split", "recompute")

Meta = Tuple[Tuple[int, ...], torch.dtype]
ActivationMeta = Union[Sequence[int], Tuple[Sequence[int], torch.dtype], Callable[[int, int], Any]]


@dataclass
class OpTiming:
    """When an op ran on this rank (``time.perf_counter`` seconds). For a comm batch ``op`` is its
    first op and ``ops`` all of them; for a compute op ``ops`` is ``(op,)``."""

    op: Op
    start: float
    end: float
    ops: Tuple[Op, ...] = ()

    @property
    def duration(self) -> float:
        return self.end - self.start


# ----------------------------------------------------------------------------- per-(mb, stage) state

@dataclass
class _Saved:
    """What F leaves for the backward of one (micro-batch, stage)."""

    chunk: int
    root: Any                      # GradientEdge of the output, or the scaled loss (last stage)
    x: Optional[torch.Tensor]      # the input leaf (None on stage 0)
    last: bool


def _normalize_meta(meta) -> Meta:
    if isinstance(meta, (tuple, list)) and len(meta) == 2 and isinstance(meta[1], torch.dtype):
        return tuple(int(d) for d in meta[0]), meta[1]
    if isinstance(meta, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in meta):
        return tuple(meta), torch.get_default_dtype()
    raise TypeError(f"activation_meta must give (shape, dtype) or a shape, got {meta!r}.")


class PipelineExecutor:
    """Runs ``schedule.ops[rank]`` on ``stage_modules`` (see the module docstring).

    Args:
        schedule: any `Schedule` (build_schedule).
        rank: this rank's index in the pipeline (its rank in ``pp_group``).
        stage_modules: ``{chunk: module}`` for ``chunk in range(schedule.chunks_per_rank)``; chunk c
            must be the model slice ``schedule.stage_of(rank, c)``.
        loss_fn: ``loss_fn(output, target) -> scalar`` on the last stage; the executor divides it
            by the number of micro-batches before the backward. In a forward-only schedule
            (`schedules.forward_only`) it may return anything: ``run`` returns its values.
        group: the pipeline `parallel.group.Group` (None: the default group, or size 1 without
            torch.distributed).
        device: where inputs, targets and receive buffers go.
        activation_meta: shape and dtype of the tensor crossing every stage boundary (which is
            also the shape of its gradient): ``(shape, dtype)``, a bare shape (default dtype), or a
            callable ``(mb, stage) -> (shape, dtype)`` giving the *output* of ``stage`` for
            micro-batch ``mb``. Required when the schedule has point-to-point messages.
        weight_grad: ``"split"`` (graph-level B/W split, default) or ``"recompute"`` (W re-runs
            the backward for the parameters); see the module docstring.
        fb_runner: ``fb_runner(run_forward, run_backward)`` runs an FB op's two halves; default
            forward then backward. The place for an overlapped F&B implementation.
        synchronize_timing: synchronize the device around every op (accurate GPU op times, no
            overlap).
        sync_start: barrier on ``group`` at the start of ``run`` (aligned clocks for bubbles).

    A forward-only schedule runs its F ops without building autograd graphs (evaluation,
    generation): nothing is kept for a backward.
    """

    def __init__(self, schedule: Schedule, rank: int, stage_modules: Mapping[int, nn.Module],
                 loss_fn: Callable[[Any, Any], Any], group: Optional[Group] = None,
                 device: Union[str, torch.device, None] = None, *,
                 activation_meta: Optional[ActivationMeta] = None, weight_grad: str = "split",
                 fb_runner: Optional[Callable[[Callable[[], None], Callable[[], None]], None]] = None,
                 synchronize_timing: bool = False, sync_start: bool = False):
        if not 0 <= rank < schedule.num_ranks:
            raise ValueError(f"rank {rank} is not in 0..{schedule.num_ranks - 1}.")
        if set(stage_modules) != set(range(schedule.chunks_per_rank)):
            raise ValueError(f"{schedule.name} needs stage_modules for chunks "
                             f"{list(range(schedule.chunks_per_rank))}, got {sorted(stage_modules)}.")
        if weight_grad not in WEIGHT_GRAD_MODES:
            raise ValueError(f"weight_grad must be one of {', '.join(WEIGHT_GRAD_MODES)}, got {weight_grad!r}.")
        self.schedule = schedule
        self.rank = rank
        self.ops = schedule.ops[rank]
        self.modules = dict(stage_modules)
        self.loss_fn = loss_fn
        self.group = group = group if group is not None else Group.world("pp")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.weight_grad = weight_grad
        self.fb_runner = fb_runner
        self.synchronize_timing = synchronize_timing
        self.sync_start = sync_start
        self._meta_fn = self._meta_function(activation_meta)
        has_comm = any(op.is_comm for op in self.ops)
        if has_comm:
            if self._meta_fn is None:
                raise ValueError("activation_meta is required: the schedule sends activations between ranks "
                                 "and receive buffers need their shape and dtype.")
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("torch.distributed must be initialised to run a multi-rank schedule.")
        if (group.size, group.rank) != (schedule.num_ranks, rank):
            raise ValueError(f"the pipeline group has {group.size} ranks and this process is rank {group.rank} in it; "
                             f"the schedule has {schedule.num_ranks} ranks and the executor was given rank {rank}.")
        self._params = {c: [p for p in m.parameters() if p.requires_grad] for c, m in self.modules.items()}
        self.timeline: List[OpTiming] = []
        self.comm_timeline: List[OpTiming] = []
        self.step_start = self.step_end = 0.0
        self._reset()

    # ------------------------------------------------------------------ public

    def run(self, microbatch_inputs, microbatch_targets=None,
            microbatch_state=None) -> Optional[List[Optional[torch.Tensor]]]:
        """Run one step (every op of this rank's list); gradients accumulate into ``.grad``.

        ``microbatch_inputs[mb]`` is read on the rank(s) holding stage 0 and
        ``microbatch_targets[mb]`` on the rank(s) holding the last stage (others may pass None).
        ``microbatch_state[mb]`` (optional) is this rank's own state of the micro-batch, never
        communicated: every stage's module is then called as ``module(x, state)`` (e.g. the
        per-layer KV cache of a generation pass, which each rank keeps for its own layers).
        Returns, on a rank that computed a loss, a list over micro-batches of the detached,
        unscaled ``loss_fn`` values (None for micro-batches whose loss another rank computed:
        DualPipe splits them between ranks 0 and R-1); None on the other ranks. Their mean over
        all micro-batches is the step's loss.
        """
        self._reset()
        self._inputs, self._targets, self._states = microbatch_inputs, microbatch_targets, microbatch_state
        if self.sync_start:
            self.group.barrier()
        self.step_start = time.perf_counter()
        try:
            i, ops = 0, self.ops
            while i < len(ops):
                if ops[i].is_comm:
                    j = i
                    while j < len(ops) and ops[j].is_comm:
                        j += 1
                    self._comm_batch(ops[i:j])
                    i = j
                    continue
                self._timed_compute(ops[i])
                i += 1
            for work, _ in self._send_works:
                work.wait()
            self._send_works.clear()
        finally:
            self._inputs = self._targets = self._states = None
        self.step_end = time.perf_counter()
        self._check_finished()
        if not any(loss is not None for loss in self._losses):
            return None
        return list(self._losses)

    def measured_bubble(self) -> Dict[str, float]:
        """This rank's last step from the recorded times: ``makespan`` (start of ``run`` to its
        end), ``busy`` (sum of compute op durations), ``bubble`` = makespan - busy,
        ``bubble_fraction`` = bubble / makespan, and ``comm_wait`` (time inside comm batches)."""
        makespan = self.step_end - self.step_start
        busy = sum(t.duration for t in self.timeline)
        bubble = makespan - busy
        return {"makespan": makespan, "busy": busy, "bubble": bubble,
                "bubble_fraction": bubble / makespan if makespan > 0 else 0.0,
                "comm_wait": sum(t.duration for t in self.comm_timeline)}

    def time_by_kind(self) -> Dict[str, float]:
        """This rank's last step split by what the time went to (seconds, summing to the makespan):
        ``forward`` (F), ``backward`` (B and BW: a BW's weight gradients are inside it),
        ``weight_grad`` (W), ``forward_backward`` (FB: an overlapped pair cannot be split) and
        ``pipeline_wait`` (the rest: waiting for point-to-point transfers and idle, the bubble).
        Kinds the schedule does not have are absent (pipeline_wait is always there)."""
        names = {Kind.F: "forward", Kind.B: "backward", Kind.BW: "backward", Kind.W: "weight_grad",
                 Kind.FB: "forward_backward"}
        split: Dict[str, float] = {}
        for timing in self.timeline:
            name = names[timing.op.kind]
            split[name] = split.get(name, 0.0) + timing.duration
        split["pipeline_wait"] = max(0.0, (self.step_end - self.step_start) - sum(split.values()))
        return split

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _meta_function(meta) -> Optional[Callable[[int, int], Meta]]:
        if meta is None:
            return None
        if callable(meta):
            return lambda mb, stage: _normalize_meta(meta(mb, stage))
        fixed = _normalize_meta(meta)
        return lambda mb, stage: fixed

    def _reset(self) -> None:
        self._acts_in: Dict[Tuple[int, int], torch.Tensor] = {}     # (mb, stage) -> its input
        self._grads_in: Dict[Tuple[int, int], torch.Tensor] = {}    # (mb, stage) -> d loss / d output
        self._acts_out: Dict[Tuple[int, int], torch.Tensor] = {}    # to send to stage+1
        self._grads_out: Dict[Tuple[int, int], torch.Tensor] = {}   # to send to stage-1
        self._saved: Dict[Tuple[int, int], _Saved] = {}
        self._pending_w: deque = deque()                             # ((mb, stage), _DeferredWeightGrad)
        self._send_works: List[Tuple[Any, torch.Tensor]] = []
        self._losses: List[Optional[torch.Tensor]] = [None] * self.schedule.num_microbatches
        self.timeline = []
        self.comm_timeline = []

    def _check_finished(self) -> None:
        left = {name: sorted(d) for name, d in (("received activations", self._acts_in),
                                                ("received gradients", self._grads_in),
                                                ("unsent activations", self._acts_out),
                                                ("unsent gradients", self._grads_out),
                                                ("forwards without backward", self._saved)) if d}
        if self._pending_w:
            left["backwards without W"] = [k for k, _ in self._pending_w]
        if left:
            raise RuntimeError(f"{self.schedule.name} rank {self.rank}: the step ended with {left}.")

    # ------------------------------------------------------------------ compute

    def _sync(self) -> None:
        if self.synchronize_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed_compute(self, op: Op) -> None:
        self._sync()
        start = time.perf_counter()
        with record_function(f"{op.kind.name} mb{op.mb} stage{op.stage}"):   # a span in torch.profiler traces
            self._compute(op)
        self._sync()
        self.timeline.append(OpTiming(op, start, time.perf_counter(), (op,)))

    def _compute(self, op: Op) -> None:
        if op.kind is Kind.FB:
            f, b = op.parts()
            run_f, run_b = (lambda: self._forward(f)), (lambda: self._backward(b))
            if self.fb_runner is None:
                # Overlap point: an overlapped F&B runs run_f's and run_b's kernels interleaved,
                # each one's expert all-to-all in flight while the other computes (module docstring).
                run_f()
                run_b()
            else:
                self.fb_runner(run_f, run_b)
        elif op.kind is Kind.F:
            self._forward(op)
        elif op.kind in (Kind.B, Kind.BW):
            self._backward(op)
        elif op.kind is Kind.W:
            self._weight(op)
        else:
            raise ValueError(f"not a compute op: {op}")

    def _module(self, op: Op) -> nn.Module:
        stage = self.schedule.stage_of(self.rank, op.chunk)
        if stage != op.stage:
            raise RuntimeError(f"rank {self.rank}: {op} runs on chunk {op.chunk}, which holds stage {stage}.")
        return self.modules[op.chunk]

    def _local(self, mb: int, stage: int) -> bool:
        return self.schedule.locate(mb, stage)[0] == self.rank

    def _forward(self, op: Op) -> None:
        mb, stage = op.mb, op.stage
        key = (mb, stage)
        module = self._module(op)
        last = stage == self.schedule.num_stages - 1
        if stage == 0:
            if self._inputs is None:
                raise ValueError(f"rank {self.rank} runs stage 0 and needs microbatch_inputs.")
            x = _to(self._inputs[mb], self.device)
            leaf = None
        else:
            try:
                leaf = x = self._acts_in.pop(key)     # the received buffer is freed with the graph
            except KeyError:
                raise RuntimeError(f"rank {self.rank}: {op} has no input (no RECV_F or local hand-over before it)")
            x.requires_grad_(not self.schedule.forward_only)
        with torch.set_grad_enabled(not self.schedule.forward_only):
            out = module(x) if self._states is None else module(x, self._states[mb])
            if last:
                if self._targets is None:
                    raise ValueError(f"rank {self.rank} runs the last stage and needs microbatch_targets.")
                loss = self.loss_fn(out, _to(self._targets[mb], self.device))
                if self.schedule.forward_only:
                    self._losses[mb] = loss
                    return
                self._losses[mb] = loss.detach()
                root = loss / self.schedule.num_microbatches
        if not last:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"stage {stage} must return one tensor, got {type(out).__name__}")
            if self._local(mb, stage + 1):
                self._acts_in[(mb, stage + 1)] = out.detach().requires_grad_(not self.schedule.forward_only)
            else:
                self._acts_out[key] = out.detach()
            if self.schedule.forward_only:
                return
            # Keep the graph through its edge, not the output tensor (Megatron's deallocation).
            root = get_gradient_edge(out) if out.requires_grad else None
        del out
        self._saved[key] = _Saved(op.chunk, root, leaf, last)

    def _output_grad(self, key: Tuple[int, int], saved: _Saved, op: Op) -> Optional[torch.Tensor]:
        if saved.last:
            return None                        # the root is the (scaled) loss itself
        try:
            return self._grads_in.pop(key)
        except KeyError:
            raise RuntimeError(f"rank {self.rank}: {op} has no output gradient (no RECV_B or local hand-over)")

    def _backward(self, op: Op) -> None:
        key = (op.mb, op.stage)
        self._module(op)
        try:
            saved = self._saved.pop(key)
        except KeyError:
            raise RuntimeError(f"rank {self.rank}: {op} before its forward")
        grad = self._output_grad(key, saved, op)
        root, x = saved.root, saved.x
        del saved
        gx = None
        if root is None:                       # the output does not require grad: nothing to do
            if op.kind is Kind.B:
                self._pending_w.append((key, _DeferredWeightGrad([])))
        elif op.kind is Kind.BW:
            torch.autograd.backward([root], None if grad is None else [grad])
            if x is not None:
                gx = x.grad
        elif x is None:                        # stage 0: no input gradient; W does all of it
            self._pending_w.append((key, _DeferredWeightGrad([], whole=(root, grad),
                                                             params=self._params[op.chunk])))
        elif self.weight_grad == "split":
            gx, deferred = _split_input_backward(root, grad, x)
            self._pending_w.append((key, deferred))
        else:                                  # "recompute": W re-runs the backward from the root
            (gx,) = torch.autograd.grad([root], [x], None if grad is None else [grad], retain_graph=True,
                                        allow_unused=True)
            self._pending_w.append((key, _DeferredWeightGrad([], whole=(root, grad),
                                                             params=self._params[op.chunk])))
        del root, grad
        if op.stage > 0:
            if gx is None:                     # the output did not depend on the input
                gx = torch.zeros_like(x)
            if self._local(op.mb, op.stage - 1):
                self._grads_in[(op.mb, op.stage - 1)] = gx
            else:
                self._grads_out[key] = gx

    def _weight(self, op: Op) -> None:
        key = (op.mb, op.stage)
        self._module(op)
        if not self._pending_w or self._pending_w[0][0] != key:
            head = self._pending_w[0][0] if self._pending_w else None
            raise RuntimeError(f"rank {self.rank}: {op} but the oldest pending weight gradient is {head}")
        _, deferred = self._pending_w.popleft()
        deferred.run()

    # ------------------------------------------------------------------ communication

    def _meta(self, mb: int, stage: int) -> Meta:
        """Shape and dtype of the output of ``stage`` (= input of stage+1, and both gradients)."""
        return self._meta_fn(mb, stage)

    def _comm_batch(self, batch: Sequence[Op]) -> None:
        self._sync()
        start = time.perf_counter()
        transfers, recvs = [], []
        for op in batch:
            key = (op.mb, op.stage)
            if op.kind is Kind.SEND_F:
                transfers.append(("send", self._pop_outgoing(self._acts_out, key, op, self._meta(op.mb, op.stage)),
                                  op.peer))
            elif op.kind is Kind.SEND_B:
                transfers.append(("send", self._pop_outgoing(self._grads_out, key, op,
                                                              self._meta(op.mb, op.stage - 1)), op.peer))
            else:
                shape, dtype = self._meta(op.mb, op.stage - 1 if op.kind is Kind.RECV_F else op.stage)
                buf = torch.empty(shape, dtype=dtype, device=self.device)
                transfers.append(("recv", buf, op.peer))
                recvs.append((op, buf))
        self._reap_sends()
        works = self.group.exchange(transfers)
        if len(works) == len(transfers):
            # One request per op: wait for the receives, keep the sends until the end of the step.
            for work, (kind, tensor, _) in zip(works, transfers):
                if kind == "recv":
                    work.wait()
                else:
                    self._send_works.append((work, tensor))
        else:
            # The backend coalesced the batch into one request (NCCL): wait for it.
            for work in works:
                work.wait()
        for op, buf in recvs:
            target = self._acts_in if op.kind is Kind.RECV_F else self._grads_in
            target[(op.mb, op.stage)] = buf
        self._sync()
        self.comm_timeline.append(OpTiming(batch[0], start, time.perf_counter(), tuple(batch)))

    def _reap_sends(self) -> None:
        """Drop the sends that have completed, and with them the tensors they read. NCCL requests
        report completion; gloo's report it only after ``wait()``, so on gloo the sent tensors
        stay referenced until the end of the step."""
        if self._send_works:
            self._send_works = [(w, t) for w, t in self._send_works if not w.is_completed()]

    def _pop_outgoing(self, store, key, op: Op, meta: Meta) -> torch.Tensor:
        try:
            t = store.pop(key)
        except KeyError:
            raise RuntimeError(f"rank {self.rank}: {op} but nothing was computed to send")
        shape, dtype = meta
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise RuntimeError(f"rank {self.rank}: {op} sends {tuple(t.shape)} {t.dtype} but activation_meta "
                               f"says {tuple(shape)} {dtype}: the receiver would read garbage.")
        return t.contiguous()


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value

"""ZeRO-1: a distributed AdamW whose gradients are reduce-scattered and whose FP32 master weights
and moments are sharded over each data-parallel group.

Device-agnostic (gloo on CPU, NCCL on GPU): buffers live on the parameters' device. Which
parameters are replicated over which group, and why their gradients are averaged with the
divisor they are, is in parallel/data_parallel.py; the bucket layout (which elements each rank
owns) in parallel/zero1_buckets.py; AdamW's update in parallel/adamw.py; the two checkpoint
formats in parallel/zero1_checkpoint.py.

The step
--------
Gradients accumulate (by autograd, in place) into one flat buffer per bucket: `p.grad` is a view
into it, set by the constructor and `zero_grad`. (If something replaces `p.grad` anyway, e.g.
`model.zero_grad(set_to_none=True)`, `step` copies the new `.grad` into the buffer: still correct,
one copy slower.) `step()`:

1. reduce-scatters each bucket's gradient (sum over the group, then / grad_divisor): each rank
   gets the averaged gradient of its shard only;
2. computes the global gradient norm from those shards (below) and, if it is not finite, returns
   without changing anything (`StepResult(grad_norm, skipped=True, reason=NONFINITE_GRAD_NORM)`,
   the same on every rank, since every rank sees the same all-reduced norm);
3. clips the shards by max_norm / (norm + 1e-6) when that is below 1 (torch's clip_grad_norm_);
4. asks whether AdamW's update of its shard would leave every master weight, moment and (cast)
   parameter finite (parallel.adamw.adamw_step_stays_finite: a bound from four reductions per
   tensor, and the update itself on copies where the bound cannot tell, so exact) and
   all-reduces the answer over the norm's groups, which span every rank; if any rank's would
   not, every rank returns without changing anything (`reason=NONFINITE_UPDATE`). Finite
   gradients do not make a finite update: a huge lr or weight decay, or a weight already near the
   FP32 maximum, overflow it. Deciding before updating is what keeps a skipped step traceless,
   since an update done in place cannot be undone exactly;
5. runs AdamW (torch.optim.AdamW's update, decoupled weight decay) on the FP32 master weights
   and moments of its shard only: the optimizer state is 3 fp32 numbers per element / g;
6. all-gathers the updated shards (cast to the parameter dtype) into the model parameters.

Every group is a `parallel.group.Group` (None: size 1) and every collective is one of its methods.
The two one-element all-reduces of steps 2 and 4 are the only collectives besides the
reduce-scatters and all-gathers. After `step`, `p.grad` still holds this rank's local (not
reduced, not clipped) gradient; unlike a plain optimizer, the averaged and clipped gradient
exists only as shards.

Gradient norm under sharding
----------------------------
The norm is that of the full averaged gradient of the whole model, every element counted exactly
once. Each rank adds the squares of the shard elements it owns (after reduce-scatter), for every
param group, and that sum is all-reduced over `data_parallel_group` (the dense DP group, which
EDP x EP spans: summing over it covers each expert element once, in the one EDP rank that owns
it, and every EP rank's distinct experts), then over `model_parallel_group` (the ranks holding
different parts of one replica: tensor- and pipeline-parallel ranks). In total every rank of the
world is counted once, so the rule is: every element of the global model must be owned by
exactly one rank. ZeRO ownership takes care of replicas inside a param group's own group; for
parameters that are identical on several ranks of the model-parallel group (under TP: norms,
the router, MLA's down-projections; their gradients must already agree, see
parallel.grad_duties.sum_partial_grads), pass `replicated_in_model_parallel(p) ->
True`: such a parameter counts only on rank 0 of `tensor_parallel_group` (defaults to
`model_parallel_group`; give the TP group explicitly when model_parallel_group also spans
pipeline stages). Sharded TP weights and pipeline stages' own parameters count everywhere. A
parameter that is a copy of one owned by another pipeline rank (the output stage's embedding copy
for MTP, DualPipe's second copy of a stage) is left out with `duplicated_elsewhere(p) -> True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from . import zero1_checkpoint
from .adamw import adamw_step, adamw_step_stays_finite
from .data_parallel import as_group, unique_trainable
from .group import Group
from .zero1_buckets import DEFAULT_BUCKET_SIZE, ParamSlot, plan_buckets


@dataclass
class DataParallelParams:
    """Parameters replicated over `group` (DP for dense, EDP for experts) and how to average their gradients."""

    params: Sequence[nn.Parameter]
    group: Group | None  # None: size 1
    grad_divisor: int | None = None  # gradients are summed over `group`, then divided by this (default: its size)


# Why a step was skipped (StepResult.reason).
NONFINITE_GRAD_NORM = "non-finite gradient norm"
NONFINITE_UPDATE = "non-finite update"


class StepResult(NamedTuple):
    grad_norm: float  # global norm of the averaged gradient, before clipping
    skipped: bool  # True: nothing was updated, on any rank
    reason: str | None = None  # why it was skipped (NONFINITE_GRAD_NORM, NONFINITE_UPDATE); None if not


class ShardedGroup:
    """One param group: its layout, gradient buffers and this rank's shard of the optimizer state."""

    def __init__(self, params: list[nn.Parameter], group: Group, grad_divisor: int,
                 bucket_size: int, decays: Callable[[nn.Parameter], bool], counted: Callable[[nn.Parameter], bool],
                 moments_dtype: torch.dtype = torch.float32):
        self.params = params
        self.group = group
        self.size = group.size
        self.rank = group.rank
        self.grad_divisor = grad_divisor
        self.buckets = plan_buckets(params, bucket_size, self.size)
        self.grad_buffers: list[torch.Tensor] = []
        self.grad_shards: list[torch.Tensor] = []
        self.master: list[torch.Tensor] = []
        self.exp_avg: list[torch.Tensor] = []
        self.exp_avg_sq: list[torch.Tensor] = []
        self.segments = [b.segments(self.rank) for b in self.buckets]
        self.decay_ranges: list[list[tuple[int, int]]] = []
        self.param_dtypes = [params[b.slots[0].index].dtype for b in self.buckets]
        # Elements of each shard that hold weights: segments are contiguous from 0, padding follows.
        self.weight_numels = [segments[-1][2] if segments else 0 for segments in self.segments]
        self.norm_ranges: list[list[tuple[int, int]] | None] = []  # None: the whole shard counts
        for bucket, segments in zip(self.buckets, self.segments):
            first = params[bucket.slots[0].index]
            self.grad_buffers.append(torch.zeros(bucket.padded_numel, dtype=first.dtype, device=first.device))
            self.grad_shards.append(torch.empty(bucket.shard_numel, dtype=first.dtype, device=first.device))
            # this rank's shard only: FP32 masters, moments in moments_dtype
            self.master.append(torch.zeros(bucket.shard_numel, dtype=torch.float32, device=first.device))
            for state in (self.exp_avg, self.exp_avg_sq):
                state.append(torch.zeros(bucket.shard_numel, dtype=moments_dtype, device=first.device))
            self.decay_ranges.append(_merge([(a, b) for slot, a, b, _ in segments if decays(params[slot.index])]))
            counted_ranges = [(a, b) for slot, a, b, _ in segments if counted(params[slot.index])]
            everything = all(counted(params[slot.index]) for slot in bucket.slots)
            self.norm_ranges.append(None if everything else _merge(counted_ranges))
        self.attach_grads()
        self.reload_params()

    # ---------------------------------------------------------------- gradients

    def grad_view(self, bucket_index: int, slot: ParamSlot) -> torch.Tensor:
        p = self.params[slot.index]
        return self.grad_buffers[bucket_index][slot.offset:slot.offset + slot.numel].view(p.shape)

    def attach_grads(self) -> None:
        for i, bucket in enumerate(self.buckets):
            for slot in bucket.slots:
                self.params[slot.index].grad = self.grad_view(i, slot)

    def zero_grads(self) -> None:
        for buf in self.grad_buffers:
            buf.zero_()
        self.attach_grads()

    def collect_grads(self) -> None:
        """Make the buffers hold every parameter's current .grad, whatever replaced the views."""
        for i, bucket in enumerate(self.buckets):
            for slot in bucket.slots:
                p = self.params[slot.index]
                view = self.grad_view(i, slot)
                if p.grad is None:
                    view.zero_()
                elif p.grad.data_ptr() != view.data_ptr() or p.grad.shape != view.shape:
                    view.copy_(p.grad)
                else:
                    continue
                p.grad = view

    def reduce_scatter_grads(self) -> None:
        """grad_shards[i] <- this rank's shard of the group-summed bucket i, divided by grad_divisor."""
        if self.size == 1:
            for buf, shard in zip(self.grad_buffers, self.grad_shards):
                shard.copy_(buf)
                if self.grad_divisor != 1:
                    shard.div_(self.grad_divisor)
            return
        works = [self.group.reduce_scatter_into(shard, buf, async_op=True)
                 for buf, shard in zip(self.grad_buffers, self.grad_shards)]
        for work, shard in zip(works, self.grad_shards):
            work.wait()
            if self.grad_divisor != 1:
                shard.div_(self.grad_divisor)

    def fp32_grad_shards(self) -> list[torch.Tensor]:
        return [g if g.dtype == torch.float32 else g.float() for g in self.grad_shards]

    def sum_of_squares(self, grads: list[torch.Tensor], total: torch.Tensor) -> torch.Tensor:
        for grad, ranges in zip(grads, self.norm_ranges):
            for a, b in [(0, grad.numel())] if ranges is None else ranges:
                if b > a:
                    total = total + torch.linalg.vector_norm(grad[a:b], dtype=torch.float32) ** 2
        return total

    # ---------------------------------------------------------------- parameters

    def reload_params(self) -> None:
        """Masters <- the model parameters' current values (this rank's shard)."""
        for master, segments in zip(self.master, self.segments):
            master.zero_()
            for slot, a, b, po in segments:
                master[a:b].copy_(self.params[slot.index].detach().reshape(-1)[po:po + b - a])

    def all_gather_params(self, scratch: dict) -> None:
        """Model parameters <- the masters of every rank, cast to the parameter dtype."""
        for bucket, master in zip(self.buckets, self.master):
            first = self.params[bucket.slots[0].index]
            if self.size == 1:
                full = master
            else:
                key = (first.device, first.dtype)
                buf = scratch.get(key)
                if buf is None or buf.numel() < bucket.padded_numel:
                    buf = scratch[key] = torch.empty(bucket.padded_numel, dtype=first.dtype, device=first.device)
                full = buf[:bucket.padded_numel]
                self.group.all_gather_into(full, master.to(first.dtype))
            for slot in bucket.slots:
                p = self.params[slot.index]
                p.data.copy_(full[slot.offset:slot.offset + slot.numel].view(p.shape))

    def layout_signature(self) -> dict:
        return {"group_size": self.size, "group_rank": self.rank,
                "param_shapes": [list(p.shape) for p in self.params],
                "bucket_numels": [b.numel for b in self.buckets]}


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent ranges joined (fewer, larger tensor ops)."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _default_decays(p: nn.Parameter) -> bool:
    return p.dim() >= 2  # matrices decay; norms and biases (1-D) do not


class DistributedOptimizer:
    """ZeRO-1 AdamW: gradients reduce-scattered, FP32 master weights and moments sharded over each group.

        opt = DistributedOptimizer([(dense_params, ctx.dp), (expert_params, ctx.edp, ctx.dp.size)],
                                   lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        opt.zero_grad()
        for micro_batch in micro_batches:
            (loss(micro_batch) / len(micro_batches)).backward()
        result = opt.step(max_grad_norm=1.0)   # StepResult(grad_norm, skipped, reason)

    Produces the parameters torch.optim.AdamW produces on the whole model with the gradients
    averaged over DP and clipped by torch.nn.utils.clip_grad_norm_ (up to fp32 reordering).
    See the module docstring for the step and the gradient-norm rule, parallel/data_parallel.py for
    the averaging and parallel/zero1_buckets.py for the layout.

    Groups are `parallel.group.Group`s (e.g. a ParallelContext's), None meaning size 1.
    `param_groups` entries: DataParallelParams or (params, group[, grad_divisor]) tuples; every rank of
        a group must pass the same parameters (shapes and dtypes) in the same order. Parameters
        that do not require grad are left out; a parameter may appear only once.
    `lr`, `betas`, `eps`, `weight_decay`: as torch.optim.AdamW. `self.param_groups` is one dict per
        entry with those keys (and "params"), settable between steps, e.g. the LR schedule's lr.
    `decays(p)`: whether weight decay applies to p (default: p.dim() >= 2, no decay for norms and biases).
    `bucket_size`: elements per bucket (see parallel/zero1_buckets.py).
    `data_parallel_group`: the group the norm's sum of squares is all-reduced over first (default:
        the first entry's group; it must be the dense DP group, which EDP x EP spans).
    `model_parallel_group`, `replicated_in_model_parallel`, `tensor_parallel_group`: the norm's second
        all-reduce, and which parameters count on one of their model-parallel copies only.
    `duplicated_elsewhere(p)`: True for a pipeline copy of a parameter counted on another rank.
    `moments_dtype`: storage of AdamW's two moments (torch.float32, or torch.bfloat16 to halve
        their memory as DeepSeek-V3 does); the update itself is computed in FP32 either way.
    """

    def __init__(self, param_groups: Sequence[DataParallelParams | tuple], *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 decays: Callable[[nn.Parameter], bool] | None = None, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 data_parallel_group: Group | None = None,
                 model_parallel_group: Group | None = None,
                 replicated_in_model_parallel: Callable[[nn.Parameter], bool] | None = None,
                 tensor_parallel_group: Group | None = None,
                 duplicated_elsewhere: Callable[[nn.Parameter], bool] | None = None,
                 moments_dtype: torch.dtype = torch.float32):
        if moments_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moments_dtype must be torch.float32 or torch.bfloat16, got {moments_dtype}.")
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}.")
        entries = [e if isinstance(e, DataParallelParams) else DataParallelParams(*e) for e in param_groups]
        if not entries:
            raise ValueError("DistributedOptimizer needs at least one param group.")
        groups = [as_group(e.group, f"the group of param group {k}") for k, e in enumerate(entries)]
        model_parallel_group = as_group(model_parallel_group, "model_parallel_group")
        if model_parallel_group.size > 1 and replicated_in_model_parallel is None:
            raise ValueError("model_parallel_group has several ranks: pass replicated_in_model_parallel "
                             "(lambda p: False when no parameter is replicated across them).")
        replicated = replicated_in_model_parallel or (lambda p: False)
        canonical = (model_parallel_group if tensor_parallel_group is None
                     else as_group(tensor_parallel_group, "tensor_parallel_group")).rank == 0
        duplicate = duplicated_elsewhere or (lambda p: False)
        counted = lambda p: (canonical or not replicated(p)) and not duplicate(p)  # noqa: E731
        decays = decays or _default_decays

        seen: set[int] = set()
        self.sharded_groups: list[ShardedGroup] = []
        self.param_groups: list[dict[str, Any]] = []
        for k, (entry, group) in enumerate(zip(entries, groups)):
            params = unique_trainable(entry.params, f"param group {k}")
            for p in params:
                if id(p) in seen:
                    raise ValueError(f"a parameter of shape {list(p.shape)} is in more than one param group.")
                seen.add(id(p))
            divisor = group.size if entry.grad_divisor is None else entry.grad_divisor
            if divisor < 1:
                raise ValueError(f"grad_divisor of param group {k} must be at least 1, got {divisor}.")
            self.sharded_groups.append(ShardedGroup(params, group, divisor, bucket_size, decays, counted,
                                                    moments_dtype))
            self.param_groups.append({"params": params, "lr": lr, "betas": tuple(betas), "eps": eps,
                                      "weight_decay": weight_decay})
        self.data_parallel_group = (groups[0] if data_parallel_group is None
                                    else as_group(data_parallel_group, "data_parallel_group"))
        self.model_parallel_group = model_parallel_group
        self.bucket_size = bucket_size
        self.steps = 0  # updates applied (skipped steps do not count), AdamW's bias-correction step
        self._scratch: dict = {}

    # ---------------------------------------------------------------- the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers. `.grad` stays a view into them (set_to_none is accepted and ignored)."""
        for g in self.sharded_groups:
            g.zero_grads()

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> StepResult:
        """Reduce-scatter, norm, (clip,) AdamW on this rank's shards, all-gather. A collective of all ranks.

        `max_grad_norm`: clip the global norm to it (None or <= 0: measure only). Returns the norm
        before clipping. The step is skipped on every rank (parameters, moments and step count
        unchanged; `reason` says why) when the norm is not finite, or when the update would make a
        master weight, a moment or a parameter non-finite on any rank.
        """
        for g in self.sharded_groups:
            g.collect_grads()
            g.reduce_scatter_grads()
        grads = [g.fp32_grad_shards() for g in self.sharded_groups]
        norm_t = self._global_norm(grads)
        norm = norm_t.item()
        if not math.isfinite(norm):
            return StepResult(norm, True, NONFINITE_GRAD_NORM)
        if max_grad_norm is not None and max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up
            coef = (max_grad_norm / (norm_t + 1e-6)).clamp(max=1.0)
            for shards in grads:
                for shard in shards:
                    shard.mul_(coef)
        step = self.steps + 1
        stays_finite = [adamw_step_stays_finite(g.master, g.exp_avg, g.exp_avg_sq, shards, g.decay_ranges, step=step,
                                                lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                                                weight_decay=hyper["weight_decay"], lengths=g.weight_numels,
                                                param_dtypes=g.param_dtypes)
                        for g, hyper, shards in zip(self.sharded_groups, self.param_groups, grads)]
        if not self._everywhere(stays_finite):
            return StepResult(norm, True, NONFINITE_UPDATE)
        self.steps = step
        for g, hyper, shards in zip(self.sharded_groups, self.param_groups, grads):
            adamw_step(g.master, g.exp_avg, g.exp_avg_sq, shards, g.decay_ranges, step=step, lr=hyper["lr"],
                       betas=hyper["betas"], eps=hyper["eps"], weight_decay=hyper["weight_decay"])
            g.all_gather_params(self._scratch)
        return StepResult(norm, False)

    def _global_norm(self, grads: list[list[torch.Tensor]]) -> torch.Tensor:
        device = next((p.device for g in self.sharded_groups for p in g.params), torch.device("cpu"))
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g, shards in zip(self.sharded_groups, grads):
            total = g.sum_of_squares(shards, total)
        total = total.reshape(1).contiguous()  # a 1-element tensor: what every backend reduces
        self.data_parallel_group.all_reduce(total)  # each a no-op at size 1
        self.model_parallel_group.all_reduce(total)
        return total.sqrt()[0]

    def _everywhere(self, flags: list[torch.Tensor]) -> bool:
        """Whether every flag (0-dim bool tensors, this rank's) is true on every rank: one read of the device.

        Reduced over the norm's two groups: the dense DP group (which EDP x EP spans, so it holds
        every expert shard's owner), then the model-parallel group (TP x PP). Together they reach
        every rank of the world, so every rank gets the same answer."""
        failed = torch.stack(flags).logical_not().sum(dtype=torch.float32).reshape(1)
        self.data_parallel_group.all_reduce(failed)  # each a no-op at size 1
        self.model_parallel_group.all_reduce(failed)
        return failed.item() == 0

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Re-read the master weights from the model parameters (after changing the model's weights
        outside the optimizer, e.g. loading pretrained weights). Local: no communication."""
        for g in self.sharded_groups:
            g.reload_params()

    # ---------------------------------------------------------------- checkpoints (parallel/zero1_checkpoint.py)

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state: see zero1_checkpoint.shard_state_dict."""
        return zero1_checkpoint.shard_state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Load what state_dict() returned on this same rank under the same layout: see
        zero1_checkpoint.load_shard_state_dict."""
        zero1_checkpoint.load_shard_state_dict(self, state)

    def parameter_moments(self, names: tuple[str, ...] = zero1_checkpoint.MOMENTS) -> dict:
        """AdamW's moments shaped like the parameters, by id(parameter) (a collective): see
        zero1_checkpoint.parameter_moments."""
        return zero1_checkpoint.parameter_moments(self, names)

    def load_parameter_moments(self, moments: dict, steps: int) -> None:
        """Keep this rank's shards of parameter-shaped moments: see zero1_checkpoint.load_parameter_moments."""
        zero1_checkpoint.load_parameter_moments(self, moments, steps)

    def full_state_dict(self) -> dict:
        """The unsharded state, gathered to rank 0 of each param group's group (a collective): see
        zero1_checkpoint.full_state_dict."""
        return zero1_checkpoint.full_state_dict(self)

    def load_full_state_dict(self, state: dict) -> None:
        """Load an unsharded state under this optimizer's layout, whatever it was saved under: see
        zero1_checkpoint.load_full_state_dict."""
        zero1_checkpoint.load_full_state_dict(self, state)

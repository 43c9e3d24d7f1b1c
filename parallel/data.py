"""Data parallelism: gradient averaging across replicas and a ZeRO-1 distributed optimizer (AdamW).

Device-agnostic (gloo on CPU, NCCL on GPU): buffers live on the parameters' device.

Which parameters are replicated where
-------------------------------------
Every data-parallel (DP) rank holds a replica of the model and runs its own share of the global
batch. Parameters come in two kinds:

- dense parameters (attention, shared experts, norms, router, embeddings) are replicated over
  the DP group;
- routed-expert parameters are sharded by expert parallelism (EP): an EP group of ranks splits
  the experts, so an expert is replicated only over the expert-data-parallel (EDP) group, the
  ranks that hold the same experts (DP = EP x EDP when EP is folded into DP, as in Megatron).

The caller says which parameters go with which process group: `param_groups` is a list of
`DataParallelParams(params, group, grad_divisor)` or plain `(params, group)` /
`(params, group, grad_divisor)` tuples. A group of None means size 1 (no communication, and
torch.distributed need not be initialised), the convention of parallel/tensor.py.

Gradient averaging
------------------
Within a rank, autograd sums the gradients of its micro-batches (the caller divides each
micro-batch loss by the number of micro-batches, so the rank's loss is the mean over its own
micro-batches). Across DP ranks gradients are *averaged*: the global loss is the mean over the
global batch, and with equal shares that is (1/dp) * sum over DP ranks of each rank's loss,
because each rank's loss is already a mean over its own share. Summing instead would scale the
gradient (and so the learning rate) with dp.

The divisor is the number of data-parallel replicas of the batch, dp, for every parameter. For
dense parameters that is the size of their group. For expert parameters it is NOT the EDP size:
the expert all-to-all already brings into an expert's local gradient the contributions of every
rank of its EP group, so summing over EDP gives the sum over all dp ranks' losses, and dividing
by dp is the average (Megatron's `expert_gradient_scaling_factor`). Pass `grad_divisor=dp` for
the expert group; it defaults to the group's size.

ZeRO-1 layout
-------------
`DistributedOptimizer` flattens each param group into buckets: parameters are taken in the given
order (grouped by device and dtype, first appearance first) and packed greedily, a bucket closing
when the next parameter would take it past `bucket_size` elements; a parameter is never split, so
one larger than `bucket_size` gets a bucket of its own. Each bucket is padded with zeros to a
multiple of the group size g, and rank r of the group owns the contiguous shard
[r * padded/g, (r+1) * padded/g) of every bucket. The layout depends only on the parameter list,
`bucket_size` and g, never on the rank (`plan_buckets` computes it).

Gradients accumulate (by autograd, in place) into one flat buffer per bucket: `p.grad` is a view
into it, set by the constructor and `zero_grad`. (If something replaces `p.grad` anyway, e.g.
`model.zero_grad(set_to_none=True)`, `step` copies the new `.grad` into the buffer: still correct,
one copy slower.) `step()`:

1. reduce-scatters each bucket's gradient (sum over the group, then / grad_divisor): each rank
   gets the averaged gradient of its shard only;
2. computes the global gradient norm from those shards (below) and, if it is not finite, returns
   without changing anything (`StepResult(grad_norm, skipped=True)`, the same on every rank,
   since every rank sees the same all-reduced norm);
3. clips the shards by max_norm / (norm + 1e-6) when that is below 1 (torch's clip_grad_norm_);
4. runs AdamW (torch.optim.AdamW's update, decoupled weight decay) on the FP32 master weights
   and moments of its shard only: the optimizer state is 3 fp32 numbers per element / g;
5. all-gathers the updated shards (cast to the parameter dtype) into the model parameters.

Step 2's all-reduce is the only collective besides the reduce-scatters and all-gathers. After
`step`, `p.grad` still holds this rank's local (not reduced, not clipped) gradient; unlike a
plain optimizer, the averaged and clipped gradient exists only as shards.

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
parallel.tensor.allreduce_sequence_parallel_grads), pass `replicated_in_model_parallel(p) ->
True`: such a parameter counts only on rank 0 of `tensor_parallel_group` (defaults to
`model_parallel_group`; give the TP group explicitly when model_parallel_group also spans
pipeline stages). Sharded TP weights and pipeline stages' own parameters count everywhere. A
parameter that is a copy of one owned by another pipeline rank (the output stage's embedding copy
for MTP, DualPipe's second copy of a stage) is left out with `duplicated_elsewhere(p) -> True`.

Checkpoints
-----------
`state_dict()` is this rank's shard only (see its docstring): every rank saves its own and loads
it back under the same layout (same parameters, bucket_size and group sizes; ranks keep their
shard). `full_state_dict()` gathers the unsharded state (per parameter) to rank 0 of each param
group's group, and `load_full_state_dict()` loads such a state under any layout, for resharding.

`allreduce_gradients(params, group)` is the plain alternative without ZeRO: bucketed all-reduce
and average of `.grad`, after which any optimizer runs replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn

ProcessGroup = dist.ProcessGroup

# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor in favour of the *_single
# names (same semantics); see parallel/tensor.py.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

DEFAULT_BUCKET_SIZE = 4_000_000  # elements per ZeRO bucket
DEFAULT_BUCKET_BYTES = 25 * 2**20  # bytes per all-reduce bucket (torch DDP's default)
_STATE_FORMAT = "megads.DistributedOptimizer.shard/1"
_FULL_STATE_FORMAT = "megads.DistributedOptimizer.full/1"


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in the group; 1 for None (no data parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank within the group; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def _unique_trainable(params: Iterable[torch.Tensor], what: str) -> list[nn.Parameter]:
    out, seen = [], set()
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what} must contain tensors, found {type(p).__name__}.")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ============================================================================ plain data parallelism


@torch.no_grad()
def allreduce_gradients(params: Iterable[nn.Parameter], group: ProcessGroup | None,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES, grad_divisor: int | None = None) -> None:
    """Average `.grad` of `params` over `group` (sum, then divide by grad_divisor, default the group size).

    Call after the backward passes of all micro-batches, before clipping and the optimizer step;
    every rank of the group must call it with the same parameters in the same order. Gradients
    are packed into flat buffers of at most `bucket_bytes` (one all-reduce each; a parameter
    larger than that gets a buffer of its own). A parameter whose `.grad` is None on this rank
    counts as zero and has a `.grad` afterwards (other ranks may have contributed to it).
    For expert parameters pass their EDP group and grad_divisor=dp (see the module docstring).
    """
    params = _unique_trainable(params, "params")
    size = group_size(group)
    divisor = size if grad_divisor is None else grad_divisor
    if divisor < 1:
        raise ValueError(f"grad_divisor must be at least 1, got {divisor}.")
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if size == 1:
        if divisor != 1:
            for p in params:
                p.grad.div_(divisor)
        return
    by_kind: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for kind_params in by_kind.values():
        bucket: list[nn.Parameter] = []
        nbytes = 0
        for p in kind_params:
            size_p = p.grad.numel() * p.grad.element_size()
            if bucket and nbytes + size_p > bucket_bytes:
                _allreduce_bucket(bucket, group, divisor)
                bucket, nbytes = [], 0
            bucket.append(p)
            nbytes += size_p
        if bucket:
            _allreduce_bucket(bucket, group, divisor)


def _allreduce_bucket(params: list[nn.Parameter], group: ProcessGroup, divisor: int) -> None:
    # torch.cat copies into a new contiguous buffer: gloo reduces a strided tensor's memory as if
    # it were contiguous, and a flat buffer is one collective instead of one per parameter.
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    if divisor != 1:
        flat.div_(divisor)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


# ============================================================================ bucket layout


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in its bucket: elements [offset, offset + numel)."""

    index: int  # position of the parameter in its param group's list
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    """A flat run of parameters; padded to a multiple of the group size, which shards it evenly."""

    slots: tuple[ParamSlot, ...]
    numel: int  # elements of its parameters
    padded_numel: int  # numel rounded up to a multiple of the group size
    group_size: int

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.group_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The elements [start, end) of the bucket that group rank `rank` owns."""
        if not 0 <= rank < self.group_size:
            raise ValueError(f"rank {rank} is not in a group of size {self.group_size}.")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def segments(self, rank: int) -> list[tuple[ParamSlot, int, int, int]]:
        """The parts of parameters inside rank's shard: (slot, start in shard, end in shard, start in param)."""
        start, end = self.shard_range(rank)
        out = []
        for slot in self.slots:
            lo, hi = max(slot.offset, start), min(slot.offset + slot.numel, end)
            if lo < hi:
                out.append((slot, lo - start, hi - start, lo - slot.offset))
        return out


def plan_buckets(params: Sequence[torch.Tensor], bucket_size: int, group_size: int) -> list[Bucket]:
    """The bucket layout of `params` (see the module docstring); deterministic, the same on every rank."""
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be at least 1 element, got {bucket_size}.")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}.")
    by_kind: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_kind.setdefault((p.device, p.dtype), []).append(i)

    buckets: list[Bucket] = []

    def close(slots: list[ParamSlot], numel: int) -> None:
        padded = -(-numel // group_size) * group_size
        buckets.append(Bucket(tuple(slots), numel, padded, group_size))

    for indices in by_kind.values():
        slots: list[ParamSlot] = []
        numel = 0
        for i in indices:
            n = params[i].numel()
            if slots and numel + n > bucket_size:
                close(slots, numel)
                slots, numel = [], 0
            slots.append(ParamSlot(i, numel, n))
            numel += n
        if slots:
            close(slots, numel)
    return buckets


# ============================================================================ ZeRO-1 optimizer


@dataclass
class DataParallelParams:
    """Parameters replicated over `group` (DP for dense, EDP for experts) and how to average their gradients."""

    params: Sequence[nn.Parameter]
    group: ProcessGroup | None
    grad_divisor: int | None = None  # gradients are summed over `group`, then divided by this (default: its size)


class StepResult(NamedTuple):
    grad_norm: float  # global norm of the averaged gradient, before clipping
    skipped: bool  # True when that norm was not finite: nothing was updated, on any rank


class _ShardedGroup:
    """One param group: its layout, gradient buffers and this rank's shard of the optimizer state."""

    def __init__(self, params: list[nn.Parameter], group: ProcessGroup | None, grad_divisor: int,
                 bucket_size: int, decays: Callable[[nn.Parameter], bool], counted: Callable[[nn.Parameter], bool],
                 moments_dtype: torch.dtype = torch.float32):
        self.params = params
        self.group = group
        self.size = group_size(group)
        self.rank = group_rank(group)
        self.grad_divisor = grad_divisor
        self.buckets = plan_buckets(params, bucket_size, self.size)
        self.grad_buffers: list[torch.Tensor] = []
        self.grad_shards: list[torch.Tensor] = []
        self.master: list[torch.Tensor] = []
        self.exp_avg: list[torch.Tensor] = []
        self.exp_avg_sq: list[torch.Tensor] = []
        self.segments = [b.segments(self.rank) for b in self.buckets]
        self.decay_ranges: list[list[tuple[int, int]]] = []
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
        works = [_reduce_scatter_single(shard, buf, group=self.group, async_op=True)
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
                _all_gather_single(full, master.to(first.dtype), group=self.group)
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

        opt = DistributedOptimizer([(dense_params, dp_group), (expert_params, edp_group, dp)],
                                   lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        opt.zero_grad()
        for micro_batch in micro_batches:
            (loss(micro_batch) / len(micro_batches)).backward()
        result = opt.step(max_grad_norm=1.0)   # StepResult(grad_norm, skipped)

    Produces the parameters torch.optim.AdamW produces on the whole model with the gradients
    averaged over DP and clipped by torch.nn.utils.clip_grad_norm_ (up to fp32 reordering).
    See the module docstring for the layout, the averaging and the gradient-norm rule.

    `param_groups` entries: DataParallelParams or (params, group[, grad_divisor]) tuples; every rank of
        a group must pass the same parameters (shapes and dtypes) in the same order. Parameters
        that do not require grad are left out; a parameter may appear only once.
    `lr`, `betas`, `eps`, `weight_decay`: as torch.optim.AdamW. `self.param_groups` is one dict per
        entry with those keys (and "params"), settable between steps, e.g. the LR schedule's lr.
    `decays(p)`: whether weight decay applies to p (default: p.dim() >= 2, no decay for norms and biases).
    `bucket_size`: elements per bucket (see the module docstring).
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
                 data_parallel_group: ProcessGroup | None = None,
                 model_parallel_group: ProcessGroup | None = None,
                 replicated_in_model_parallel: Callable[[nn.Parameter], bool] | None = None,
                 tensor_parallel_group: ProcessGroup | None = None,
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
        if group_size(model_parallel_group) > 1 and replicated_in_model_parallel is None:
            raise ValueError("model_parallel_group has several ranks: pass replicated_in_model_parallel "
                             "(lambda p: False when no parameter is replicated across them).")
        replicated = replicated_in_model_parallel or (lambda p: False)
        canonical = group_rank(tensor_parallel_group if tensor_parallel_group is not None
                               else model_parallel_group) == 0
        duplicate = duplicated_elsewhere or (lambda p: False)
        counted = lambda p: (canonical or not replicated(p)) and not duplicate(p)  # noqa: E731
        decays = decays or _default_decays

        seen: set[int] = set()
        self._groups: list[_ShardedGroup] = []
        self.param_groups: list[dict[str, Any]] = []
        for k, entry in enumerate(entries):
            params = _unique_trainable(entry.params, f"param group {k}")
            for p in params:
                if id(p) in seen:
                    raise ValueError(f"a parameter of shape {list(p.shape)} is in more than one param group.")
                seen.add(id(p))
            divisor = group_size(entry.group) if entry.grad_divisor is None else entry.grad_divisor
            if divisor < 1:
                raise ValueError(f"grad_divisor of param group {k} must be at least 1, got {divisor}.")
            self._groups.append(_ShardedGroup(params, entry.group, divisor, bucket_size, decays, counted,
                                              moments_dtype))
            self.param_groups.append({"params": params, "lr": lr, "betas": tuple(betas), "eps": eps,
                                      "weight_decay": weight_decay})
        self.data_parallel_group = entries[0].group if data_parallel_group is None else data_parallel_group
        self.model_parallel_group = model_parallel_group
        self.bucket_size = bucket_size
        self.steps = 0  # updates applied (skipped steps do not count), AdamW's bias-correction step
        self._scratch: dict = {}

    # ---------------------------------------------------------------- the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers. `.grad` stays a view into them (set_to_none is accepted and ignored)."""
        for g in self._groups:
            g.zero_grads()

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> StepResult:
        """Reduce-scatter, norm, (clip,) AdamW on this rank's shards, all-gather. A collective of all ranks.

        `max_grad_norm`: clip the global norm to it (None or <= 0: measure only). Returns the norm
        before clipping; a non-finite norm skips the update on every rank (parameters, moments and
        step count unchanged).
        """
        for g in self._groups:
            g.collect_grads()
            g.reduce_scatter_grads()
        grads = [g.fp32_grad_shards() for g in self._groups]
        norm_t = self._global_norm(grads)
        norm = norm_t.item()
        if not math.isfinite(norm):
            return StepResult(norm, True)
        if max_grad_norm is not None and max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up
            coef = (max_grad_norm / (norm_t + 1e-6)).clamp(max=1.0)
            for shards in grads:
                for shard in shards:
                    shard.mul_(coef)
        self.steps += 1
        for g, hyper, shards in zip(self._groups, self.param_groups, grads):
            self._adamw(g, hyper, shards)
            g.all_gather_params(self._scratch)
        return StepResult(norm, False)

    def _global_norm(self, grads: list[list[torch.Tensor]]) -> torch.Tensor:
        device = next((p.device for g in self._groups for p in g.params), torch.device("cpu"))
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g, shards in zip(self._groups, grads):
            total = g.sum_of_squares(shards, total)
        total = total.reshape(1).contiguous()  # a 1-element tensor: what every backend reduces
        if group_size(self.data_parallel_group) > 1:
            dist.all_reduce(total, group=self.data_parallel_group)
        if group_size(self.model_parallel_group) > 1:
            dist.all_reduce(total, group=self.model_parallel_group)
        return total.sqrt()[0]

    def _adamw(self, g: _ShardedGroup, hyper: dict, grads: list[torch.Tensor]) -> None:
        # torch.optim.AdamW's single-tensor update (torch/optim/adam.py), on flat fp32 shards
        lr, (beta1, beta2), eps, wd = hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"]
        step = float(self.steps)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        for master, stored_avg, stored_avg_sq, grad, decay in zip(g.master, g.exp_avg, g.exp_avg_sq, grads,
                                                                   g.decay_ranges):
            if wd != 0:
                for a, b in decay:
                    master[a:b].mul_(1 - lr * wd)
            # Low-precision moments: update FP32 copies, step with them, store them rounded.
            exp_avg, exp_avg_sq = stored_avg.float(), stored_avg_sq.float()
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            master.addcdiv_(exp_avg, denom, value=-step_size)
            if stored_avg.dtype != torch.float32:
                stored_avg.copy_(exp_avg)
                stored_avg_sq.copy_(exp_avg_sq)

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Re-read the master weights from the model parameters (after changing the model's weights
        outside the optimizer, e.g. loading pretrained weights). Local: no communication."""
        for g in self._groups:
            g.reload_params()

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state (tensors shared with the optimizer: save, don't mutate).

        {"format", "steps", "param_groups": [{"lr", "betas", "eps", "weight_decay"}, ...],
         "shards": [per param group: {"group_size", "group_rank", "param_shapes", "bucket_numels",
                    "master", "exp_avg", "exp_avg_sq" (lists, one fp32 tensor per bucket: the elements
                    [group_rank * padded/group_size, ...) of the bucket, padding included)}]}
        Plain containers, numbers and tensors: loadable with torch.load(weights_only=True).
        """
        return {
            "format": _STATE_FORMAT,
            "steps": self.steps,
            "bucket_size": self.bucket_size,
            "param_groups": [{k: v for k, v in h.items() if k != "params"} for h in self.param_groups],
            "shards": [{**g.layout_signature(), "master": list(g.master), "exp_avg": list(g.exp_avg),
                        "exp_avg_sq": list(g.exp_avg_sq)} for g in self._groups],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load what state_dict() returned on this same rank under the same layout (local, no communication).

        Restores the masters, moments, step count and hyperparameters; the model parameters are not
        touched (load the model's own checkpoint too: its weights are the masters in the parameter
        dtype). A different layout (group sizes, ranks, parameters, bucket_size) is an error: use
        full_state_dict() / load_full_state_dict() to reshard.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a DistributedOptimizer shard state (format {_STATE_FORMAT!r} expected).")
        if len(state["shards"]) != len(self._groups):
            raise ValueError(f"the state has {len(state['shards'])} param groups, this optimizer has "
                             f"{len(self._groups)}.")
        for k, (g, shard) in enumerate(zip(self._groups, state["shards"])):
            mine = g.layout_signature()
            theirs = {key: shard.get(key) for key in mine}
            if theirs != mine:
                diff = [key for key in mine if theirs[key] != mine[key]]
                raise ValueError(f"param group {k} of the state was saved under another layout (differs in "
                                 f"{', '.join(diff)}); load it with load_full_state_dict after full_state_dict.")
            for name in ("master", "exp_avg", "exp_avg_sq"):
                for dst, src in zip(getattr(g, name), shard[name]):
                    if src.shape != dst.shape:
                        raise ValueError(f"param group {k}: {name} shard of shape {list(src.shape)}, "
                                         f"expected {list(dst.shape)}.")
                    dst.copy_(src)
        self._load_common(state)

    def _load_common(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for hyper, saved in zip(self.param_groups, state["param_groups"]):
            hyper.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """The unsharded state, gathered to rank 0 of each param group's group. A collective.

        {"format", "steps", "param_groups", "params": [per param group: a list with one
        {"param", "exp_avg", "exp_avg_sq"} (fp32, the parameter's shape) per parameter, or None on
        ranks other than rank 0 of that group]}. Expert groups hold this EP rank's experts only.
        """
        full_groups = []
        for g in self._groups:
            root = g.rank == 0
            per_param = [{} for _ in g.params] if root else None
            for i, bucket in enumerate(g.buckets):
                for name in ("master", "exp_avg", "exp_avg_sq"):
                    shard = getattr(g, name)[i]
                    if g.size == 1:
                        full = shard
                    else:
                        parts = [torch.empty_like(shard) for _ in range(g.size)] if root else None
                        dist.gather(shard, parts, group=g.group, group_dst=0)
                        full = torch.cat(parts) if root else None
                    if root:
                        for slot in bucket.slots:
                            value = full[slot.offset:slot.offset + slot.numel].view(g.params[slot.index].shape)
                            per_param[slot.index]["param" if name == "master" else name] = value.float().clone()
            full_groups.append(per_param)
        return {"format": _FULL_STATE_FORMAT, "steps": self.steps,
                "param_groups": [{k: v for k, v in h.items() if k != "params"} for h in self.param_groups],
                "params": full_groups}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict) -> None:
        """Load an unsharded state (full_state_dict()'s, read by every rank) under this optimizer's
        layout, whatever the layout it was saved under: each rank keeps its shard. Local, no
        communication; the model parameters are not touched."""
        if not isinstance(state, dict) or state.get("format") != _FULL_STATE_FORMAT:
            raise ValueError(f"not a DistributedOptimizer full state (format {_FULL_STATE_FORMAT!r} expected).")
        if len(state["params"]) != len(self._groups):
            raise ValueError(f"the state has {len(state['params'])} param groups, this optimizer has "
                             f"{len(self._groups)}.")
        for k, (g, per_param) in enumerate(zip(self._groups, state["params"])):
            if per_param is None or len(per_param) != len(g.params):
                raise ValueError(f"param group {k}: the state has no entry for each of its {len(g.params)} "
                                 f"parameters (full_state_dict returns them on group rank 0 only).")
            for j, (p, entry) in enumerate(zip(g.params, per_param)):
                if tuple(entry["param"].shape) != tuple(p.shape):
                    raise ValueError(f"param group {k}, parameter {j}: the state's shape "
                                     f"{list(entry['param'].shape)} differs from the parameter's {list(p.shape)}.")
            for i, segments in enumerate(g.segments):
                for name, key in (("master", "param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                    dst = getattr(g, name)[i]
                    dst.zero_()
                    for slot, a, b, po in segments:
                        dst[a:b].copy_(per_param[slot.index][key].reshape(-1)[po:po + b - a])
        self._load_common(state)

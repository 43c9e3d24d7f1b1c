"""The two checkpoint formats of parallel.zero1.DistributedOptimizer.

`shard_state_dict()` (the optimizer's `state_dict()`) is this rank's shard only (see its
docstring): every rank saves its own and loads it back under the same layout (same parameters,
bucket_size and group sizes; ranks keep their shard). `full_state_dict()` gathers the unsharded
state (per parameter) to rank 0 of each param group's group, and `load_full_state_dict()` loads
such a state under any layout, for resharding. All are plain containers, numbers and tensors:
loadable with torch.load(weights_only=True).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .zero1 import DistributedOptimizer

_STATE_FORMAT = "megads.DistributedOptimizer.shard/1"
_FULL_STATE_FORMAT = "megads.DistributedOptimizer.full/1"


def shard_state_dict(optimizer: DistributedOptimizer) -> dict:
    """This rank's shard of the optimizer state (tensors shared with the optimizer: save, don't mutate).

    {"format", "steps", "param_groups": [{"lr", "betas", "eps", "weight_decay"}, ...],
     "shards": [per param group: {"group_size", "group_rank", "param_shapes", "bucket_numels",
                "master", "exp_avg", "exp_avg_sq" (lists, one fp32 tensor per bucket: the elements
                [group_rank * padded/group_size, ...) of the bucket, padding included)}]}
    Plain containers, numbers and tensors: loadable with torch.load(weights_only=True).
    """
    return {
        "format": _STATE_FORMAT,
        "steps": optimizer.steps,
        "bucket_size": optimizer.bucket_size,
        "param_groups": [{k: v for k, v in h.items() if k != "params"} for h in optimizer.param_groups],
        "shards": [{**g.layout_signature(), "master": list(g.master), "exp_avg": list(g.exp_avg),
                    "exp_avg_sq": list(g.exp_avg_sq)} for g in optimizer.sharded_groups],
    }


@torch.no_grad()
def load_shard_state_dict(optimizer: DistributedOptimizer, state: dict) -> None:
    """Load what state_dict() returned on this same rank under the same layout (local, no communication).

    Restores the masters, moments, step count and hyperparameters; the model parameters are not
    touched (load the model's own checkpoint too: its weights are the masters in the parameter
    dtype). A different layout (group sizes, ranks, parameters, bucket_size) is an error: use
    full_state_dict() / load_full_state_dict() to reshard.
    """
    _check_state(optimizer, state, _STATE_FORMAT, "shard", "shards")
    for k, (g, shard) in enumerate(zip(optimizer.sharded_groups, state["shards"])):
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
    _load_common(optimizer, state)


def _check_state(optimizer: DistributedOptimizer, state: dict, fmt: str, kind: str, groups_key: str) -> None:
    """`state` is a dict of format `fmt` with one entry per param group of the optimizer under `groups_key`."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"not a DistributedOptimizer {kind} state (format {fmt!r} expected).")
    if len(state[groups_key]) != len(optimizer.sharded_groups):
        raise ValueError(f"the state has {len(state[groups_key])} param groups, this optimizer has "
                         f"{len(optimizer.sharded_groups)}.")


def _load_common(optimizer: DistributedOptimizer, state: dict) -> None:
    optimizer.steps = int(state["steps"])
    for hyper, saved in zip(optimizer.param_groups, state["param_groups"]):
        hyper.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})


@torch.no_grad()
def full_state_dict(optimizer: DistributedOptimizer) -> dict:
    """The unsharded state, gathered to rank 0 of each param group's group. A collective.

    {"format", "steps", "param_groups", "params": [per param group: a list with one
    {"param", "exp_avg", "exp_avg_sq"} (fp32, the parameter's shape) per parameter, or None on
    ranks other than rank 0 of that group]}. Expert groups hold this EP rank's experts only.
    """
    full_groups = []
    for g in optimizer.sharded_groups:
        root = g.rank == 0
        per_param = [{} for _ in g.params] if root else None
        for i, bucket in enumerate(g.buckets):
            for name in ("master", "exp_avg", "exp_avg_sq"):
                shard = getattr(g, name)[i]
                if g.size == 1:
                    full = shard
                else:
                    parts = [torch.empty_like(shard) for _ in range(g.size)] if root else None
                    g.group.gather(shard, parts, dst=0)
                    full = torch.cat(parts) if root else None
                if root:
                    for slot in bucket.slots:
                        value = full[slot.offset:slot.offset + slot.numel].view(g.params[slot.index].shape)
                        per_param[slot.index]["param" if name == "master" else name] = value.float().clone()
        full_groups.append(per_param)
    return {"format": _FULL_STATE_FORMAT, "steps": optimizer.steps,
            "param_groups": [{k: v for k, v in h.items() if k != "params"} for h in optimizer.param_groups],
            "params": full_groups}


@torch.no_grad()
def load_full_state_dict(optimizer: DistributedOptimizer, state: dict) -> None:
    """Load an unsharded state (full_state_dict()'s, read by every rank) under this optimizer's
    layout, whatever the layout it was saved under: each rank keeps its shard. Local, no
    communication; the model parameters are not touched."""
    _check_state(optimizer, state, _FULL_STATE_FORMAT, "full", "params")
    for k, (g, per_param) in enumerate(zip(optimizer.sharded_groups, state["params"])):
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
    _load_common(optimizer, state)


MOMENTS = ("exp_avg", "exp_avg_sq")


@torch.no_grad()
def parameter_moments(optimizer: DistributedOptimizer, names: tuple[str, ...] = MOMENTS
                      ) -> dict[int, dict[str, torch.Tensor]]:
    """AdamW's moments `names` shaped like the parameters, on every rank of each param group's
    group: {id(parameter): {"exp_avg": ..., "exp_avg_sq": ...}} (FP32). A collective (one
    all-gather per bucket and moment); the layout-free checkpoint gathers these across TP/EP ranks
    like the weights, so that a run resumes under another layout (load_parameter_moments). Ask for
    one moment at a time to hold one parameter-shaped copy instead of two."""
    out: dict[int, dict[str, torch.Tensor]] = {id(p): {} for g in optimizer.sharded_groups for p in g.params}
    for g in optimizer.sharded_groups:
        for i, bucket in enumerate(g.buckets):
            for name in names:
                shard = getattr(g, name)[i].float()
                if g.size == 1:
                    full = shard
                else:
                    full = torch.empty(bucket.padded_numel, dtype=shard.dtype, device=shard.device)
                    g.group.all_gather_into(full, shard.contiguous())
                for slot in bucket.slots:
                    p = g.params[slot.index]
                    out[id(p)][name] = full[slot.offset:slot.offset + slot.numel].view(p.shape).clone()
    return out


@torch.no_grad()
def load_parameter_moments(optimizer: DistributedOptimizer, moments: dict[int, dict[str, torch.Tensor]],
                           steps: int) -> None:
    """The inverse of parameter_moments on this rank's shards (local, no communication): each rank
    keeps its part of every parameter's moments, whatever layout they were saved under. The
    masters are not touched (reload_model_params after loading the weights)."""
    for g in optimizer.sharded_groups:
        for i, segments in enumerate(g.segments):
            for name in MOMENTS:
                dst = getattr(g, name)[i]
                dst.zero_()
                for slot, a, b, po in segments:
                    dst[a:b].copy_(moments[id(g.params[slot.index])][name].reshape(-1)[po:po + b - a])
    optimizer.steps = int(steps)

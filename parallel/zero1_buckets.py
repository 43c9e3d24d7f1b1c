"""The ZeRO-1 bucket layout: which elements of which parameters each rank of a group owns.

`parallel.zero1.DistributedOptimizer` flattens each param group into buckets: parameters are taken
in the given order (grouped by device and dtype, first appearance first) and packed greedily, a
bucket closing when the next parameter would take it past `bucket_size` elements; a parameter is
never split, so one larger than `bucket_size` gets a bucket of its own. Each bucket is padded with
zeros to a multiple of the group size g, and rank r of the group owns the contiguous shard
[r * padded/g, (r+1) * padded/g) of every bucket. The layout depends only on the parameter list,
`bucket_size` and g, never on the rank (`plan_buckets` computes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_BUCKET_SIZE = 4_000_000  # elements per ZeRO bucket


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

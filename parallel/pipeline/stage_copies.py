"""DualPipe's duplicate stages: adding the two copies' gradients.

With ``dualpipe`` every stage s lives on two ranks (chunk 0 of rank s, used by the first half of
the micro-batches, and chunk 1 of rank R-1-s, used by the second half). The executor accumulates
each copy's gradients separately and does **not** sum them: the caller must, before the optimizer
step (and the copies must start from identical parameters). `sum_duplicate_stage_grads` does it
with one batched exchange between ranks r and R-1-r (a no-op for the other schedules); it is
linear, so it may run before or after the data-parallel reduction.

`add_peer_tensors` is the exchange itself (also used for other tensors two pipeline ranks must
sum, e.g. a tied embedding's gradient on the first and last stage).
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from parallel.group import Group

from .ops import Schedule

__all__ = ["sum_duplicate_stage_grads", "add_peer_tensors"]


def sum_duplicate_stage_grads(schedule: Schedule, rank: int, stage_modules: Mapping[int, nn.Module],
                              pp_group: Optional[Group] = None, buffers: Optional[Callable[[str], bool]] = None) -> None:
    """DualPipe: add each stage's two copies' gradients so both hold the sum (a no-op otherwise).

    Rank r's chunk 0 (stage r) is rank R-1-r's chunk 1 and vice versa; the two ranks exchange the
    gradients of both chunks in one batched point-to-point and add. A tensor is named by (stage,
    parameter name), so the two copies of a stage must name their parameters alike (same module
    class). A parameter object shared by both chunks of a rank (e.g. one embedding used by the
    first and the last stage) is exchanged and added once: it is named by the smallest of its
    (stage, name) pairs, and the paired rank, sharing the same pair of stages, names its own
    shared object the same. A missing ``.grad`` counts as zero (and is materialised).
    ``buffers(name)``: buffers to sum the same way, in place (e.g. per-expert token counts that
    both copies must agree on). Call it after ``run`` and before clipping and the optimizer step,
    on both ranks of each pair.
    """
    if schedule.layout != "dualpipe":
        return
    pp_group = pp_group if pp_group is not None else Group.world("pp")
    peer = schedule.num_ranks - 1 - rank
    if peer == rank:
        return
    tensors: Dict[int, Tuple[Tuple[int, str], torch.Tensor]] = {}
    for chunk in (0, 1):
        stage = schedule.stage_of(rank, chunk)
        named = [(n, p) for n, p in stage_modules[chunk].named_parameters() if p.requires_grad]
        if buffers is not None:
            named += [(n, b) for n, b in stage_modules[chunk].named_buffers() if buffers(n)]
        for name, t in named:
            if isinstance(t, nn.Parameter) and t.grad is None:
                t.grad = torch.zeros_like(t)
            key = (stage, name)
            if id(t) not in tensors or key < tensors[id(t)][0]:
                tensors[id(t)] = (key, t)
    ordered = [t for _, t in sorted(tensors.values(), key=lambda kt: kt[0])]
    add_peer_tensors([t.grad if isinstance(t, nn.Parameter) else t for t in ordered], peer, pp_group)


def add_peer_tensors(tensors: Sequence[torch.Tensor], peer: int, group: Group) -> None:
    """Exchange ``tensors`` with rank ``peer`` of ``group`` (which calls this with tensors of the
    same shapes, in the same order) and add the peer's to ours in place: both end with the sum."""
    incoming = [torch.empty_like(t) for t in tensors]
    transfers = [("send", t.contiguous(), peer) for t in tensors] + [("recv", t, peer) for t in incoming]
    for work in group.exchange(transfers):
        work.wait()
    with torch.no_grad():
        for target, theirs in zip(tensors, incoming):
            target.add_(theirs)

"""A process group as the runtime uses it: its size, this rank's place in it, and every collective
the runtime issues on it.

All communication in ``parallel/`` goes through `Group` methods, which gives three things in one
place:

* **Size 1 is the single process.** A Group without a process group (``pg`` None) has size 1 and
  rank 0; callers check ``group.size == 1`` and skip communication, so torch.distributed need not
  be initialised for a one-process run.
* **Lanes.** An overlapped F&B pair (``parallel/pipeline/overlap.py``) runs its backward half in a
  second thread. Ranks must issue a group's collectives in the same order, so the backward half
  communicates on a *twin* of each group (same ranks, another process group): ``twin`` is set by
  `parallel.twin_groups.create_twins`, and every collective resolves which of the two to use when
  it is issued (``lanes``, the context's `Lanes`, knows the calling thread's lane).
* **Failures.** A collective that fails (another rank died, hangs past the process group's
  timeout, or the network failed) raises `CollectiveError`, one sentence naming the group and the
  operation, instead of a backend's multi-line message.
* **Measurement.** ``observer`` (None unless a tool sets one) is called after every collective
  with ``(kind, nbytes, seconds, group)``: ``parallel/comm_meter.py`` counts bytes per group
  through it, without patching torch.distributed.

Bytes are the payload as the calling rank sees it (element size x elements): the tensor for
all-reduce and broadcast, the gathered output for all-gather, the reduced input for
reduce-scatter, the whole input for all-to-all, the tensor sent or received for point-to-point.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor in favour of the *_single
# names (same semantics); use the new names where they exist so that no call warns.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Observer = Callable[[str, int, float, "Group"], None]


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank stopped, hangs, or the network failed."""


def _backend_reason(err: BaseException) -> str:
    """The backend's reason without its source location and advice: "Connection reset by peer"."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)          # gloo's "[.../pair.cc:537] "
    return text.split(". ")[0].rstrip(".")


class Group:
    """`pg` (a torch ProcessGroup, or None for size 1) with the runtime's collectives; see the module doc."""

    def __deepcopy__(self, memo):
        # A handle on process-wide communication state, not data: a copied model shares it.
        return self

    def __init__(self, pg: Optional[dist.ProcessGroup] = None, name: str = "", lanes=None):
        self.pg = pg
        self.name = name
        self.size = 1 if pg is None else dist.get_world_size(pg)
        self.rank = 0 if pg is None else dist.get_rank(pg)
        self.lanes = lanes                                  # parallel.twin_groups.Lanes, shared per context
        self.twin: Optional[dist.ProcessGroup] = None       # the backward lane's process group
        self.observer: Optional[Observer] = None

    @classmethod
    def world(cls, name: str = "world") -> "Group":
        """Every rank (the default process group), or size 1 without torch.distributed."""
        return cls(dist.group.WORLD if dist.is_available() and dist.is_initialized() else None, name)

    def __repr__(self) -> str:
        return f"Group({self.name or 'unnamed'}, size={self.size}, rank={self.rank})"

    # ------------------------------------------------------------------ placement

    def ranks(self) -> list[int]:
        """Global ranks of the members, in group-rank order."""
        if self.pg is None:
            return [dist.get_rank() if dist.is_initialized() else 0]
        ranks = dist.get_process_group_ranks(self.pg)
        return sorted(ranks, key=lambda r: dist.get_group_rank(self.pg, r))

    def global_rank(self, group_rank: int) -> int:
        return group_rank if self.pg is None else dist.get_global_rank(self.pg, group_rank)

    def current(self) -> Optional[dist.ProcessGroup]:
        """The process group to issue a collective on from the calling thread (its lane's)."""
        if self.lanes is None or self.size == 1 or not self.lanes.in_backward_lane():
            return self.pg
        if self.twin is None:
            raise RuntimeError(f"a collective on {self!r} (ranks {self.ranks()}) was issued in the backward lane of an "
                               "overlapped F&B pair, but the group has no twin: it would interleave with the "
                               "forward half's collectives. Twin it with parallel.twin_groups.create_twins.")
        return self.twin

    # ------------------------------------------------------------------ collectives

    def _observed(self, kind: str, nbytes: int, call: Callable[[], Any]) -> Any:
        start = time.perf_counter() if self.observer is not None else 0.0
        try:
            result = call()
        except RuntimeError as err:
            raise CollectiveError(
                f"A {kind} over the {self.name or 'process'} group (ranks {self.ranks()}) failed, most likely because "
                f"another rank stopped (see its log): {_backend_reason(err)}.") from err
        if self.observer is not None:
            self.observer(kind, nbytes, time.perf_counter() - start, self)
        return result

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `tensor` over the group in place (it must be contiguous: gloo reduces a strided
        tensor's memory as if it were contiguous); returns it."""
        if self.size > 1:
            self._observed("all_reduce", tensor.nbytes, lambda: dist.all_reduce(tensor, op=op, group=self.current()))
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over the group, in a new contiguous tensor (the tensor itself at size 1).

        Copies first because the tensor handed in may be used elsewhere (autograd can pass one
        gradient tensor to several functions)."""
        if self.size == 1:
            return tensor
        return self.all_reduce(tensor.clone(memory_format=torch.contiguous_format))

    def all_gather_into(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """output = every rank's `input` concatenated along dim 0, in group-rank order."""
        self._observed("all_gather", output.nbytes, lambda: _all_gather_single(output, input, group=self.current()))

    def reduce_scatter_into(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """output = this rank's block (along dim 0) of the sum over the group of `input`."""
        return self._observed("reduce_scatter", input.nbytes,
                              lambda: _reduce_scatter_single(output, input, group=self.current(), async_op=async_op))

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: Optional[list[int]] = None,
                   input_splits: Optional[list[int]] = None) -> None:
        """Rows input_splits[i] of `input` go to group rank i; output_splits[i] rows come from it."""
        self._observed("all_to_all", input.nbytes, lambda: dist.all_to_all_single(
            output, input, output_split_sizes=output_splits, input_split_sizes=input_splits, group=self.current()))

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` of group rank `src` on every rank (in place)."""
        if self.size > 1:
            self._observed("broadcast", tensor.nbytes, lambda: dist.broadcast(
                tensor, self.global_rank(src), group=self.current()))
        return tensor

    def gather(self, tensor: torch.Tensor, parts: Optional[list[torch.Tensor]], dst: int = 0) -> None:
        """`parts` on group rank `dst` receives every rank's `tensor` (None elsewhere)."""
        self._observed("gather", tensor.nbytes, lambda: dist.gather(tensor, parts, group=self.current(), group_dst=dst))

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable `obj`, in group-rank order."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        self._observed("all_gather_object", 0, lambda: dist.all_gather_object(out, obj, group=self.current()))
        return out

    def first_reported(self, message: Optional[str]) -> Optional[str]:
        """The first non-None `message` of the ranks (in group-rank order), the same on every rank:
        how ranks agree that one of them failed, so that all stop at the same point."""
        return next((m for m in self.all_gather_object(message) if m is not None), None)

    def barrier(self) -> None:
        if self.size > 1:
            self._observed("barrier", 0, lambda: dist.barrier(group=self.current()))

    def exchange(self, transfers: Sequence[tuple[str, torch.Tensor, int]]):
        """Post point-to-point transfers ("send" or "recv", tensor, peer group rank), in order, as
        one batch (``batch_isend_irecv``); returns the requests: one per transfer, or a single one
        when the backend coalesces the batch (NCCL)."""
        group = self.current()
        ops = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, tensor, self.global_rank(peer), group)
               for kind, tensor, peer in transfers]
        return self._observed("send_recv", sum(t.nbytes for _, t, _ in transfers), lambda: dist.batch_isend_irecv(ops))

"""ParallelContext: the one object that knows how ranks are laid out; the model receives only this.

    ctx = ParallelContext.create(tensor_parallel=2, expert_parallel=4, sequence_parallel=True)
    ctx.tp.size, ctx.tp.rank, ctx.sequence_parallel, ctx.device
    ParallelContext.single()         # one process: every group has size 1, no torch.distributed

Built from plain sizes (nothing here knows the model or the config; the caller validates the
layout before any group exists). `create` reads what ``torchrun`` sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), picks the backend (NCCL on CUDA, gloo on CPU) and builds the
groups with megatron-core's ``parallel_state.initialize_model_parallel`` (which works over gloo).

Layout: world = TP x PP x DP. Routed experts are not tensor-split (DeepSeek-V3 uses no TP inside
experts: ``expert_tensor_parallel_size = 1``), so expert parallelism spreads experts over the
TP x DP ranks of one pipeline stage: EP divides TP x DP, and each expert is replicated over
EDP = TP x DP / EP ranks.

Groups (each a `parallel.group.Group`; size 1 where there is no parallelism):

    tp     tensor-parallel ranks (heads, FFN width, vocabulary split)
    pp     pipeline ranks (stages of one model replica)
    dp     data-parallel replicas of dense parameters
    ep     expert-parallel ranks (routed experts split)
    edp    ranks holding the same experts
    stage  all ranks of one pipeline stage (TP x DP): expert loads are summed over it
    model  the ranks holding the parts of one model replica (TP x PP): the gradient norm's last sum

Sequence parallelism is one derived property: ``sequence_parallel`` is true only when it was asked
for and TP > 1.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from parallel.attempt_store import attempt_store
from parallel.group import Group
from parallel.twin_groups import Lanes

GROUP_NAMES = ("tp", "pp", "dp", "ep", "edp", "stage", "model")


def device_for(local_rank: int) -> torch.device:
    """This rank's device: cuda:<local_rank> (made current) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def world_size_from_environment() -> int:
    """The world size a launcher asked for (torch.distributed's if already started; 1 by default)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(eq=False)
class ParallelContext:
    """This rank's place in the layout (see the module doc)."""

    def __deepcopy__(self, memo):
        # A handle on process-wide communication state, not data: a copied model shares it.
        return self

    tp: Group
    pp: Group
    dp: Group
    ep: Group
    edp: Group
    stage: Group
    model: Group
    device: torch.device = torch.device("cpu")
    sequence_parallel_requested: bool = False
    lanes: Lanes = field(default_factory=Lanes)

    def __post_init__(self):
        for name in GROUP_NAMES:
            getattr(self, name).lanes = self.lanes

    @property
    def sequence_parallel(self) -> bool:
        """Activations sharded along the sequence between TP regions (asked for, and TP > 1)."""
        return self.sequence_parallel_requested and self.tp.size > 1

    def local_sequence_length(self, seq_length: int) -> int:
        """Tokens per sequence this rank holds between TP regions (its chunk under SP)."""
        return seq_length // self.tp.size if self.sequence_parallel else seq_length

    def full_sequence_length(self, local_length: int) -> int:
        """The whole sequence's length from this rank's share of it (`local_sequence_length`'s inverse)."""
        return local_length * self.tp.size if self.sequence_parallel else local_length

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_distributed(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def groups(self) -> Iterator[Group]:
        for name in GROUP_NAMES:
            yield getattr(self, name)

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.is_distributed:
            dist.barrier()

    # ------------------------------------------------------------------ construction

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "ParallelContext":
        """One process, every group of size 1 (no torch.distributed needed)."""
        return cls(**{name: Group(None, name) for name in GROUP_NAMES}, device=device or torch.device("cpu"))

    @classmethod
    def from_groups(cls, device: Optional[torch.device] = None, sequence_parallel: bool = False,
                    **groups: Optional[dist.ProcessGroup]) -> "ParallelContext":
        """A context over process groups made by hand (tests, tools); absent ones have size 1."""
        unknown = set(groups) - set(GROUP_NAMES)
        if unknown:
            raise ValueError(f"unknown group names {sorted(unknown)}; known: {', '.join(GROUP_NAMES)}.")
        return cls(**{name: Group(groups.get(name), name) for name in GROUP_NAMES},
                   device=device or torch.device("cpu"), sequence_parallel_requested=sequence_parallel)

    @classmethod
    def create(cls, tensor_parallel: int = 1, pipeline_parallel: int = 1, expert_parallel: int = 1,
               sequence_parallel: bool = False, timeout_s: float = 600.0) -> "ParallelContext":
        """Start torch.distributed if a launcher asked for several ranks, and build the groups.

        `timeout_s`: how long any collective waits for the other ranks before failing (so a rank
        that died does not leave the others hanging). The caller has validated the layout against
        the world size (megads.config.validate)."""
        world_size = world_size_from_environment()
        if world_size == 1 and not dist.is_initialized():
            return cls.single()
        device = device_for(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            start_process_group("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=timeout_s))

        from megatron.core import parallel_state as ps  # slow to import: only for multi-rank runs

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                     pipeline_model_parallel_size=pipeline_parallel,
                                     expert_model_parallel_size=expert_parallel,
                                     expert_tensor_parallel_size=1,
                                     distributed_timeout_minutes=timeout_s / 60)
        return cls.from_groups(device=device, sequence_parallel=sequence_parallel,
                               tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                               dp=ps.get_data_parallel_group(), ep=ps.get_expert_model_parallel_group(),
                               edp=ps.get_expert_data_parallel_group(),
                               stage=ps.get_tensor_and_data_parallel_group(), model=ps.get_model_parallel_group())


def start_process_group(backend: str, timeout: timedelta) -> None:
    """torch.distributed's default process group from the launcher's environment (env://).

    Where torchrun's agent serves the store (TORCHELASTIC_USE_AGENT_STORE, torch's default) it keeps
    it across restarts, so each attempt rendezvouses in a store of its own (parallel.attempt_store:
    the ranks of a restarted attempt would otherwise read the addresses the previous attempt's ranks
    left there and fail to connect). Otherwise (no torchrun, or TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    rank 0 serves a new store at MASTER_ADDR:MASTER_PORT, which torchrun picks anew for each attempt."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_host, agent_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = dist.TCPStore(agent_host, agent_port, world_size, is_master=False, timeout=timeout)
    # Rank 0 need not run on the node that serves the agent's store: it announces its own address,
    # the one its packets to that store leave from (what the other nodes can reach).
    with socket.create_connection((agent_host, agent_port), timeout=timeout.total_seconds()) as probe:
        own_host = probe.getsockname()[0]
    dist.init_process_group(backend, store=attempt_store(agent_store, own_host, rank, world_size, timeout), rank=rank,
                            world_size=world_size, timeout=timeout)


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and torch.distributed (if started)."""
    if dist.is_initialized():
        try:
            from megatron.core import parallel_state as ps
            ps.destroy_model_parallel()
        except ImportError:
            pass
        dist.destroy_process_group()

"""Process groups: the one place that knows how ranks are laid out.

`init_distributed(parallel_cfg, model_cfg, train_cfg)` reads what `torchrun` sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), validates the layout against the world size and the
model *before* any group exists, picks the backend (NCCL on CUDA, gloo on CPU), and builds the
tensor-, pipeline-, data-, expert- and expert-data-parallel groups with megatron-core's
`parallel_state.initialize_model_parallel` (which works over gloo on CPU).

Layout: world = TP x PP x DP. Routed experts are not tensor-split (DeepSeek-V3 uses no TP inside
experts: `expert_tensor_parallel_size = 1`), so expert parallelism spreads experts over the
TP x DP ranks of one pipeline stage: EP must divide TP x DP, and each expert is replicated over
EDP = TP x DP / EP ranks.

A single process with all sizes 1 needs no torch.distributed at all: every group is None and
the parallel layers degrade to ordinary ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megads.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, micro_batch_rules


@dataclass
class Topology:
    """This rank's place in the layout; groups are None when their size is 1 in a single process."""

    world_size: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Optional[dist.ProcessGroup] = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Optional[dist.ProcessGroup] = None
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Optional[dist.ProcessGroup] = None
    edp_size: int = 1
    edp_group: Optional[dist.ProcessGroup] = None
    # All ranks of this pipeline stage (TP x DP): the expert loads of a step are summed over it.
    stage_group: Optional[dist.ProcessGroup] = None
    # The ranks holding the parts of one model replica (TP x PP): the gradient norm's last sum.
    model_parallel_group: Optional[dist.ProcessGroup] = None
    sequence_parallel: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def validate_layout(p: ParallelConfig, m: ModelConfig, t: TrainConfig, world_size: int) -> None:
    """Raise ConfigError (one sentence per violated rule) if the layout cannot run on `world_size` ranks."""
    problems = []
    model_parallel = p.tensor_parallel * p.pipeline_parallel
    if world_size % model_parallel:
        problems.append(f"The world size ({world_size}) must be a multiple of parallel.tensor_parallel x "
                        f"parallel.pipeline_parallel ({p.tensor_parallel} x {p.pipeline_parallel}).")
    else:
        dp = world_size // model_parallel
        if (p.tensor_parallel * dp) % p.expert_parallel:
            problems.append(f"parallel.expert_parallel ({p.expert_parallel}) must divide the {p.tensor_parallel * dp} "
                            f"ranks of a pipeline stage (tensor_parallel x data-parallel size "
                            f"{p.tensor_parallel} x {dp}).")
        if t.global_batch_size % (dp * t.micro_batch_size):
            problems.append(f"train.global_batch_size ({t.global_batch_size}) must be divisible by the data-parallel "
                            f"size ({dp}) x train.micro_batch_size ({t.micro_batch_size}).")
        else:
            n = t.global_batch_size // (dp * t.micro_batch_size)
            if p.micro_batches is not None and p.micro_batches != n:
                problems.append(f"parallel.micro_batches ({p.micro_batches}) must equal train.global_batch_size / "
                                f"(data-parallel size x train.micro_batch_size) = {t.global_batch_size} / "
                                f"({dp} x {t.micro_batch_size}) = {n}, or be null.")
            elif p.micro_batches is None:
                what = (f"the number of micro-batches per step, train.global_batch_size / (data-parallel size "
                        f"{dp} x train.micro_batch_size),")
                problems += [message for ok, message in micro_batch_rules(p, n, what) if not ok]
    # Without sequence parallelism MoE layers split whole sequences across TP ranks; with it each
    # TP rank already holds a chunk of every sequence (config requires seq_length % TP == 0).
    if p.tensor_parallel > 1 and not p.sequence_parallel and m.num_moe_layers + m.num_nextn_predict_layers > 0 \
            and t.micro_batch_size % p.tensor_parallel:
        problems.append(f"train.micro_batch_size ({t.micro_batch_size}) must be divisible by "
                        f"parallel.tensor_parallel ({p.tensor_parallel}): MoE layers split whole sequences "
                        f"across tensor-parallel ranks (or set parallel.sequence_parallel).")
    if p.expert_parallel > 1 and m.n_routed_experts % p.expert_parallel:
        problems.append(f"model.n_routed_experts ({m.n_routed_experts}) must be divisible by "
                        f"parallel.expert_parallel ({p.expert_parallel}).")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "Invalid layout:\n  " + "\n  ".join(problems))


def device_for(local_rank: int) -> torch.device:
    """This rank's device: cuda:<local_rank> (made current) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(p: ParallelConfig, m: ModelConfig, t: TrainConfig) -> Topology:
    """Validate the layout, start torch.distributed if torchrun launched us, and build the groups."""
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    validate_layout(p, m, t, world_size)
    if world_size == 1 and not dist.is_initialized():
        return Topology(sequence_parallel=False)

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    from megatron.core import parallel_state as ps  # imported only for multi-rank runs: it is slow to import

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor_parallel,
                                 pipeline_model_parallel_size=p.pipeline_parallel,
                                 expert_model_parallel_size=p.expert_parallel,
                                 expert_tensor_parallel_size=1)
    dp_size = ps.get_data_parallel_world_size()
    return Topology(
        world_size=world_size, rank=dist.get_rank(), device=device,
        tp_size=p.tensor_parallel, tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_size=p.pipeline_parallel, pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_size=dp_size, dp_rank=ps.get_data_parallel_rank(), dp_group=ps.get_data_parallel_group(),
        ep_size=p.expert_parallel, ep_rank=ps.get_expert_model_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group(),
        edp_size=ps.get_expert_data_parallel_world_size(), edp_group=ps.get_expert_data_parallel_group(),
        stage_group=ps.get_tensor_and_data_parallel_group(),
        model_parallel_group=ps.get_model_parallel_group(),
        sequence_parallel=p.sequence_parallel and p.tensor_parallel > 1,
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        try:
            from megatron.core import parallel_state as ps
            ps.destroy_model_parallel()
        except ImportError:
            pass
        dist.destroy_process_group()


def barrier(topo: Topology) -> None:
    """Wait for every rank (no-op in a single process)."""
    if topo.is_distributed:
        dist.barrier()


def sum_over(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum of `tensor` over the ranks of `group` (a new tensor; the tensor itself for group None)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    out = tensor.clone(memory_format=torch.contiguous_format)  # gloo needs contiguous tensors
    dist.all_reduce(out, group=group)
    return out

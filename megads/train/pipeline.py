"""Pipeline-parallel training: this rank's stages of the model, run by a schedule.

`PipelineStages` builds the model slices a pipeline rank holds under ``parallel.schedule`` (one
for 1F1B and ZB-H1, ``virtual_stages`` for interleaved 1F1B, two for DualPipe and DualPipeV),
runs one step's micro-batches through `parallel.pipeline.PipelineExecutor`, and makes the result
the same optimizer step as the single-process one:

* **Loss.** Each micro-batch's loss is divided by their number (the executor does it on the last
  stage). A stage that is not the last adds its MoE layers' sequence-wise balance loss to its own
  backward: `_AttachBalanceLoss` hangs it on the stage's output, so that the output gradient
  coming back from the next stage also carries d(loss)/d(balance) = 1 / micro-batches (Megatron's
  ``MoEAuxLossAutoScaler``; it works with every schedule's B/W split unchanged).
* **The embedding used twice.** MTP on the last stage embeds the next tokens with the first
  stage's embedding. DualPipe and DualPipeV put the first and the last stage on the same ranks:
  there the two stages share one embedding module. Otherwise the last stage holds a copy (same
  initial weights), and after the step's backward the two ranks exchange and add their
  embedding gradients (tied weights, as Megatron's embedding group does), so both copies take
  the same update.
* **DualPipe's two copies of every stage** (chunk 0 of rank r and chunk 1 of rank PP-1-r) get
  each other's gradients and expert-load counts added (`sum_duplicate_stage_grads`), so both
  take the same update and the same router-bias step.
* **Gradient norm.** Every parameter of the global model counts once: a copy (the last stage's
  embedding where it is a copy, DualPipe's chunk-1 stages) is left out of the sum
  (`duplicated_elsewhere`), and the sum runs over the TP x PP model-parallel group.
* **Metrics** (losses per MTP depth, balance loss, FP8 tile counts) are summed over the pipeline
  ranks, which each computed their part.

Placement of stages on ranks is the schedule's (`Schedule.stage_of`); the model is cut into
`Schedule.num_stages` stages of contiguous layers (`stage_specs`: ``parallel.layers_per_stage``,
or as even as possible).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megads.config import Config
from megads.model.model import DeepSeekV3, StageSpec, build_model, stage_specs
from megads.model.moe import MoE
from parallel.pipeline import build_schedule
from parallel.pipeline.executor import PipelineExecutor, add_peer_tensors, sum_duplicate_stage_grads
from parallel.topology import Topology

EMBEDDING = "embed_tokens.weight"


class _AttachBalanceLoss(torch.autograd.Function):
    """Identity on `hidden` whose backward also starts the backward of `balance` with gradient
    `scale`: a non-last stage's balance loss joins the step's loss without a second backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, balance: torch.Tensor, scale: float):
        ctx.scale = scale
        ctx.balance_shape = balance.shape
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.balance_shape, ctx.scale, dtype=grad.dtype, device=grad.device), None


class PipelineStage(nn.Module):
    """One stage as the executor runs it: ``forward(x)`` takes the micro-batch's token ids (first
    stage) or the previous stage's hidden states and returns this stage's last block output; the
    last stage's losses come from `loss`."""

    def __init__(self, model: DeepSeekV3, tp_size: int):
        super().__init__()
        self.model = model
        self.spec: StageSpec = model.stage
        self.sequence_factor = tp_size if model.sequence_parallel else 1
        self.balance_scale = 1.0          # 1 / micro-batches of the step, set by PipelineStages
        self.record: Callable[[str, torch.Tensor], None] = lambda key, value: None

    def _balance_loss(self) -> Optional[torch.Tensor]:
        balance = [m.balance_loss for m in self.model.moe_layers() if m.balance_loss is not None]
        return torch.stack(balance).sum() if balance else None

    def _release_balance_losses(self) -> None:
        """Drop the MoE layers' references to this forward's balance losses once used: they hold
        the micro-batch's graph, which a split (B/W) backward keeps whole until no one refers to it."""
        for m in self.model.moe_layers():
            m.balance_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.first:
            seq_length, ids, hidden = x.shape[1], x, None
        else:   # under sequence parallelism x is this rank's chunk of the sequence
            seq_length, ids, hidden = x.shape[1] * self.sequence_factor, None, x
        cos, sin = self.model.positions(seq_length, x.device)
        h = self.model.hidden_states(ids, cos, sin, hidden)
        if not self.spec.last:
            balance = self._balance_loss()
            self._release_balance_losses()
            if balance is not None:
                self.record("balance_loss", balance)
                if torch.is_grad_enabled():
                    h = _AttachBalanceLoss.apply(h, balance, self.balance_scale)
        return h

    def loss(self, h: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The last stage's loss (LM + weighted MTP + its balance losses) from its block output."""
        input_ids, labels = target
        cos, sin = self.model.positions(input_ids.shape[1], h.device)
        out = self.model._losses(h, input_ids, labels, cos, sin)
        self._release_balance_losses()
        self.record("loss", out.lm_loss)
        for depth, value in enumerate(out.mtp_losses, start=1):
            self.record(f"mtp_loss_depth_{depth}", value)
        if out.balance_loss is not None:
            self.record("balance_loss", out.balance_loss)
        return out.loss


class PipelineStages:
    """This pipeline rank's stages, and one training step's pipelined forward and backward.

    Quacks like the parts of `DeepSeekV3` the trainer, optimizer and checkpoints use
    (`parameters`, `modules`, `moe_layers`, `full_state`, ...), over all stages of this rank.
    """

    def __init__(self, cfg: Config, topo: Topology, seed: Optional[int] = None):
        p = cfg.parallel
        if topo.pp_size != p.pipeline_parallel or topo.pp_size < 2:
            raise ValueError(f"PipelineStages needs a topology with pipeline_parallel = {p.pipeline_parallel} > 1 "
                             f"(got {topo.pp_size}).")
        self.cfg, self.topo = cfg, topo
        self.num_microbatches = cfg.train.global_batch_size // (topo.dp_size * cfg.train.micro_batch_size)
        self.schedule = build_schedule(p.schedule, topo.pp_size, self.num_microbatches, p.virtual_stages)
        self.specs = stage_specs(cfg.model, self.schedule.num_stages, p.layers_per_stage)
        seed = cfg.train.seed if seed is None else seed
        rank = topo.pp_rank
        self.stage_ids = [self.schedule.stage_of(rank, c) for c in range(self.schedule.chunks_per_rank)]
        built: dict[int, DeepSeekV3] = {}
        for stage in self.stage_ids:
            if stage not in built:
                built[stage] = build_model(cfg.model, seed=seed, device=topo.device, tp_group=topo.tp_group,
                                           ep_group=topo.ep_group, sequence_parallel=topo.sequence_parallel,
                                           stage=self.specs[stage])
        last = self.schedule.num_stages - 1
        # DualPipe(V): the first and the last stage are on this rank: MTP uses the first one's embedding.
        self.embedding_shared = 0 in built and last in built and hasattr(built[last], "embed_tokens") and last != 0
        if self.embedding_shared:
            built[last].embed_tokens = built[0].embed_tokens
        self.models = built                                     # stage -> model (unique per stage)
        self.chunks = {c: PipelineStage(built[s], topo.tp_size) for c, s in enumerate(self.stage_ids)}
        self._container = nn.ModuleList([built[s] for s in sorted(built)])
        for chunk in self.chunks.values():
            chunk.record = self._record
        self._sums: dict[str, torch.Tensor] = {}
        # The embedding copy on the last stage that lives on another rank than stage 0's: its
        # gradient is exchanged with the first stage's.
        self._tied_embedding_peer: Optional[int] = None
        has_mtp = cfg.model.num_nextn_predict_layers > 0
        if has_mtp and not self.embedding_shared:
            first_rank, _ = self.schedule.locate(0, 0)
            last_rank, _ = self.schedule.locate(0, last)
            if rank in (first_rank, last_rank) and first_rank != last_rank:
                self._tied_embedding_peer = last_rank if rank == first_rank else first_rank
        seq = cfg.train.seq_length // (topo.tp_size if topo.sequence_parallel else 1)
        meta = ((cfg.train.micro_batch_size, seq, cfg.model.hidden_size), torch.float32)
        fb_runner = None
        if p.overlap:
            from parallel.pipeline.overlap import make_overlap_runner  # sets up process groups: all ranks call it
            fb_runner = make_overlap_runner(topo)
        self.executor = PipelineExecutor(self.schedule, rank, self.chunks, self._last_stage_loss, topo.pp_group,
                                         topo.device, activation_meta=meta, fb_runner=fb_runner)
        self._copy_ids = {id(p) for _, p, owned in self.named_owned_parameters() if not owned}

    whole_model = False         # checkpoints: this rank holds only its stages' tensors

    # ------------------------------------------------------------------ the step

    def _record(self, key: str, value: torch.Tensor) -> None:
        # Summed on the device: one host sync per step (in run), not one per micro-batch.
        self._sums[key] = self._sums.get(key, 0.0) + value.detach().double() / self.num_microbatches

    def _last_stage_loss(self, h: torch.Tensor, target) -> torch.Tensor:
        return self.chunks[self._last_chunk].loss(h, target)

    @property
    def _last_chunk(self) -> int:
        return self.stage_ids.index(self.schedule.num_stages - 1)

    def run(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Forward and backward of this rank's share of the step's micro-batches (a collective of
        the pipeline group). Gradients accumulate into ``.grad`` as the single-process step's
        would, except for the sums over copies that `finish_gradients` does. Returns this rank's
        part of the step's metrics: sum them over the pipeline group (`reduce_metrics`)."""
        if len(batches) != self.num_microbatches:
            raise ValueError(f"the pipeline schedule was built for {self.num_microbatches} micro-batches, got "
                             f"{len(batches)}.")
        self._sums = {}
        for chunk in self.chunks.values():
            chunk.balance_scale = 1.0 / self.num_microbatches
        inputs = [ids for ids, _ in batches]
        targets = [(ids.to(self.topo.device), labels.to(self.topo.device)) for ids, labels in batches]
        self.executor.run(inputs, targets)
        keys = list(self._sums)
        values = torch.stack([self._sums[k] for k in keys]).tolist() if keys else []
        return dict(zip(keys, values))

    def metric_keys(self) -> list[str]:
        """Every key any pipeline rank may report (the same list on all ranks)."""
        keys = ["loss"] + [f"mtp_loss_depth_{d}" for d in range(1, self.cfg.model.num_nextn_predict_layers + 1)]
        if self.cfg.model.num_moe_layers > 0 and self.cfg.model.aux_loss_alpha > 0:
            keys.append("balance_loss")
        return keys

    def reduce_metrics(self, sums: dict[str, float], extra_keys: tuple[str, ...] = ()) -> dict[str, float]:
        """Sum each metric over the pipeline ranks (those that did not compute it give 0)."""
        keys = self.metric_keys() + list(extra_keys)
        values = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.topo.device)
        dist.all_reduce(values, group=self.topo.pp_group)
        return dict(zip(keys, values.cpu().tolist()))

    def finish_gradients(self) -> None:
        """Make every copy's gradient the sum over copies (a collective of the pipeline group): the
        tied embedding's two ranks exchange theirs; DualPipe's paired ranks add each other's
        stage gradients and expert-load counts."""
        if self._tied_embedding_peer is not None:
            embedding = self._embedding_parameter()
            if embedding.grad is None:
                embedding.grad = torch.zeros_like(embedding)
            add_peer_tensors([embedding.grad], self._tied_embedding_peer, self.topo.pp_group)
        sum_duplicate_stage_grads(self.schedule, self.topo.pp_rank, self.chunks, self.topo.pp_group,
                                  buffers=lambda name: name.endswith("tokens_per_expert"))

    def _embedding_parameter(self) -> nn.Parameter:
        for model in self.models.values():
            if hasattr(model, "embed_tokens"):
                return model.embed_tokens.weight
        raise RuntimeError("no embedding on this rank")

    # ------------------------------------------------------------------ which copy counts

    def _primary_stages(self) -> set[int]:
        """Stages whose parameters this rank owns for the norm and the checkpoint: all it holds,
        except DualPipe's chunk 1 (a copy of a stage owned by the paired rank's chunk 0)."""
        if self.schedule.layout == "dualpipe":
            return {self.stage_ids[0]}
        return set(self.stage_ids)

    def _owner_stage(self, stage: int, name: str) -> int:
        """The stage whose copy of `name` counts: the embedding is the first stage's."""
        return 0 if name == EMBEDDING else stage

    def named_owned_parameters(self) -> Iterator[tuple[str, nn.Parameter, bool]]:
        """(name, parameter, owned) for every parameter on this rank, each once."""
        primary, first_name, owned = self._primary_stages(), {}, {}
        for stage in sorted(self.models):
            for name, p in self.models[stage].named_parameters():
                first_name.setdefault(id(p), (name, p))
                # a parameter shared by two stages (the embedding) is owned if either copy is
                owned[id(p)] = owned.get(id(p), False) or self._owner_stage(stage, name) in primary
        for key, (name, p) in first_name.items():
            yield name, p, owned[key]

    def duplicated_elsewhere(self, p: nn.Parameter) -> bool:
        """True for a copy of a parameter whose gradient norm another pipeline rank counts."""
        return id(p) in self._copy_ids

    # ------------------------------------------------------------------ DeepSeekV3-like interface

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._container.parameters()

    def named_parameters(self):
        return self._container.named_parameters()

    def modules(self) -> Iterator[nn.Module]:
        return self._container.modules()

    def named_modules(self):
        return self._container.named_modules()

    def train(self, mode: bool = True) -> "PipelineStages":
        self._container.train(mode)
        return self

    def eval(self) -> "PipelineStages":
        return self.train(False)

    def moe_layers(self) -> Iterator[MoE]:
        for model in self._container:
            yield from model.moe_layers()

    def sequence_parallel_parameters(self) -> list[nn.Parameter]:
        unique = {}
        for model in self._container:
            for p in model.sequence_parallel_parameters():
                unique[id(p)] = p
        return list(unique.values())

    def update_router_biases(self, speed: float, reduce_loads=None) -> dict[str, float]:
        """Each stage's MoE layers take their bias step (loads of DualPipe's copies already summed);
        returns max/mean load per layer of the whole model (gathered over the pipeline group)."""
        imbalance: dict[str, float] = {}
        for model in self._container:
            imbalance.update(model.update_router_biases(speed, reduce_loads))
        gathered: list[dict] = [None] * self.topo.pp_size
        dist.all_gather_object(gathered, imbalance, group=self.topo.pp_group)
        merged: dict[str, float] = {}
        for part in gathered:
            merged.update(part)
        return dict(sorted(merged.items(), key=lambda kv: _layer_order(kv[0])))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of the state this rank owns (see `_primary_stages`); a collective of
        the stage's TP/EP ranks like DeepSeekV3.full_state, which every rank must iterate."""
        primary, written = self._primary_stages(), set()
        for stage in sorted(self.models):
            for name, tensor in self.models[stage].full_state():
                # (a shared embedding shows up in two stages: written once)
                if self._owner_stage(stage, name) in primary and name not in written:
                    written.add(name)
                    yield name, tensor

    def state_names(self) -> set[str]:
        return {name for model in self.models.values() for name in model.state_dict()}

    def load_full_state(self, get_tensor) -> None:
        for model in self.models.values():
            model.load_full_state(get_tensor)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        """The LM loss of one batch, forward only, through the stages in order (each run by the rank
        that holds it for the first micro-batch); the same value on every pipeline rank."""
        rank, last = self.topo.pp_rank, self.schedule.num_stages - 1
        input_ids, labels = input_ids.to(self.topo.device), labels.to(self.topo.device)
        group = self.topo.pp_group
        loss = torch.zeros(1, dtype=torch.float64, device=self.topo.device)
        h, holder_of = None, [self.schedule.locate(0, s)[0] for s in range(last + 1)]
        for stage in range(last + 1):
            if holder_of[stage] != rank:
                continue
            if stage == 0:
                x = input_ids
            elif holder_of[stage - 1] == rank:
                x = h
            else:
                factor = self.topo.tp_size if self.topo.sequence_parallel else 1
                x = torch.empty((input_ids.shape[0], input_ids.shape[1] // factor, self.cfg.model.hidden_size),
                                dtype=torch.float32, device=self.topo.device)
                dist.recv(x, dist.get_global_rank(group, holder_of[stage - 1]), group=group)
            h = self.chunks[self.stage_ids.index(stage)](x)
            if stage == last:
                model = self.models[last]
                loss += model.head_loss(model.norm(h), labels).double()
            elif holder_of[stage + 1] != rank:
                dist.send(h.contiguous(), dist.get_global_rank(group, holder_of[stage + 1]), group=group)
        dist.all_reduce(loss, group=group)
        return loss.item()


def _layer_order(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))

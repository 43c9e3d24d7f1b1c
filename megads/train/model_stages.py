"""This rank's stages of the model, and the passes that run them through a pipeline schedule.

`ModelStages` is what the trainer holds whatever the layout: at PP = 1 it holds the whole model as
one stage (run by the 1F1B schedule of one rank, which is the plain loop: forward and backward of
each micro-batch in turn); under pipeline parallelism it holds the model slices a pipeline rank
runs under ``parallel.schedule`` (one for 1F1B and ZB-H1, ``virtual_stages`` for interleaved
1F1B, two for DualPipe and DualPipeV). One executor (`parallel.pipeline.PipelineExecutor`) runs
training steps (F/B/W) and forward-only passes (evaluation), and the result of a step is the same
optimizer step as the single-process one:

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
* **Declared gradient duties** (`parallel.grad_duties`: the router under TP, TP-replicated
  parameters under SP) are summed over their groups in `finish_gradients`.
* **Gradient norm.** Every parameter of the global model counts once: a copy (the last stage's
  embedding where it is a copy, DualPipe's chunk-1 stages) is left out of the sum
  (`duplicated_elsewhere`), and the sum runs over the TP x PP model-parallel group.
* **Metrics** (losses per MTP depth, balance loss) are summed over the pipeline ranks, which each
  computed their part.

Placement of stages on ranks is the schedule's (`Schedule.stage_of`); the model is cut into
`Schedule.num_stages` stages of contiguous layers (`stage_specs`: ``parallel.layers_per_stage``,
or as even as possible).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from megads.config import Config, micro_batches_per_step
from megads.model.model import DeepSeekV3, StageSpec, build_model, stage_specs
from megads.model.moe import MoE
from megads.model.pass_state import PassState
from parallel.context import ParallelContext
from parallel.grad_duties import sum_partial_grads
from parallel.pipeline import build_schedule, forward_only
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.stage_copies import add_peer_tensors, sum_duplicate_stage_grads

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


class Stage(nn.Module):
    """One stage as the executor runs it: ``forward(x)`` takes the micro-batch's token ids (first
    stage) or the previous stage's output and returns this stage's last block output; on the last
    stage `loss` (training) or `lm_loss` (evaluation) turns that into the micro-batch's loss."""

    def __init__(self, model: DeepSeekV3):
        super().__init__()
        self.model = model
        self.spec: StageSpec = model.stage
        self.microbatch_weight = 1.0      # 1 / micro-batches of the step, set by ModelStages
        # record(key, value, weight=1): add weight * value to the step's metric `key` (summed over
        # micro-batches and ranks, in float64)
        self.record: Callable[..., None] = lambda key, value, weight=1.0: None

    def forward(self, x: torch.Tensor, state: Optional[PassState] = None) -> torch.Tensor:
        h = self.model.forward_stage(x, state)
        if not self.spec.last:
            balance = self.model.balance_loss()
            self.model.release_balance_losses()
            if balance is not None:
                self.record("balance_loss", balance, self.microbatch_weight)
                if torch.is_grad_enabled():
                    h = _AttachBalanceLoss.apply(h, balance, self.microbatch_weight)
        return h

    def loss(self, h: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The last stage's training loss (LM + weighted MTP + its balance losses) from its block output."""
        input_ids, labels = target
        out = self.model.stage_losses(h, input_ids, labels)
        self.model.release_balance_losses()
        weight = self.microbatch_weight
        self.record("loss", out.lm_loss, weight)
        for depth, value in enumerate(out.mtp_losses, start=1):
            self.record(f"mtp_loss_depth_{depth}", value, weight)
        if out.balance_loss is not None:
            self.record("balance_loss", out.balance_loss, weight)
        return out.loss

    def lm_loss(self, h: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The language-model loss alone (evaluation)."""
        input_ids, labels = target
        model = self.model
        return model.head_loss(model.norm(h), labels)


class ModelStages:
    """This rank's stages (the whole model at PP = 1) and the passes that run them (module doc).

    Offers what the trainer, the optimizer and checkpoints use (`parameters`, `modules`,
    `moe_layers`, `full_state`, ...), over all stages of this rank.
    """

    def __init__(self, cfg: Config, ctx: ParallelContext, seed: Optional[int] = None):
        p = cfg.parallel
        self.cfg, self.ctx = cfg, ctx
        pp = ctx.pp.size
        self.num_microbatches = micro_batches_per_step(cfg, ctx.dp.size)
        self.schedule = build_schedule(p.schedule if pp > 1 else "1f1b", pp, self.num_microbatches,
                                       p.virtual_stages)
        self.specs = stage_specs(cfg.model, self.schedule.num_stages, p.layers_per_stage if pp > 1 else None)
        seed = cfg.train.seed if seed is None else seed
        rank = ctx.pp.rank
        self.stage_ids = [self.schedule.stage_of(rank, c) for c in range(self.schedule.chunks_per_rank)]
        built: dict[int, DeepSeekV3] = {}
        for stage in self.stage_ids:
            if stage not in built:
                built[stage] = build_model(cfg.model, seed=seed, device=ctx.device, ctx=ctx, stage=self.specs[stage])
                built[stage].recompute_mode = cfg.train.recompute
        last = self.schedule.num_stages - 1
        # DualPipe(V): the first and the last stage are on this rank: MTP uses the first one's embedding.
        self.embedding_shared = 0 in built and last in built and hasattr(built[last], "embed_tokens") and last != 0
        if self.embedding_shared:
            built[last].embed_tokens = built[0].embed_tokens
        self.models = built                                     # stage -> model (unique per stage)
        self.chunks = {c: Stage(built[s]) for c, s in enumerate(self.stage_ids)}
        self._container = nn.ModuleList([built[s] for s in sorted(built)])
        for chunk in self.chunks.values():
            chunk.record = self._record
        self._sums: dict[str, torch.Tensor] = {}
        self._loss: Callable = Stage.loss                      # the last stage's loss of the running step
        self._head: Callable = Stage.lm_loss                   # the last stage's head of the running forward-only pass
        self._forward_executors: dict[tuple[int, int, int], PipelineExecutor] = {}
        # The embedding copy on the last stage that lives on another rank than stage 0's: its
        # gradient is exchanged with the first stage's.
        self._tied_embedding_peer: Optional[int] = None
        if cfg.model.num_nextn_predict_layers > 0 and not self.embedding_shared:
            first_rank, _ = self.schedule.locate(0, 0)
            last_rank, _ = self.schedule.locate(0, last)
            if rank in (first_rank, last_rank) and first_rank != last_rank:
                self._tied_embedding_peer = last_rank if rank == first_rank else first_rank
        fb_runner = None
        if p.overlap:
            from parallel.pipeline.overlap import make_overlap_runner  # sets up process groups: all ranks call it
            fb_runner = make_overlap_runner(ctx)
        self.executor = PipelineExecutor(self.schedule, rank, self.chunks, self._last_stage_loss, ctx.pp, ctx.device,
                                         activation_meta=self._activation_meta(cfg.train.micro_batch_size),
                                         fb_runner=fb_runner)
        self._copy_ids = {id(p) for _, p, owned in self.named_owned_parameters() if not owned}

    @property
    def whole_model(self) -> bool:
        """Checkpoints: whether this rank holds every tensor (else load expects a subset)."""
        return self.schedule.num_stages == 1

    def _activation_meta(self, batch_size: int, seq_length: Optional[int] = None):
        """Shape and dtype of what crosses a stage boundary (hidden states, this rank's chunk under SP)."""
        seq = self.ctx.local_sequence_length(seq_length or self.cfg.train.seq_length)
        return (batch_size, seq, self.cfg.model.hidden_size), torch.float32

    # ------------------------------------------------------------------ the training step

    def _record(self, key: str, value: torch.Tensor, weight: float = 1.0) -> None:
        # Summed on the device: one host sync per step (in run), not one per micro-batch.
        self._sums[key] = self._sums.get(key, 0.0) + value.detach().double() * weight

    def _last_stage_loss(self, h: torch.Tensor, target) -> torch.Tensor:
        return self._loss(self.chunks[self._last_chunk], h, target)

    @property
    def _last_chunk(self) -> int:
        return self.stage_ids.index(self.schedule.num_stages - 1)

    def run(self, batches: list[tuple[torch.Tensor, Any]], loss: Optional[Callable] = None,
            states: Optional[list[PassState]] = None, metric_keys: Optional[list[str]] = None) -> dict[str, float]:
        """Forward and backward of this rank's share of the step's micro-batches (a collective of
        the pipeline group). Gradients accumulate into ``.grad`` as the single-process step's
        would, except for the sums that `finish_gradients` does. Returns the step's metrics,
        summed over the pipeline ranks: by default the mean over micro-batches of the LM loss
        (``loss``), of each MTP depth's loss and of the balance loss (this rank's TP share of it).

        `batches[mb]` is (input_ids, target). `loss(stage, h, (input_ids, target))` replaces the
        language-model loss (target: the labels) on the last stage (the executor divides it by the number of micro-batches); it
        records its metrics with ``stage.record(key, value)`` and names them in `metric_keys`.
        `states[mb]`: this rank's PassState of each micro-batch (e.g. routing replay)."""
        if len(batches) != self.num_microbatches:
            raise ValueError(f"the pipeline schedule was built for {self.num_microbatches} micro-batches, got "
                             f"{len(batches)}.")
        self._sums = {}
        self._loss = loss or Stage.loss
        for chunk in self.chunks.values():
            chunk.microbatch_weight = 1.0 / self.num_microbatches
        inputs = [ids for ids, _ in batches]
        targets = [_to_device(batch, self.ctx.device) for batch in batches]      # the loss gets (input_ids, target)
        self.executor.run(inputs, targets, states)
        return self._reduce_metrics(self._sums, self.metric_keys() if metric_keys is None else metric_keys)

    def metric_keys(self) -> list[str]:
        """Every key any pipeline rank may report with the language-model loss (the same list on all ranks)."""
        keys = ["loss"] + [f"mtp_loss_depth_{d}" for d in range(1, self.cfg.model.num_nextn_predict_layers + 1)]
        if self.cfg.model.num_moe_layers > 0 and self.cfg.model.aux_loss_alpha > 0:
            keys.append("balance_loss")
        return keys

    def _reduce_metrics(self, sums: dict[str, torch.Tensor], keys: list[str]) -> dict[str, float]:
        """Each metric summed over the pipeline ranks (those that did not compute it give 0): one
        host sync."""
        keys = keys if self.ctx.pp.size > 1 else list(sums)
        if not keys:
            return {}
        zero = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        values = torch.stack([torch.as_tensor(sums.get(k, zero), dtype=torch.float64, device=self.ctx.device)
                              for k in keys])
        self.ctx.pp.all_reduce(values)
        return dict(zip(keys, values.cpu().tolist()))

    def finish_gradients(self) -> None:
        """Complete the gradients after the backward (a collective): copies of a parameter on
        several pipeline ranks get the sum over copies (the tied embedding's two ranks, DualPipe's
        paired ranks, expert-load counts included), then every declared partial gradient is summed
        over its group (`parallel.grad_duties`)."""
        if self._tied_embedding_peer is not None:
            embedding = self._embedding_parameter()
            if embedding.grad is None:
                embedding.grad = torch.zeros_like(embedding)
            add_peer_tensors([embedding.grad], self._tied_embedding_peer, self.ctx.pp)
        sum_duplicate_stage_grads(self.schedule, self.ctx.pp.rank, self.chunks, self.ctx.pp,
                                  buffers=lambda name: name.endswith("tokens_per_expert"))
        sum_partial_grads(self.parameters(), self.ctx)

    def _embedding_parameter(self) -> nn.Parameter:
        for model in self.models.values():
            if hasattr(model, "embed_tokens"):
                return model.embed_tokens.weight
        raise RuntimeError("no embedding on this rank")

    # ------------------------------------------------------------------ forward-only passes

    @torch.no_grad()
    def forward_only(self, inputs: list[torch.Tensor], head: Callable[[Stage, torch.Tensor, Any], torch.Tensor],
                     output_shape: tuple[int, ...], targets: Optional[list] = None,
                     states: Optional[list] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Forward passes of micro-batches through the stages, no autograd (a collective of the
        pipeline group): `inputs[mb]` enters the first stage, and on the last stage
        ``head(stage, h, targets[mb])`` turns its block output into the micro-batch's result, of
        shape `output_shape` (e.g. a loss, the log-probabilities of chosen tokens, sampled ids).
        Returns them stacked [micro-batches, *output_shape] on every rank of the pipeline.
        `states[mb]` (optional) is this rank's own per-micro-batch state, never communicated,
        which every stage module receives (`PipelineExecutor.run`)."""
        batch, seq = inputs[0].shape
        shape = (len(inputs), batch, seq)
        executor = self._forward_executors.get(shape)
        if executor is None:     # one per shape: a decode step reuses it (building one walks the parameters)
            schedule = forward_only(self.schedule, len(inputs))
            executor = PipelineExecutor(schedule, self.ctx.pp.rank, self.chunks, self._forward_head, self.ctx.pp,
                                        self.ctx.device, activation_meta=self._activation_meta(batch, seq))
            self._forward_executors[shape] = executor
        self._head = head
        outputs = executor.run(inputs, targets if targets is not None else [None] * len(inputs), states)
        # Each micro-batch's result is on the rank that ran its last stage; the sum over the pipeline
        # (zeros elsewhere) puts every result on every rank.
        stacked = torch.zeros((len(inputs), *output_shape), dtype=dtype, device=self.ctx.device)
        for mb, out in enumerate(outputs or ()):
            if out is not None:
                stacked[mb] = out.to(dtype)
        return self.ctx.pp.all_reduce(stacked)

    def _forward_head(self, h: torch.Tensor, target) -> torch.Tensor:
        return self._head(self.chunks[self._last_chunk], h, target)

    def evaluate_loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean LM loss of `batches` (micro-batches), forward only through the stages; the same
        value on every rank of the pipeline (a collective of it)."""
        if not batches:
            return 0.0
        targets = [(ids.to(self.ctx.device), labels.to(self.ctx.device)) for ids, labels in batches]
        losses = self.forward_only([ids for ids, _ in batches], Stage.lm_loss, (), targets, dtype=torch.float64)
        return losses.sum().item() / len(batches)

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

    # ------------------------------------------------------------------ the stages' modules, together

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._container.parameters()

    def named_parameters(self):
        return self._container.named_parameters()

    def modules(self) -> Iterator[nn.Module]:
        return self._container.modules()

    def named_modules(self):
        return self._container.named_modules()

    @property
    def training(self) -> bool:
        return self._container.training

    def train(self, mode: bool = True) -> "ModelStages":
        self._container.train(mode)
        return self

    def eval(self) -> "ModelStages":
        return self.train(False)

    def moe_layers(self) -> Iterator[MoE]:
        for model in self._container:
            yield from model.moe_layers()

    def update_router_biases(self, speed: float, reduce_loads=None) -> dict[str, list[float]]:
        """Each stage's MoE layers take their bias step (loads of DualPipe's copies already summed);
        returns the tokens per expert of every MoE layer of the whole model (gathered over the
        pipeline group), in the model's layer order."""
        loads: dict[str, list[float]] = {}
        for model in self._container:
            loads.update({name: counts.tolist() for name, counts in model.update_router_biases(speed, reduce_loads).items()})
        if self.ctx.pp.size == 1:
            return loads
        merged: dict[str, list[float]] = {}
        for part in self.ctx.pp.all_gather_object(loads):
            merged.update(part)
        return dict(sorted(merged.items(), key=lambda kv: _layer_order(kv[0])))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def full_state(self, per_parameter: Optional[dict[int, torch.Tensor]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of the state this rank owns (see `_primary_stages`); a collective of
        the stage's TP/EP ranks like DeepSeekV3.full_state, which every rank must iterate.
        `per_parameter`: tensors shaped like the parameters, by id(parameter) (e.g. an optimizer
        moment), gathered instead of the state, under the parameters' names."""
        primary, written = self._primary_stages(), set()
        for stage in sorted(self.models):
            local = None if per_parameter is None else self._by_name(stage, per_parameter)
            for name, tensor in self.models[stage].full_state(local):
                # (a shared embedding shows up in two stages: written once)
                if self._owner_stage(stage, name) in primary and name not in written:
                    written.add(name)
                    yield name, tensor

    def state_names(self) -> set[str]:
        return {name for model in self.models.values() for name in model.state_dict()}

    def load_full_state(self, get_tensor, per_parameter: Optional[dict[int, torch.Tensor]] = None) -> None:
        """Fill this rank's state (or the tensors of `per_parameter`, shaped like the parameters, by
        id(parameter)) with its shards of the full tensors `get_tensor(name)`."""
        for stage, model in self.models.items():
            model.load_full_state(get_tensor, None if per_parameter is None else self._by_name(stage, per_parameter))

    def _by_name(self, stage: int, per_parameter: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: per_parameter[id(p)] for name, p in self.models[stage].named_parameters()}


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _layer_order(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))

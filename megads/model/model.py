"""The DeepSeek-V3 model: embedding, transformer blocks, final norm, output head and MTP modules.

Parameter names equal DeepSeek-V3's Hugging Face names with the `model.` prefix dropped
(`embed_tokens`, `layers.{i}.self_attn.kv_b_proj`, `norm`, `lm_head`), except that routed experts
are stacked (`layers.{i}.mlp.experts.gate_up_proj` [E, 2I, H], `...down_proj` [E, H, I]) for grouped
GEMMs and MTP modules live under `mtp.{k}` (`megads.hf` maps both to and from the on-disk layout).

Layers are kept in a ModuleDict keyed by their global index so that a pipeline stage holding
layers 7..13 names them exactly as the full model does.

The parallel layout arrives as one `parallel.context.ParallelContext` (None: one process), which
every layer that communicates receives. Sequence parallelism (``ctx.sequence_parallel``,
Megatron-style): the residual stream between blocks is this rank's contiguous sequence chunk
[B, S/t, hidden]. The embedding reduce-scatters into chunks, norms and residual adds run on chunks,
attention and the FFNs gather the sequence and reduce-scatter their output, MoE routes each rank's
chunk (no batch split), and the output head gathers the normed chunks for the vocabulary-parallel
loss on the full sequence (labels stay full). Parameters replicated over the TP group then get
partial gradients, which they declare where they are created (`parallel.grad_duties`).

Pipeline stages: `StageSpec` says which slice of the model a module holds, and the public stage
API is `forward_stage` (embedding or the previous stage's output -> this stage's last block
output) and `stage_losses` (the last stage: head, MTP and balance losses from that output);
`compute_loss` chains the two on the whole model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from megads.config import ModelConfig
from megads.model import recompute
from megads.model.block import TransformerBlock
from megads.model.moe import MoE, RoutedExperts
from megads.model.mtp import MTPModule
from megads.model.norm import RMSNorm
from megads.model.pass_state import PassState
from megads.model.rope import RotaryEmbedding
from megads.model.loss import IGNORE_INDEX, linear_cross_entropy, masked_mean_cross_entropy  # noqa: F401 (re-exported)
from parallel.context import ParallelContext
from parallel.tensor import (ColumnParallelLinear, VocabParallelEmbedding, gather_along_dim, gather_from_tp_region,
                             shard_for_rank)



@dataclass
class LossOutput:
    """Losses of one forward pass. `loss` is what backward runs on; the rest are for reporting."""

    loss: torch.Tensor  # lm_loss + mtp_loss_weight * mean(mtp_losses) + balance_loss
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # one per depth
    balance_loss: torch.Tensor | None = None

    @property
    def mtp_loss(self) -> torch.Tensor | None:
        return torch.stack(self.mtp_losses).mean() if self.mtp_losses else None


def mtp_inputs_and_targets(input_ids: torch.Tensor, labels: torch.Tensor, depth: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids t_{i+depth} fed to MTP depth `depth` at position i, and its targets t_{i+depth+1}.

    input_ids[i] = t_i and labels[i] = t_{i+1}, so input[i] = input_ids[i + depth] (the last one,
    t_S, is labels[S-1]) and target[i] = labels[i + depth]. Inputs come from input_ids so that a
    masked label (IGNORE_INDEX) never becomes an input token; positions past the end get input 0
    and an ignored target.
    """
    batch, seq = labels.shape
    inputs = torch.zeros_like(input_ids)
    targets = torch.full_like(labels, IGNORE_INDEX)
    inputs[:, : seq - depth] = input_ids[:, depth:]
    inputs[:, seq - depth] = labels[:, -1].clamp(min=0)
    targets[:, : seq - depth] = labels[:, depth:]
    return inputs, targets


@dataclass(frozen=True)
class StageSpec:
    """The slice of the model one pipeline stage holds.

    `layers`: global indices of its transformer blocks. The first stage also holds the embedding;
    the last the final norm, the output head and the MTP modules, plus (when there are MTP modules)
    its own copy of the embedding, which MTP needs for the next tokens: a pipeline run must sum that
    copy's gradient with the first stage's, as for tied weights. DualPipe places the first and the
    last stage on the same rank, where the two are one module.
    """

    layers: range
    first: bool = True
    last: bool = True


def split_layers(num_layers: int, num_stages: int, layers_per_stage: Optional[list[int]] = None) -> list[range]:
    """Contiguous layer ranges per stage: an explicit list of counts, or a balanced split (the first
    `num_layers % num_stages` stages take one layer more)."""
    if layers_per_stage is None:
        if num_stages > num_layers:
            raise ValueError(f"{num_layers} layers cannot fill {num_stages} pipeline stages.")
        base, extra = divmod(num_layers, num_stages)
        layers_per_stage = [base + (1 if s < extra else 0) for s in range(num_stages)]
    if len(layers_per_stage) != num_stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
        raise ValueError(f"layers_per_stage {layers_per_stage} must give each of the {num_stages} stages at least "
                         f"one layer and sum to {num_layers}.")
    starts = [sum(layers_per_stage[:s]) for s in range(num_stages)]
    return [range(start, start + count) for start, count in zip(starts, layers_per_stage)]


def stage_specs(cfg: ModelConfig, num_stages: int, layers_per_stage: Optional[list[int]] = None) -> list[StageSpec]:
    ranges = split_layers(cfg.num_hidden_layers, num_stages, layers_per_stage)
    return [StageSpec(r, first=s == 0, last=s == num_stages - 1) for s, r in enumerate(ranges)]


class DeepSeekV3(nn.Module):
    """The model, or with `stage` one pipeline stage of it; `ctx` (None: one process) injects the
    parallel layout into the layers that communicate."""

    # Activation recomputation in training passes (`train.recompute`): none, selective or full
    # (megads.model.recompute).
    recompute_mode = "none"

    def __init__(self, cfg: ModelConfig, ctx: Optional[ParallelContext] = None, stage: Optional[StageSpec] = None):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx = ctx or ParallelContext.single()
        self.stage = stage or StageSpec(range(cfg.num_hidden_layers))
        last, mtp_depth = self.stage.last, cfg.num_nextn_predict_layers
        if self.stage.first or (last and mtp_depth > 0):
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i, ctx) for i in self.stage.layers})
        if last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, ctx)
        self.mtp = nn.ModuleList([MTPModule(cfg, cfg.num_hidden_layers + k, ctx)
                                  for k in range(mtp_depth if last else 0)])
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_interleave)

    # ------------------------------------------------------------------ forward

    def positions(self, seq_length: int, device: torch.device, start: int = 0):
        """Rotary (cos, sin) for positions start..start+seq_length-1 (the full sequence, also under SP)."""
        return self.rotary(torch.arange(start, start + seq_length, device=device))

    def forward_stage(self, x: torch.Tensor, state: Optional[PassState] = None) -> torch.Tensor:
        """This module's part of the forward: the output of its last transformer block (before the
        final norm), [B, S, hidden], or under sequence parallelism this rank's chunk [B, S/t, hidden].

        `x` is the token ids [B, S] on the first stage (which embeds them), else the previous
        stage's output (this rank's chunk under SP). `state` (megads.model.pass_state) carries the
        micro-batch's KV cache and routing tapes across calls; its tokens start at `state.start`.
        """
        if self.stage.first:
            h, seq_length = self.embed_tokens(x), x.shape[1]
        else:
            h, seq_length = x, self.ctx.full_sequence_length(x.shape[1])
        if state is not None and self.ctx.sequence_parallel:
            raise NotImplementedError("a pass with a PassState (generation, routing replay) does not run "
                                      "under sequence parallelism.")
        cos, sin = self.positions(seq_length, x.device, state.start if state is not None else 0)
        with recompute.policy(self.recompute_mode):
            for layer in self.layers.values():
                h = layer(h, cos, sin, state)
        return h

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, S, vocab] for input_ids [B, S] (the main model; MTP is training-only)."""
        return gather_from_tp_region(self.vocab_logits(self.forward_stage(input_ids)), self.ctx.tp)

    def vocab_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head's logits of this rank's vocabulary shard [..., V/t] from the last block's
        output h (the last stage; under SP h is this rank's chunk and the head gathers the sequence)."""
        return self.lm_head(self.norm(h))

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the output head on already-normed hidden states.

        One rank: fused head + loss (no logits tensor). Tensor-parallel: this rank's vocabulary
        shard of the logits and the vocab-parallel cross-entropy, never gathering the logits.
        Under sequence parallelism `hidden` is this rank's chunk (the head gathers the sequence)
        and `labels` the full [B, S].
        """
        if self.lm_head.tp_size == 1:
            return linear_cross_entropy(hidden, self.lm_head.weight, labels)
        return masked_mean_cross_entropy(self.lm_head(hidden), labels, self.ctx.tp)

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Language-model loss, MTP losses per depth and the sequence-wise balance loss.

        labels[b, i] is the token after input_ids[b, i] (IGNORE_INDEX where there is none).
        """
        return self.stage_losses(self.forward_stage(input_ids), input_ids, labels)

    def stage_losses(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """The last stage's losses from its last block output `h`: LM, MTP per depth, and the
        balance losses of the MoE layers this module holds. Every stage gets the micro-batch's
        input_ids (MTP embeds the next tokens)."""
        cos, sin = self.positions(input_ids.shape[1], h.device)
        with recompute.policy(self.recompute_mode):
            lm_loss = self.head_loss(self.norm(h), labels)

            mtp_losses = []
            for depth, module in enumerate(self.mtp, start=1):
                mtp_ids, mtp_targets = mtp_inputs_and_targets(input_ids, labels, depth)
                h = module(h, self.embed_tokens(mtp_ids), cos, sin)
                mtp_losses.append(self.head_loss(module.shared_head.norm(h), mtp_targets))

        balance_loss = self.balance_loss()
        loss = lm_loss
        if mtp_losses and self.cfg.mtp_loss_weight > 0:
            loss = loss + self.cfg.mtp_loss_weight * torch.stack(mtp_losses).mean()
        if balance_loss is not None:
            loss = loss + balance_loss
        return LossOutput(loss, lm_loss, mtp_losses, balance_loss)

    def balance_loss(self) -> Optional[torch.Tensor]:
        """The sum of the sequence-wise balance losses of this module's MoE layers in the last
        forward (None without any)."""
        balance = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        return torch.stack(balance).sum() if balance else None

    def release_balance_losses(self) -> None:
        """Drop the MoE layers' references to the last forward's balance losses once used: they
        hold the micro-batch's graph, which a split (B/W) backward keeps whole until no one refers
        to it."""
        for m in self.moe_layers():
            m.balance_loss = None

    # ------------------------------------------------------------------ MoE bookkeeping

    def moe_layers(self) -> Iterator[MoE]:
        for module in self.modules():
            if isinstance(module, MoE):
                yield module

    def named_moe_layers(self) -> Iterator[tuple[str, MoE]]:
        for name, module in self.named_modules():
            if isinstance(module, MoE):
                yield name, module

    @torch.no_grad()
    def update_router_biases(self, speed: float, reduce_loads=None) -> dict[str, torch.Tensor]:
        """Apply the aux-loss-free bias update to every MoE layer; returns the tokens routed to each
        expert that the update used, per layer that routed any (the step's expert loads).

        `reduce_loads(tensor) -> tensor` sums loads over ranks when the step's tokens were split.
        """
        used = {}
        for name, moe in self.named_moe_layers():
            loads = moe.tokens_per_expert.clone()
            if reduce_loads is not None:
                loads = reduce_loads(loads)
            moe.update_bias(speed, loads)
            if loads.sum() > 0:
                used[name] = loads
        return used

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, initializer_range) matrices, unit norms, zero biases.

        Each parameter draws its *full* (unsharded) tensor from its own generator seeded by (seed,
        its name) and keeps this rank's shard, so one seed gives the same full model whatever the
        parallel layout or the order modules are built in.
        """
        std = self.cfg.initializer_range
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() == 1:  # RMSNorm weights
                    param.fill_(1.0)
                    continue
                name = f"{module_name}.{param_name}" if module_name else param_name
                generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                full = torch.empty(full_shape(module, param_name, param)).normal_(0.0, std, generator=generator)
                param.copy_(local_shard(module, param_name, full))
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()
            moe.tokens_per_expert.zero_()

    def _parameter_owners(self) -> dict[str, tuple[nn.Module, str]]:
        return {(f"{m}.{n}" if m else n): (module, n) for m, module in self.named_modules()
                for n, _ in module.named_parameters(recurse=False)}

    def full_state(self, local: Optional[dict[str, torch.Tensor]] = None):
        """(name, full unsharded tensor) for every entry of state_dict(), gathered across TP/EP ranks.

        `local`: tensors shaped like this rank's parameters (e.g. an optimizer's moments), by
        parameter name, to gather instead of the state. A collective under tensor/expert
        parallelism: every rank must iterate it to the end.
        """
        owners = self._parameter_owners()
        for name, tensor in (self.state_dict() if local is None else local).items():
            yield name, gather_full(*owners[name], tensor) if name in owners else tensor

    @torch.no_grad()
    def load_full_state(self, get_tensor, into: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Fill every state_dict() entry (or every tensor of `into`, by parameter name) with this
        rank's shard of `get_tensor(name)` (a full tensor)."""
        owners = self._parameter_owners()
        for name, target in (self.state_dict() if into is None else into).items():
            full = get_tensor(name)
            shard = local_shard(*owners[name], full) if name in owners else full
            if shard.shape != target.shape:
                raise ValueError(f"{name}: full tensor of shape {tuple(full.shape)} does not fit this model "
                                 f"(local shape {tuple(target.shape)}).")
            target.copy_(shard)

    whole_model = True          # checkpoints: a stage-only model sets it False (load expects a subset)

    def state_names(self) -> set[str]:
        return set(self.state_dict())

    def num_parameters(self, active_only: bool = False) -> int:
        """All parameters, or those a single token uses (K_r of the N_r routed experts per MoE layer)."""
        total = 0
        for name, p in self.named_parameters():
            n = p.numel()
            if active_only and ".experts." in name:
                n = n * self.cfg.num_experts_per_tok // self.cfg.n_routed_experts
            total += n
        return total


def _is_tp_sharded_weight(module: nn.Module, param_name: str) -> bool:
    return hasattr(module, "full_shape") and param_name == "weight"


def full_shape(module: nn.Module, param_name: str, param: torch.Tensor) -> tuple:
    """Shape of the unsharded tensor that `module.<param_name>` is this rank's part of."""
    if isinstance(module, RoutedExperts):
        return (module.total_experts, *param.shape[1:])
    if _is_tp_sharded_weight(module, param_name):
        return tuple(module.full_shape)
    return tuple(param.shape)


def local_shard(module: nn.Module, param_name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` for `module.<param_name>`: an expert slice under EP, a TP block."""
    if isinstance(module, RoutedExperts):
        return full[module.first_expert: module.first_expert + module.num_experts]
    if _is_tp_sharded_weight(module, param_name):
        return shard_for_rank(full, module.partition_dim, module.tp_rank, module.tp_size)
    return full


def gather_full(module: nn.Module, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor of which `tensor` is this rank's part, as `module.<param_name>` is (a
    collective over its TP or EP group when sharded). `tensor` is the parameter itself or a tensor
    of its shape (an optimizer moment)."""
    if isinstance(module, RoutedExperts):
        return gather_along_dim(tensor, 0, module.ep)
    if _is_tp_sharded_weight(module, param_name):
        return gather_along_dim(tensor.detach(), module.partition_dim, module.tp)
    return tensor.detach()


def build_model(cfg: ModelConfig, seed: int = 0, device: Optional[torch.device] = None,
                ctx: Optional[ParallelContext] = None, stage: Optional[StageSpec] = None) -> DeepSeekV3:
    """A model (or one pipeline stage of it) with initialised weights: seeded, and the same full
    weights for any layout, since every tensor is drawn from a generator keyed by its name."""
    model = DeepSeekV3(cfg, ctx, stage)
    model.init_weights(seed)
    return model.to(device) if device is not None else model

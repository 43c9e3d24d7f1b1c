"""Turn a built DeepSeekV3 model into an FP8-training one, in place (TorchTitan style).

    model = build_model(cfg, seed)
    convert_to_fp8(model, Fp8Config())          # before building the optimizer or after: same tensors
    print(model.fp8_summary)                    # what was converted and what stayed high precision
    ...
    record["fp8"] = fp8_stats(model, reset=True)   # once per step, into metrics.jsonl
    if found_nonfinite(model): skip the step

What becomes FP8 (DeepSeek-V3 report, section 3.3): every linear layer of attention (MLA's
``q_a_proj``, ``q_b_proj`` / ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``), of the
dense FFNs and shared experts (``gate_proj``, ``up_proj``, ``down_proj``) and the MTP projections
(``eh_proj``), all three GEMMs each; and the routed experts' grouped GEMMs (``gate_up_proj`` and
``down_proj`` of every ``RoutedExperts``). What stays in high precision: the embedding, the output
head (``lm_head``, whose weight megads.model.loss uses directly), the MoE router (``gate``, not an
nn.Linear), the norms and the attention core (scores, softmax, values).

How: the modules are not replaced, their class is swapped. An nn.Linear becomes an ``Fp8Linear``
(a ``ColumnParallelLinear`` an ``Fp8ColumnParallelLinear``, which is both), a ``RoutedExperts`` an
``Fp8RoutedExperts``; each gains ``config`` (Fp8Config) and ``fp8_stats`` (Fp8Stats). Parameters,
buffers, hooks, names, the module tree and every other attribute stay exactly as they were, so
``state_dict()`` keys and values, the optimizer's parameter list, checkpoints and the Hugging Face
mapping (megads.hf) are unchanged: the FP32 master weights are the same tensor objects.

Tensor parallelism: a ColumnParallelLinear / RowParallelLinear sharded over several ranks becomes
an Fp8ColumnParallelLinear / Fp8RowParallelLinear, which runs the same collectives as the parallel
layer around an FP8 GEMM on this rank's shard. Each rank quantizes what it holds: its weight shard
in 128x128 blocks counted from the shard's own first row / column, and its activations in 1x128
tiles along the dimension it holds (the input features of a RowParallelLinear, the output-feature
gradient of a ColumnParallelLinear). Block and tile boundaries therefore follow the shard: TP = t
quantizes exactly as TP = 1 does (and gives the same numbers up to floating-point summation order)
only when every sharded width (out_features / t of a column layer, in_features / t of a row
layer) is a multiple of 128, as in DeepSeek-V3's real sizes. Otherwise a 128-wide block straddles
a shard boundary at TP = 1 and is split in two at TP = t, each part getting its own scale: both are
valid FP8 roundings of the same weights, and the two runs differ by about the FP8 error itself.

Expert dispatch: with ``Fp8Config.dispatch`` every MoE layer's token dispatcher gets an
``Fp8DispatchCodec`` (megads.fp8.dispatch): the routed experts' input tokens cross the
expert-parallel all-to-all as E4M3 codes with power-of-two 1x128 scales, the combine and all
gradients stay high precision (parallel/expert.py). At expert-parallel size 1 the tokens are
quantized and dequantized all the same, so the numbers do not depend on the expert-parallel size.
With ``pow2_scales`` as well (DeepSeek-V3's setting) the routed experts' GEMM re-quantizes the
dispatched tokens without any further loss; without it their tiles are rounded a second time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megads.fp8.dispatch import Fp8DispatchCodec
from megads.fp8.linear import Fp8Config, Fp8Linear, fp8_grouped_linear
from megads.fp8.stats import Fp8Stats
from megads.model.moe import MoE, RoutedExperts
from parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)

# Linear layers kept in high precision by default, matched as whole components of the module name.
DEFAULT_SKIP = ("lm_head",)


# ============================================================================ converted classes


class Fp8ColumnParallelLinear(Fp8Linear, ColumnParallelLinear):
    """A ColumnParallelLinear whose local GEMM (all three, forward and backward) runs in FP8.

    The collectives are ColumnParallelLinear.forward's, in the same order, with Fp8Linear.forward
    (this rank's output rows of the weight, quantized per 128x128 block of the shard) in place of
    F.linear: keep the two forwards in step (tests/test_fp8_tensor_parallel.py compares them with
    the single-process layer). Only ever made by class swap (convert_to_fp8).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group)
        elif not self.disable_grad_reduce:
            x = copy_to_tp_region(x, self.tp_group)
        y = Fp8Linear.forward(self, x)
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y


class Fp8RowParallelLinear(Fp8Linear, RowParallelLinear):
    """A RowParallelLinear whose local GEMM runs in FP8 (RowParallelLinear.forward's collectives around
    Fp8Linear.forward); see Fp8ColumnParallelLinear. The partial products are summed over the TP group
    in the activation dtype, as the high-precision layer does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)
        partial = Fp8Linear.forward(self, x)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        return reduce_from_tp_region(partial, self.tp_group)


_FP8_LINEAR_CLASSES: dict[type, type] = {
    nn.Linear: Fp8Linear,
    ColumnParallelLinear: Fp8ColumnParallelLinear,
    RowParallelLinear: Fp8RowParallelLinear,
}


def fp8_grouped_swiglu(tokens: torch.Tensor, gates: torch.Tensor, tokens_per_expert: Sequence[int],
                       gate_up: torch.Tensor, down: torch.Tensor, config: Fp8Config,
                       stats: Fp8Stats | None = None) -> torch.Tensor:
    """megads.model.moe.grouped_swiglu with both grouped GEMMs in FP8 (fp8_grouped_linear).

    tokens [N, H] sorted by expert, gates [N], gate_up [E, 2I, H], down [E, H, I]. The SwiGLU and
    the gate scaling stay in high precision between the two GEMMs.
    """
    sizes = [int(s) for s in tokens_per_expert]
    if sum(sizes) == 0:
        return tokens.new_zeros(tokens.shape[0], down.shape[1])
    gate, up = fp8_grouped_linear(tokens, gate_up, sizes, config, stats).chunk(2, dim=-1)
    hidden = F.silu(gate) * up * gates.unsqueeze(-1).to(up.dtype)
    return fp8_grouped_linear(hidden, down, sizes, config, stats)


class Fp8RoutedExperts(RoutedExperts):
    """RoutedExperts whose grouped GEMMs run in FP8; same parameters (gate_up_proj, down_proj).

    Only ever made by class swap (convert_to_fp8), which adds ``config`` and ``fp8_stats``.
    """

    config: Fp8Config
    fp8_stats: Fp8Stats

    def forward(self, sorted_tokens: torch.Tensor, sorted_gates: torch.Tensor,
                tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_swiglu(sorted_tokens, sorted_gates, tokens_per_expert.tolist(), self.gate_up_proj,
                                  self.down_proj, self.config, self.fp8_stats)

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_experts={self.num_experts}, intermediate_size={self.intermediate_size}, backend={c.backend}, "
                f"accumulation={c.accumulation}, pow2_scales={c.pow2_scales}, "
                f"cache_activations={c.cache_activations}")


FP8_MODULE_TYPES = (Fp8Linear, Fp8RoutedExperts)


# ============================================================================ conversion


@dataclass
class Fp8ConversionSummary:
    """What convert_to_fp8 did: module names converted, and those with weights left high precision."""

    config: Fp8Config
    linears: list[str] = field(default_factory=list)          # now Fp8Linear
    grouped_experts: list[str] = field(default_factory=list)  # now Fp8RoutedExperts
    dispatchers: list[str] = field(default_factory=list)      # MoE layers whose expert dispatch is FP8
    kept: dict[str, str] = field(default_factory=dict)        # name -> class, modules with own weights kept

    @property
    def num_linears(self) -> int:
        return len(self.linears)

    @property
    def num_grouped_experts(self) -> int:
        return len(self.grouped_experts)

    @property
    def num_converted(self) -> int:
        return self.num_linears + self.num_grouped_experts

    def __str__(self) -> str:
        kept = Counter(self.kept.values())
        kept_text = ", ".join(f"{n} {cls}" for cls, n in sorted(kept.items())) or "nothing"
        skipped = [name for name, cls in self.kept.items() if "Linear" in cls]
        c = self.config
        dispatch = f"; expert dispatch in FP8 in {len(self.dispatchers)} MoE layers" if self.dispatchers else ""
        return (f"FP8 ({c.backend}, accumulation {c.accumulation}): {self.num_linears} linear layers and "
                f"{self.num_grouped_experts} routed-expert groups converted{dispatch}; kept in high precision: "
                f"{kept_text}" + (f" (linear: {', '.join(skipped)})" if skipped else ""))


def _name_matches(fqn: str, pattern: str) -> bool:
    """pattern is a run of whole dot-separated components of fqn ("lm_head", "mlp.gate", ...)."""
    return f".{pattern}." in f".{fqn}."


def _fp8_class_for(name: str, module: nn.Linear) -> type:
    cls = type(module)
    if cls in _FP8_LINEAR_CLASSES:
        return _FP8_LINEAR_CLASSES[cls]
    if cls.forward is not nn.Linear.forward:
        raise NotImplementedError(f"convert_to_fp8: {name} is a {cls.__name__} with its own forward; only "
                                  f"nn.Linear, ColumnParallelLinear and RowParallelLinear (and nn.Linear "
                                  f"subclasses that keep its forward) can be converted. Skip it with skip=.")
    # An nn.Linear subclass with nn.Linear's forward: a combined class, made once per class.
    fp8_cls = type(f"Fp8{cls.__name__}", (Fp8Linear, cls), {"__module__": __name__})
    _FP8_LINEAR_CLASSES[cls] = fp8_cls
    return fp8_cls


def _attach(module: nn.Module, cls: type, config: Fp8Config) -> None:
    """Swap module's class to cls and give it a config and fresh stats (parameters untouched)."""
    module.__class__ = cls
    module.config = config
    module.fp8_stats = Fp8Stats()


def _set_dispatch_codec(moe: MoE, config: Fp8Config) -> None:
    """Give moe's dispatcher the FP8 codec (config.dispatch), or take an FP8 codec away (not a foreign one).

    Made after _attach so that it records into the routed experts' fresh stats: the dispatch
    quantizes exactly the tokens their up-projection consumes, and an inf/NaN among them is then
    reported (fp8_stats, found_nonfinite) under that layer's name.
    """
    dispatcher = moe.dispatcher
    if config.dispatch:
        stats = moe.experts.fp8_stats if isinstance(moe.experts, Fp8RoutedExperts) else None
        dispatcher.codec = Fp8DispatchCodec(eps=config.eps, stats=stats)
    elif isinstance(dispatcher.codec, Fp8DispatchCodec):
        dispatcher.codec = None


def convert_to_fp8(model: nn.Module, fp8_config: Fp8Config | None = None, *,
                   skip: Iterable[str] = DEFAULT_SKIP, experts: bool = True,
                   module_filter: Callable[[str, nn.Module], bool] | None = None,
                   log: Callable[[str], None] | None = None) -> nn.Module:
    """Convert ``model`` in place to FP8 training and return it; ``model.fp8_summary`` says what changed.

    Every nn.Linear (ColumnParallelLinear and RowParallelLinear included) becomes an Fp8Linear,
    except those whose name contains a ``skip`` entry as whole components (default: ``lm_head``)
    or for which ``module_filter(name, module)`` returns False; with ``experts`` every
    RoutedExperts becomes an Fp8RoutedExperts. Embeddings, routers and norms are never touched.
    Tensor-parallel layers may be sharded (see the module docstring). With ``fp8_config.dispatch``
    every MoE layer's token dispatcher gets an Fp8DispatchCodec (counted in its routed experts'
    fp8_stats when those are FP8); without it an FP8 codec set by an earlier conversion is removed.
    Already converted modules take the new config (their stats are reset).

    Nothing is copied: parameters stay the same objects (see the module docstring). Everything is
    checked before anything changes: a linear layer with a forward of its own (NotImplementedError)
    or an unavailable backend (Fp8BackendUnavailable) leaves the model as it was.
    """
    config = fp8_config or Fp8Config()
    config.get_backend()                          # probe now: fail before converting anything
    skip = tuple(skip)
    summary = Fp8ConversionSummary(config)
    plan: list[tuple[nn.Module, type]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            wanted = (not any(_name_matches(name, s) for s in skip)
                      and (module_filter is None or module_filter(name, module)))
            if not wanted:
                if isinstance(module, Fp8Linear):
                    raise ValueError(f"convert_to_fp8: {name} is already FP8 but is excluded now; "
                                     f"converting back is not supported")
                summary.kept[name] = type(module).__name__
                continue
            cls = type(module) if isinstance(module, Fp8Linear) else _fp8_class_for(name, module)
            plan.append((module, cls))
            summary.linears.append(name)
        elif isinstance(module, RoutedExperts) and (experts or isinstance(module, Fp8RoutedExperts)):
            if not experts:
                raise ValueError(f"convert_to_fp8: {name} is already FP8 but experts=False now; "
                                 f"converting back is not supported")
            plan.append((module, Fp8RoutedExperts))
            summary.grouped_experts.append(name)
        elif any(True for _ in module.parameters(recurse=False)):
            summary.kept[name] = type(module).__name__
    for module, cls in plan:
        _attach(module, cls, config)
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            _set_dispatch_codec(module, config)
            if config.dispatch:
                summary.dispatchers.append(name)
    model.fp8_summary = summary
    if log is not None:
        log(str(summary))
    return model


def fp8_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) of every FP8 layer (Fp8Linear or Fp8RoutedExperts) in model."""
    for name, module in model.named_modules():
        if isinstance(module, FP8_MODULE_TYPES) or isinstance(getattr(module, "fp8_stats", None), Fp8Stats):
            yield name, module


# ============================================================================ statistics


def fp8_stats(model: nn.Module, reset: bool = False) -> dict[str, int]:
    """Counters of every FP8 layer summed, as plain ints for metrics.jsonl (one host sync in all).

    layers: FP8 layers; gemms: FP8 GEMMs run; tiles: scale tiles/blocks quantized; clamped_tiles:
    tiles whose amax fell below eps (all-zero tiles); nonfinite: quantizations that met inf/NaN;
    nonfinite_layers: how many layers saw one (``nonfinite_layers(model)`` names them). Counters
    accumulate from the last reset: pass ``reset=True`` once per step to get per-step numbers.
    """
    stats = [m.fp8_stats for _, m in fp8_modules(model)]
    rows = []                                              # [clamped, nonfinite] of each layer, on device
    for s in stats:
        if s._clamped is None and s._nonfinite is None:
            continue
        ref = s._clamped if s._clamped is not None else s._nonfinite
        zero = torch.zeros((), dtype=torch.int64, device=ref.device)
        rows.append(torch.stack([zero if s._clamped is None else s._clamped,
                                 zero if s._nonfinite is None else s._nonfinite.to(ref.device)]))
    clamped_total = nonfinite_total = nonfinite_layer_count = 0
    if rows:
        counts = torch.stack(rows)                                                     # [layers, 2]
        sums = torch.cat([counts.sum(dim=0), (counts[:, 1] > 0).sum().view(1)]).tolist()   # the one sync
        clamped_total, nonfinite_total, nonfinite_layer_count = (int(v) for v in sums)
    out = {"layers": len(stats), "gemms": sum(s.gemms for s in stats), "tiles": sum(s.tiles for s in stats),
           "clamped_tiles": clamped_total, "nonfinite": nonfinite_total, "nonfinite_layers": nonfinite_layer_count}
    if reset:
        for s in stats:
            s.reset()
    return out


def nonfinite_layers(model: nn.Module) -> list[str]:
    """Names of the FP8 layers that met inf/NaN since their last reset (one host sync per layer)."""
    return [name for name, m in fp8_modules(model) if m.fp8_stats.nonfinite > 0]

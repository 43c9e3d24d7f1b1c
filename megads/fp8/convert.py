"""Turn a built DeepSeekV3 model into an FP8-training one, in place (TorchTitan style).

    model = build_model(cfg.model, seed)
    convert_to_fp8(model, cfg.fp8)              # before building the optimizer or after: same tensors
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

How: the modules are not replaced, their class is swapped, and an FP8 class overrides one GEMM
hook, never a forward. A linear layer's forward calls ``self.local_linear(x)`` for its GEMM; the
FP8 class puts the mixin ``Fp8LocalGemm`` (megads.fp8.linear), whose local_linear is the FP8 GEMM,
in front of the layer's class: an nn.Linear becomes an ``Fp8Linear``, a ``ColumnParallelLinear`` an
``Fp8ColumnParallelLinear`` (Fp8LocalGemm + ColumnParallelLinear, whose forward still runs the
collectives), a ``RowParallelLinear`` an ``Fp8RowParallelLinear``, and any other nn.Linear subclass
whose forward is nn.Linear's or calls the hook (``ReplicatedLinear``, ...) a class made once for it.
A ``RoutedExperts`` becomes an ``Fp8RoutedExperts``, whose ``expert_linear`` (the expert-grouped
GEMM of both projections) is fp8_grouped_linear. Each gains ``config`` (the one Fp8Config of
megads.config, e.g. ``cfg.fp8``; its ``enabled`` is the trainer's business, not read here) and
``fp8_stats`` (Fp8Stats). Parameters, buffers, hooks, names, the module tree and every other
attribute stay exactly as they were, so ``state_dict()`` keys and values, the optimizer's parameter
list, checkpoints and the Hugging Face mapping (megads.hf) are unchanged: the FP32 master weights
are the same tensor objects.

Tensor parallelism: a ColumnParallelLinear / RowParallelLinear sharded over several ranks becomes
an Fp8ColumnParallelLinear / Fp8RowParallelLinear: the parallel layer's own forward runs its
collectives around an FP8 GEMM on this rank's shard. Each rank quantizes what it holds: its weight
shard in 128x128 blocks counted from the shard's own first row / column, and its activations in
1x128 tiles along the dimension it holds (the input features of a RowParallelLinear, the output-feature
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

import functools
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable

import torch
from torch import nn

from megads.config import Fp8Config
from megads.fp8.dispatch import Fp8DispatchCodec
from megads.fp8.gemm import backend_for
from megads.fp8.linear import Fp8Linear, Fp8LocalGemm, fp8_grouped_linear
from megads.fp8.stats import Fp8Stats
from megads.model.moe import MoE, RoutedExperts
from parallel.tensor import ColumnParallelLinear, RowParallelLinear

# Linear layers kept in high precision by default, matched as whole components of the module name.
DEFAULT_SKIP = ("lm_head",)


# ============================================================================ converted classes


class Fp8ColumnParallelLinear(Fp8LocalGemm, ColumnParallelLinear):
    """A ColumnParallelLinear whose local GEMM (all three, forward and backward) runs in FP8.

    ColumnParallelLinear.forward runs as it is, its collectives around ``local_linear``, here the
    FP8 GEMM of this rank's output rows of the weight, quantized per 128x128 block of the shard
    (tests/test_fp8_tensor_parallel.py compares it with the single-process Fp8Linear). Only ever
    made by class swap (convert_to_fp8).
    """


class Fp8RowParallelLinear(Fp8LocalGemm, RowParallelLinear):
    """A RowParallelLinear whose local GEMM runs in FP8 (RowParallelLinear.forward's collectives around
    the FP8 ``local_linear``); see Fp8ColumnParallelLinear. The partial products are summed over the TP
    group in the activation dtype, as the high-precision layer does."""


# The classes megads builds its linear layers from; any other nn.Linear subclass gets a class made
# once (_derived_fp8_class).
_FP8_LINEAR_CLASSES = MappingProxyType({
    nn.Linear: Fp8Linear,
    ColumnParallelLinear: Fp8ColumnParallelLinear,
    RowParallelLinear: Fp8RowParallelLinear,
})


class Fp8RoutedExperts(RoutedExperts):
    """RoutedExperts whose grouped GEMMs run in FP8; same parameters (gate_up_proj, down_proj).

    RoutedExperts.forward runs as it is (the SwiGLU and the gate scaling stay in high precision
    between the two GEMMs); only its expert-grouped GEMM, ``expert_linear``, is fp8_grouped_linear.
    Only ever made by class swap (convert_to_fp8), which adds ``config`` and ``fp8_stats``.
    """

    config: Fp8Config
    fp8_stats: Fp8Stats

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        if sum(tokens_per_expert) == 0:           # no tokens here: no GEMM, no gradient (as grouped_linear)
            return x.new_zeros(x.shape[0], weight.shape[1])
        return fp8_grouped_linear(x, weight, tokens_per_expert, self.config, self.fp8_stats)

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_experts={self.num_experts}, intermediate_size={self.intermediate_size}, backend={c.backend}, "
                f"accumulation={c.accumulation}, pow2_scales={c.pow2_scales}, "
                f"cache_activations={c.cache_activations}")


FP8_MODULE_TYPES = (Fp8LocalGemm, Fp8RoutedExperts)


# ============================================================================ conversion


@dataclass
class Fp8ConversionSummary:
    """What convert_to_fp8 did: module names converted, and those with weights left high precision."""

    config: Fp8Config
    linears: list[str] = field(default_factory=list)          # now FP8 (an Fp8LocalGemm)
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


def _forward_owner(cls: type) -> type:
    """The class in cls's MRO whose forward cls runs."""
    return next(k for k in cls.__mro__ if "forward" in vars(k))


def _fp8_class_for(name: str, module: nn.Linear) -> type:
    cls = type(module)
    if cls in _FP8_LINEAR_CLASSES:
        return _FP8_LINEAR_CLASSES[cls]
    owner = _forward_owner(cls)
    if owner is not nn.Linear and "local_linear" not in vars(owner):
        raise NotImplementedError(f"convert_to_fp8: {name} is a {cls.__name__} with its own forward; only "
                                  f"nn.Linear subclasses that keep nn.Linear's forward or whose forward comes "
                                  f"from a class that defines the local_linear hook (ColumnParallelLinear, "
                                  f"RowParallelLinear, ...) can be converted. Skip it with skip=.")
    return _derived_fp8_class(cls)


@functools.lru_cache(maxsize=None)
def _derived_fp8_class(cls: type) -> type:
    """The FP8 class of an nn.Linear subclass, made once per class.

    Its forward runs its GEMM through ``local_linear`` (the hook, here Fp8LocalGemm's) when the
    class that defines the forward also defines local_linear and the forward is not that method
    itself: then cls's forward runs as it is. Otherwise (nn.Linear's forward, or ``forward =
    local_linear``, which would call cls's own GEMM directly) Fp8Linear's forward replaces it.
    """
    owner = _forward_owner(cls)
    calls_hook = owner is not nn.Linear and vars(owner)["forward"] is not vars(owner)["local_linear"]
    base = Fp8LocalGemm if calls_hook else Fp8Linear
    return type(f"Fp8{cls.__name__}", (base, cls), {"__module__": __name__, "__qualname__": f"Fp8{cls.__name__}"})


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

    Every nn.Linear (ColumnParallelLinear and RowParallelLinear included) becomes FP8 (an
    Fp8LocalGemm: Fp8Linear, Fp8ColumnParallelLinear, ...; see the module docstring), except those whose name contains a ``skip`` entry as whole components (default: ``lm_head``)
    or for which ``module_filter(name, module)`` returns False; with ``experts`` every
    RoutedExperts becomes an Fp8RoutedExperts. Embeddings, routers and norms are never touched.
    Tensor-parallel layers may be sharded (see the module docstring). With ``fp8_config.dispatch``
    every MoE layer's token dispatcher gets an Fp8DispatchCodec (counted in its routed experts'
    fp8_stats when those are FP8); without it an FP8 codec set by an earlier conversion is removed.
    Already converted modules take the new config (their stats are reset). ``fp8_config`` is the
    ``fp8`` section as it is (``cfg.fp8``); its ``enabled`` is not read here.

    Nothing is copied: parameters stay the same objects (see the module docstring). Everything is
    checked before anything changes: a linear layer with a forward of its own (NotImplementedError)
    or an unavailable backend (Fp8BackendUnavailable) leaves the model as it was.
    """
    config = fp8_config or Fp8Config()
    backend_for(config)                           # probe now: fail before converting anything
    skip = tuple(skip)
    summary = Fp8ConversionSummary(config)
    plan: list[tuple[nn.Module, type]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            wanted = (not any(_name_matches(name, s) for s in skip)
                      and (module_filter is None or module_filter(name, module)))
            if not wanted:
                if isinstance(module, Fp8LocalGemm):
                    raise ValueError(f"convert_to_fp8: {name} is already FP8 but is excluded now; "
                                     f"converting back is not supported")
                summary.kept[name] = type(module).__name__
                continue
            cls = type(module) if isinstance(module, Fp8LocalGemm) else _fp8_class_for(name, module)
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
    """(name, module) of every FP8 layer (an Fp8LocalGemm such as Fp8Linear, or Fp8RoutedExperts) in model."""
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

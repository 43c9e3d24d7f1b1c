"""Tensor names and tensors between a megads state and a Hugging Face DeepSeek-V3 checkpoint.

Weights on disk use DeepSeek's names: one tensor per routed expert
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`) where megads stacks them
(`layers.{i}.mlp.experts.gate_up_proj` [E, 2I, H], gate rows first, and `...down_proj` [E, H, I]);
MTP depth k is layer `num_hidden_layers + k` (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the
block's weights, and copies of `embed_tokens` and of the head as `shared_head.head`), where megads
has `mtp.{k}.{enorm,hnorm,eh_proj,shared_head.norm,block.*}` and shares the main embedding and head.

Tensors are read one at a time (one MoE layer's experts at a time when stacking).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Optional

import torch

from megads.config import ModelConfig
from megads.hf.config import Log
from megads.model.model import DeepSeekV3
from megads.shards import CheckpointFormatError, ShardedReader

_EXPERTS_GATE_UP = ".mlp.experts.gate_up_proj"
_EXPERTS_DOWN = ".mlp.experts.down_proj"
_MTP_NAME = re.compile(r"^mtp\.(\d+)\.(.+)$")


def megads_to_hf_name(name: str, cfg: ModelConfig) -> str:
    """The Hugging Face name of a megads tensor (stacked experts keep transformers' packed name)."""
    if name == "lm_head.weight":
        return name
    match = _MTP_NAME.match(name)
    if match:
        rest = match.group(2).removeprefix("block.")  # block weights sit directly in the MTP layer
        return f"model.layers.{cfg.num_hidden_layers + int(match.group(1))}.{rest}"
    return "model." + name


def _mtp_depth(name: str) -> Optional[int]:
    match = _MTP_NAME.match(name)
    return int(match.group(1)) if match else None


def _mtp_copies(cfg: ModelConfig, depth: int) -> dict[str, str]:
    """HF names of an MTP layer's copies of the shared tensors -> the megads tensor they copy."""
    layer = f"model.layers.{cfg.num_hidden_layers + depth}"
    return {f"{layer}.embed_tokens.weight": "embed_tokens.weight", f"{layer}.shared_head.head.weight": "lm_head.weight"}


def megads_state_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of everything a megads checkpoint stores, in model order (no memory used)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    return {name: t.shape for name, t in model.state_dict().items()}


def hf_mtp_depths(reader: ShardedReader, cfg: ModelConfig) -> int:
    """How many leading MTP depths (layers num_hidden_layers, +1, ...) have weights in `reader`."""
    layers = {int(m.group(1)) for m in (re.match(r"^model\.layers\.(\d+)\.", k) for k in reader.keys()) if m}
    depth = 0
    while cfg.num_hidden_layers + depth in layers:
        depth += 1
    return depth


@dataclasses.dataclass
class _Source:
    """Where one megads tensor comes from: one HF tensor, or per-expert ones to stack."""

    names: list[str]
    stacked: bool = False  # names are per expert, expert-major (gate_0, up_0, gate_1, ... or down_0, down_1, ...)


def _source_of(name: str, cfg: ModelConfig, available: set[str]) -> _Source:
    hf_name = megads_to_hf_name(name, cfg)
    if hf_name in available:  # includes transformers' packed in-memory expert names
        return _Source([hf_name])
    for suffix, parts in ((_EXPERTS_GATE_UP, ("gate_proj", "up_proj")), (_EXPERTS_DOWN, ("down_proj",))):
        if hf_name.endswith(suffix):
            experts = hf_name.rsplit(".", 1)[0]  # `model.layers.{i}.mlp.experts`
            names = [f"{experts}.{e}.{part}.weight" for e in range(cfg.n_routed_experts) for part in parts]
            return _Source(names, stacked=True)
    return _Source([hf_name])


def hf_source_names(name: str, cfg: ModelConfig, available: set[str]) -> list[str]:
    """The Hugging Face tensor(s) megads tensor `name` is read from (per-expert ones for a stack), given
    the names `available` in the Hugging Face directory."""
    return _source_of(name, cfg, available).names


def _read(reader: ShardedReader, hf_name: str, shape: tuple) -> torch.Tensor:
    tensor = reader.get(hf_name)
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointFormatError(
            f"Tensor {hf_name} in {reader.directory} has shape {tuple(tensor.shape)}, expected {tuple(shape)}.")
    return tensor


def _load(reader: ShardedReader, source: _Source, shape: torch.Size) -> torch.Tensor:
    """Read one megads tensor; per-expert tensors are copied into one preallocated stack."""
    if not source.stacked:
        return _read(reader, source.names[0], shape)
    experts, rows, cols = shape
    per_expert = len(source.names) // experts  # 2 (gate, up) or 1 (down)
    piece_rows = rows // per_expert
    stacked = None
    for i, hf_name in enumerate(source.names):
        expert, part = divmod(i, per_expert)
        piece = _read(reader, hf_name, (piece_rows, cols))
        if stacked is None:
            stacked = torch.empty(shape, dtype=piece.dtype)
        stacked[expert, part * piece_rows:(part + 1) * piece_rows] = piece
    return stacked


def hf_tensors_to_megads(reader: ShardedReader, cfg: ModelConfig,
                         log: Log = print) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megads name, tensor) for every tensor of `cfg`'s model found in the HF weights.

    Names are checked before anything is read: a missing tensor or one megads would not use (an
    FP8 scale whose weight is absent, a layer the config does not have) is a CheckpointFormatError.
    MTP depths without weights are skipped with a log line (the caller initialises them); MTP layers beyond
    `cfg.num_nextn_predict_layers` are skipped likewise. The MTP copies of the embedding and head
    are not imported (megads shares the main ones); a copy that differs is warned about.
    """
    shapes = megads_state_shapes(cfg)
    available = set(reader.keys())
    present = hf_mtp_depths(reader, cfg)
    wanted = cfg.num_nextn_predict_layers
    imported = min(present, wanted)
    if present < wanted:
        log(f"hf weights: {reader.directory} has {present} of {wanted} MTP depth(s); "
            f"depth(s) {present}..{wanted - 1} start freshly initialised.")
    if present > wanted:
        log(f"hf weights: ignoring MTP depth(s) {wanted}..{present - 1} of {reader.directory} "
            f"(model.num_nextn_predict_layers = {wanted}).")

    plan, used = {}, set()
    for name in shapes:
        depth = _mtp_depth(name)
        if depth is not None and depth >= imported:
            continue
        plan[name] = _source_of(name, cfg, available)
        used.update(plan[name].names)
    copies = {hf: main for depth in range(imported) for hf, main in _mtp_copies(cfg, depth).items() if hf in available}
    ignored = {k for k in available if any(k.startswith(f"model.layers.{cfg.num_hidden_layers + d}.")
                                           for d in range(wanted, present))}
    ignored |= {k for k in available if k.endswith("rotary_emb.inv_freq")}  # recomputed, older exports saved it
    missing = sorted(used - available)
    unexpected = sorted(available - used - set(copies) - ignored)
    if missing or unexpected:
        raise CheckpointFormatError(
            f"Weights in {reader.directory} do not match the config: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}.")

    for name, source in plan.items():
        yield name, _load(reader, source, shapes[name])

    for hf_name, main in copies.items():
        copy, original = reader.get(hf_name), reader.get(megads_to_hf_name(main, cfg))
        if copy.shape != original.shape or not torch.equal(copy, original):
            log(f"warning: {hf_name} differs from {megads_to_hf_name(main, cfg)}; megads shares the main one "
                f"and does not import the copy.")
        del copy, original  # before the next pair is read: at most two vocabulary-sized tensors alive


def keeps_fp32(name: str) -> bool:
    """Router weights and biases stay FP32 in any export (as transformers and DeepSeek keep them).
    `name` may be the megads or the Hugging Face name: they end alike."""
    return name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"))


def megads_tensors_to_hf(named_tensor_getter: Callable[[str], torch.Tensor], names: Iterable[str], cfg: ModelConfig,
                         dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for the megads tensors `names`, fetched one at a time.

    Stacked experts are split into per-expert tensors (cloned, so the stack can be freed while
    they wait in the writer); every MTP depth also gets copies of `embed_tokens` and of the head
    (`shared_head.head`), as DeepSeek-V3 stores them. `dtype` casts floating tensors except the router's.
    """
    names = list(names)
    for required in ("embed_tokens.weight", "lm_head.weight"):
        if cfg.num_nextn_predict_layers and required not in names:
            raise CheckpointFormatError(f"Cannot write MTP layers without {required}.")

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if dtype is None or not tensor.is_floating_point() or keeps_fp32(name):
            return tensor
        return tensor.to(dtype)

    for name in names:
        tensor = named_tensor_getter(name)
        hf_name = megads_to_hf_name(name, cfg)
        if hf_name.endswith(_EXPERTS_GATE_UP) or hf_name.endswith(_EXPERTS_DOWN):
            base, kind = hf_name.rsplit(".", 1)
            parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
            for expert in range(tensor.shape[0]):
                for part, piece in zip(parts, tensor[expert].chunk(len(parts), dim=0)):
                    yield f"{base}.{expert}.{part}.weight", cast(name, piece).clone()
        else:
            yield hf_name, cast(name, tensor)
        del tensor  # so a stacked expert tensor is freed before the next one is fetched
    for depth in range(cfg.num_nextn_predict_layers):
        for hf_name, main in _mtp_copies(cfg, depth).items():
            # A separate copy: safetensors refuses two names for one storage in a shard.
            yield hf_name, cast(main, named_tensor_getter(main)).clone()

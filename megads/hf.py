"""Import from and export to the Hugging Face DeepSeek-V3 format (config.json + sharded safetensors).

Two config dialects are read:

- the original DeepSeek-V3 `config.json` (`rope_theta` and a `rope_scaling` dict with `type: yarn`,
  `scoring_func`, `topk_method`, `aux_loss_alpha`, `seq_aux`, `moe_layer_freq`, `ep_size`, ...; no
  `rope_interleave`, because its weights are always in DeepSeek's interleaved rotary layout), and
- the one transformers 5 writes (`rope_parameters` holding `rope_type`, `rope_theta` and the YaRN
  keys; `rope_interleave`; `num_nextn_predict_layers`).

Exports are transformers-5 configs (plus DeepSeek's `scoring_func` / `topk_method` /
`aux_loss_alpha`, which transformers tolerates and vLLM-style loaders read).

Weights on disk use DeepSeek's names: one tensor per routed expert
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`) where megads stacks them
(`layers.{i}.mlp.experts.gate_up_proj` [E, 2I, H], gate rows first, and `...down_proj` [E, H, I]);
MTP depth k is layer `num_hidden_layers + k` (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the
block's weights, and copies of `embed_tokens` and of the head as `shared_head.head`), where megads
has `mtp.{k}.{enorm,hnorm,eh_proj,shared_head.norm,block.*}` and shares the main embedding and head.

Every conversion streams: tensors are read one at a time (one MoE layer's experts at a time when
stacking) and written through ShardedWriter, so peak memory is about one layer plus one shard,
whatever the model size. Directories are written under a temporary name next to the target and
renamed into place once complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from megads.config import Config, ConfigError, ModelConfig, config_from_dict, dump_config
from megads.model.model import DeepSeekV3
from megads.model.moe import MoE, Router
from megads.model.rope import RotaryEmbedding, rope_frequencies
from megads.shards import DEFAULT_SHARD_BYTES, CheckpointFormatError, ShardedReader, ShardedWriter
from megads.train.checkpoint import (
    finalize_directory,
    read_checkpoint_config,
    resolve_checkpoint,
    verify_manifest,
    write_model_weights,
)

Log = Callable[[str], None]

HF_CONFIG = "config.json"
PROGRESS_EVERY_S = 5.0

# ============================================================================ config.json

# Keys that matter only to inference code, tokenizers or transformers' own bookkeeping. They do not
# change what the weights compute, so importing ignores them.
INFERENCE_ONLY_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "_name_or_path",
    "torch_dtype", "dtype",  # storage dtype; every tensor carries its own
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_class",
    "output_router_logits", "output_attentions", "output_hidden_states", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "pretraining_tp",  # Llama's slicing switch; DeepSeek-V3 modelling code never reads it
    "ep_size",  # expert-parallel degree of DeepSeek's inference code
})

# config.json keys that are ModelConfig fields of the same name and meaning, and must be present.
_REQUIRED_SAME_NAME = (
    "vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
    "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "hidden_act",
    "max_position_embeddings", "rms_norm_eps",
)


def _megads_default(name: str):
    return ModelConfig.__dataclass_fields__[name].default


# ModelConfig fields a config.json may lack: the value used then, and why. Each use is logged.
_WHEN_ABSENT = {
    "rope_interleave": (True, "original DeepSeek checkpoints store interleaved rotary weights"),
    "num_nextn_predict_layers": (0, "no multi-token-prediction layers"),
    "scoring_func": ("sigmoid", "what transformers' DeepseekV3 computes"),
    "topk_method": ("noaux_tc", "what transformers' DeepseekV3 computes"),
    "tie_word_embeddings": (False, "transformers' DeepseekV3Config default"),
    "initializer_range": (_megads_default("initializer_range"), "megads default; only initialises new weights"),
    # Training-only values: Hugging Face configs rarely (aux_loss_alpha) or never carry them.
    "aux_loss_alpha": (_megads_default("aux_loss_alpha"), "training-only; megads default"),
    "bias_update_speed": (_megads_default("bias_update_speed"), "training-only; megads default"),
    "mtp_loss_weight": (_megads_default("mtp_loss_weight"), "training-only; megads default"),
}

_YARN_KEYS = frozenset({"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim", "attention_factor", "truncate"})


def _unsupported(key: str, value, reason: str) -> ConfigError:
    return ConfigError(f"config.json key '{key}' = {value!r} is not supported: {reason}.")


def _rope_from_hf(hf: dict, log: Log) -> tuple[float, Optional[dict]]:
    """(rope_theta, megads rope_scaling) from either dialect; errors name the offending key."""

    def normalise(params: dict, where: str, theta) -> tuple[float, Optional[dict]]:
        params = dict(params)
        theta = params.pop("rope_theta", theta)
        type_key = "rope_type" if "rope_type" in params else "type"  # transformers 5 / original name
        kind = params.get(type_key) or "default"
        params.pop("rope_type", None)
        params.pop("type", None)
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _unsupported(f"{where}.partial_rotary_factor", params["partial_rotary_factor"],
                               "MLA rotates all qk_rope_head_dim dims")
        params.pop("partial_rotary_factor", None)
        if theta is None:
            raise ConfigError("config.json has no 'rope_theta' (neither top-level nor in 'rope_parameters').")
        if kind == "default":
            for key, value in params.items():
                raise _unsupported(f"{where}.{key}", value, "plain RoPE takes no scaling keys")
            return float(theta), None
        if kind != "yarn":
            raise _unsupported(f"{where}.{type_key}", kind, "megads implements plain RoPE and YaRN only")
        unknown = sorted(set(params) - _YARN_KEYS)
        if unknown:
            raise _unsupported(f"{where}.{unknown[0]}", params[unknown[0]], f"YaRN keys are {sorted(_YARN_KEYS)}")
        # transformers fills these two the same way when they are missing or null.
        if params.get("original_max_position_embeddings") is None:
            params["original_max_position_embeddings"] = hf.get("max_position_embeddings")
            log(f"hf config: {where}.original_max_position_embeddings = {params['original_max_position_embeddings']} "
                f"(absent; transformers uses max_position_embeddings)")
        if params.get("factor") is None and params["original_max_position_embeddings"]:
            params["factor"] = hf.get("max_position_embeddings", 0) / params["original_max_position_embeddings"]
            log(f"hf config: {where}.factor = {params['factor']} (absent; transformers uses "
                f"max_position_embeddings / original_max_position_embeddings)")
        return float(theta), {"type": "yarn", **params}

    parsed = []
    if hf.get("rope_parameters") is not None:
        params = hf["rope_parameters"]
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise _unsupported("rope_parameters", params, "expected one dict (per-layer RoPE is not supported)")
        parsed.append(normalise(params, "rope_parameters", hf.get("rope_theta")))
    if "rope_scaling" in hf or "rope_theta" in hf:
        scaling = hf.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise _unsupported("rope_scaling", scaling, "expected a dict or null")
        parsed.append(normalise(scaling, "rope_scaling", hf.get("rope_theta")))
    if not parsed:
        raise ConfigError("config.json has neither 'rope_parameters' nor 'rope_theta'.")
    if len(parsed) == 2 and parsed[0] != parsed[1]:
        raise ConfigError(f"config.json's 'rope_parameters' ({parsed[0]}) and 'rope_scaling'/'rope_theta' "
                          f"({parsed[1]}) disagree.")
    return parsed[0]


def _reject_unrepresentable(hf: dict) -> None:
    """ConfigError naming the first key whose value megads' DeepSeek-V3 cannot represent."""
    if hf.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise _unsupported("model_type", hf["model_type"], "only deepseek_v3 checkpoints are imported")
    if "quantization_config" in hf:
        raise _unsupported("quantization_config", hf["quantization_config"],
                           "dequantize the weights first (e.g. DeepSeek's fp8_cast_bf16.py)")
    if hf.get("moe_layer_freq", 1) != 1:
        raise _unsupported("moe_layer_freq", hf["moe_layer_freq"], "every layer after first_k_dense_replace is MoE")
    if hf.get("attention_bias", False):
        raise _unsupported("attention_bias", hf["attention_bias"], "DeepSeek-V3 projections have no bias")
    if hf.get("attention_dropout") not in (None, 0, 0.0):
        raise _unsupported("attention_dropout", hf["attention_dropout"], "megads has no dropout")
    if hf.get("seq_aux", True) is not True:
        raise _unsupported("seq_aux", hf["seq_aux"], "megads' balance loss is the sequence-wise one")
    if hf.get("tie_word_embeddings", False):
        raise _unsupported("tie_word_embeddings", hf["tie_word_embeddings"],
                           "DeepSeek-V3 keeps embedding and head apart")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "megads' FFNs are SwiGLU (silu)")
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != hf.get("num_attention_heads"):
        raise _unsupported("num_key_value_heads", kv_heads,
                           f"MLA has one key/value per head (num_attention_heads = {hf.get('num_attention_heads')})")
    # Derived values transformers writes; they must agree with the dims they come from.
    if hf.get("head_dim") not in (None, hf.get("qk_rope_head_dim")):
        raise _unsupported("head_dim", hf["head_dim"],
                           f"transformers sets it to qk_rope_head_dim ({hf.get('qk_rope_head_dim')})")
    qk = (hf.get("qk_nope_head_dim") or 0) + (hf.get("qk_rope_head_dim") or 0)
    if hf.get("qk_head_dim") not in (None, qk):
        raise _unsupported("qk_head_dim", hf["qk_head_dim"],
                           f"it must equal qk_nope_head_dim + qk_rope_head_dim ({qk})")


# Keys that _reject_unrepresentable or _rope_from_hf consume (checked, not copied).
_CHECKED_KEYS = frozenset({
    "model_type", "quantization_config", "moe_layer_freq", "attention_bias", "attention_dropout", "seq_aux",
    "num_key_value_heads", "head_dim", "qk_head_dim", "rope_parameters", "rope_scaling", "rope_theta",
    "num_mtp_layers",
})


def model_config_from_hf(hf: dict, log: Log = print) -> ModelConfig:
    """A validated ModelConfig from a DeepSeek-V3 config.json (original or transformers-5 dialect).

    Raises ConfigError naming the key for anything megads cannot represent or does not know, and
    for a missing required key. Values filled in because the config lacks them are logged.
    """
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must be a JSON object, got {type(hf).__name__}.")
    unknown = sorted(set(hf) - INFERENCE_ONLY_KEYS - _CHECKED_KEYS - set(_REQUIRED_SAME_NAME) - set(_WHEN_ABSENT))
    if unknown:
        raise ConfigError(f"config.json has key(s) megads does not know: {', '.join(repr(k) for k in unknown)}; "
                          f"refusing to guess whether they change the model.")
    _reject_unrepresentable(hf)

    missing = [key for key in _REQUIRED_SAME_NAME if key not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required key(s): {', '.join(repr(k) for k in missing)}.")
    fields = {key: hf[key] for key in _REQUIRED_SAME_NAME}
    if "num_nextn_predict_layers" not in hf and "num_mtp_layers" in hf:  # transformers' alias
        hf = {**hf, "num_nextn_predict_layers": hf["num_mtp_layers"]}
    for key, (value, why) in _WHEN_ABSENT.items():
        if key in hf:
            fields[key] = hf[key]
        else:
            fields[key] = value
            log(f"hf config: {key} = {value!r} (not in config.json; {why})")
    fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(hf, log)
    return config_from_dict({"model": fields}).model


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json dict that transformers 5 loads as DeepseekV3ForCausalLM (weights stored as `dtype`).

    transformers' DeepseekV3 implements only sigmoid scoring with noaux_tc selection, so other
    routing settings are refused rather than exported as a model that would compute differently.
    """
    if cfg.scoring_func != "sigmoid" or cfg.topk_method != "noaux_tc":
        raise ConfigError(
            f"model.scoring_func {cfg.scoring_func!r} / model.topk_method {cfg.topk_method!r} cannot be exported: "
            f"transformers' DeepseekV3 implements only sigmoid scoring with noaux_tc selection.")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta,
                **{k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,  # transformers defaults it to 128, not to the heads
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": cfg.scoring_func,
        "topk_method": cfg.topk_method,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "rope_interleave": cfg.rope_interleave,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": cfg.aux_loss_alpha,
        # megads knows nothing about the tokenizer here; null beats transformers' defaults (0 and 1).
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
    }


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / HF_CONFIG
    if not path.is_file():
        raise CheckpointFormatError(f"{directory} is not a Hugging Face model directory (no {HF_CONFIG}).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{path} is not valid JSON ({err}).") from None


# ============================================================================ tensor names

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
    FP8 scale, a layer the config does not have) is a CheckpointFormatError. MTP depths without
    weights are skipped with a log line (the caller initialises them); MTP layers beyond
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


def _keep_fp32(name: str) -> bool:
    """Router weights and biases stay FP32 in any export (as transformers and DeepSeek keep them)."""
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
        if dtype is None or not tensor.is_floating_point() or _keep_fp32(name):
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


# ============================================================================ plumbing


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class _Progress:
    """One log line every PROGRESS_EVERY_S seconds while tensors flow, and a summary at the end."""

    def __init__(self, what: str, log: Log):
        self.what, self.log = what, log
        self.tensors = self.bytes = 0
        self.start = self.last = time.monotonic()

    def count(self, stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            self.tensors += 1
            self.bytes += tensor.numel() * tensor.element_size()
            now = time.monotonic()
            if now - self.last >= PROGRESS_EVERY_S:
                self.last = now
                self.log(f"{self.what}: {self.tensors} tensors, {_size(self.bytes)} so far ({name})")
            yield name, tensor

    def done(self) -> None:
        self.log(f"{self.what}: done, {self.tensors} tensors, {_size(self.bytes)} "
                 f"in {time.monotonic() - self.start:.1f} s")


@contextmanager
def _staged_directory(target: Path, finalize: Callable[[Path, Path], None]):
    """Yield a temporary sibling of `target`; `finalize(tmp, target)` moves it into place on success.

    Refuses a non-empty target: replacing a directory full of someone's files is not a conversion's
    call to make. On failure the temporary directory is removed and nothing appears at `target`.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty; refusing to overwrite it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            target.rmdir()  # empty, checked above
        finalize(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_hf_dir(hf_dir: Path, cfg: ModelConfig, stream: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int, dtype: Optional[torch.dtype], log: Log) -> Path:
    """Write config.json and the sharded weights of `stream` into `hf_dir`, atomically."""
    progress = _Progress(f"writing Hugging Face weights to {hf_dir}", log)
    stored_dtype = dtype
    with _staged_directory(hf_dir, lambda tmp, final: os.replace(tmp, final)) as tmp:
        with ShardedWriter(tmp, "model", max_shard_bytes) as writer:
            for name, tensor in progress.count(stream):
                if name == "lm_head.weight":
                    stored_dtype = stored_dtype or tensor.dtype
                writer.add(name, tensor)
        # Written last: only now is the stored dtype known.
        config = hf_config_from_model_config(cfg, stored_dtype or torch.float32)
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    progress.done()
    return hf_dir


def _init_mtp(mtp: nn.ModuleList, cfg: ModelConfig, seed: int) -> None:
    """Initialise MTP modules exactly as build_model(cfg, seed) would.

    DeepSeekV3.init_weights seeds each parameter by its full name, so a shell model holding only
    `mtp` (named as in the full model) reproduces the full model's values without building it.
    """
    shell = DeepSeekV3.__new__(DeepSeekV3)
    nn.Module.__init__(shell)
    shell.cfg = cfg
    shell.mtp = mtp
    shell.init_weights(seed)


def _empty_model(cfg: ModelConfig, dtype: torch.dtype) -> DeepSeekV3:
    """An uninitialised CPU model: built on the meta device, then given (unfilled) storage once.

    Parameters take `dtype`, except the router's, which stays FP32 like its biases (as in
    transformers). Non-persistent buffers, which no checkpoint holds, are recomputed here.
    """
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    for module in model.modules():
        if isinstance(module, Router):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.to(dtype), requires_grad=param.requires_grad))
    model.to_empty(device="cpu")

    persistent = set(model.state_dict())
    inv_freq, _ = rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    restored = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(inv_freq)
            restored.add(prefix + "inv_freq")
        elif isinstance(module, MoE):
            module.tokens_per_expert.zero_()
            restored.add(prefix + "tokens_per_expert")
    unknown = {name for name, _ in model.named_buffers()} - persistent - restored
    if unknown:
        raise RuntimeError(f"megads.hf does not know how to initialise the non-persistent buffer(s) {sorted(unknown)}.")
    return model


# ============================================================================ public API


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0, log: Log = print) -> DeepSeekV3:
    """A megads model (in eval mode, like transformers' from_pretrained) from a Hugging Face directory.

    MTP depths the directory lacks are initialised as build_model(cfg, seed) would.
    """
    path = Path(path)
    cfg = model_config_from_hf(read_hf_config(path), log)
    reader = ShardedReader(path)
    model = _empty_model(cfg, dtype)
    if hf_mtp_depths(reader, cfg) < cfg.num_nextn_predict_layers:
        with torch.no_grad():
            _init_mtp(model.mtp, cfg, seed)
    state = model.state_dict()
    progress = _Progress(f"loading {path}", log)
    with torch.no_grad():
        for name, tensor in progress.count(hf_tensors_to_megads(reader, cfg, log)):
            state[name].copy_(tensor)
    progress.done()
    return model.eval()


def save_hf(model: DeepSeekV3, path: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            dtype: Optional[torch.dtype] = None, log: Log = print) -> Path:
    """Write a full (unsharded) megads model as a Hugging Face DeepSeek-V3 directory."""
    state = model.state_dict()
    stream = megads_tensors_to_hf(state.__getitem__, list(state), model.cfg, dtype)
    return _write_hf_dir(Path(path), model.cfg, stream, max_shard_bytes, dtype, log)


def import_hf(hf_dir: str | Path, ckpt_dir: str | Path, seed: int = 0, max_shard_bytes: Optional[int] = None,
              log: Log = print) -> Path:
    """Convert a Hugging Face directory into a megads checkpoint directory without building the model.

    The checkpoint holds config.yaml (the imported model section, defaults elsewhere), model/ and
    the COMPLETE manifest, and no training state. Missing MTP depths are written freshly
    initialised (as build_model(cfg, seed) would), so the checkpoint always matches its config.
    """
    hf_dir, ckpt_dir = Path(hf_dir), Path(ckpt_dir)
    cfg = model_config_from_hf(read_hf_config(hf_dir), log)
    reader = ShardedReader(hf_dir)
    present = min(hf_mtp_depths(reader, cfg), cfg.num_nextn_predict_layers)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        yield from hf_tensors_to_megads(reader, cfg, log)
        if present < cfg.num_nextn_predict_layers:
            with torch.device("meta"):
                mtp = DeepSeekV3(cfg).mtp
            mtp.to_empty(device="cpu")
            with torch.no_grad():
                _init_mtp(mtp, cfg, seed)
            for name, tensor in mtp.state_dict().items():
                if int(name.split(".", 1)[0]) >= present:
                    yield f"mtp.{name}", tensor

    progress = _Progress(f"importing {hf_dir} into {ckpt_dir}", log)
    with _staged_directory(ckpt_dir, lambda tmp, final: finalize_directory(tmp, final, None)) as tmp:
        (tmp / "config.yaml").write_text(dump_config(Config(model=cfg)))
        write_model_weights(tmp, progress.count(stream()), max_shard_bytes)
    progress.done()
    return ckpt_dir


def export_hf(ckpt_path: str | Path, hf_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              dtype: Optional[torch.dtype] = None, log: Log = print) -> Path:
    """Convert a megads checkpoint (a checkpoint directory, or a run directory: its latest one) to HF format."""
    ckpt = resolve_checkpoint(ckpt_path)
    verify_manifest(ckpt)
    cfg = read_checkpoint_config(ckpt).model
    reader = ShardedReader(ckpt / "model")
    names = list(megads_state_shapes(cfg))
    missing, unexpected = sorted(set(names) - set(reader.keys())), sorted(set(reader.keys()) - set(names))
    if missing or unexpected:
        raise CheckpointFormatError(f"Checkpoint {ckpt} does not match its config.yaml: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}.")
    log(f"exporting checkpoint {ckpt}")
    return _write_hf_dir(Path(hf_dir), cfg, megads_tensors_to_hf(reader.get, names, cfg, dtype),
                         max_shard_bytes, dtype, log)

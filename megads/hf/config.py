"""config.json <-> ModelConfig: the Hugging Face DeepSeek-V3 config, translated both ways.

Two config dialects are read:

- the original DeepSeek-V3 `config.json` (`rope_theta` and a `rope_scaling` dict with `type: yarn`,
  `scoring_func`, `topk_method`, `aux_loss_alpha`, `seq_aux`, `moe_layer_freq`, `ep_size`, ...; no
  `rope_interleave`, because its weights are always in DeepSeek's interleaved rotary layout), and
- the one transformers 5 writes (`rope_parameters` holding `rope_type`, `rope_theta` and the YaRN
  keys; `rope_interleave`; `num_nextn_predict_layers`).

Exports are transformers-5 configs (plus DeepSeek's `scoring_func` / `topk_method` /
`aux_loss_alpha`, which transformers tolerates and vLLM-style loaders read).

`quantization_config` is accepted only as DeepSeek-V3 released it (FP8 E4M3 weights in 128x128
blocks, see megads.hf.fp8): it says how the weights are stored, not what the model computes, so it
is not part of ModelConfig; `fp8_weights(hf)` tells the weight reader.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Optional

import torch

from megads.config import ROPE_TYPE_KEYS, YARN_KEYS, ConfigError, ModelConfig, model_config_from_dict
from megads.shards import CheckpointFormatError, read_json_object

Log = Callable[[str], None]

HF_CONFIG = "config.json"

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

# DeepSeek-V3's released FP8 format, as its config.json states it (and `megads export-hf --fp8` writes it).
# activation_scheme concerns inference kernels only ("dynamic": activations are scaled per tile on the
# fly); "static" would come with activation scales megads has no use for.
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}


def _unsupported(key: str, value, reason: str) -> ConfigError:
    return ConfigError(f"config.json key '{key}' = {value!r} is not supported: {reason}.")


def fp8_weights(hf: dict) -> bool:
    """True if config.json declares DeepSeek-V3's FP8 weights (E4M3, one scale per 128x128 block).

    Any other `quantization_config` is a ConfigError naming the key: megads can only dequantize
    the format it knows. A missing activation_scheme means "dynamic", as in transformers."""
    if hf.get("quantization_config") is None:
        return False
    quant = hf["quantization_config"]
    if not isinstance(quant, dict):
        raise _unsupported("quantization_config", quant, "expected a dict")
    for key, value in {"activation_scheme": "dynamic", **quant}.items():
        if key not in FP8_QUANTIZATION_CONFIG:
            raise _unsupported(f"quantization_config.{key}", value,
                               f"megads reads DeepSeek-V3's FP8 format only ({FP8_QUANTIZATION_CONFIG})")
        expected = FP8_QUANTIZATION_CONFIG[key]
        if value != expected:
            raise _unsupported(f"quantization_config.{key}", value,
                               f"megads reads DeepSeek-V3's FP8 format only ({key} {expected!r})")
    for key in ("fmt", "quant_method", "weight_block_size"):
        if key not in quant:
            raise ConfigError(f"config.json's quantization_config lacks {key!r} (DeepSeek-V3's FP8 format "
                              f"has {key} = {FP8_QUANTIZATION_CONFIG[key]!r}).")
    return True


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
        unknown = sorted(set(params) - YARN_KEYS)
        if unknown:
            raise _unsupported(f"{where}.{unknown[0]}", params[unknown[0]], f"YaRN keys are {sorted(YARN_KEYS)}")
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
    fp8_weights(hf)  # validates quantization_config; the weights reader acts on it
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
    return model_config_from_dict(fields)


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, fp8: bool = False) -> dict:
    """A config.json dict that transformers 5 loads as DeepseekV3ForCausalLM (weights stored as `dtype`).

    `fp8`: the weights are in DeepSeek-V3's FP8 format (megads.hf.fp8); the config then also carries
    its `quantization_config` and the older `torch_dtype` key that DeepSeek's config.json has.

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
                **{k: v for k, v in cfg.rope_scaling.items() if k not in ROPE_TYPE_KEYS}}
    config = {
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
    if fp8:
        config["torch_dtype"] = config["dtype"]
        config["quantization_config"] = copy.deepcopy(FP8_QUANTIZATION_CONFIG)
    return config


def read_hf_config(directory: str | Path) -> dict:
    """The settings in `directory`/config.json; a missing or damaged file is a CheckpointFormatError naming it."""
    path = Path(directory) / HF_CONFIG
    if not path.is_file():
        raise CheckpointFormatError(f"{directory} is not a Hugging Face model directory (no {HF_CONFIG}).")
    return read_json_object(path)

"""The small model tests build when they do not state every model value themselves.

ModelConfig's defaults are Hugging Face DeepseekV3Config's (DeepSeek-V3 itself, 671B parameters).
TINY_MODEL holds the values ModelConfig's defaults had before that (a few-million-parameter
DeepSeek-V3: MLA, DeepSeekMoE, one MTP depth), every field stated. Tests that give only some model
values get the rest from here, so each one keeps building the model it always built:

    from tiny_model import TINY_MODEL, tiny_config, tiny_model, tiny_overrides

    tiny_model(hidden_size=64)                  # a ModelConfig (unvalidated, like ModelConfig(...))
    tiny_config({"model": {"n_group": 4}, "parallel": {...}})   # config_from_dict, model on top of TINY_MODEL
    load_config(None, tiny_overrides("train.max_steps=3"))       # the same for overrides

(tests/ is on sys.path under pytest's default prepend import mode, also in multi-rank children.)
"""

from __future__ import annotations

from typing import Any

import yaml

from megads.config import Config, ModelConfig, config_from_dict

TINY_MODEL: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    intermediate_size=704,
    num_attention_heads=8,
    q_lora_rank=None,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    moe_intermediate_size=128,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    hidden_act="silu",
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    rope_interleave=True,
    num_nextn_predict_layers=1,
    initializer_range=0.006,
    tie_word_embeddings=False,
    mtp_loss_weight=0.3,
    bias_update_speed=0.001,
    aux_loss_alpha=0.0001,
)


def tiny_model(**changes) -> ModelConfig:
    """ModelConfig(**TINY_MODEL, **changes), not validated (as ModelConfig(...) is not)."""
    return ModelConfig(**{**TINY_MODEL, **changes})


def with_tiny_model(raw: Any = None) -> Any:
    """A raw config (nested dicts, as config_from_dict takes) whose model section is TINY_MODEL
    updated by `raw`'s own. Anything that is not a mapping (of sections, or a non-null model
    section) is returned as it is, for config_from_dict to reject with its own message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return raw
    model = raw.get("model")
    if model is not None and not isinstance(model, dict):
        return raw
    return {**raw, "model": {**TINY_MODEL, **(model or {})}}


def tiny_config(raw: Any = None) -> Config:
    """config_from_dict(raw) with the model values `raw` does not give taken from TINY_MODEL."""
    return config_from_dict(with_tiny_model(raw))


def tiny_overrides(*overrides: str) -> list[str]:
    """`SECTION.KEY=VALUE` overrides stating TINY_MODEL, then `overrides` (later ones win), for
    load_config(None, ...) and `megads train ... --set`."""
    return [f"model.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in TINY_MODEL.items()] + list(overrides)

"""Tests for megads.config: loading, type checking, overrides and every validation rule."""

import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest
import yaml

from megads.config import (
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    apply_overrides,
    config_for_model,
    config_from_dict,
    data_parallel_size,
    describe_fields,
    dump_config,
    load_config,
    micro_batches_per_step,
    model_config_from_dict,
    validate,
)
from tiny_model import TINY_MODEL, tiny_config, tiny_model, tiny_overrides, with_tiny_model

REPO = Path(__file__).resolve().parents[1]

YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def yarn(**changes):
    rs = dict(YARN)
    for key, value in changes.items():
        if value is _DROP:
            rs.pop(key)
        else:
            rs[key] = value
    return rs


_DROP = object()


def _error(raw) -> str:
    """The ConfigError of `raw` on top of the tiny model (the messages name its values)."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(with_tiny_model(raw))
    return str(info.value)


def _assert_values(cfg: Config, raw: dict) -> None:
    """Every value `raw` gives is in `cfg`; every model value it does not give is TINY_MODEL's."""
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    given = raw.get("model", {})
    assert {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in given} == \
        {k: v for k, v in TINY_MODEL.items() if k not in given}


# ----------------------------------------------------------------------------- defaults and loading


def test_defaults_validate():
    cfg = config_from_dict({})
    validate(cfg)
    assert cfg == Config()
    assert cfg.model.qk_head_dim == cfg.model.qk_nope_head_dim + cfg.model.qk_rope_head_dim
    assert config_from_dict(None) == Config()
    assert load_config() == Config()


def test_empty_sections_mean_defaults():
    assert config_from_dict({"model": None, "train": {}}) == Config()


# ModelConfig fields DeepseekV3Config has no attribute for: DeepSeek's original config.json keys
# (transformers' DeepseekV3 computes exactly these) and training-only values; all DeepSeek-V3's.
NOT_IN_HF = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "mtp_loss_weight": 0.3,
             "bias_update_speed": 0.001, "aux_loss_alpha": 0.0001}


def test_model_defaults_are_deepseek_v3_configs():
    """Every ModelConfig default is the default of DeepseekV3Config's attribute of the same name."""
    transformers = pytest.importorskip("transformers")
    hf, ours = transformers.DeepseekV3Config(), ModelConfig()
    # Exceptions, where the representations differ: transformers 5 keeps rope_theta inside
    # rope_parameters (aliased as rope_scaling), whose rope_type "default" (plain RoPE) is
    # rope_scaling null here.
    rope = getattr(hf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": hf.rope_theta}
    assert ours.rope_theta == rope["rope_theta"]
    assert rope["rope_type"] == "default" and set(rope) <= {"rope_type", "rope_theta"} and ours.rope_scaling is None
    exceptions = {"rope_theta", "rope_scaling"}
    compared = set()
    for f in dataclasses.fields(ModelConfig):
        if f.name in exceptions or not hasattr(hf, f.name):
            continue
        assert getattr(ours, f.name) == getattr(hf, f.name), f"model.{f.name}"
        compared.add(f.name)
    others = {f.name for f in dataclasses.fields(ModelConfig)} - compared - exceptions
    assert {name: getattr(ours, name) for name in others} == NOT_IN_HF
    assert (ours.hidden_size, ours.num_hidden_layers, ours.n_routed_experts) == (7168, 61, 256)  # DeepSeek-V3


def test_tiny_yaml_states_every_model_value():
    """examples/configs/tiny.yaml does not lean on the (671B) defaults for any model value."""
    path = REPO / "examples" / "configs" / "tiny.yaml"
    raw = yaml.safe_load(path.read_text())
    assert set(raw["model"]) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert load_config(path).model == ModelConfig(**{**TINY_MODEL, **raw["model"]})
    assert load_config(path).model == tiny_model(vocab_size=4096, q_lora_rank=128, n_group=4, topk_group=2,
                                                 max_position_embeddings=1024)


def test_tiny_model_helper():
    assert set(TINY_MODEL) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert tiny_model() == tiny_config().model == load_config(None, tiny_overrides()).model
    assert dataclasses.asdict(tiny_model()) == TINY_MODEL
    assert tiny_model(hidden_size=64).hidden_size == 64
    assert load_config(None, tiny_overrides("model.n_group=2")).model == tiny_model(n_group=2)
    cfg = tiny_config({"model": {"n_group": 2}, "train": {"max_steps": 3}})
    assert cfg.model == tiny_model(n_group=2) and cfg.train.max_steps == 3
    assert cfg.parallel == ParallelConfig()


def test_dump_round_trip(tmp_path):
    cfg = load_config(overrides=tiny_overrides("model.q_lora_rank=32",
                                               f"model.rope_scaling={YARN}".replace("'", "")))
    assert cfg.model == tiny_model(q_lora_rank=32, rope_scaling=YARN)
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_describe_fields_lists_every_field_with_help():
    text = describe_fields()
    for section in ("model", "parallel", "data", "train"):
        cls = type(getattr(Config(), section))
        assert f"{section}:" in text
        for f in dataclasses.fields(cls):
            assert f"  {f.name} = " in text
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"


def test_load_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n"
        "  hidden_size: 128\n"
        "  q_lora_rank: 32\n"
        "  rope_scaling: {type: yarn, factor: 4, original_max_position_embeddings: 1024}\n"
        "train:\n"
        "  lr: 1          # int accepted where a float is expected\n"
        "  max_steps: 7\n"
        "parallel:\n"
        "  schedule: dualpipe\n"
        "  pipeline_parallel: 2\n"
        "data:\n"
        "  tokenizer: byte\n")
    cfg = load_config(path)
    assert cfg.model.hidden_size == 128
    assert cfg.model.q_lora_rank == 32
    assert cfg.model.rope_scaling["factor"] == 4
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.parallel.schedule == "dualpipe"
    assert cfg.data.tokenizer == "byte"
    # untouched fields keep their defaults
    assert cfg.model.vocab_size == ModelConfig().vocab_size
    # a path given as a string works too
    assert load_config(str(path)) == cfg


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)  # a directory is not a config file


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_unknown_key_in_yaml_file_names_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"train\.max_step\b"):
        load_config(path)


@pytest.mark.parametrize("text, where", [
    ("model: 5\n", "model"),
    ("model: [1, 2]\n", "model"),
    ("- model\n- train\n", "mapping"),
    ("just a string\n", "mapping"),
])
def test_non_mapping_yaml_is_a_config_error(tmp_path, text, where):
    """A file whose top level or section is not a mapping is a ConfigError, not a TypeError.

    Library bug: apply_overrides (config.py:250) runs dict(v or {}) / raw.items() before
    config_from_dict's mapping checks, so load_config raises TypeError / AttributeError here.
    """
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=where):
        load_config(path)


# Damaged config files: each is one sentence naming the file and what is wrong with it.
DAMAGED_FILES = {
    "random bytes": (b"\xff" + bytes(range(256)) * 3, "is not UTF-8 text: byte 0xff at offset 0"),
    "not YAML": (b"model: {hidden_size: [1, 2\n", "is not valid YAML (expected ',' or ']'"),
    "a list": (b"- model\n- train\n", "must be a mapping of sections (model:, train:, ...), got list"),
    "a string": (b"just a string\n", "must be a mapping of sections (model:, train:, ...), got str 'just a string'"),
    "an empty list": (b"[]\n", "got list []"),  # falsy: once silently all defaults
    "zero": (b"0\n", "got int 0"),
    "a scalar section": (b"train: 5\n", "Section 'train' of config file"),
    "a list section": (b"model:\n  - 1\n", "Section 'model' of config file"),
    "an impossible date": (b"train:\n  seed: 2001-13-01\n", "is not valid YAML (month must be in 1..12)"),
    "deep nesting": (b"train: " + b"[" * 5000 + b"\n", "is not valid YAML"),
    "a NUL byte": (b"train:\x00\n", "is not valid YAML (unacceptable character #x0000"),
}


@pytest.mark.parametrize("content, expected", DAMAGED_FILES.values(), ids=DAMAGED_FILES.keys())
def test_damaged_config_file_is_one_sentence_naming_it(tmp_path, content, expected):
    path = tmp_path / "damaged.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message, message


def test_damaged_checkpoint_config_is_one_sentence_naming_it(tmp_path):
    from megads.train.checkpoint import read_checkpoint_config

    (tmp_path / "config.yaml").write_bytes(b"\x9c" + bytes(range(256)))
    with pytest.raises(ConfigError, match=re.escape(f"Config file {tmp_path / 'config.yaml'} is not UTF-8 text")):
        read_checkpoint_config(tmp_path)


def test_cli_reports_a_garbage_config_in_one_line(tmp_path, capsys):
    from megads.cli import main

    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\xfe\xed" + bytes(range(256)) * 4)
    for command in ("train", "sft", "grpo"):
        assert main([command, str(garbage)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(garbage) in err and "not UTF-8" in err, err
    assert main(["train", str(garbage.with_name("absent.yaml"))]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- overrides


def test_overrides_apply_and_parse_yaml_values():
    base = {"train": {"max_steps": 5}, "model": {"q_lora_rank": 32}}
    raw = apply_overrides(base, [
        "train.max_steps=20",
        "model.q_lora_rank=null",
        "train.lr=1e-3",  # PyYAML reads 1e-3 as a string; 0.001 style is a float
        "data.source = /tmp/texts",
        "model.rope_scaling={type: yarn, factor: 4, original_max_position_embeddings: 1024}",
        "parallel.sequence_parallel=true",
    ])
    assert raw["train"]["max_steps"] == 20
    assert raw["model"]["q_lora_rank"] is None
    assert raw["data"]["source"] == "/tmp/texts"
    assert raw["model"]["rope_scaling"] == {"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024}
    assert raw["parallel"]["sequence_parallel"] is True
    # the input dict is not mutated
    assert base == {"train": {"max_steps": 5}, "model": {"q_lora_rank": 32}}


def test_overrides_through_load_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 5}, "model": {**TINY_MODEL, "q_lora_rank": 32}}))
    cfg = load_config(path, ["train.max_steps=20", "model.q_lora_rank=null", "train.lr=0.01"])
    assert cfg.train.max_steps == 20
    assert cfg.model.q_lora_rank is None
    assert cfg.train.lr == 0.01
    assert cfg.model == tiny_model(q_lora_rank=None)
    assert cfg.train == TrainConfig(max_steps=20, lr=0.01)
    # the last override of a key wins
    assert load_config(None, tiny_overrides("train.max_steps=3", "train.max_steps=4")).train.max_steps == 4


@pytest.mark.parametrize("item", [
    "train.max_steps",       # no '='
    "max_steps=20",          # no section
    "train.max.steps=20",    # too many parts
    ".max_steps=20",         # empty section
    "train.=20",             # empty key
    "=20",
])
def test_bad_override_syntax(item):
    with pytest.raises(ConfigError, match="SECTION.KEY"):
        apply_overrides({}, [item])


@pytest.mark.parametrize("item", ["train.lr=[", "train.lr={a", "train.seed=2001-13-01"])
def test_override_value_that_is_not_yaml_is_one_sentence(item):
    with pytest.raises(ConfigError) as info:
        load_config(None, [item])
    assert str(info.value).startswith(f"The value of override '{item}' is not valid YAML (")
    assert "\n" not in str(info.value)


def test_exponent_without_a_dot_is_a_number():
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; a float field takes it as the number it means."""
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=5E-4", "fp8.eps=1e-10", "rl.beta=+2e-3"])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.fp8.eps, cfg.rl.beta) == (1e-3, 5e-4, 1e-10, 2e-3)


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=-.inf", "train.lr=.nan", "train.grad_clip=.inf",
                                      "rl.beta=.nan", "model.rms_norm_eps=.inf"])
def test_non_finite_numbers_are_rejected(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]} must be a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize("override, field", [
    ("train.max_stepz=20", "train.max_stepz"),
    ("trian.max_steps=20", "trian"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=", "train.max_steps"),     # empty value is null, not an integer
    ("train.max_steps=2.5", "train.max_steps"),
    ("train.lr=fast", "train.lr"),
    ("model.scoring_func=relu", "model.scoring_func"),
    ("model.topk_group=5", "model.topk_group"),
])
def test_bad_override_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, tiny_overrides(override))
    assert field in str(info.value)


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize("raw, field", [
    ({"model": {"hidden_szie": 64}}, "model.hidden_szie"),
    ({"train": {"steps": 1}}, "train.steps"),
    ({"parallel": {"tp": 2}}, "parallel.tp"),
    ({"data": {"path": "x"}}, "data.path"),
    ({"modle": {}}, "modle"),
    ({"optimizer": {"lr": 1.0}}, "optimizer"),
])
def test_unknown_keys_and_sections(raw, field):
    msg = _error(raw)
    assert "Unknown" in msg and f"'{field}'" in msg


@pytest.mark.parametrize("raw, field", [
    # string where an int is expected
    ({"train": {"max_steps": "20"}}, "train.max_steps"),
    # float where an int is expected
    ({"train": {"max_steps": 20.0}}, "train.max_steps"),
    ({"model": {"hidden_size": 256.5}}, "model.hidden_size"),
    # bool is not an int, int is not a bool
    ({"model": {"hidden_size": True}}, "model.hidden_size"),
    ({"model": {"norm_topk_prob": 1}}, "model.norm_topk_prob"),
    ({"parallel": {"sequence_parallel": "yes"}}, "parallel.sequence_parallel"),
    # bool / string where a float is expected
    ({"train": {"lr": True}}, "train.lr"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"model": {"rope_theta": None}}, "model.rope_theta"),
    # Optional[int]
    ({"model": {"q_lora_rank": "big"}}, "model.q_lora_rank"),
    ({"model": {"q_lora_rank": 1.5}}, "model.q_lora_rank"),
    ({"model": {"q_lora_rank": False}}, "model.q_lora_rank"),
    ({"train": {"decay_steps": "never"}}, "train.decay_steps"),
    ({"parallel": {"micro_batches": 2.0}}, "parallel.micro_batches"),
    # strings
    ({"data": {"source": 5}}, "data.source"),
    ({"data": {"cache_dir": 3}}, "data.cache_dir"),
    ({"data": {"datasets": ["a.bin"]}}, "data.datasets must be a list of mappings or null"),
    ({"data": {"tokenizer_file": 1}}, "data.tokenizer_file"),
    ({"parallel": {"schedule": 1}}, "parallel.schedule"),
    # Literal fields
    ({"model": {"scoring_func": "relu"}}, "model.scoring_func"),
    ({"model": {"topk_method": "topk"}}, "model.topk_method"),
    ({"model": {"hidden_act": "gelu"}}, "model.hidden_act"),
    ({"data": {"tokenizer": "wordpiece"}}, "data.tokenizer"),
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"train": {"precision": 32}}, "train.precision"),
    ({"train": {"recompute": "partial"}}, "train.recompute must be one of 'none', 'selective', 'full'"),
    # rope_scaling must be a mapping or null
    ({"model": {"rope_scaling": ["yarn", 40]}}, "model.rope_scaling"),
    ({"model": {"rope_scaling": "yarn"}}, "model.rope_scaling"),
])
def test_wrong_types_name_the_field(raw, field):
    assert field in _error(raw)


@pytest.mark.parametrize("section_value", [[1, 2], "model", 5])
def test_section_must_be_a_mapping(section_value):
    assert "'model'" in _error({"model": section_value})


def test_falsy_non_mapping_section_is_rejected():
    """`model: 0` (or `false`) is not a mapping either.

    Library bug: config_from_dict (config.py:243) uses `raw.get(name) or {}`, so any falsy value
    silently becomes an empty section.
    """
    assert "'model'" in _error({"model": 0})


def test_top_level_must_be_a_mapping():
    assert "mapping" in _error(["model"])


def test_int_accepted_where_float_expected():
    cfg = tiny_config({"train": {"lr": 1, "min_lr": 0, "weight_decay": 0, "grad_clip": 2},
                       "model": {"rope_theta": 50000, "routed_scaling_factor": 2}})
    for value in (cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay, cfg.train.grad_clip,
                  cfg.model.rope_theta, cfg.model.routed_scaling_factor):
        assert isinstance(value, float)
    assert cfg.train.lr == 1.0 and cfg.model.rope_theta == 50000.0
    assert (cfg.train.min_lr, cfg.train.weight_decay, cfg.train.grad_clip) == (0.0, 0.0, 2.0)
    assert cfg.model == tiny_model(rope_theta=50000.0, routed_scaling_factor=2.0)


def test_optional_fields_accept_null_and_value():
    raw = {"model": {"q_lora_rank": 16, "rope_scaling": None}, "train": {"decay_steps": None, "num_threads": 2},
           "parallel": {"micro_batches": 4}, "data": {"cache_dir": None}}
    cfg = tiny_config(raw)
    assert cfg.model.q_lora_rank == 16 and cfg.model.rope_scaling is None
    assert cfg.train.decay_steps is None and cfg.train.num_threads == 2
    assert cfg.parallel.micro_batches == 4
    _assert_values(cfg, raw)


# ----------------------------------------------------------------------------- rules, one at a time

M, T, P, D = "model", "train", "parallel", "data"
MULTI = "multi"  # the violation necessarily breaks a dependent rule too

# (raw config, text the error must contain[, MULTI]). Without MULTI the raw config violates exactly
# one rule, so the error is that rule's sentence alone.
RULE_CASES = [
    # ---- model: sizes
    ({M: {"vocab_size": 0}}, "model.vocab_size"),
    ({M: {"hidden_size": 0}}, "model.hidden_size"),
    ({M: {"num_hidden_layers": 0, "first_k_dense_replace": 0}}, "model.num_hidden_layers must be at least 1", MULTI),
    ({M: {"num_attention_heads": 0}}, "model.num_attention_heads"),
    ({M: {"kv_lora_rank": 0}}, "model.kv_lora_rank"),
    ({M: {"qk_rope_head_dim": 0}}, "model.qk_rope_head_dim"),
    ({M: {"v_head_dim": 0}}, "model.v_head_dim"),
    ({M: {"max_position_embeddings": 0}}, "model.max_position_embeddings must be at least 1", MULTI),
    ({M: {"qk_nope_head_dim": -1}}, "model.qk_nope_head_dim"),
    ({M: {"n_shared_experts": -1}}, "model.n_shared_experts"),
    ({M: {"num_nextn_predict_layers": -1}}, "model.num_nextn_predict_layers"),
    ({M: {"n_routed_experts": -16, "first_k_dense_replace": 4, "num_nextn_predict_layers": 0}},
     "model.n_routed_experts"),
    ({M: {"qk_rope_head_dim": 15}}, "model.qk_rope_head_dim must be even"),
    ({M: {"q_lora_rank": 0}}, "model.q_lora_rank"),
    ({M: {"first_k_dense_replace": 5}}, "model.first_k_dense_replace"),
    ({M: {"first_k_dense_replace": -1}}, "model.first_k_dense_replace"),
    ({M: {"intermediate_size": 0}}, "model.intermediate_size"),
    # ---- model: MoE
    ({M: {"n_routed_experts": 0}}, "model.n_routed_experts must be at least 1", MULTI),
    ({M: {"moe_intermediate_size": 0}}, "model.moe_intermediate_size"),
    ({M: {"num_experts_per_tok": 17}}, "model.num_experts_per_tok (17) must be between", MULTI),
    ({M: {"num_experts_per_tok": 0}}, "model.num_experts_per_tok (0)"),
    ({M: {"n_group": 0, "topk_group": 0}}, "model.n_group"),
    ({M: {"n_group": 3}}, "model.n_routed_experts (16) must be divisible by n_group (3)", MULTI),
    ({M: {"n_group": 2, "topk_group": 3}}, "model.topk_group (3)"),
    ({M: {"n_group": 2, "topk_group": 0}}, "model.topk_group (0)", MULTI),
    ({M: {"n_group": 16, "topk_group": 4}}, "fewer than 2 experts per group"),
    ({M: {"n_group": 4, "topk_group": 1, "num_experts_per_tok": 5}}, "model.num_experts_per_tok (5) exceeds"),
    ({M: {"n_group": 16, "topk_group": 3, "topk_method": "group_limited_greedy"}},
     "model.num_experts_per_tok (4) exceeds"),
    ({M: {"routed_scaling_factor": 0}}, "model.routed_scaling_factor"),
    # ---- model: scalars
    ({M: {"rms_norm_eps": 0}}, "model.rms_norm_eps"),
    ({M: {"rope_theta": -1}}, "model.rope_theta"),
    ({M: {"initializer_range": 0}}, "model.initializer_range"),
    ({M: {"tie_word_embeddings": True}}, "model.tie_word_embeddings"),
    ({M: {"mtp_loss_weight": -0.1}}, "model.mtp_loss_weight"),
    ({M: {"bias_update_speed": -0.001}}, "model.bias_update_speed"),
    ({M: {"aux_loss_alpha": -1e-4}}, "model.aux_loss_alpha"),
    # ---- model: rope_scaling
    ({M: {"rope_scaling": yarn(scale=2)}}, "model.rope_scaling has unknown keys ['scale']"),
    ({M: {"rope_scaling": yarn(type="linear")}}, "model.rope_scaling.type"),
    ({M: {"rope_scaling": yarn(type=_DROP)}}, "model.rope_scaling.type"),
    ({M: {"rope_scaling": yarn(factor=_DROP)}}, "model.rope_scaling.factor"),
    ({M: {"rope_scaling": yarn(factor="40")}}, "model.rope_scaling.factor"),
    ({M: {"rope_scaling": yarn(factor=0.5)}}, "model.rope_scaling.factor"),
    ({M: {"rope_scaling": yarn(original_max_position_embeddings=_DROP)}},
     "model.rope_scaling.original_max_position_embeddings"),
    ({M: {"rope_scaling": yarn(original_max_position_embeddings=4096.0)}},
     "model.rope_scaling.original_max_position_embeddings"),
    ({M: {"rope_scaling": yarn(original_max_position_embeddings=0)}},
     "model.rope_scaling.original_max_position_embeddings"),
    # ---- train
    ({T: {"max_steps": 0}}, "train.max_steps"),
    ({T: {"global_batch_size": 0}}, "train.global_batch_size"),
    ({T: {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({T: {"seq_length": 0}}, "train.seq_length"),
    ({T: {"log_every": 0}}, "train.log_every"),
    ({T: {"eval_batches": 0}}, "train.eval_batches"),
    ({T: {"save_every": -1}}, "train.save_every"),
    ({T: {"keep_checkpoints": -1}}, "train.keep_checkpoints"),
    ({T: {"eval_every": -1}}, "train.eval_every"),
    ({T: {"warmup_steps": -1}}, "train.warmup_steps"),
    ({T: {"weight_decay": -0.1}}, "train.weight_decay"),
    ({T: {"grad_clip": -1}}, "train.grad_clip"),
    ({T: {"max_skipped_steps": -1}}, "train.max_skipped_steps"),
    ({T: {"expert_load_every": -1}}, "train.expert_load_every must be null or not negative, got -1"),
    ({T: {"profile_steps": [0, 5]}}, "train.profile_steps must name steps between 1 and train.max_steps (200), got [0]"),
    ({T: {"global_batch_size": 8, "micro_batch_size": 3}},
     "train.global_batch_size (8) must be divisible by train.micro_batch_size (3)"),
    ({T: {"lr": 0, "min_lr": 0}}, "train.lr"),
    ({T: {"min_lr": 0.1}}, "train.min_lr"),
    ({T: {"min_lr": -1e-5}}, "train.min_lr"),
    ({T: {"adam_beta1": 1.0}}, "train.adam_beta1"),
    ({T: {"adam_beta2": -0.1}}, "train.adam_beta2"),
    ({T: {"adam_eps": 0}}, "train.adam_eps"),
    ({T: {"decay_steps": 0}}, "train.decay_steps"),
    ({T: {"num_threads": 0}}, "train.num_threads"),
    ({T: {"seq_length": 4097}},
     "train.seq_length (4097) must not exceed model.max_position_embeddings (4096)"),
    # ---- parallel
    ({P: {"tensor_parallel": 0}}, "parallel.tensor_parallel"),
    ({P: {"pipeline_parallel": 0}}, "parallel.pipeline_parallel"),
    ({P: {"expert_parallel": 0}}, "parallel.expert_parallel"),
    ({P: {"virtual_stages": 0}}, "parallel.virtual_stages"),
    ({P: {"schedule": "gpipe"}}, "parallel.schedule"),
    ({P: {"micro_batches": 0}}, "parallel.micro_batches"),
    ({P: {"collective_timeout_s": 0}}, "parallel.collective_timeout_s"),
    ({P: {"tensor_parallel": 16}}, "model.num_attention_heads (8) must be divisible by parallel.tensor_parallel (16)"),
    ({P: {"tensor_parallel": 2}, M: {"vocab_size": 8191}}, "model.vocab_size (8191)"),
    ({P: {"tensor_parallel": 2}, M: {"intermediate_size": 703}}, "model.intermediate_size (703)"),
    ({P: {"expert_parallel": 3}}, "model.n_routed_experts (16) must be divisible by parallel.expert_parallel (3)"),
    ({P: {"pipeline_parallel": 8}}, "model.num_hidden_layers (4) must be at least"),
    ({P: {"pipeline_parallel": 2, "virtual_stages": 3}}, "model.num_hidden_layers (4) must be at least"),
    ({P: {"schedule": "dualpipe", "pipeline_parallel": 3}}, "dualpipe needs an even parallel.pipeline_parallel"),
    ({P: {"overlap": True, "pipeline_parallel": 2}}, "parallel.overlap overlaps DualPipe's fused forward-backward"),
    ({P: {"pipeline_parallel": 2, "layers_per_stage": [1, 2]}}, "parallel.layers_per_stage [1, 2] must give each"),
    ({P: {"pipeline_parallel": 2, "schedule": "dualpipev", "layers_per_stage": [1, 3]}},
     "each of the 4 pipeline stages of dualpipev"),
    ({P: {"layers_per_stage": [1, "x"]}}, "parallel.layers_per_stage must be a list of integers or null, got [1, 'x']"),
    ({P: {"layers_per_stage": 3}}, "parallel.layers_per_stage must be a list of integers or null"),
    ({P: {"sequence_parallel": True, "tensor_parallel": 2}, T: {"seq_length": 255}}, "train.seq_length (255)"),
    # ---- data
    ({D: {"max_bytes": 999}}, "data.max_bytes"),
    ({D: {"valid_fraction": 0.5}}, "data.valid_fraction"),
    ({D: {"valid_fraction": -0.01}}, "data.valid_fraction"),
    ({D: {"tokenizer": "byte"}, M: {"vocab_size": 256}}, "model.vocab_size (256) must be at least 260"),
    ({D: {"datasets": [], "tokenizer_file": "tok.json"}}, "data.datasets must list at least one dataset"),
    ({D: {"datasets": [{"path": "a", "wieght": 1}], "tokenizer_file": "tok.json"}},
     "data.datasets[0] has unknown keys ['wieght']; its keys are path, weight."),
    ({D: {"datasets": [{"path": "a"}, {"path": ""}], "tokenizer_file": "tok.json"}},
     "data.datasets[1].path must be the PREFIX of a preprocessed PREFIX.bin/.idx, got ''."),
    ({D: {"datasets": [{"weight": 1}], "tokenizer_file": "tok.json"}}, "data.datasets[0].path must be the PREFIX"),
    ({D: {"datasets": [{"path": "a", "weight": 0}], "tokenizer_file": "tok.json"}},
     "data.datasets[0].weight must be a positive number, got 0."),
    ({D: {"datasets": [{"path": "a", "weight": "heavy"}], "tokenizer_file": "tok.json"}},
     "data.datasets[0].weight must be a positive number, got 'heavy'."),
    ({D: {"datasets": [{"path": "a", "weight": 0.5}]}}, "data.tokenizer_file must name the tokenizer file"),
    ({D: {"tokenizer_file": "tok.json"}}, "data.tokenizer_file is read only with data.datasets"),
]


RULE_CASES = [case if len(case) == 3 else (*case, None) for case in RULE_CASES]


def _case_id(case):
    return ",".join(f"{s}.{k}={v[k]!r}"[:40] for s, v in case[0].items() for k in v)


@pytest.mark.parametrize("raw, expected, multi", RULE_CASES, ids=[_case_id(c) for c in RULE_CASES])
def test_each_rule(raw, expected, multi):
    msg = _error(raw)
    assert expected in msg
    if not multi:
        # exactly one rule is violated: the message is that rule's single sentence
        assert not msg.startswith("Invalid configuration"), msg


def test_n_group_not_dividing_experts_is_one_error():
    """16 experts in 3 groups is reported as 'not divisible', not also as 'fewer than 2 experts per group'.

    Library bug (message only): _model_rules (config.py:325-329) sets per_group = 0 when n_group does not
    divide n_routed_experts and then reports the spurious 'leaves fewer than 2 experts per group'.
    """
    msg = _error({M: {"n_group": 3}})
    assert "divisible by n_group (3)" in msg
    assert "fewer than 2 experts per group" not in msg


def test_every_validated_field_has_a_case():
    """Each field the rules read (per the source of the rule functions) is set in some RULE_CASES entry."""
    import megads.config as config_module

    rules_source = "".join(inspect.getsource(fn) for fn in (
        config_module._model_rules, config_module._train_rules, config_module._parallel_rules,
        config_module._data_rules, config_module.validate))
    exercised = {f"{section}.{key}" for raw, _, _ in RULE_CASES for section, values in raw.items() for key in values}
    for section, cfg in (("model", ModelConfig()), ("train", Config().train), ("parallel", Config().parallel),
                         ("data", Config().data)):
        for f in dataclasses.fields(cfg):
            if re.search(rf"\b{f.name}\b", rules_source):
                assert f"{section}.{f.name}" in exercised, f"no rule case sets {section}.{f.name}"


# ----------------------------------------------------------------------------- valid edge cases


@pytest.mark.parametrize("raw", [
    # group-limited routing with valid sizes
    {M: {"n_group": 4, "topk_group": 2}},
    {M: {"n_group": 8, "topk_group": 2, "num_experts_per_tok": 4}},
    # greedy ignores groups: one expert per group is fine
    {M: {"n_group": 16, "topk_group": 1, "topk_method": "greedy"}},
    # group_limited_greedy scores a group by its max: one expert per group is fine
    {M: {"n_group": 16, "topk_group": 4, "topk_method": "group_limited_greedy", "scoring_func": "softmax"}},
    # a dense-only model needs no experts
    {M: {"n_routed_experts": 0, "first_k_dense_replace": 4, "num_nextn_predict_layers": 0},
     P: {"expert_parallel": 3}},
    # no dense layers: intermediate_size is unused
    {M: {"first_k_dense_replace": 0, "intermediate_size": 0}, P: {"tensor_parallel": 2}},
    {M: {"num_experts_per_tok": 16}},
    {M: {"rope_scaling": YARN}},
    {M: {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                          "truncate": False, "attention_factor": 1.0}}},
    {M: {"q_lora_rank": 32, "qk_nope_head_dim": 0}},
    {P: {"schedule": "dualpipe", "pipeline_parallel": 2}},
    {P: {"schedule": "dualpipev", "pipeline_parallel": 2}},  # 2 devices x 2 stages <= 4 layers
    {P: {"pipeline_parallel": 2, "virtual_stages": 2}},
    {P: {"tensor_parallel": 2, "sequence_parallel": True, "expert_parallel": 4}},
    {T: {"global_batch_size": 32, "micro_batch_size": 4, "min_lr": 0.003, "adam_beta1": 0}},
    {D: {"tokenizer": "byte"}, M: {"vocab_size": 260}},
    {D: {"valid_fraction": 0, "max_bytes": 1000}},
])
def test_valid_edge_cases(raw):
    _assert_values(tiny_config(raw), raw)


# ----------------------------------------------------------------------------- several violations


def test_several_violations_are_all_listed():
    raw = {
        M: {"topk_group": 2, "num_experts_per_tok": 20, "hidden_size": 0},
        T: {"global_batch_size": 10, "micro_batch_size": 4, "lr": -1.0},
        P: {"pipeline_parallel": 8},
        D: {"valid_fraction": 0.9},
    }
    msg = _error(raw)
    assert msg.startswith("Invalid configuration:")
    expected = ["model.hidden_size", "model.num_experts_per_tok (20)", "model.topk_group (2)",
                "train.global_batch_size (10)", "train.lr", "model.num_hidden_layers (4)", "data.valid_fraction"]
    for text in expected:
        assert text in msg
    lines = msg.splitlines()[1:]
    assert len(lines) >= len(expected)
    assert all(line.startswith("  ") for line in lines)


def test_validate_checks_a_mutated_config():
    cfg = Config(model=tiny_model())
    cfg.model.topk_group = 2
    with pytest.raises(ConfigError, match=r"model\.topk_group"):
        validate(cfg)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------- rules with the world size

# (raw config, world size, text the error must contain): each violates exactly one rule, and only
# with that world size (the config alone is valid).
LAYOUT_CASES = [
    ({P: {"tensor_parallel": 2, "pipeline_parallel": 2}}, 6,
     "The world size (6) must be a multiple of parallel.tensor_parallel x parallel.pipeline_parallel (2 x 2)."),
    ({P: {"expert_parallel": 4}, T: {"global_batch_size": 16}}, 2,
     "parallel.expert_parallel (4) must divide the 2 ranks of a pipeline stage (tensor_parallel x data-parallel "
     "size 1 x 2)."),
    ({T: {"global_batch_size": 8, "micro_batch_size": 4}}, 4,
     "train.global_batch_size (8) must be divisible by the data-parallel size (4) x train.micro_batch_size (4)."),
    ({P: {"micro_batches": 2}, T: {"global_batch_size": 8, "micro_batch_size": 2}}, 1,
     "parallel.micro_batches (2) must equal train.global_batch_size / (data-parallel size x "
     "train.micro_batch_size) = 8 / (1 x 2) = 4, or be null."),
    ({P: {"pipeline_parallel": 2, "schedule": "dualpipe"}, T: {"global_batch_size": 8, "micro_batch_size": 4}}, 2,
     "the number of micro-batches per step, train.global_batch_size / (data-parallel size 1 x "
     "train.micro_batch_size), (2) must be at least 2 x parallel.pipeline_parallel (4) and even for dualpipe."),
    ({P: {"pipeline_parallel": 2, "schedule": "interleaved-1f1b", "virtual_stages": 2},
      T: {"global_batch_size": 6, "micro_batch_size": 2}}, 2,
     "the number of micro-batches per step, train.global_batch_size / (data-parallel size 1 x "
     "train.micro_batch_size), (3) must be a multiple of parallel.pipeline_parallel (2) for interleaved-1f1b"),
    ({P: {"tensor_parallel": 2}, T: {"global_batch_size": 6, "micro_batch_size": 3}}, 2,
     "train.micro_batch_size (3) must be divisible by parallel.tensor_parallel (2): MoE layers split whole "
     "sequences across tensor-parallel ranks (or set parallel.sequence_parallel)."),
    ({}, 0, "The world size must be at least 1, got 0."),
]


@pytest.mark.parametrize("raw, world_size, expected", LAYOUT_CASES)
def test_each_layout_rule(raw, world_size, expected):
    cfg = tiny_config(raw)
    _assert_values(cfg, raw)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size)
    assert str(info.value).startswith(expected), str(info.value)  # one rule: its sentence alone


@pytest.mark.parametrize("raw, world_size", [
    ({}, 1),
    ({T: {"micro_batch_size": 1}}, 8),  # DP 8: one micro-batch of 1 sequence each
    ({P: {"tensor_parallel": 2, "sequence_parallel": True}, T: {"micro_batch_size": 1, "global_batch_size": 4}}, 4),
    ({P: {"tensor_parallel": 2, "expert_parallel": 4}, T: {"micro_batch_size": 2, "global_batch_size": 4}}, 4),
    ({P: {"pipeline_parallel": 2, "schedule": "dualpipev", "micro_batches": 4},
      T: {"global_batch_size": 8, "micro_batch_size": 2}}, 2),
    ({M: {"n_routed_experts": 0, "first_k_dense_replace": 4, "num_nextn_predict_layers": 0},
      P: {"tensor_parallel": 2}, T: {"micro_batch_size": 1}}, 2),  # no MoE: micro-batches need not split
])
def test_valid_layouts(raw, world_size):
    cfg = tiny_config(raw)
    validate(cfg, world_size=world_size)
    dp = data_parallel_size(cfg, world_size)
    assert dp == world_size // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    assert micro_batches_per_step(cfg, dp) * dp * cfg.train.micro_batch_size == cfg.train.global_batch_size


def test_layout_sizes_and_their_errors():
    cfg = tiny_config({P: {"tensor_parallel": 2, "pipeline_parallel": 2},
                       T: {"global_batch_size": 24, "micro_batch_size": 2}})
    assert data_parallel_size(cfg, 4) == 1 and data_parallel_size(cfg, 12) == 3
    assert micro_batches_per_step(cfg, 1) == 12 and micro_batches_per_step(cfg, 3) == 4
    with pytest.raises(ConfigError, match=r"The world size \(6\) must be a multiple"):
        data_parallel_size(cfg, 6)
    with pytest.raises(ConfigError, match=r"divisible by the data-parallel size \(5\)"):
        micro_batches_per_step(cfg, 5)


def test_config_and_layout_violations_are_listed_together():
    cfg = tiny_config({P: {"expert_parallel": 4}, T: {"global_batch_size": 16}})
    cfg.train.adam_eps = 0.0
    cfg.parallel.micro_batches = 3
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=2)
    lines = str(info.value).splitlines()
    assert lines[0] == "Invalid configuration:"
    assert [line.strip().split(" ")[0] for line in lines[1:]] == [
        "train.adam_eps", "parallel.expert_parallel", "parallel.micro_batches"]
    validate(tiny_config({P: {"expert_parallel": 4}}))  # without the world size: no layout rules


# ----------------------------------------------------------------------------- known gaps (library bugs)


@pytest.mark.parametrize("changes, field", [
    ({"factor": True}, "model.rope_scaling.factor"),
    ({"original_max_position_embeddings": True}, "model.rope_scaling.original_max_position_embeddings"),
    ({"beta_fast": "fast"}, "model.rope_scaling.beta_fast"),
    ({"beta_slow": [1]}, "model.rope_scaling.beta_slow"),
    ({"mscale": "one"}, "model.rope_scaling.mscale"),
    ({"mscale_all_dim": "one"}, "model.rope_scaling.mscale_all_dim"),
])
def test_rope_scaling_value_types(changes, field):
    """Every rope_scaling value is type-checked (bool is not a number; beta/mscale must be numbers).

    Library bug: _model_rules (config.py:342-352) checks only the keys, type, factor and
    original_max_position_embeddings, and lets bools pass isinstance(x, int). A config with
    beta_fast: "fast" validates and then fails inside rope.py with a TypeError.
    """
    assert field in _error({M: {"rope_scaling": yarn(**changes)}})


def test_yarn_factor_value_reaches_model_config():
    cfg = tiny_config({M: {"rope_scaling": YARN}})
    assert math.isclose(cfg.model.rope_scaling["factor"], 40)
    assert yaml.safe_load(dump_config(cfg))["model"]["rope_scaling"] == YARN


def test_seq_length_is_bounded_by_max_position_embeddings():
    """train.seq_length may reach model.max_position_embeddings but not pass it. Under YaRN the bound is
    max_position_embeddings, the extended length (DeepSeek-V3: 163840 = factor 40 x original 4096)."""
    assert tiny_config({T: {"seq_length": 4096}}).train.seq_length == 4096
    with pytest.raises(ConfigError) as info:
        load_config(None, tiny_overrides("train.seq_length=4097"))
    assert str(info.value) == "train.seq_length (4097) must not exceed model.max_position_embeddings (4096)."
    long_context = {M: {"rope_scaling": YARN, "max_position_embeddings": 163840}, T: {"seq_length": 8192}}
    assert tiny_config(long_context).train.seq_length == 8192  # past the original 4096, within the extension
    assert "model.max_position_embeddings (4096)" in _error({M: {"rope_scaling": YARN}, T: {"seq_length": 8192}})


def test_a_model_section_alone_meets_only_the_model_rules():
    """A model meant for fewer positions than the default train.seq_length (256) is a valid model
    (model_config_from_dict, as a Hugging Face import reads it); config_for_model wraps it in a valid
    config, seq_length capped, that survives a round trip through YAML (a checkpoint's config.yaml)."""
    short = model_config_from_dict({**TINY_MODEL, "max_position_embeddings": 64})
    assert short == tiny_model(max_position_embeddings=64)
    with pytest.raises(ConfigError, match=r"model\.hidden_size"):
        model_config_from_dict({**TINY_MODEL, "hidden_size": 0})
    cfg = config_for_model(short)
    assert cfg.model == short and cfg.train.seq_length == 64
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert config_for_model(tiny_model()).train == TrainConfig()


@pytest.mark.parametrize("overrides, field", [
    (["parallel.pipeline_parallel=2", "parallel.schedule=interleaved-1f1b", "parallel.virtual_stages=1"],
     "parallel.virtual_stages"),
    (["parallel.pipeline_parallel=2", "parallel.schedule=interleaved-1f1b", "parallel.virtual_stages=2",
      "parallel.micro_batches=3"], "parallel.micro_batches"),
    (["parallel.pipeline_parallel=2", "parallel.schedule=dualpipe", "parallel.micro_batches=2"],
     "parallel.micro_batches"),
    (["parallel.pipeline_parallel=2", "parallel.schedule=dualpipe", "parallel.micro_batches=5"],
     "parallel.micro_batches"),
    (["parallel.pipeline_parallel=2", "parallel.schedule=dualpipev", "parallel.micro_batches=3"],
     "parallel.micro_batches"),
    (["parallel.pipeline_parallel=3", "parallel.schedule=dualpipev", "model.num_hidden_layers=4"],
     "model.num_hidden_layers"),
])
def test_pipeline_schedule_rules(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, tiny_overrides(*overrides))


@pytest.mark.parametrize("overrides", [
    ["parallel.pipeline_parallel=2", "parallel.schedule=dualpipe", "parallel.micro_batches=4"],
    ["parallel.pipeline_parallel=2", "parallel.schedule=dualpipev", "parallel.micro_batches=5"],
    ["parallel.pipeline_parallel=2", "parallel.schedule=interleaved-1f1b", "parallel.virtual_stages=2",
     "parallel.micro_batches=4"],
])
def test_pipeline_schedule_rules_accept_valid(overrides):
    cfg = load_config(None, tiny_overrides(*overrides))
    assert cfg.model == tiny_model()
    for item in overrides:
        key, value = item.split("=")
        assert getattr(cfg.parallel, key.removeprefix("parallel.")) == yaml.safe_load(value), key

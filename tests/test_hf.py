"""Tests for megads.hf: Hugging Face DeepSeek-V3 import/export.

Parity is checked against transformers' own DeepseekV3ForCausalLM (fp32, same weights), so these
tests pin down both the math (rope layout, YaRN, routing) and the on-disk names.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from megads.config import ConfigError, ModelConfig, model_config_from_dict  # noqa: E402
from megads.hf import (  # noqa: E402
    export_hf,
    hf_config_from_model_config,
    import_hf,
    load_hf,
    megads_tensors_to_hf,
    megads_to_hf_name,
    model_config_from_hf,
    save_hf,
)
from megads.model.model import build_model  # noqa: E402
from megads.shards import (  # noqa: E402
    CheckpointFormatError,
    NonFiniteTensorError,
    ShardedReader,
    ShardedWriter,
    count_non_finite,
)
from megads.train.checkpoint import read_checkpoint_config, resolve_checkpoint  # noqa: E402
from megads.train.manifest import verify_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 97, 16
# factor x original_max_position_embeddings = max_position_embeddings, else transformers warns.
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
MAX_REL_ERR = 1e-5



def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=48,
                  num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=12,
                  n_group=1, topk_group=1, routed_scaling_factor=2.5, max_position_embeddings=32,
                  num_nextn_predict_layers=0,
                  initializer_range=0.1)  # wide enough that router scores and logits are far from uniform
    fields.update(overrides)
    return model_config_from_dict(fields)


def randomize_norms_and_biases(named_parameters, moe_gates, seed: int) -> None:
    """Norm weights in [0.5, 1.5) and N(0, 0.3) router biases: with the defaults (ones, zeros) a
    mix-up of two norms or a dropped bias would not change the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in named_parameters:
            if param.dim() == 1:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        for gate in moe_gates:
            bias = gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.3)


def megads_model(cfg: ModelConfig, seed: int = 1):
    model = build_model(cfg, seed)
    randomize_norms_and_biases(model.named_parameters(), [moe.gate for moe in model.moe_layers()], seed)
    return model.eval()


def hf_model(cfg: ModelConfig, seed: int = 2) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(hf_config_from_model_config(cfg)))
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    randomize_norms_and_biases(model.named_parameters(), gates, seed)
    return model.eval()


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def quiet(_line: str) -> None:
    pass


# ----------------------------------------------------------------------------- parity

PARITY_CONFIGS = {
    "plain": dict(),
    "qlora-yarn-4groups-0dense": dict(q_lora_rank=16, rope_scaling=YARN, n_group=4, topk_group=2,
                                      first_k_dense_replace=0),
    "qlora-yarn-mscale0.7-halves-3dense": dict(q_lora_rank=16, rope_scaling={**YARN, "mscale_all_dim": 0.7},
                                               rope_interleave=False, n_group=2, topk_group=1,
                                               first_k_dense_replace=3, num_hidden_layers=4),
    "halves-4groups": dict(rope_interleave=False, n_group=4, topk_group=3),
    "yarn-halves": dict(rope_scaling=YARN, rope_interleave=False),
}


@pytest.mark.parametrize("overrides", PARITY_CONFIGS.values(), ids=PARITY_CONFIGS.keys())
def test_logits_match_transformers(overrides):
    cfg = tiny_cfg(**overrides)
    model = megads_model(cfg)
    reference = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(hf_config_from_model_config(cfg))).eval()
    # In memory, transformers keeps experts packed under the names megads' stacks map to.
    reference.load_state_dict({megads_to_hf_name(n, cfg): t for n, t in model.state_dict().items()}, strict=True)

    ids = token_ids()
    ours = logits_of(model, ids)
    assert ours.shape == (2, SEQ, VOCAB)
    assert max_rel_err(ours, logits_of(reference, ids)) <= MAX_REL_ERR

    # The router biases are large enough to change which experts are chosen.
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.zero_()
    assert max_rel_err(logits_of(model, ids), ours) > 1e-3


# ----------------------------------------------------------------------------- round trips


def test_save_hf_loads_in_transformers(tmp_path, monkeypatch):
    cfg = tiny_cfg(q_lora_rank=16, rope_scaling=YARN, n_group=2, topk_group=1, num_nextn_predict_layers=1)
    model = megads_model(cfg)
    lines = []
    monkeypatch.setattr("megads.hf.io.PROGRESS_EVERY_S", 0.0)  # a progress line for every tensor
    save_hf(model, tmp_path / "hf", log=lines.append)
    assert sum("so far" in line for line in lines) > 100
    assert "done" in lines[-1] and "tensors" in lines[-1]

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.7.up_proj.weight"):
        assert f"{mtp}.{name}" in index
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in index

    reference, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # transformers only skips layer 61 (full-size DeepSeek-V3's MTP layer) silently; others are reported.
    assert all(key.startswith(mtp + ".") for key in info["unexpected_keys"])
    ids = token_ids()
    assert max_rel_err(logits_of(model, ids), logits_of(reference, ids)) <= MAX_REL_ERR


@pytest.fixture(scope="module")
def transformers_dir(tmp_path_factory):
    """A directory written by transformers' save_pretrained (no MTP weights, config wants 1 depth)."""
    cfg = tiny_cfg(q_lora_rank=16, rope_scaling={**YARN, "mscale_all_dim": 0.7}, n_group=4, topk_group=2,
                   num_nextn_predict_layers=1)
    reference = hf_model(cfg)
    path = tmp_path_factory.mktemp("transformers") / "hf"
    reference.save_pretrained(path)
    ids = token_ids(1)
    return path, cfg, ids, logits_of(reference, ids)


def test_transformers_save_pretrained_loads_in_megads(transformers_dir):
    path, cfg, ids, expected = transformers_dir
    lines = []
    model = load_hf(path, seed=5, log=lines.append)
    assert model.cfg == cfg
    assert max_rel_err(logits_of(model, ids), expected) <= MAX_REL_ERR
    assert any("start freshly initialised" in line for line in lines)
    # The missing MTP depth gets megads' normal initialisation, exactly as build_model would.
    assert_same_state(model.mtp.state_dict(), build_model(cfg, seed=5).mtp.state_dict())


def test_import_then_export_round_trip(transformers_dir, tmp_path):
    path, cfg, ids, expected = transformers_dir
    run = tmp_path / "run"
    ckpt = import_hf(path, run / "checkpoints" / "step_7", max_shard_bytes=8_000, log=quiet)
    verify_manifest(ckpt)
    saved = read_checkpoint_config(ckpt)
    assert saved.model == cfg
    assert saved.train.seq_length == cfg.max_position_embeddings == 32  # capped to fit: config.yaml loads
    assert len(list((ckpt / "model").glob("*.safetensors"))) > 2
    assert resolve_checkpoint(run) == ckpt

    export_hf(run, tmp_path / "hf", log=quiet)  # a run directory resolves to its latest checkpoint
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert max_rel_err(logits_of(reference, ids), expected) <= MAX_REL_ERR


@pytest.mark.parametrize("depths", [1, 2])
def test_mtp_weights_survive_megads_hf_megads(tmp_path, depths):
    cfg = tiny_cfg(num_nextn_predict_layers=depths, q_lora_rank=16)
    model = megads_model(cfg)
    save_hf(model, tmp_path / "hf", log=quiet)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    for depth in range(depths):
        layer = f"model.layers.{cfg.num_hidden_layers + depth}"
        for name in ("enorm.weight", "shared_head.head.weight", "embed_tokens.weight"):
            assert f"{layer}.{name}" in index

    lines = []
    assert_same_state(load_hf(tmp_path / "hf", log=lines.append).state_dict(), model.state_dict())
    assert not any("freshly" in line or "warning" in line for line in lines)

    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt", log=quiet)
    reader = ShardedReader(ckpt / "model")
    assert_same_state({name: reader.get(name) for name in reader.keys()}, model.state_dict())


def test_mtp_matches_transformers_mtp_layer(tmp_path):
    """megads' MTP module computes what transformers' MtpLayer does with the exported weights."""
    from transformers.modeling_layers import MtpModel

    cfg = tiny_cfg(num_nextn_predict_layers=1, first_k_dense_replace=0)
    model = megads_model(cfg)
    save_hf(model, tmp_path / "hf", log=quiet)
    main = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    mtp = MtpModel(main, 1).eval()
    # transformers' MtpModel renames DeepSeek's layer-L weights like this (see its conversion mapping).
    renamed = {}
    for name, tensor in model.mtp.state_dict().items():
        depth, rest = name.split(".", 1)
        rest = "mtp_block." + rest.removeprefix("block.") if rest.startswith("block.") else rest
        renamed[f"layers.{depth}.{rest.replace('shared_head.norm.', 'post_norm.')}"] = tensor
    missing, unexpected = mtp.load_state_dict(renamed, strict=False)
    assert not unexpected and set(missing) == {"embed_tokens.weight", "shared_head.weight"}  # tied to `main`

    ids, next_ids = token_ids(2), token_ids(3)
    with torch.no_grad():
        cos, sin = model.positions(ids.shape[1], ids.device)
        hidden = model.forward_stage(ids)
        ours = model.mtp[0].shared_head.norm(model.mtp[0](hidden, model.embed_tokens(next_ids), cos, sin))
        positions = torch.arange(SEQ).expand(ids.shape[0], -1)
        theirs = mtp.forward_layer(0, hidden, positions, None, input_ids=next_ids)
    assert max_rel_err(ours, theirs) <= MAX_REL_ERR


def test_packed_expert_names_are_accepted(tmp_path):
    """A checkpoint saved from transformers' in-memory state (3-D packed experts) imports too."""
    from safetensors.torch import save_file

    cfg = tiny_cfg()
    reference = hf_model(cfg)
    (tmp_path / "hf").mkdir()
    packed = {name: tensor.contiguous() for name, tensor in reference.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in packed
    save_file(packed, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config_from_model_config(cfg)))
    ids = token_ids()
    assert max_rel_err(logits_of(load_hf(tmp_path / "hf", log=quiet), ids), logits_of(reference, ids)) <= MAX_REL_ERR


def test_differing_mtp_copy_of_embedding_is_warned_about(tmp_path):
    cfg = tiny_cfg(num_nextn_predict_layers=1)
    model = megads_model(cfg)
    state = model.state_dict()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config_from_model_config(cfg)))
    copy_name = f"model.layers.{cfg.num_hidden_layers}.embed_tokens.weight"
    with ShardedWriter(tmp_path / "hf") as writer:
        for name, tensor in megads_tensors_to_hf(state.__getitem__, state, cfg):
            writer.add(name, tensor + 1 if name == copy_name else tensor)
    lines = []
    assert_same_state(load_hf(tmp_path / "hf", log=lines.append).state_dict(), state)
    assert any(line.startswith("warning") and copy_name in line for line in lines)


def test_small_shards_write_an_index_and_read_back(tmp_path):
    cfg = tiny_cfg(num_nextn_predict_layers=1)
    model = megads_model(cfg)
    lines = []
    save_hf(model, tmp_path / "hf", max_shard_bytes=16_000, log=lines.append)
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(shards) >= 4
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert_same_state(load_hf(tmp_path / "hf", log=quiet).state_dict(), model.state_dict())
    ids = token_ids()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert max_rel_err(logits_of(model, ids), logits_of(reference, ids)) <= MAX_REL_ERR


def test_bf16_export_keeps_router_in_fp32(tmp_path):
    cfg = tiny_cfg()
    save_hf(megads_model(cfg), tmp_path / "hf", dtype=torch.bfloat16, log=quiet)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    reader = ShardedReader(tmp_path / "hf")
    assert reader.get("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.bfloat16
    assert reader.get("model.layers.1.mlp.gate.weight").dtype == torch.float32
    assert reader.get("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    model = load_hf(tmp_path / "hf", dtype=torch.bfloat16, log=quiet)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers["1"].mlp.gate.weight.dtype == torch.float32


# ----------------------------------------------------------------------------- config.json

# A scaled-down DeepSeek-V3 config.json in the original format (as released with the weights).
ORIGINAL_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "kv_lora_rank": 16,
    "max_position_embeddings": 64,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 12,
    "moe_layer_freq": 1,
    "n_group": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 16, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 8,
    "vocab_size": VOCAB,
}


def test_original_config_imports():
    lines = []
    cfg = model_config_from_hf(ORIGINAL_CONFIG, log=lines.append)
    assert cfg == ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=48,
        num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=12, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
        hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 16},
        rope_interleave=True, num_nextn_predict_layers=1, initializer_range=0.02, tie_word_embeddings=False,
        aux_loss_alpha=0.001, bias_update_speed=0.001, mtp_loss_weight=0.3)
    # Exactly the values config.json lacks are logged, each on one line that names it.
    assert sorted(line.split(" = ")[0].removeprefix("hf config: ") for line in lines) == [
        "bias_update_speed", "mtp_loss_weight", "rope_interleave"]


def test_exported_config_loads_in_transformers_and_imports_back(tmp_path):
    cfg = tiny_cfg(q_lora_rank=16, rope_scaling={**YARN, "mscale_all_dim": 0.7}, rope_interleave=False,
                   num_nextn_predict_layers=2, n_group=4, topk_group=2)
    exported = hf_config_from_model_config(cfg)
    DeepseekV3Config.from_dict(exported).save_pretrained(tmp_path)  # transformers' own rewrite of it
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.num_key_value_heads == cfg.num_attention_heads and loaded.num_mtp_layers == 2
    assert loaded.scoring_func == "sigmoid" and loaded.topk_method == "noaux_tc"  # extra keys survive @strict
    assert loaded.rope_parameters["rope_type"] == "yarn"

    rewritten = json.loads((tmp_path / "config.json").read_text())
    assert model_config_from_hf(rewritten, log=quiet) == cfg
    assert model_config_from_hf(exported, log=quiet) == cfg


@pytest.mark.parametrize("key, value", [
    ("moe_layer_freq", 2),
    ("attention_bias", True),
    ("tie_word_embeddings", True),
    ("hidden_act", "gelu"),
    ("num_key_value_heads", 2),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_scaling", {**ORIGINAL_CONFIG["rope_scaling"], "low_freq_factor": 1.0}),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}),  # not DeepSeek's
    ("seq_aux", False),
    ("attention_dropout", 0.1),
    ("model_type", "llama"),
    ("sliding_window", 4096),  # unknown to megads
])
def test_unsupported_config_is_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        model_config_from_hf({**ORIGINAL_CONFIG, key: value}, log=quiet)


def test_transformers_rope_parameters_are_checked():
    hf = hf_config_from_model_config(tiny_cfg())
    with pytest.raises(ConfigError, match="rope_parameters.rope_type"):
        model_config_from_hf({**hf, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
                             log=quiet)


def test_missing_required_key_and_invalid_value_are_errors():
    with pytest.raises(ConfigError, match="'kv_lora_rank'"):
        model_config_from_hf({k: v for k, v in ORIGINAL_CONFIG.items() if k != "kv_lora_rank"}, log=quiet)
    with pytest.raises(ConfigError, match="model.topk_group"):  # megads' own validation sentence
        model_config_from_hf({**ORIGINAL_CONFIG, "topk_group": 5}, log=quiet)


def test_export_refuses_routing_transformers_cannot_compute():
    with pytest.raises(ConfigError, match="scoring_func"):
        hf_config_from_model_config(tiny_cfg(scoring_func="softmax", topk_method="greedy"))


# ----------------------------------------------------------------------------- broken inputs, atomicity


@pytest.fixture
def sharded_hf_dir(tmp_path):
    save_hf(megads_model(tiny_cfg()), tmp_path / "hf", max_shard_bytes=16_000, log=quiet)
    return tmp_path / "hf"


def test_truncated_shard_is_named(sharded_hf_dir):
    shard = sorted(sharded_hf_dir.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match=shard.name):
        load_hf(sharded_hf_dir, log=quiet)


def test_corrupt_shard_header_is_named(sharded_hf_dir):
    shard = sorted(sharded_hf_dir.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=shard.name):
        load_hf(sharded_hf_dir, log=quiet)


def test_truncated_checkpoint_file_is_named(sharded_hf_dir, tmp_path):
    ckpt = import_hf(sharded_hf_dir, tmp_path / "ckpt", max_shard_bytes=16_000, log=quiet)
    shard = sorted((ckpt / "model").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointFormatError, match=shard.name):
        export_hf(ckpt, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_writes_are_atomic_and_never_overwrite(sharded_hf_dir, tmp_path, monkeypatch):
    with pytest.raises(FileExistsError):
        save_hf(megads_model(tiny_cfg()), sharded_hf_dir, log=quiet)

    def failing_stream(getter, names, cfg, dtype=None):
        yield "model.embed_tokens.weight", getter("embed_tokens.weight")
        raise OSError("disk full")

    monkeypatch.setattr("megads.hf.io.megads_tensors_to_hf", failing_stream)
    with pytest.raises(OSError, match="disk full"):
        save_hf(megads_model(tiny_cfg()), tmp_path / "new", log=quiet)
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]  # no temporary left behind


# Damaged JSON files of a weights directory: each is one sentence naming the file.
DAMAGED_JSON = {
    "random bytes": (b"\xff" + bytes(range(256)) * 3, "is not UTF-8 text: byte 0xff at offset 0"),
    "not JSON": (b'{"vocab_size": ', "is not valid JSON"),
    "a list": (b"[1, 2]", "must hold a JSON object, got list"),
    "a string": (b'"deepseek_v3"', "must hold a JSON object, got str"),
    "a number": (b"NaN", "must hold a JSON object, got float"),
}


@pytest.mark.parametrize("content, expected", DAMAGED_JSON.values(), ids=DAMAGED_JSON.keys())
def test_damaged_hf_config_is_one_sentence_naming_it(sharded_hf_dir, tmp_path, content, expected, capsys):
    from megads.cli import main

    config = sharded_hf_dir / "config.json"
    config.write_bytes(content)
    with pytest.raises(CheckpointFormatError) as info:
        load_hf(sharded_hf_dir, log=quiet)
    assert str(config) in str(info.value) and expected in str(info.value), str(info.value)
    assert main(["import-hf", str(sharded_hf_dir), str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(config) in err and expected in err, err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("content, expected", [
    (b"\x80" * 64, "is not UTF-8 text"),
    (b"[]", "must hold a JSON object, got list"),
    (b'{"weight_map": ["model-00001-of-00002.safetensors"]}', "is not a valid safetensors index"),
])
def test_damaged_index_and_manifest_are_named(sharded_hf_dir, tmp_path, content, expected):
    ckpt = import_hf(sharded_hf_dir, tmp_path / "ckpt", max_shard_bytes=16_000, log=quiet)
    index = sharded_hf_dir / "model.safetensors.index.json"
    index.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=re.escape(str(index))):
        load_hf(sharded_hf_dir, log=quiet)
    manifest = ckpt / "COMPLETE"
    manifest.write_bytes(content.replace(b"weight_map", b"files"))
    with pytest.raises(CheckpointFormatError, match=re.escape(str(manifest))):
        export_hf(ckpt, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("dtype, bad_value", [
    (torch.float32, float("nan")), (torch.float32, float("-inf")), (torch.bfloat16, float("inf")),
    (torch.float16, float("nan")), (torch.float8_e4m3fn, float("nan")), (torch.float8_e5m2, float("-inf")),
])
def test_sharded_writer_refuses_non_finite_tensors(tmp_path, dtype, bad_value):
    tensor = torch.randn(4, 8).to(dtype)
    flat = tensor.view(-1)
    flat[3] = bad_value
    flat[17] = bad_value
    with ShardedWriter(tmp_path / "out") as writer:
        writer.add("fine.weight", torch.randn(2, 2).to(dtype))
        writer.add("steps", torch.tensor([3, -1]))  # integers have no NaN: not checked
        with pytest.raises(NonFiniteTensorError) as info:
            writer.add("layers.0.broken.weight", tensor)
    assert str(info.value) == (f"Tensor 'layers.0.broken.weight' has 2 non-finite value(s) (NaN or inf) of 32; "
                               f"refusing to write it to {tmp_path / 'out'}.")
    assert sorted(ShardedReader(tmp_path / "out").keys()) == ["fine.weight", "steps"]  # the refused one is not there


def test_count_non_finite_counts_only_float_nan_and_inf():
    assert count_non_finite(torch.zeros(0)) == count_non_finite(torch.arange(10)) == 0
    values = torch.tensor([1.0, float("nan"), -float("inf"), 3e38, float("inf"), -0.0])
    assert count_non_finite(values) == count_non_finite(values.double()) == 3
    assert count_non_finite(values.t().contiguous()[1:]) == 3


def assert_save_hf_refuses_nan(cfg: ModelConfig, tmp_path: Path, **save_options) -> None:
    """5 NaN values in one weight: save_hf refuses, naming the tensor, its own count and the target,
    and leaves neither the target nor its temporary."""
    model = megads_model(cfg)
    weight = model.layers["1"].self_attn.o_proj.weight
    with torch.no_grad():
        weight[0, :5] = float("nan")
    with pytest.raises(NonFiniteTensorError) as info:
        save_hf(model, tmp_path / "hf", log=quiet, **save_options)
    assert str(info.value) == (f"Tensor 'model.layers.1.self_attn.o_proj.weight' has 5 non-finite value(s) (NaN or "
                               f"inf) of {weight.numel()}; refusing to write it to {tmp_path / 'hf'}.")
    assert list(tmp_path.iterdir()) == []


def test_save_hf_refuses_a_nan_weight_naming_the_target(tmp_path):
    assert_save_hf_refuses_nan(tiny_cfg(), tmp_path)


def _overwrite_tensor_bytes(shard: Path, name: str, count: int, byte: int = 0xFF) -> None:
    """Overwrite the first `count` data bytes of tensor `name` in a safetensors file, its header intact
    (8 bytes little-endian header length N, N bytes of JSON header, then the data)."""
    data = bytearray(shard.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8:8 + header_length])[name]["data_offsets"]
    start = 8 + header_length + begin
    data[start:start + count] = bytes([byte]) * count
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("pattern", [".mlp.experts.", ".self_attn.kv_a_proj_with_mqa."])
def test_import_of_a_shard_with_overwritten_data_names_the_tensor_and_shard(tmp_path, capsys, pattern):
    """A shard whose data bytes were overwritten (0xFF: NaN in FP32) imports as NaN weights unless refused;
    megads import-hf exits 1 with one line naming the Hugging Face tensor and its shard file, and leaves
    nothing at the target. A routed expert's tensor is read into a stack of all experts: still named."""
    from megads.cli import main

    src, dst = tmp_path / "hf", tmp_path / "ckpt"
    save_hf(megads_model(tiny_cfg()), src, max_shard_bytes=16_000, log=quiet)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in sorted(weight_map) if pattern in n)
    shard = src / weight_map[name]
    _overwrite_tensor_bytes(shard, name, 4 * 3)  # three FP32 values
    assert main(["import-hf", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err == f"megads import-hf: Tensor {name!r} in {shard} has 3 non-finite value(s) (NaN or inf) of " \
                  f"{ShardedReader(src).get(name).numel()}; refusing to write it to {dst}.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no checkpoint, no temporary


# ----------------------------------------------------------------------------- streaming memory

# Runs in a fresh interpreter so that nothing else (the test process's models, transformers) is in
# memory. It measures the process's anonymous resident memory (Linux RssAnon: heap and private
# mappings, where tensors live; not the page cache of the mmapped safetensors files) from a
# sampling thread, relative to just before each conversion. MALLOC_MMAP_THRESHOLD_ makes glibc
# give every tensor-sized allocation its own mapping, returned to the kernel on free, so RssAnon
# tracks the tensors actually alive instead of the allocator's high-water mark.
MEMORY_PROBE = textwrap.dedent("""
    import gc, json, sys, threading, time
    from pathlib import Path
    from megads.config import Config, dump_config
    from megads.hf import export_hf, import_hf, megads_state_shapes
    from megads.model.model import build_model
    from megads.shards import ShardedReader
    from megads.train.checkpoint import finalize_directory, write_model_weights
    from tiny_model import tiny_config

    def rss_anon():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

    class Peak(threading.Thread):
        def __enter__(self):
            self.base, self.peak, self.running = rss_anon(), 0, True
            self.start()
            return self
        def run(self):
            while self.running:
                self.peak = max(self.peak, rss_anon())
                time.sleep(0.0005)
        def __exit__(self, *exc):
            self.running = False
            self.join()
            self.growth = max(self.peak, rss_anon()) - self.base

    root, shard, fp8 = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["fp8"]
    cfg = tiny_config({"model": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=8, first_k_dense_replace=0, num_attention_heads=4,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32,
        num_experts_per_tok=4, moe_intermediate_size=128, num_nextn_predict_layers=1)}).model
    model = build_model(cfg, 0)
    state = model.state_dict()
    sizes = [t.numel() * t.element_size() for t in state.values()]
    tmp = root / ".ckpt.tmp"
    tmp.mkdir(parents=True)
    (tmp / "config.yaml").write_text(dump_config(Config(model=cfg)))
    write_model_weights(tmp, state.items(), shard)
    finalize_directory(tmp, root / "ckpt", 1)
    del model, state
    gc.collect()
    megads_state_shapes(cfg)  # the first meta-device model imports torch's meta kernels (~70 MB, once)

    with Peak() as export_peak:
        export_hf(root / "ckpt", root / "hf", max_shard_bytes=shard, log=lambda line: None, fp8=fp8)
    gc.collect()
    with Peak() as import_peak:
        import_hf(root / "hf", root / "back", max_shard_bytes=shard, log=lambda line: None)

    before, after = ShardedReader(root / "ckpt" / "model"), ShardedReader(root / "back" / "model")
    assert before.keys() and sorted(before.keys()) == sorted(after.keys())
    assert fp8 or all(before.get(name).equal(after.get(name)) for name in before.keys())  # FP8 is lossy
    print(json.dumps({"total": sum(sizes), "largest": max(sizes), "export": export_peak.growth,
                      "import": import_peak.growth, "shards": len(list((root / "hf").glob("*.safetensors")))}))
""")


def measure_conversion_memory(tmp_path, fp8: bool = False) -> tuple[dict, int]:
    """(MEMORY_PROBE's figures, the bound on each conversion's growth) for an export and an import
    (`fp8`: export-hf --fp8, then import of that FP8 directory)."""
    shard = 8 * 2**20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), str(shard)] + (["fp8"] if fp8 else []),
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    # Alive at once, at most: the shard being filled, safetensors' serialisation buffer of it, the
    # stacked expert tensor being split or assembled and its per-expert pieces, plus interpreter noise.
    return stats, 2 * shard + 2 * stats["largest"] + 8 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status")
def test_conversions_stream_in_about_one_layer_plus_one_shard(tmp_path):
    stats, bound = measure_conversion_memory(tmp_path)
    assert stats["total"] > 3 * bound, stats  # the model is big enough for the bound to mean something
    assert stats["shards"] > 10, stats
    assert stats["export"] < bound, stats
    assert stats["import"] < bound, stats

"""Tests for DeepSeek-V3's FP8 checkpoint format (megads.hf.fp8): `megads export-hf --fp8` writes it,
`megads import-hf` / load_hf read it.

The FP8 directory under test is a tiny megads model exported with --fp8 (weights with several
128x128 blocks and partial edge blocks, an MTP layer, a dozen shards).
Its import is checked against a twin dequantized here, independently of megads.hf.fp8, and written
as an ordinary Hugging Face directory.
"""

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from megads.cli import main  # noqa: E402
from megads.config import ConfigError  # noqa: E402
from megads.fp8.quantize import quantize_blocks  # noqa: E402
from megads.hf import (  # noqa: E402
    FP8_QUANTIZATION_CONFIG,
    fp8_weights,
    import_hf,
    load_hf,
    model_config_from_hf,
    save_hf,
)
from megads.shards import ShardedReader  # noqa: E402
from test_hf import (  # noqa: E402
    MAX_REL_ERR,
    assert_save_hf_refuses_nan,
    ORIGINAL_CONFIG,
    _overwrite_tensor_bytes,
    assert_same_state,
    logits_of,
    max_rel_err,
    measure_conversion_memory,
    megads_model,
    quiet,
    tiny_cfg,
    token_ids,
)

SHARD_GB = "0.0001"  # about 107 kB: a dozen shards
DEEPSEEK_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128]}


def fp8_test_cfg():
    """Dims above 128 that are not multiples of it: full and partial blocks in most weights."""
    return tiny_cfg(hidden_size=160, intermediate_size=272, q_lora_rank=144, qk_nope_head_dim=32, qk_rope_head_dim=16,
                    v_head_dim=32, num_nextn_predict_layers=1)


def expected_fp8(hf_name: str) -> bool:
    """Which tensors DeepSeek-V3's release stores in FP8, written out independently of megads.hf.fp8:
    the matrices of attention and of the FFNs; not norms, the router, embeddings, heads or eh_proj."""
    return ((".self_attn." in hf_name or ".mlp." in hf_name) and hf_name.endswith(".weight")
            and "layernorm" not in hf_name and not hf_name.endswith(".mlp.gate.weight"))


def read_hf_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors directory, read with safetensors alone."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(directory / shard), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    assert tensors.keys() == index.keys()
    return tensors


def dequantize_independently(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes * scale_inv, the scale repeated over its 128x128 block and cut at the edges."""
    rows, cols = codes.shape
    per_element = scale.repeat_interleave(128, dim=0)[:rows].repeat_interleave(128, dim=1)[:, :cols]
    return codes.float() * per_element


def block_amax(weight: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of each 128x128 block, block by block."""
    rows, cols = weight.shape
    amax = torch.empty(math.ceil(rows / 128), math.ceil(cols / 128))
    for i in range(amax.shape[0]):
        for j in range(amax.shape[1]):
            amax[i, j] = weight[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].abs().max()
    return amax


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def assert_identical_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """(FP8 Hugging Face directory written by `megads export-hf --fp8`, the FP32 checkpoint it came from)."""
    root = tmp_path_factory.mktemp("fp8")
    save_hf(megads_model(fp8_test_cfg()), root / "hf32", log=quiet)
    ckpt = import_hf(root / "hf32", root / "ckpt32", log=quiet)
    assert main(["export-hf", str(ckpt), str(root / "fp8"), "--fp8", "--max-shard-gb", SHARD_GB]) == 0
    return root / "fp8", ckpt


# ----------------------------------------------------------------------------- the format written


def test_fp8_export_is_deepseeks_format(fp8_dir):
    directory, ckpt = fp8_dir
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"] == DEEPSEEK_QUANTIZATION
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"

    tensors = read_hf_dir(directory)
    weights = {name for name in tensors if not name.endswith("_scale_inv")}
    assert {name for name in tensors if name.endswith("_scale_inv")} == {
        f"{name}_scale_inv" for name in weights if expected_fp8(name)}
    for name in weights:
        tensor = tensors[name]
        if expected_fp8(name):
            scale = tensors[f"{name}_scale_inv"]
            assert tensor.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, name
            assert scale.shape == (math.ceil(tensor.shape[0] / 128), math.ceil(tensor.shape[1] / 128)), name
        elif name.endswith((".mlp.gate.weight", ".e_score_correction_bias")):
            assert tensor.dtype == torch.float32, name
        else:
            assert tensor.dtype == torch.bfloat16, name
    for name, dtype in {"model.layers.3.self_attn.o_proj.weight": torch.float8_e4m3fn,  # MTP layer's block
                        "model.layers.3.mlp.experts.7.down_proj.weight": torch.float8_e4m3fn,
                        "model.layers.1.mlp.shared_experts.up_proj.weight": torch.float8_e4m3fn,
                        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": torch.float8_e4m3fn,
                        "model.layers.3.eh_proj.weight": torch.bfloat16,  # BF16 in DeepSeek's release
                        "model.layers.3.shared_head.head.weight": torch.bfloat16,
                        "model.embed_tokens.weight": torch.bfloat16, "lm_head.weight": torch.bfloat16}.items():
        assert tensors[name].dtype == dtype, name

    # DeepSeek's rule, from the checkpoint's FP32 weight: scale = amax / 448 per block (here 2 x 3 blocks,
    # the last row and column partial), codes = the weight / its block's scale, rounded to E4M3.
    master = ShardedReader(ckpt / "model").get("layers.0.mlp.down_proj.weight")
    assert master.shape == (160, 272) and master.dtype == torch.float32
    scale = block_amax(master) / 448  # DeepSeek's rule
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.weight_scale_inv"], scale)
    per_element = scale.repeat_interleave(128, 0)[:160].repeat_interleave(128, 1)[:, :272]
    codes = tensors["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(bits(codes), bits((master / per_element).clamp(-448, 448).to(torch.float8_e4m3fn)))
    assert codes.float().abs().max() == 448.0


# ----------------------------------------------------------------------------- import and round trip


@pytest.mark.parametrize("twin_dtype", [torch.float32, torch.bfloat16])
def test_fp8_import_equals_importing_its_dequantized_twin(fp8_dir, tmp_path, twin_dtype):
    """The twin is what DeepSeek's fp8_cast_bf16.py makes of the FP8 directory (BF16), or the same
    kept in FP32, which is what megads imports: the FP32 twin must import identically, the BF16 one
    to megads' import rounded to BF16."""
    directory, _ = fp8_dir
    tensors = read_hf_dir(directory)
    twin = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = dequantize_independently(tensor, tensors[f"{name}_scale_inv"]).to(twin_dtype)
        twin[name] = tensor
    (tmp_path / "twin").mkdir()
    save_file(twin, str(tmp_path / "twin" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"], config["torch_dtype"]
    (tmp_path / "twin" / "config.json").write_text(json.dumps(config))

    assert main(["import-hf", str(directory), str(tmp_path / "from_fp8")]) == 0
    assert main(["import-hf", str(tmp_path / "twin"), str(tmp_path / "from_twin")]) == 0
    ours, theirs = ShardedReader(tmp_path / "from_fp8" / "model"), ShardedReader(tmp_path / "from_twin" / "model")
    ours = {name: ours.get(name) for name in ours.keys()}
    theirs = {name: theirs.get(name) for name in theirs.keys()}
    assert not any("scale" in name for name in ours)
    assert ours["layers.1.mlp.experts.gate_up_proj"].dtype == torch.float32  # dequantized to FP32
    assert ours["embed_tokens.weight"].dtype == torch.bfloat16  # stored as it came
    if twin_dtype == torch.float32:
        assert_same_state(ours, theirs)
        assert_same_state(load_hf(directory, log=quiet).state_dict(),
                          load_hf(tmp_path / "twin", log=quiet).state_dict())
    else:
        assert_same_state({name: t.to(theirs[name].dtype) for name, t in ours.items()}, theirs)


def test_fp8_reexport_of_the_import_is_byte_identical(fp8_dir, tmp_path):
    """FP8 -> import (FP32) -> export --fp8 gives back the same codes and scales (megads.hf.fp8 says why),
    config.json and, with the same shard size, the same files byte for byte."""
    directory, _ = fp8_dir
    assert main(["import-hf", str(directory), str(tmp_path / "ckpt")]) == 0
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "again"), "--fp8",
                 "--max-shard-gb", SHARD_GB]) == 0
    assert_identical_tensors(read_hf_dir(tmp_path / "again"), read_hf_dir(directory))
    assert (tmp_path / "again" / "config.json").read_bytes() == (directory / "config.json").read_bytes()
    files = sorted(path.name for path in directory.iterdir())
    assert sorted(path.name for path in (tmp_path / "again").iterdir()) == files and len(files) > 10
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (directory / name).read_bytes(), name


def test_transformers_loads_the_plain_export_of_an_fp8_import(fp8_dir, tmp_path):
    """An FP8 checkpoint imported, then exported without --fp8: transformers computes what megads does."""
    directory, _ = fp8_dir
    assert main(["import-hf", str(directory), str(tmp_path / "ckpt")]) == 0
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    # The export is mixed: FP32 dequantized linears, BF16 embeddings and norms, so config.json says
    # bfloat16; FP32 here, because transformers' BF16 grouped experts need 16-byte aligned rows on CPU.
    reference, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    model = load_hf(directory, log=quiet)
    ids = token_ids()
    assert max_rel_err(logits_of(model, ids), logits_of(reference, ids)) <= MAX_REL_ERR
    assert load_hf(directory, dtype=torch.bfloat16, log=quiet).layers["0"].mlp.down_proj.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- why FP32 makes it stable


def test_quantize_dequantize_quantize_is_the_identity():
    generator = torch.Generator().manual_seed(0)
    # 48 stacked 200 x 300 weights (2 x 3 blocks, partial edges) at magnitudes from 1e-9 to 1e9, one all zero,
    # one with a single non-zero value, heavy tails.
    weights = torch.randn(48, 200, 300, generator=generator) * torch.logspace(-9, 9, 48)[:, None, None]
    weights[1] = 0.0
    weights[2] = 0.0
    weights[2, 150, 250] = -3.0
    weights[3] = torch.randn(200, 300, generator=generator) ** 5
    first = quantize_blocks(weights)
    dequantized = first.dequantize()
    assert dequantized.dtype == torch.float32
    second = quantize_blocks(dequantized)
    assert torch.equal(bits(second.data), bits(first.data))
    assert torch.equal(second.scale, first.scale)

    # The step that needs FP32: the dequantized amax fl(448 s) divides back to s, because s = fl(a / 448)
    # for an FP32 a (see megads.hf.fp8). A scale made any other way need not survive: here 1 / fl(448 / a).
    amax = torch.rand(1_000_000, generator=generator) * 2 + 1
    scale = amax / 448
    assert torch.equal((scale * 448) / 448, scale)
    foreign = 1 / (448 / amax)
    assert not torch.equal((foreign * 448) / 448, foreign)
    # ... and BF16 is not enough to hold the dequantized values.
    assert not torch.equal(quantize_blocks(dequantized.bfloat16()).scale, first.scale)


def test_foreign_scales_reexport_with_the_same_codes(tmp_path):
    """An FP8 checkpoint whose scales megads would not have computed (1 / (448 / amax) here), with all
    its scales in a shard of their own, imports; it re-exports with the same codes, and scales moved
    by at most one FP32 ulp."""
    cfg = fp8_test_cfg()
    save_hf(megads_model(cfg), tmp_path / "fp8", fp8=True, log=quiet)
    tensors = read_hf_dir(tmp_path / "fp8")
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        weight = dequantize_independently(tensors[name.removesuffix("_scale_inv")], tensors[name])
        foreign = 1 / (448 / block_amax(weight))
        per_element = foreign.repeat_interleave(128, 0)[:weight.shape[0]].repeat_interleave(128, 1)[:, :weight.shape[1]]
        tensors[name] = foreign
        tensors[name.removesuffix("_scale_inv")] = (weight / per_element).clamp(-448, 448).to(torch.float8_e4m3fn)
    for path in (tmp_path / "fp8").glob("*.safetensors*"):
        path.unlink()
    shards = {"model-00001-of-00002.safetensors": {n: t for n, t in tensors.items() if not n.endswith("_scale_inv")},
              "model-00002-of-00002.safetensors": {n: t for n, t in tensors.items() if n.endswith("_scale_inv")}}
    for shard, part in shards.items():
        save_file(part, str(tmp_path / "fp8" / shard), metadata={"format": "pt"})
    (tmp_path / "fp8" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: shard for shard, part in shards.items() for name in part}}))

    import_hf(tmp_path / "fp8", tmp_path / "ckpt", log=quiet)
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "again"), "--fp8"]) == 0
    again = read_hf_dir(tmp_path / "again")
    moved = 0
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            assert (again[name] - tensor).abs().le(torch.finfo(torch.float32).eps * tensor).all(), name
            moved += int((again[name] != tensor).sum())
        else:
            assert torch.equal(bits(again[name]), bits(tensor)), name
    assert moved > 0  # else this test would not be about foreign scales


# ----------------------------------------------------------------------------- config.json


def test_deepseeks_quantization_config_is_accepted():
    assert fp8_weights({**ORIGINAL_CONFIG, "quantization_config": DEEPSEEK_QUANTIZATION})
    assert FP8_QUANTIZATION_CONFIG == DEEPSEEK_QUANTIZATION
    without_scheme = {k: v for k, v in DEEPSEEK_QUANTIZATION.items() if k != "activation_scheme"}
    assert fp8_weights({**ORIGINAL_CONFIG, "quantization_config": without_scheme})  # transformers' default: dynamic
    assert not fp8_weights(ORIGINAL_CONFIG)
    assert model_config_from_hf({**ORIGINAL_CONFIG, "quantization_config": DEEPSEEK_QUANTIZATION}, log=quiet) == \
        model_config_from_hf(ORIGINAL_CONFIG, log=quiet)


@pytest.mark.parametrize("key, value", [
    ("fmt", "e5m2"), ("weight_block_size", [64, 64]), ("weight_block_size", [128]), ("activation_scheme", "static"),
    ("quant_method", "gptq"), ("modules_to_not_convert", ["lm_head"]),
])
def test_other_quantization_configs_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"quantization_config.{key}")):
        model_config_from_hf({**ORIGINAL_CONFIG, "quantization_config": {**DEEPSEEK_QUANTIZATION, key: value}},
                             log=quiet)
    with pytest.raises(ConfigError, match="lacks 'weight_block_size'"):
        fp8_weights({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}})


# ----------------------------------------------------------------------------- broken FP8 directories

WEIGHT = "model.layers.1.self_attn.o_proj.weight"  # (160, 128): a 2 x 1 block scale
SCALE = f"{WEIGHT}_scale_inv"


def _rewrite(directory: Path, name: str, tensor) -> Path:
    """Replace tensor `name` in its shard (None: remove it, from the index too); returns the shard."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = directory / index["weight_map"][name]
    tensors = load_file(shard)
    if tensor is None:
        del tensors[name], index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    else:
        tensors[name] = tensor
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard


def _broken(directory: Path, case: str) -> str:
    """Damage the copy `directory` of the FP8 directory; returns the sentence import-hf must print."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    weight_shard, scale_shard = directory / index[WEIGHT], directory / index[SCALE]
    if case == "missing scale":
        _rewrite(directory, SCALE, None)
        return f"Tensor {WEIGHT!r} in {weight_shard} is float8_e4m3fn but its scale {SCALE!r} is missing."
    if case == "wrong-shape scale":
        _rewrite(directory, SCALE, torch.ones(2, 2))
        return (f"Scale {SCALE!r} in {scale_shard} has shape (2, 2), expected (2, 1) (one per 128x128 block of "
                f"{WEIGHT!r}, shape (160, 128)).")
    if case == "inf scale":
        _rewrite(directory, SCALE, torch.tensor([[1e-3], [float("inf")]]))
        return f"Scale {SCALE!r} in {scale_shard} has 1 non-finite value(s) (NaN or inf) of 2; refusing to " \
               f"dequantize {WEIGHT!r} with it."
    if case == "NaN codes":
        _overwrite_tensor_bytes(weight_shard, WEIGHT, 3, byte=0x7F)  # E4M3's NaN
        return f"Tensor {WEIGHT!r} in {weight_shard} has 3 non-finite value(s) (NaN or inf) of 20480; refusing " \
               f"to write it to {directory.parent / 'ckpt'}."
    if case == "no quantization_config":
        config = json.loads((directory / "config.json").read_text())
        del config["quantization_config"]
        (directory / "config.json").write_text(json.dumps(config))
        first = sorted(n for n in index if n.endswith("_scale_inv"))[0]
        return f"Tensor {first!r} in {directory / index[first]} is an FP8 block scale, but " \
               f"{directory / 'config.json'} has no quantization_config saying the weights are FP8."
    if case == "scale of a BF16 weight":
        _rewrite(directory, WEIGHT, torch.zeros(160, 128, dtype=torch.bfloat16))
        return f"Tensor {WEIGHT!r} in {weight_shard} is bfloat16 but has a {SCALE!r}; only float8_e4m3fn " \
               f"weights have block scales."
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing scale", "wrong-shape scale", "inf scale", "NaN codes",
                                  "no quantization_config", "scale of a BF16 weight"])
def test_broken_fp8_directory_is_one_sentence_and_leaves_nothing(fp8_dir, tmp_path, capsys, case):
    directory = tmp_path / "hf"
    shutil.copytree(fp8_dir[0], directory)
    expected = _broken(directory, case)
    capsys.readouterr()
    assert main(["import-hf", str(directory), str(tmp_path / "ckpt")]) == 1
    assert capsys.readouterr().err == f"megads import-hf: {expected}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]  # no checkpoint, no temporary


def test_fp8_export_refuses_a_nan_weight_counting_its_values(tmp_path):
    """Quantized, 5 NaN values would be a whole block of NaN codes; the refusal counts the weight's own."""
    assert_save_hf_refuses_nan(fp8_test_cfg(), tmp_path, fp8=True)


# ----------------------------------------------------------------------------- streaming memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status")
def test_fp8_conversions_stream_in_about_one_layer_plus_one_shard(tmp_path):
    """export-hf --fp8 quantizes, and import-hf dequantizes, one tensor at a time: peak growth stays
    about one shard plus one (stacked expert) tensor, as for the BF16/FP32 conversions."""
    stats, bound = measure_conversion_memory(tmp_path, fp8=True)
    assert stats["total"] > 3 * bound and stats["shards"] >= 3, stats
    assert stats["export"] < bound, stats
    assert stats["import"] < bound, stats

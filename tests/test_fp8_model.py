"""convert_to_fp8 on the whole DeepSeek-V3 model: what is converted, that nothing is copied, and
that one FP8 training step matches the FP32 one.

Accuracy uses DeepGEMM's calc_diff, 1 - 2<x,y> / (|x|^2 + |y|^2) (about half the squared relative
error), per parameter gradient. Bounds, measured on this file's tiny model (5 seeds, q_lora_rank
16 and None, emulated backend), with routing pinned to the FP32 model's choices:

    per-parameter gradient calc_diff   max 1.4e-2 (a q_a_layernorm weight), 2-D weights max 8.2e-3,
                                       median over parameters 2.0e-3 .. 2.7e-3
    loss relative difference           <= 3.5e-5 (the loss at initialisation is ~ln(vocab))

One E4M3 GEMM alone gives about 6.6e-4 (tests/test_fp8_linear.py: 4.5% relative error at most 3
significant bits); a parameter's gradient here passes through the forward and backward GEMMs of
several FP8 layers, and those errors add up (calc_diff of independent errors adds). Norm weights
are worst: their gradient is a sum over tokens of terms with random signs that mostly cancel, so the
absolute FP8 error of each term survives while the sum shrinks. The asserted bounds are 2-6x the
measured maxima: per parameter 3e-2 (2-D weights 2e-2), median 5e-3, loss 2e-4. (This file's seed
measures 1.4e-2, 7.5e-3, 2.5e-3 and 5.5e-6.)

Routing is pinned because it is discontinuous: top-k over near-equal affinities of a randomly
initialised router flips for 1-6% of the tokens once hidden states carry FP8 error, which moves
whole tokens between experts and gives the routed experts and routers of later layers calc_diff up
to 5e-2 on this tiny model. That is the expected behaviour of any low-precision forward, not an
FP8 bug, so the unpinned step is checked on its loss only.
"""

import copy
import json

import pytest
import torch
from torch import nn

from megads.config import model_config_from_dict
from megads.fp8 import (
    Fp8Config,
    Fp8LocalGemm,
    Fp8RoutedExperts,
    convert_to_fp8,
    found_nonfinite,
    fp8_stats,
    nonfinite_layers,
)
from megads.model.model import build_model
from megads.model.moe import RoutedExperts, Router
from megads.model.norm import RMSNorm
from parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

BATCH, SEQ = 4, 32


def tiny(**changes):
    model = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=48,
                 num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                 v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                 moe_intermediate_size=16, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                 max_position_embeddings=64, num_nextn_predict_layers=1, initializer_range=0.02,
                 aux_loss_alpha=1e-3)
    model.update(changes)
    return model_config_from_dict(model)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def tokens(cfg, seed=0):
    t = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def step(model, batch):
    """Forward and backward of the training loss; (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model.compute_loss(*batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def record_routing(model):
    """Forward hooks storing each router call's expert choice; returns (choices, handles)."""
    choices = []
    handles = [m.register_forward_hook(lambda mod, inp, out: choices.append(out[0]))
               for m in model.modules() if isinstance(m, Router)]
    return choices, handles


def pin_routing(model, choices):
    """Make the routers of `model` pick `choices` (in call order); gates still come from their own scores."""
    it = iter(choices)

    def hook(router, inp, out):
        idx, scores = next(it), out[2]
        gates = scores.gather(1, idx)
        if router.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, gates * router.routed_scaling_factor, scores

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Router)]


# ---------------------------------------------------------------------------------------------- structure


def test_state_dict_and_parameters_unchanged():
    model = build_model(tiny(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = list(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)      # built before conversion
    convert_to_fp8(model, Fp8Config())

    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # the FP32 master weights are the same tensor objects, so the optimizer still trains the model
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params_before]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # a converted model's checkpoint loads into a plain one and back, strictly
    plain = build_model(tiny(), seed=1)
    plain.load_state_dict(after)
    model.load_state_dict(plain.state_dict())

    loss, _ = step(model, tokens(model.cfg))
    optimizer.step()
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_which_modules_are_converted(q_lora_rank):
    model = build_model(tiny(q_lora_rank=q_lora_rank), seed=0)
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kinds = {n: type(m) for n, m in model.named_modules()}
    convert_to_fp8(model, Fp8Config())
    modules = dict(model.named_modules())

    fp8 = {n for n, m in modules.items() if isinstance(m, Fp8LocalGemm)}
    assert fp8 == set(linears) - {"lm_head"}
    for name in fp8:                                       # the parallel classes are kept (their attributes too)
        assert isinstance(modules[name], linears[name])
    for name in ("self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj"):
        assert f"layers.0.{name}" in fp8 and f"mtp.0.block.{name}" in fp8
    attn_q = ["self_attn.q_proj"] if q_lora_rank is None else ["self_attn.q_a_proj", "self_attn.q_b_proj"]
    expected = {f"{prefix}.{name}" for prefix in ("layers.0", "layers.1", "mtp.0.block") for name in attn_q}
    expected |= {f"layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {f"{prefix}.mlp.shared_experts.{p}" for prefix in ("layers.1", "mtp.0.block")
                 for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {"mtp.0.eh_proj"}
    assert expected <= fp8
    assert isinstance(modules["layers.1.self_attn.o_proj"], RowParallelLinear)

    experts = {n for n, m in modules.items() if isinstance(m, RoutedExperts)}
    assert experts == {"layers.1.mlp.experts", "mtp.0.block.mlp.experts"}
    assert all(isinstance(modules[n], Fp8RoutedExperts) for n in experts)

    # high precision: head, embedding, routers, norms (their classes untouched)
    assert type(model.lm_head) is ColumnParallelLinear and not hasattr(model.lm_head, "fp8_stats")
    assert type(model.embed_tokens) is VocabParallelEmbedding
    for name, m in modules.items():
        if isinstance(m, (Router, RMSNorm, VocabParallelEmbedding)):
            assert type(m) is kinds[name] and not hasattr(m, "fp8_stats")

    summary = model.fp8_summary
    assert summary.num_linears == len(fp8) and summary.num_grouped_experts == 2
    assert summary.kept["lm_head"] == "ColumnParallelLinear" and summary.kept["embed_tokens"] == "VocabParallelEmbedding"
    assert "lm_head" in str(summary)

    # every converted layer runs its GEMMs in FP8 during a step: 3 per linear call
    step(model, tokens(model.cfg))
    for name in fp8:
        assert modules[name].fp8_stats.gemms == 3, name
    stats = fp8_stats(model)
    assert stats["layers"] == len(fp8) + 2 and stats["nonfinite"] == 0


def test_converting_again_updates_the_config():
    model = build_model(tiny(), seed=0)
    convert_to_fp8(model, Fp8Config())
    names = model.fp8_summary.linears
    convert_to_fp8(model, Fp8Config(accumulation="hopper", pow2_scales=True))
    assert model.fp8_summary.linears == names
    assert all(m.config.accumulation == "hopper" for m in model.modules() if hasattr(m, "fp8_stats"))


class _ScaledColumn(ColumnParallelLinear):
    """A parallel linear layer with a forward of its own: convert_to_fp8 cannot know its collectives."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_with_its_own_forward_raises_and_changes_nothing():
    # (Tensor-parallel sharded layers are converted: tests/test_fp8_tensor_parallel.py.)
    model = build_model(tiny(), seed=0)
    model.layers["1"].self_attn.kv_b_proj.__class__ = _ScaledColumn
    with pytest.raises(NotImplementedError, match="layers.1.self_attn.kv_b_proj is a _ScaledColumn with its own"):
        convert_to_fp8(model, Fp8Config())
    assert not any(hasattr(m, "fp8_stats") for m in model.modules())
    assert not hasattr(model, "fp8_summary")


def test_skip_and_filter():
    model = build_model(tiny(), seed=0)
    convert_to_fp8(model, Fp8Config(), skip=("lm_head", "mtp"), experts=False,
                   module_filter=lambda name, m: not name.endswith("o_proj"))
    fp8 = {n for n, m in model.named_modules() if hasattr(m, "fp8_stats")}
    assert fp8 and not any(n.startswith("mtp.") or n.endswith("o_proj") or n.endswith("experts") for n in fp8)
    assert "layers.0.self_attn.kv_b_proj" in fp8


# ---------------------------------------------------------------------------------------------- accuracy


def test_fp8_step_matches_fp32_step():
    cfg = tiny()
    ref = build_model(cfg, seed=0)
    fp8 = convert_to_fp8(copy.deepcopy(ref), Fp8Config(backend="emulated", accumulation="fp32"))
    batch = tokens(cfg)

    choices, handles = record_routing(ref)
    loss_ref, grads_ref = step(ref, batch)
    for h in handles:
        h.remove()
    pins = pin_routing(fp8, choices)
    loss_fp8, grads_fp8 = step(fp8, batch)
    for h in pins:
        h.remove()

    assert grads_fp8.keys() == grads_ref.keys() and len(grads_ref) == len(list(ref.parameters()))
    diffs = {n: calc_diff(grads_fp8[n], grads_ref[n]) for n in grads_ref}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 3e-2, (worst, diffs[worst])
    assert all(d <= 2e-2 for n, d in diffs.items() if grads_ref[n].dim() >= 2), diffs
    assert sorted(diffs.values())[len(diffs) // 2] <= 5e-3
    assert min(diffs.values()) > 1e-7                      # the FP8 path really quantized
    assert abs(loss_fp8 - loss_ref) / loss_ref <= 2e-4
    assert fp8_stats(fp8)["nonfinite"] == 0 and not found_nonfinite(fp8)

    # unpinned, routing may flip for a few tokens: the loss still agrees
    loss_free, _ = step(fp8, batch)
    assert abs(loss_free - loss_ref) / loss_ref <= 2e-4


def test_hopper_accumulation_close_to_fp32_accumulation():
    """With promotion every 128 elements the tensor-core chain model adds ~2^-13 relative error per
    GEMM (calc_diff ~1e-9 for one layer), but that is enough to move a few values downstream across
    an E4M3 rounding boundary (a 1/16..1/8 jump each), so whole-model gradients differ by calc_diff
    ~2e-4 median, up to 2e-3 (3 seeds): still well below the FP8-vs-FP32 error above. Bound 5e-3."""
    cfg = tiny()
    a = convert_to_fp8(build_model(cfg, seed=0), Fp8Config(accumulation="fp32"))
    b = convert_to_fp8(build_model(cfg, seed=0), Fp8Config(accumulation="hopper"))
    batch = tokens(cfg, seed=1)
    choices, handles = record_routing(a)
    loss_a, grads_a = step(a, batch)
    for h in handles:
        h.remove()
    pin_routing(b, choices)
    loss_b, grads_b = step(b, batch)
    assert abs(loss_a - loss_b) / loss_a <= 1e-4
    assert max(calc_diff(grads_b[n], grads_a[n]) for n in grads_a) <= 5e-3


def test_bf16_autocast_step_is_finite():
    model = convert_to_fp8(build_model(tiny(), seed=0), Fp8Config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.compute_loss(*tokens(model.cfg))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- stats


def test_nan_weight_and_nan_input_are_detected():
    model = convert_to_fp8(build_model(tiny(), seed=0), Fp8Config())
    batch = tokens(model.cfg)
    step(model, batch)
    assert not found_nonfinite(model)
    clean = fp8_stats(model, reset=True)
    assert clean["nonfinite"] == 0 and clean["nonfinite_layers"] == 0 and clean["gemms"] > 0
    assert fp8_stats(model)["gemms"] == 0                    # reset

    o_proj = model.layers["1"].self_attn.o_proj
    with torch.no_grad():
        saved = o_proj.weight[0, 0].item()
        o_proj.weight[0, 0] = float("nan")
    step(model, batch)
    assert found_nonfinite(model)
    assert "layers.1.self_attn.o_proj" in nonfinite_layers(model)
    stats = fp8_stats(model, reset=True)
    assert stats["nonfinite"] > 0 and stats["nonfinite_layers"] >= 1
    json.dumps(stats)                                       # ready for metrics.jsonl
    with torch.no_grad():
        o_proj.weight[0, 0] = saved
    step(model, batch)
    assert not found_nonfinite(model)
    fp8_stats(model, reset=True)

    # a NaN activation entering from the (high-precision) embedding reaches the first FP8 layer
    token = int(batch[0][0, 0])
    with torch.no_grad():
        model.embed_tokens.weight[token, 0] = float("nan")
    step(model, batch)
    assert found_nonfinite(model)
    assert "layers.0.self_attn.kv_a_proj_with_mqa" in nonfinite_layers(model)

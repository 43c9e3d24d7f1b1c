"""Activation recomputation (`train.recompute`, megads.model.recompute): selective and full give the
losses, gradients, expert loads and balance losses of none, keep fewer activation bytes (selective
fewer than none, full fewer than selective), and do so under bf16 autocast, FP8, the trainer, tensor
+ sequence parallelism, and pipeline schedules that split the backward (ZB-H1, DualPipeV; with tensor
and expert parallelism, whose collectives a full rerun reissues in backward, including overlapped
DualPipeV pairs on twin groups)."""

import gc

import pytest
import torch

from megads.fp8 import Fp8Config, convert_to_fp8
from megads.model import recompute
from megads.model.model import DeepSeekV3
from megads.model.pass_state import RECORD, PassState
from megads.train.activation_memory import measure_activation_memory
from megads.train.model_stages import ModelStages
from megads.train.trainer import parallel_context, train
from test_pipeline_train import LiveSavedTensors, global_batch, make_config, my_micro_batches
from test_train import read_metrics, tiny_config
from tiny_model import tiny_model
from tools.harness.distributed import run_distributed

MODES = ("none", "selective", "full")
RTOL = 1e-5


def small_model(**changes) -> DeepSeekV3:
    """Two blocks (dense, MoE) and one MTP depth (MoE), with the sequence-wise balance loss on."""
    cfg = tiny_model(**{**dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                               num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                               v_head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                               n_group=2, topk_group=1, aux_loss_alpha=0.01), **changes})
    model = DeepSeekV3(cfg)
    model.init_weights(0)
    return model.train()


def batch(model, size=2, seq=16):
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, model.cfg.vocab_size, (size, seq), generator=generator),
            torch.randint(0, model.cfg.vocab_size, (size, seq), generator=generator))


def one_pass(model, mode, ids, labels, precision=None, between=lambda: None):
    """Loss, balance loss, every gradient and every MoE layer's expert loads of one forward and backward
    (`between()` runs between the two)."""
    model.recompute_mode = mode
    model.zero_grad(set_to_none=True)
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model.compute_loss(ids, labels)
    balance_losses = [moe.balance_loss for moe in model.moe_layers()]
    between()
    out.loss.backward()
    assert all(moe.balance_loss is b for moe, b in zip(model.moe_layers(), balance_losses))   # not the rerun's
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    loads = [moe.tokens_per_expert.clone() for moe in model.moe_layers()]
    return out.loss.item(), out.balance_loss.item(), grads, loads


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def assert_same_pass(got, want):
    loss, balance, grads, loads = got
    assert loss == pytest.approx(want[0], rel=RTOL) and balance == pytest.approx(want[1], rel=RTOL)
    assert grads.keys() == want[2].keys() and len(grads) > 0
    for name, grad in grads.items():
        assert rel_err(grad, want[2][name]) <= RTOL, name
    assert len(loads) == 2 and all(torch.equal(a, b) for a, b in zip(loads, want[3]))   # counted once


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_losses_gradients_and_loads_as_none(q_lora_rank, precision):
    model = small_model(q_lora_rank=q_lora_rank)
    ids, labels = batch(model)
    want = one_pass(model, "none", ids, labels, precision)
    for mode in ("selective", "full"):
        assert_same_pass(one_pass(model, mode, ids, labels, precision), want)


def test_a_rerun_routes_as_the_forward_did():
    """Even if the router's bias moved between forward and backward (it does not within a step), a
    block's rerun sends every token to the experts the forward chose."""
    model = small_model()
    ids, labels = batch(model)
    want = one_pass(model, "none", ids, labels)

    def move_biases():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.linspace(-1, 1, moe.num_experts))

    assert_same_pass(one_pass(model, "full", ids, labels, between=move_biases), want)


def test_routing_replay_under_full_recompute():
    """GRPO's policy update replays the rollout's routing tapes: a block's rerun routes as its forward
    did (the tape's choices) and leaves the tape's cursor where the forward left it."""
    model = small_model()
    ids, labels = batch(model)
    recorder = PassState(routing=RECORD)
    with torch.no_grad():
        model.forward_stage(ids, recorder)
    for moe in model.moe_layers():          # selection now differs from the recorded choices
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-1, 1, moe.num_experts))
    grads = {}
    for mode in ("none", "full"):
        model.recompute_mode = mode
        model.zero_grad(set_to_none=True)
        state = recorder.replay()
        model.stage_losses(model.forward_stage(ids, state), ids, labels).loss.backward()
        assert [tape.cursor for tape in state.tapes.values()] == [ids.shape[1]]
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads["full"].items():
        assert rel_err(grad, grads["none"][name]) <= RTOL, name


def test_fp8_layers_recompute_alike():
    model = convert_to_fp8(small_model(q_lora_rank=24), Fp8Config(enabled=True, backend="emulated"))
    ids, labels = batch(model)
    want = one_pass(model, "none", ids, labels)
    for mode in ("selective", "full"):
        assert_same_pass(one_pass(model, mode, ids, labels), want)


def test_each_mode_keeps_fewer_activation_bytes():
    """Deterministic bytes (megads.train.activation_memory): selective drops the norms', the
    up-projections' and the SwiGLUs' tensors, full everything but the blocks' inputs."""
    model = small_model(q_lora_rank=24)
    ids, labels = batch(model, size=4, seq=32)
    kept = {}
    for mode in MODES:
        model.recompute_mode = mode
        kept[mode] = measure_activation_memory(lambda: model.compute_loss(ids, labels).loss.backward()).kept
        assert measure_activation_memory(lambda: model.compute_loss(ids, labels).loss.backward()).kept == kept[mode]
    assert kept["none"] > kept["selective"] > kept["full"] > 0
    # 49% here (61% when the SwiGLU outputs were not recomputed); far more if the norms' outputs stayed in their consumers' saved tensors
    assert kept["selective"] < 0.55 * kept["none"]


def test_a_region_input_modified_in_place_is_an_error():
    model = small_model()
    ids, _ = batch(model)
    h = model.embed_tokens(ids)
    cos, sin = model.positions(ids.shape[1], h.device)
    with recompute.policy("full"):
        out = model.layers["0"](h, cos, sin)
    with torch.no_grad():
        h.mul_(2)                          # what the block's rerun would read is gone
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_trainer_steps_equal_none(tmp_path, cache_dir):
    metrics = {}
    for mode in MODES:
        train(tiny_config(tmp_path / mode, cache_dir, "train.max_steps=3", f"train.recompute={mode}"),
              log=lambda *_: None)
        metrics[mode] = read_metrics(tmp_path / mode)
    for mode in ("selective", "full"):
        for got, want in zip(metrics[mode], metrics["none"], strict=True):
            for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=RTOL), (mode, key)
            assert got["expert_load_max_over_mean"] == pytest.approx(want["expert_load_max_over_mean"], rel=RTOL)


# ----------------------------------------------------------------------------- multi-rank


def recompute_layouts_worker(cases):
    """One rank: per case (layout, schedule, micro-batches), one step's forward and backward under each
    mode; returns per case and mode the step's metrics and this rank's gradients (local shards)."""
    results = []
    for layout, schedule, n in cases:
        per_mode = {}
        for mode in MODES:
            cfg = make_config(schedule, n=n, **{k: v for k, v in layout.items() if k not in ("sp", "overlap")})
            cfg.parallel.sequence_parallel = layout.get("sp", False)
            cfg.parallel.overlap = layout.get("overlap", False)
            cfg.train.recompute = mode
            ctx = parallel_context(cfg)
            model = ModelStages(cfg, ctx).train()
            batches = my_micro_batches(global_batch(cfg.train.global_batch_size), ctx.dp.rank, ctx.dp.size,
                                       cfg.train.micro_batch_size)
            saved = LiveSavedTensors()
            with saved.hooks():
                metrics = model.run(batches)
            model.finish_gradients()
            gc.collect()
            assert saved.live == 0, f"{saved.live} saved tensors outlive the step ({mode})"
            per_mode[mode] = (metrics, {name: p.grad.clone() for name, p, _ in model.named_owned_parameters()
                                        if p.grad is not None})
        results.append(per_mode)
    return results


def check_layout_results(cases, results):
    for i, case in enumerate(cases):
        for rank_results in results:
            want_record, want_grads = rank_results[i]["none"]
            for mode in ("selective", "full"):
                record, grads = rank_results[i][mode]
                for key, value in want_record.items():
                    assert record[key] == pytest.approx(value, rel=RTOL), (case, mode, key)
                assert grads.keys() == want_grads.keys() and len(grads) > 0, (case, mode)
                for name, grad in grads.items():
                    assert rel_err(grad, want_grads[name]) <= RTOL, (case, mode, name)


def test_tensor_sequence_and_pipeline_layouts():
    """TP 2 with sequence parallelism; PP 2 under ZB-H1 and DualPipeV (B/W split: the weight pass
    reruns regions too)."""
    cases = [({"tp": 2, "sp": True, "mbs": 2}, "1f1b", 1), ({"pp": 2}, "zbh1", 3), ({"pp": 2}, "dualpipev", 4)]
    results = run_distributed(recompute_layouts_worker, 2, args=(cases,), timeout_s=300)
    check_layout_results(cases, results)


def test_full_rerun_collectives_under_split_backward_and_overlap():
    """PP 2 x TP 2 with EP 2: a full rerun reissues the block's TP all-reduces and EP all-to-alls in
    B and again in ZB-H1's W (in creation order on every rank), and in an overlapped DualPipeV pair's
    backward half (on the twin groups)."""
    cases = [({"pp": 2, "tp": 2, "ep": 2, "mbs": 2}, "zbh1", 3),
             ({"pp": 2, "tp": 2, "ep": 2, "mbs": 2, "overlap": True}, "dualpipev", 4)]
    results = run_distributed(recompute_layouts_worker, 4, args=(cases,), timeout_s=300)
    check_layout_results(cases, results)

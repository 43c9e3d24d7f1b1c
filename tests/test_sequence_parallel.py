"""Sequence parallelism beyond the layout-equivalence runs of test_layouts.py.

- the all-reduce whose backward all-reduces too (the balance loss's whole-sequence statistics);
- SP lifts the "micro_batch_size divisible by TP" rule (MoE no longer splits the batch);
- MLA without q_lora_rank (q_proj gathers the hidden chunk itself), more shared experts, and bf16
  autocast (the gathered latents mix FP32 norm outputs and the bf16 rope key) against one process;
- `megads train` end to end with TP 2 + SP and micro_batch_size 1 against a single-process run.
"""

import json

import pytest
import torch
import torch.distributed as dist

from megads.config import ConfigError, load_config, validate
from megads.model.model import build_model, gather_full
from megads.train.optimizer import expert_parameters
from megads.train.trainer import parallel_context, train
from parallel.context import ParallelContext
from parallel.data_parallel import allreduce_gradients
from parallel.grad_duties import partial_grad_group, sum_partial_grads
from parallel.group import Group
from parallel.tensor import all_reduce_sum_of_shares
from tools.harness.distributed import run_distributed
from tiny_model import tiny_config, tiny_overrides

MODEL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=64,
             num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=16,
             n_group=1, topk_group=1, num_nextn_predict_layers=1, aux_loss_alpha=0.01)
TRAIN = dict(global_batch_size=2, micro_batch_size=1, seq_length=8, seed=3)


def make_config(tp=1, sp=False, **train):
    return tiny_config({"model": MODEL, "train": {**TRAIN, **train},
                        "parallel": {"tensor_parallel": tp, "sequence_parallel": sp}})


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# ============================================================================ the mapping


def _check_all_reduce_sum_of_shares():
    r = dist.get_rank()
    x = torch.full((2, 3), float(r + 1), requires_grad=True)
    y = all_reduce_sum_of_shares(x, Group(dist.group.WORLD, "tp"))
    (y * (10.0 ** r)).sum().backward()  # rank r's loss holds its share: 10^r * the sum
    return y.detach(), x.grad


def test_all_reduce_sum_of_shares():
    x = torch.ones(2)
    assert all_reduce_sum_of_shares(x, Group(None, "tp")) is x
    for y, grad in run_distributed(_check_all_reduce_sum_of_shares, 2):
        assert torch.equal(y, torch.full((2, 3), 3.0))  # 1 + 2
        assert torch.equal(grad, torch.full((2, 3), 11.0))  # d(sum of the ranks' losses)/dx = 1 + 10


# ============================================================================ layout rules


def test_sequence_parallel_lifts_the_micro_batch_rule():
    cfg = make_config(tp=2, sp=True)
    validate(cfg, world_size=2)  # micro_batch_size 1, TP 2: fine with SP
    cfg = make_config(tp=2)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="seq_length"):
        make_config(tp=2, sp=True, seq_length=7)


# ============================================================================ model against one process


def gradients_and_losses(cfg, ctx):
    """Reduced full gradients and losses of one forward/backward on a batch of 2 sequences, and the
    bf16-autocast loss and forward() logits of the same batch."""
    ids = torch.randint(0, MODEL["vocab_size"], (2, TRAIN["seq_length"] + 1),
                        generator=torch.Generator().manual_seed(5))
    model = build_model(cfg.model, seed=cfg.train.seed, ctx=ctx).train()
    out = model.compute_loss(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    sum_partial_grads(model.parameters(), ctx)        # the router's and, under SP, the replicated parameters'
    allreduce_gradients(expert_parameters(model), ctx.edp, grad_divisor=ctx.dp.size)  # TP ranks' tokens
    owners = model._parameter_owners()
    grads = {name: gather_full(*owners[name], p.grad) for name, p in model.named_parameters()}
    # Each TP rank holds 1/t of the balance loss: the total is the sum over TP ranks.
    balance = ctx.tp.sum(out.balance_loss.detach())
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).lm_loss
        logits = model(ids[:, :-1])
    return grads, (out.lm_loss.item(), out.mtp_loss.item(), balance.item(), bf16_loss.item()), logits


def _sp_worker():
    cfg = make_config(tp=2, sp=True)
    ctx = parallel_context(cfg)
    assert ctx.sequence_parallel and ctx.tp.size == 2
    return gradients_and_losses(cfg, ctx)


def test_model_without_q_lora_matches_single_process():
    ref_grads, ref_losses, ref_logits = gradients_and_losses(make_config(), ParallelContext.single())
    for grads, losses, logits in run_distributed(_sp_worker, 2):
        for name in ref_grads:
            assert rel_err(grads[name], ref_grads[name]) <= 1e-5, f"gradient of {name}"
        assert losses[:3] == pytest.approx(ref_losses[:3], rel=1e-5)
        assert losses[3] == pytest.approx(ref_losses[3], rel=1e-3)  # bf16 rounding (seen: 2e-6)
        assert rel_err(logits, ref_logits) <= 1e-5


def test_no_partial_gradients_declared_in_one_process():
    model = build_model(make_config().model)
    assert not model.ctx.sequence_parallel
    assert [name for name, p in model.named_parameters() if partial_grad_group(p) is not None] == []


# ============================================================================ `megads train`

TINY = tiny_overrides(
    "model.vocab_size=320", "model.hidden_size=32", "model.num_hidden_layers=2", "model.first_k_dense_replace=1",
    "model.intermediate_size=64", "model.num_attention_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.n_routed_experts=4",
    "model.num_experts_per_tok=2", "model.moe_intermediate_size=16", "model.n_group=2", "model.topk_group=1",
    "model.num_nextn_predict_layers=1", "data.max_bytes=60000", "data.tokenizer=bpe",
    "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=16", "train.max_steps=2",
    "train.warmup_steps=1", "train.lr=0.01", "train.log_every=1", "train.save_every=0", "train.keep_checkpoints=0",
)


def _train_worker(overrides):
    return train(load_config(None, overrides), log=lambda *_: None).last_loss


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_megads_train_with_sequence_parallel(tmp_path):
    common = TINY + [f"data.cache_dir={tmp_path / 'cache'}"]
    train(load_config(None, common + [f"train.output_dir={tmp_path / 'ref'}"]), log=lambda *_: None)
    sp = common + [f"train.output_dir={tmp_path / 'sp'}", "parallel.tensor_parallel=2",
                   "parallel.sequence_parallel=true", "train.micro_batch_size=1"]
    last = run_distributed(_train_worker, 2, args=(sp,), timeout_s=240)
    assert last[0] == last[1]
    ref, got = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "sp")
    assert len(got) == len(ref) == 2
    for step, (a, b) in enumerate(zip(got, ref)):
        assert not a["skipped"]
        for key in ("loss", "mtp_loss", "balance_loss") + (("grad_norm",) if step == 0 else ()):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (step, key)
    assert (tmp_path / "sp" / "checkpoints" / "step_2").is_dir()

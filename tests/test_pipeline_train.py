"""Pipelined training steps equal the single-process step, for every schedule.

`megads train`'s step (`train_step`) runs on `ModelStages` over gloo ranks: the full model
(MLA, a dense layer and MoE layers with balance loss and aux-free bias update, MTP with the shared
embedding, ZeRO-1 AdamW with clipping active) is cut into the schedule's stages, and one step is
compared with the single-process step on the same global batch:

- the step's loss, MTP loss, balance loss and gradient norm: relative 1e-5;
- every parameter's gradient (after the copies of the embedding and DualPipe's stage copies were
  summed), each owned by exactly one pipeline rank: relative 1e-5 (max |a - b| / max |b|);
- every parameter and router bias after the AdamW step: 2e-3 (one Adam step moves each element by
  about lr, so rounding noise in a near-zero gradient can show; tests/test_layouts.py explains).

Schedules run at PP 2 and 4 with the minimum number of micro-batches, twice it and an awkward
count; then a world of 8 ranks combines PP 2 with TP 2, DP 2 and EP 2. One group of rank
processes runs all cases of one layout, so processes start once per layout.
"""

import gc
import weakref

import pytest
import torch

from megads.train.model_stages import ModelStages
from megads.train.optimizer import build_optimizer
from megads.train.trainer import parallel_context, train_step
from parallel.context import ParallelContext
from tools.harness.distributed import run_distributed
from tiny_model import tiny_config

MODEL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=48,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
             n_group=2, topk_group=1, routed_scaling_factor=2.0, num_nextn_predict_layers=1, aux_loss_alpha=0.01,
             bias_update_speed=0.01)
SEQ = 8
TRAIN = dict(seq_length=SEQ, lr=0.01, warmup_steps=0, max_steps=1, grad_clip=0.05, seed=7)
RTOL = 1e-5
PARAM_TOLERANCE = 2e-3


def make_config(schedule="1f1b", pp=1, n=1, mbs=1, dp=1, tp=1, ep=1, virtual=2, layers=None):
    return tiny_config({
        "model": MODEL, "train": {**TRAIN, "global_batch_size": n * mbs * dp, "micro_batch_size": mbs},
        "parallel": {"pipeline_parallel": pp, "schedule": schedule, "tensor_parallel": tp, "expert_parallel": ep,
                     "virtual_stages": virtual if schedule == "interleaved-1f1b" else 1,
                     "layers_per_stage": layers}})


def global_batch(size):
    gen = torch.Generator().manual_seed(100 + size)
    return torch.randint(0, MODEL["vocab_size"], (size, SEQ + 1), generator=gen)


def my_micro_batches(batch, dp_rank, dp_size, mbs):
    share = batch.shape[0] // dp_size
    mine = batch[dp_rank * share:(dp_rank + 1) * share]
    return [(mine[i:i + mbs, :-1], mine[i:i + mbs, 1:]) for i in range(0, share, mbs)]


RECORD_KEYS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "skipped")


class LiveSavedTensors:
    """Counts the tensors autograd saved for backward that are still alive (saved as detached
    aliases, so that counting never creates a reference cycle of its own)."""

    def __init__(self):
        self.live = 0

    def _freed(self):
        self.live -= 1

    def pack(self, t):
        if t.is_leaf and t.requires_grad:
            return t
        saved = t.detach()
        self.live += 1
        weakref.finalize(saved, self._freed)
        return saved

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def one_step(cfg, ctx, model):
    optimizer = build_optimizer(model, cfg.train, ctx)
    batches = my_micro_batches(global_batch(cfg.train.global_batch_size), ctx.dp.rank, ctx.dp.size,
                               cfg.train.micro_batch_size)
    saved = LiveSavedTensors()
    with saved.hooks():
        record = train_step(model, optimizer, cfg, 0, batches)
    gc.collect()
    # Every activation is freed by the end of the step, whatever the schedule (a split B/W backward
    # keeps graphs whole until W: anything still referring to one would keep all its activations).
    assert saved.live == 0, f"{saved.live} saved tensors outlive the step"
    return {k: record[k] for k in RECORD_KEYS}, record.get("expert_load_max_over_mean", {})


def reference_step(n, mbs=1):
    """Single process: the record, gradients and parameters after one step on the same batch."""
    cfg = make_config(n=n, mbs=mbs)
    ctx = ParallelContext.single()
    model = ModelStages(cfg, ctx).train()
    record, imbalance = one_step(cfg, ctx, model)
    grads = {name: p.grad.clone() for name, p, _ in model.named_owned_parameters()}
    state = {name: t.clone() for name, t in model.full_state()}
    return record, imbalance, grads, state


def pipeline_cases_worker(cases, layout):
    """One rank: run each (schedule, n) case; return per case the record, the gradients of the
    parameters this rank owns (only without TP/EP, where a local gradient is the full one), and
    the full tensors this rank writes to a checkpoint."""
    results = []
    for schedule, n, *layers in cases:          # an optional third item: parallel.layers_per_stage
        cfg = make_config(schedule, n=n, layers=layers[0] if layers else None, **layout)
        ctx = parallel_context(cfg)
        model = ModelStages(cfg, ctx).train()
        record, imbalance = one_step(cfg, ctx, model)
        plain = ctx.tp.size == 1 and ctx.ep.size == 1 and ctx.dp.size == 1
        grads = {name: p.grad.clone() for name, p, owned in model.named_owned_parameters() if owned} if plain else {}
        state = {}
        for name, t in model.full_state():
            assert name not in state, f"{name} written twice"
            state[name] = t.clone()
        writes = ctx.tp.rank == 0 and ctx.dp.rank == 0
        layers = {stage: len(m.stage.layers) for stage, m in model.models.items()}
        results.append((record, imbalance, grads, state if writes else {}, layers))
    return results


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def schedule_cases(pp):
    """(schedule, micro-batches): the minimum, twice it, and an awkward valid count."""
    return [("1f1b", 1), ("1f1b", 2), ("1f1b", 5),
            ("interleaved-1f1b", pp), ("interleaved-1f1b", 2 * pp), ("interleaved-1f1b", 3 * pp),
            ("zbh1", 1), ("zbh1", 2), ("zbh1", 2 * pp + 1),
            ("dualpipe", 2 * pp), ("dualpipe", 4 * pp), ("dualpipe", 2 * pp + 2),
            ("dualpipev", 2 * pp), ("dualpipev", 4 * pp), ("dualpipev", 2 * pp + 1)]


_references = {}


def reference(n, mbs=1):
    if (n, mbs) not in _references:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _references[(n, mbs)] = reference_step(n, mbs)
        finally:
            torch.set_num_threads(threads)
    return _references[(n, mbs)]


def check_case(case, rank_results, n, mbs=1, check_grads=True):
    want_record, want_imbalance, want_grads, want_state = reference(n, mbs)
    records = [r[0] for r in rank_results]
    assert all(r == records[0] for r in records), (case, "every rank reports the same metrics")
    got = records[0]
    assert not got["skipped"] and not want_record["skipped"]
    for key in RECORD_KEYS[:-1]:
        assert got[key] == pytest.approx(want_record[key], rel=RTOL), (case, key)
    assert want_record["grad_norm"] > TRAIN["grad_clip"]            # clipping was active
    imbalance = rank_results[0][1]
    assert imbalance.keys() == want_imbalance.keys()
    for name in imbalance:
        assert imbalance[name] == pytest.approx(want_imbalance[name], rel=RTOL), (case, name)
    if check_grads:
        grads = {}
        for _, _, rank_grads, _, _ in rank_results:
            assert not grads.keys() & rank_grads.keys(), (case, "a gradient owned twice")
            grads.update(rank_grads)
        assert grads.keys() == want_grads.keys(), case
        for name, want in want_grads.items():
            assert rel_err(grads[name], want) <= RTOL, (case, "gradient", name)
    state = {}
    for _, _, _, rank_state, _ in rank_results:
        assert not state.keys() & rank_state.keys(), (case, "a tensor written twice")
        state.update(rank_state)
    assert state.keys() == want_state.keys(), case
    for name, want in want_state.items():
        assert rel_err(state[name], want) <= PARAM_TOLERANCE, (case, "after the step", name,
                                                                rel_err(state[name], want))
    biases = [t for name, t in want_state.items() if name.endswith("e_score_correction_bias")]
    assert sum(b.abs().sum() for b in biases) > 0              # the aux-free biases moved


@pytest.mark.parametrize("pp", [2, 4])
def test_every_schedule_matches_single_process(pp):
    cases = schedule_cases(pp)
    results = run_distributed(pipeline_cases_worker, pp, args=(cases, {"pp": pp}), timeout_s=600)
    for i, case in enumerate(cases):
        check_case(case, [rank_results[i] for rank_results in results], case[1])


def test_explicit_layer_split():
    """parallel.layers_per_stage: uneven stages (fewer layers where the embedding and head sit)."""
    cases = [("zbh1", 3, [3, 5]), ("dualpipev", 4, [1, 3, 3, 1]), ("interleaved-1f1b", 2, [1, 3, 3, 1])]
    results = run_distributed(pipeline_cases_worker, 2, args=(cases, {"pp": 2}), timeout_s=300)
    for i, case in enumerate(cases):
        check_case(case, [rank_results[i] for rank_results in results], case[1])
        layers = {}
        for rank_results in results:
            layers.update(rank_results[i][4])
        assert [layers[stage] for stage in sorted(layers)] == case[2]


def test_pipeline_with_tensor_expert_and_data_parallel():
    """World 8 = PP 2 x TP 2 x DP 2 with EP 2 (experts split over the stage's TP x DP ranks)."""
    layout = {"pp": 2, "tp": 2, "dp": 2, "ep": 2, "mbs": 2}
    cases = [("1f1b", 2), ("zbh1", 3), ("interleaved-1f1b", 2), ("dualpipe", 4), ("dualpipev", 4)]
    results = run_distributed(pipeline_cases_worker, 8, args=(cases, layout),
                              timeout_s=600)
    for i, case in enumerate(cases):
        check_case(case, [rank_results[i] for rank_results in results], case[1] * 2, mbs=2, check_grads=False)


def test_layout_checks_the_derived_number_of_micro_batches():
    """parallel.micro_batches null: the schedule's needs are checked against global batch / (DP x micro
    batch) once the world size is known; a given value must agree with the batch sizes."""
    from megads.config import ConfigError, validate

    cfg = make_config("dualpipe", pp=2, n=2)                    # 2 micro-batches, DualPipe needs 4
    with pytest.raises(ConfigError, match=r"the number of micro-batches per step.* must be at least 2 x"):
        validate(cfg, world_size=2)
    cfg = make_config("interleaved-1f1b", pp=2, n=3)
    with pytest.raises(ConfigError, match="must be a multiple of parallel.pipeline_parallel"):
        validate(cfg, world_size=2)
    cfg = make_config("1f1b", pp=2, n=4)
    cfg.parallel.micro_batches = 3
    with pytest.raises(ConfigError, match=r"parallel.micro_batches \(3\) must equal .* = 4"):
        validate(cfg, world_size=2)
    cfg.parallel.micro_batches = 4
    validate(cfg, world_size=2)

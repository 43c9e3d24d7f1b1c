"""Layout equivalence: every tensor/expert/data-parallel layout trains exactly like one process.

Each layout runs 3 optimizer steps of the full model (MLA, dense + MoE layers, MTP, balance loss,
aux-free bias update, ZeRO-1 AdamW with active gradient clipping) on gloo ranks, from the same seed
and the same global batches, and its losses, gradient norms, router biases and gathered parameters
are compared with the single-process run.

Tolerances (max |a - b| / max |b| per tensor). Layouts sum the same terms in another order (TP
partial sums, all-reduce order, expert outputs combined across ranks), so results agree to FP32
rounding, not bit for bit:
- losses, gradient norms and the data-parallel-reduced gradients of the first step: 1e-5 (seen: ~1e-7);
  a wrong gradient scale or a missing reduction gives errors of order 1.
- parameters after 3 AdamW steps: 2e-3. Adam normalises each element's update to about lr whatever
  the gradient's size, so an element whose gradient is tiny (a sum that nearly cancels) carries its
  large *relative* rounding error into a full-size update. The single-process run itself moves by
  4e-5 when only its micro-batch split changes (same math, another order); layouts were seen at up
  to 8e-4. The gradient check above is what proves the layouts compute the same step.
"""

import pytest
import torch

from megads.config import config_from_dict
from megads.model.model import build_model, gather_full
from megads.train.optimizer import build_optimizer, expert_parameters
from megads.train.trainer import router_parameters, train_step
from parallel.data import allreduce_gradients
from parallel.distributed_testing import run_distributed
from parallel.topology import Topology, init_distributed

MODEL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=64,
             num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
             n_group=2, topk_group=1, routed_scaling_factor=2.0, num_nextn_predict_layers=1, aux_loss_alpha=0.01,
             bias_update_speed=0.01)
TRAIN = dict(global_batch_size=4, micro_batch_size=2, seq_length=16, lr=0.01, warmup_steps=1, max_steps=3,
             grad_clip=0.05, seed=7)
STEPS = 3
PARAM_TOLERANCE = 2e-3


def make_config(tp=1, ep=1):
    return config_from_dict({"model": MODEL, "train": TRAIN,
                             "parallel": {"tensor_parallel": tp, "expert_parallel": ep}})


def global_batches():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, MODEL["vocab_size"], (TRAIN["global_batch_size"], TRAIN["seq_length"] + 1),
                          generator=gen) for _ in range(STEPS)]


def run_steps(cfg, topo, batches):
    model = build_model(cfg.model, seed=cfg.train.seed, tp_group=topo.tp_group, ep_group=topo.ep_group).train()
    optimizer = build_optimizer(model, cfg.train, topo)
    per_rank = cfg.train.global_batch_size // topo.dp_size
    mbs = cfg.train.micro_batch_size
    records = []
    for step, batch in enumerate(batches):
        mine = batch[topo.dp_rank * per_rank:(topo.dp_rank + 1) * per_rank]
        micro = [(mine[i:i + mbs, :-1], mine[i:i + mbs, 1:]) for i in range(0, per_rank, mbs)]
        record = train_step(model, optimizer, cfg, step, micro, topo)
        records.append({k: record[k] for k in ("loss", "mtp_loss", "balance_loss", "grad_norm", "skipped")})
    state = {name: tensor.clone() for name, tensor in model.full_state()}
    return records, state


def first_step_gradients(cfg, topo):
    """Full gradients of one forward/backward on the first global batch, reduced as the optimizer
    reduces them (dense: mean over DP; experts: sum over expert-data-parallel replicas / DP; router:
    sum over TP ranks, which routed different sequences)."""
    model = build_model(cfg.model, seed=cfg.train.seed, tp_group=topo.tp_group, ep_group=topo.ep_group).train()
    per_rank = cfg.train.global_batch_size // topo.dp_size
    mine = global_batches()[0][topo.dp_rank * per_rank:(topo.dp_rank + 1) * per_rank]
    model.compute_loss(mine[:, :-1], mine[:, 1:]).loss.backward()
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    if topo.tp_size > 1:
        allreduce_gradients(router_parameters(model), topo.tp_group, grad_divisor=1)
    allreduce_gradients(experts, topo.edp_group, grad_divisor=topo.dp_size)
    allreduce_gradients([p for p in model.parameters() if id(p) not in expert_ids], topo.dp_group)
    owners = model._parameter_owners()
    return {name: gather_full(*owners[name], p.grad) for name, p in model.named_parameters()}


def layout_worker(tp, ep):
    cfg = make_config(tp, ep)
    topo = init_distributed(cfg.parallel, cfg.model, cfg.train)
    grads = first_step_gradients(cfg, topo)
    records, state = run_steps(cfg, topo, global_batches())
    return records, (state, grads) if topo.rank == 0 else None


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grads = first_step_gradients(make_config(), Topology())
        records, state = run_steps(make_config(), Topology(), global_batches())
        return records, (state, grads)
    finally:
        torch.set_num_threads(threads)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# (world size, tensor_parallel, expert_parallel): every TP x EP x DP layout with at most 4 ranks.
LAYOUTS = [(2, 1, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2), (4, 2, 1), (4, 2, 2), (4, 2, 4)]


@pytest.mark.parametrize("world, tp, ep", LAYOUTS, ids=[f"tp{tp}-dp{w // tp}-ep{ep}" for w, tp, ep in LAYOUTS])
def test_layout_matches_single_process(world, tp, ep, reference):
    ref_records, (ref_state, ref_grads) = reference
    results = run_distributed(layout_worker, world, args=(tp, ep), timeout_s=240)
    records, (state, grads) = results[0]
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, f"gradient of {name}"
    for rank_records, _ in results[1:]:
        assert rank_records == records  # every rank reports the same (reduced) metrics
    for step, (got, want) in enumerate(zip(records, ref_records)):
        assert not got["skipped"] and not want["skipped"]
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
    assert want["grad_norm"] > TRAIN["grad_clip"]  # clipping was active
    assert state.keys() == ref_state.keys()
    errors = {name: rel_err(state[name], ref_state[name]) for name in ref_state}
    worst = max(errors, key=errors.get)
    print(f"worst parameter error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= PARAM_TOLERANCE, worst
    # the aux-loss-free biases moved, identically
    assert ref_state["layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0

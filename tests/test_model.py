"""Unit tests of the DeepSeek-V3 model pieces against straightforward references written here.

Everything runs in FP32 on tiny sizes. References are deliberately naive (Python loops over tokens
and experts, hand-written RMSNorm and cross-entropy) and share no code with the library beyond the
parameters they read.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megads.config import model_config_from_dict
from megads.model.mlp import SwiGLU
from megads.model.model import (
    IGNORE_INDEX,
    DeepSeekV3,
    build_model,
    masked_mean_cross_entropy,
    mtp_inputs_and_targets,
)
from megads.model.moe import MoE, Router
from megads.model.rope import RotaryEmbedding, rope_frequencies, softmax_scale, yarn_mscale
from parallel.expert import LocalTokenDispatcher




def tiny(**changes):
    """A validated tiny ModelConfig."""
    model = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=48,
                 num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                 v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                 moe_intermediate_size=16, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                 max_position_embeddings=64, num_nextn_predict_layers=1, initializer_range=0.02,
                 aux_loss_alpha=0.0)
    model.update(changes)
    return model_config_from_dict(model)


def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_cross_entropy(logits, targets):
    """Mean over targets != -100 of -log softmax(logits)[target]; 0 when none."""
    logp = logits.reshape(-1, logits.shape[-1]).log_softmax(-1)
    targets = targets.reshape(-1)
    terms = [-logp[i, t] for i, t in enumerate(targets.tolist()) if t != IGNORE_INDEX]
    return torch.stack(terms).mean() if terms else logits.sum() * 0


# ----------------------------------------------------------------------------- routing reference


def ref_select(logits, bias, cfg):
    """Per-token expert choice, written as a plain Python loop. logits [T, E] -> list of expert lists."""
    num_experts, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    chosen = []
    for row in logits.tolist():
        if cfg.scoring_func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            z = sum(math.exp(v) for v in row)
            s = [math.exp(v) / z for v in row]
        choice = [s[e] + float(bias[e]) for e in range(num_experts)] if cfg.topk_method == "noaux_tc" else s
        allowed = list(range(num_experts))
        if cfg.n_group > 1 and cfg.topk_method != "greedy":
            per = num_experts // cfg.n_group
            group_score = []
            for g in range(cfg.n_group):
                members = sorted(choice[g * per:(g + 1) * per], reverse=True)
                group_score.append(members[0] + members[1] if cfg.topk_method == "noaux_tc" else members[0])
            groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
            allowed = [e for e in allowed if e // per in groups]
        chosen.append(sorted(sorted(allowed, key=lambda e: -choice[e])[:k]))
    return chosen


def ref_gates(scores, chosen, cfg):
    """Differentiable gates [T, K] for the chosen experts (sorted by expert id) from raw scores."""
    idx = torch.tensor(chosen)
    g = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        g = g / g.sum(-1, keepdim=True)
    return g * cfg.routed_scaling_factor


def ref_scores(logits, cfg):
    return logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)


def sort_by_expert(idx, gates):
    """Library output (top-k order) -> (expert ids ascending, matching gates)."""
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), gates.gather(1, order)


def identity_router(cfg, bias=None):
    """A Router whose logits equal its input (hidden_size == n_routed_experts, weight = I)."""
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(cfg.n_routed_experts))
        if bias is not None:
            router.e_score_correction_bias.copy_(torch.tensor(bias))
    return router


# ----------------------------------------------------------------------------- router


def test_bias_steers_selection_but_gates_come_from_raw_scores():
    cfg = tiny(hidden_size=4, n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = x.sigmoid()[0]

    idx, gates, scores = identity_router(cfg)(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(scores, x.sigmoid())

    # bias +1 on expert 3 moves it into the top-2 (s3 + 1 = 1.27 > s1 = 0.73)
    idx, gates, _ = identity_router(cfg, bias=[0.0, 0.0, 0.0, 1.0])(x)
    idx, gates = sort_by_expert(idx, gates)
    assert idx[0].tolist() == [0, 3]
    expected = torch.stack([s[0], s[3]]) / (s[0] + s[3]) * 2.5
    torch.testing.assert_close(gates[0], expected)
    biased = torch.stack([s[0], s[3] + 1.0])
    assert not torch.allclose(gates[0], biased / biased.sum() * 2.5)
    assert math.isclose(gates.sum().item(), 2.5, rel_tol=1e-6)

    # without normalisation: the raw sigmoid scores times the scaling factor
    cfg_raw = tiny(hidden_size=4, n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5,
                   norm_topk_prob=False)
    idx, gates, _ = identity_router(cfg_raw, bias=[0.0, 0.0, 0.0, 1.0])(x)
    idx, gates = sort_by_expert(idx, gates)
    assert idx[0].tolist() == [0, 3]
    torch.testing.assert_close(gates[0], torch.stack([s[0], s[3]]) * 2.5)


def test_bias_ignored_by_greedy_and_group_limited_greedy():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for method in ("greedy", "group_limited_greedy"):
        cfg = tiny(hidden_size=4, n_routed_experts=4, num_experts_per_tok=2, topk_method=method,
                   scoring_func="softmax")
        idx, _, _ = identity_router(cfg, bias=[0.0, 0.0, 0.0, 5.0])(x)
        assert sorted(idx[0].tolist()) == [0, 1]


# logits per expert, 4 groups of 2 experts: group 0 has the single best expert, group 1 the best pair.
GROUP_LOGITS = [[4.0, -4.0, 1.0, 0.95, 0.9, 0.8, -3.0, -3.1]]


@pytest.mark.parametrize("method, topk_group, k, expected", [
    ("noaux_tc", 2, 2, [2, 3]),                # groups by top-2 sum: g1 (1.45), g2 (1.40); expert 0 excluded
    ("noaux_tc", 1, 2, [2, 3]),
    ("noaux_tc", 2, 4, [2, 3, 4, 5]),
    ("group_limited_greedy", 2, 2, [0, 2]),    # groups by max: g0 (0.98), g1 (0.73)
    ("group_limited_greedy", 1, 2, [0, 1]),    # only group 0: even its weak expert 1 is taken
    ("greedy", 1, 2, [0, 2]),                  # groups ignored
])
def test_group_limited_routing_hand_case(method, topk_group, k, expected):
    cfg = tiny(hidden_size=8, n_routed_experts=8, n_group=4, topk_group=topk_group, num_experts_per_tok=k,
               topk_method=method)
    idx, _, _ = identity_router(cfg)(torch.tensor(GROUP_LOGITS))
    assert sorted(idx[0].tolist()) == expected


ROUTER_CASES = {
    "v3_sigmoid_noaux_tc": dict(n_routed_experts=16, num_experts_per_tok=4, routed_scaling_factor=2.5),
    "v3_grouped": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5),
    "v3_grouped_unnormalised": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=8, topk_group=3,
                                    norm_topk_prob=False),
    "v2_softmax_greedy": dict(n_routed_experts=16, num_experts_per_tok=3, scoring_func="softmax",
                              topk_method="greedy", norm_topk_prob=False),
    "v2_softmax_group_limited_greedy": dict(n_routed_experts=16, num_experts_per_tok=3, scoring_func="softmax",
                                            topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                            norm_topk_prob=False, routed_scaling_factor=16.0),
    "softmax_normalised_grouped": dict(n_routed_experts=16, num_experts_per_tok=4, scoring_func="softmax",
                                       topk_method="group_limited_greedy", n_group=8, topk_group=2),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_matches_reference(case):
    cfg = tiny(hidden_size=12, **ROUTER_CASES[case])
    gen = torch.Generator().manual_seed(0)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        router.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.3)
    x = torch.randn(96, cfg.hidden_size, generator=gen)

    idx, gates, scores = router(x)
    assert idx.shape == gates.shape == (96, cfg.num_experts_per_tok)
    assert scores.dtype == gates.dtype == torch.float32

    logits = x.double() @ router.weight.double().T
    chosen = ref_select(logits, router.e_score_correction_bias, cfg)
    ref_s = ref_scores(logits, cfg)
    torch.testing.assert_close(scores.double(), ref_s, rtol=1e-5, atol=1e-6)
    idx, gates = sort_by_expert(idx, gates)
    assert idx.tolist() == chosen
    torch.testing.assert_close(gates.double(), ref_gates(ref_s, chosen, cfg), rtol=1e-5, atol=1e-6)

    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        per = cfg.n_routed_experts // cfg.n_group
        for row in idx.tolist():
            assert len({e // per for e in row}) <= cfg.topk_group
    if cfg.norm_topk_prob:
        torch.testing.assert_close(gates.sum(-1), torch.full((96,), cfg.routed_scaling_factor))


def test_grouped_routing_never_leaves_the_chosen_groups():
    """Group score = sum of the top-2 *biased* scores; selection stays inside the top topk_group groups."""
    cfg = tiny(hidden_size=16, n_routed_experts=32, num_experts_per_tok=6, n_group=8, topk_group=3)
    gen = torch.Generator().manual_seed(1)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(32, 16, generator=gen))
        router.e_score_correction_bias.copy_(torch.randn(32, generator=gen) * 0.5)
    x = torch.randn(200, 16, generator=gen)
    idx, _, scores = router(x)
    biased = (scores + router.e_score_correction_bias).view(-1, 8, 4)
    group_score = biased.topk(2, dim=-1).values.sum(-1)
    top_groups = group_score.topk(3, dim=-1).indices
    for t in range(200):
        groups = set(top_groups[t].tolist())
        assert {e // 4 for e in idx[t].tolist()} <= groups
        # and within those groups the best biased scores are taken
        allowed = [e for e in range(32) if e // 4 in groups]
        b = (scores[t] + router.e_score_correction_bias)[allowed]
        best = {allowed[i] for i in b.topk(6).indices.tolist()}
        assert set(idx[t].tolist()) == best


# ----------------------------------------------------------------------------- routed experts


def randomise(module, gen, std=0.3, router_std=1.0):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (router_std if name.endswith("gate.weight") else std))


def ref_moe(x, params, bias, cfg):
    """Per-token loop: sum over the token's experts of gate * SwiGLU_e(x) plus the shared experts."""
    hidden = x.shape[-1]
    flat = x.reshape(-1, hidden)
    inter = cfg.moe_intermediate_size
    logits = flat @ params["gate.weight"].T
    scores = ref_scores(logits, cfg)
    chosen = ref_select(logits.detach(), bias, cfg)
    gates = ref_gates(scores, chosen, cfg)
    rows = []
    for t in range(flat.shape[0]):
        xt = flat[t]
        y = torch.zeros(hidden)
        if cfg.n_shared_experts:
            g = params["shared_experts.gate_proj.weight"] @ xt
            u = params["shared_experts.up_proj.weight"] @ xt
            y = y + params["shared_experts.down_proj.weight"] @ (F.silu(g) * u)
        for j, e in enumerate(chosen[t]):
            w = params["experts.gate_up_proj"][e]
            h = F.silu(w[:inter] @ xt) * (w[inter:] @ xt)
            y = y + gates[t, j] * (params["experts.down_proj"][e] @ h)
        rows.append(y)
    return torch.stack(rows).view_as(x), scores, chosen


MOE_CASES = {
    "v3": dict(n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5),
    "two_shared": dict(n_shared_experts=2, num_experts_per_tok=2),
    "no_shared_softmax": dict(n_shared_experts=0, scoring_func="softmax", topk_method="greedy",
                              norm_topk_prob=False, num_experts_per_tok=3),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_output_and_grads_match_per_token_loop(case):
    cfg = tiny(**MOE_CASES[case])
    gen = torch.Generator().manual_seed(2)
    moe = MoE(cfg)
    randomise(moe, gen)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.2)
    x = torch.randn(3, 5, cfg.hidden_size, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 5, cfg.hidden_size, generator=gen)

    out = moe(x)
    (out * upstream).sum().backward()

    params = {n: p.detach().clone().requires_grad_(True) for n, p in moe.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    ref, _, _ = ref_moe(x_ref, params, moe.gate.e_score_correction_bias, cfg)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    # the routing bias is a buffer, not trained by gradients
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())


def test_moe_with_idle_experts():
    """Experts that get no token contribute nothing and get zero gradient."""
    cfg = tiny(n_routed_experts=8, num_experts_per_tok=1, n_shared_experts=0)
    gen = torch.Generator().manual_seed(3)
    moe = MoE(cfg)
    randomise(moe, gen)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 0]))  # all go to expert 0
    x = torch.randn(1, 4, cfg.hidden_size, generator=gen)
    out = moe(x)
    out.sum().backward()
    params = {n: p.detach() for n, p in moe.named_parameters()}
    ref, _, chosen = ref_moe(x, params, moe.gate.e_score_correction_bias, cfg)
    assert chosen == [[0]] * 4
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(moe.experts.gate_up_proj.grad[1:]) == 0
    assert torch.count_nonzero(moe.experts.gate_up_proj.grad[0]) > 0


# ----------------------------------------------------------------------------- dispatcher


def test_dispatcher_sorts_counts_and_combines():
    gen = torch.Generator().manual_seed(4)
    num_tokens, k, num_experts, hidden = 11, 3, 6, 5
    # distinct experts per token, expert 4 never used
    pool = [0, 1, 2, 3, 5]
    topk_idx = torch.stack([torch.tensor(pool)[torch.randperm(5, generator=gen)[:k]] for _ in range(num_tokens)])
    x = torch.randn(num_tokens, hidden, generator=gen)
    dispatcher = LocalTokenDispatcher(num_experts)

    gates = torch.rand(num_tokens, k, generator=gen)
    sorted_tokens, sorted_gates, tokens_per_expert, state = dispatcher.dispatch(x, topk_idx, gates)

    flat = topk_idx.reshape(-1).tolist()
    slots = sorted(range(num_tokens * k), key=lambda s: (flat[s], s))  # stable sort by expert
    assert torch.equal(sorted_tokens, x[[s // k for s in slots]])
    assert torch.equal(sorted_gates, gates.reshape(-1)[slots])
    assert torch.equal(tokens_per_expert, torch.bincount(topk_idx.reshape(-1), minlength=num_experts))
    assert tokens_per_expert.tolist()[4] == 0 and tokens_per_expert.sum() == num_tokens * k
    experts_in_order = [flat[s] for s in slots]
    assert experts_in_order == sorted(experts_in_order)

    # combine: each slot's (gate-weighted) output goes back to its token and is summed
    scale = torch.tensor(experts_in_order, dtype=torch.float32)[:, None] + 1  # "expert e multiplies by e+1"
    combined = dispatcher.combine(sorted_tokens * scale * sorted_gates[:, None], state)
    expected = torch.stack([sum(gates[t, j] * (topk_idx[t, j] + 1) * x[t] for j in range(k))
                            for t in range(num_tokens)])
    torch.testing.assert_close(combined, expected)

    # identity experts with gates 1/K give back the input
    torch.testing.assert_close(dispatcher.combine(sorted_tokens / k, state), x)


# ----------------------------------------------------------------------------- balance loss


def test_sequence_balance_loss_matches_formula():
    alpha = 0.01
    cfg = tiny(aux_loss_alpha=alpha, n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1)
    gen = torch.Generator().manual_seed(5)
    moe = MoE(cfg).train()
    randomise(moe, gen)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(8, generator=gen) * 0.2)
    batch, seq, num_experts, k = 3, 7, 8, 3
    x = torch.randn(batch, seq, cfg.hidden_size, generator=gen)
    moe(x)
    loss = moe.balance_loss
    assert loss is not None and loss.dim() == 0
    loss.backward()

    weight = moe.gate.weight.detach().clone().requires_grad_(True)
    per_sequence = []
    for b in range(batch):
        logits = x[b] @ weight.T
        s = logits.sigmoid()
        chosen = ref_select(logits.detach(), moe.gate.e_score_correction_bias, cfg)
        total = 0
        for i in range(num_experts):
            count = sum(i in row for row in chosen)
            f_i = num_experts / (k * seq) * count
            p_i = sum(s[t, i] / s[t].sum() for t in range(seq)) / seq
            total = total + f_i * p_i
        per_sequence.append(total)
    ref = alpha * sum(per_sequence) / batch
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(moe.gate.weight.grad, weight.grad, rtol=1e-4, atol=1e-9)


def test_no_balance_loss_when_alpha_zero_or_eval():
    cfg = tiny(aux_loss_alpha=0.0)
    moe = MoE(cfg).train()
    randomise(moe, torch.Generator().manual_seed(6))
    x = torch.randn(2, 4, cfg.hidden_size)
    moe(x)
    assert moe.balance_loss is None

    moe_alpha = MoE(tiny(aux_loss_alpha=0.1))
    moe_alpha.load_state_dict(moe.state_dict())
    moe_alpha.train()(x)
    assert moe_alpha.balance_loss is not None
    moe_alpha.eval()(x)
    assert moe_alpha.balance_loss is None

    model = build_model(tiny(aux_loss_alpha=0.0), seed=0).train()
    ids = torch.randint(0, 64, (2, 6))
    out = model.compute_loss(ids, ids)
    assert out.balance_loss is None
    torch.testing.assert_close(out.loss, out.lm_loss + model.cfg.mtp_loss_weight * out.mtp_loss)


# ----------------------------------------------------------------------------- aux-loss-free bias update


def test_tokens_per_expert_counts_train_only():
    cfg = tiny(n_routed_experts=8, num_experts_per_tok=2)
    gen = torch.Generator().manual_seed(7)
    moe = MoE(cfg).train()
    randomise(moe, gen)
    seen = []
    moe.gate.register_forward_hook(lambda mod, inp, out: seen.append(out[0].detach().clone()))
    for _ in range(2):
        moe(torch.randn(2, 5, cfg.hidden_size, generator=gen))
    expected = sum(torch.bincount(idx.reshape(-1), minlength=8) for idx in seen)
    assert torch.equal(moe.tokens_per_expert, expected.float())
    assert moe.tokens_per_expert.sum() == 2 * 2 * 5 * 2

    moe.eval()
    with torch.no_grad():
        moe(torch.randn(2, 5, cfg.hidden_size, generator=gen))
    assert torch.equal(moe.tokens_per_expert, expected.float())


def test_update_bias_moves_by_exactly_speed():
    cfg = tiny(n_routed_experts=4, num_experts_per_tok=1)
    moe = MoE(cfg)
    start = torch.tensor([0.25, -0.5, 0.125, 0.0])
    moe.gate.e_score_correction_bias.copy_(start)
    moe.tokens_per_expert.copy_(torch.tensor([3.0, 1.0, 2.0, 2.0]))  # mean 2
    speed = 0.001
    loads = moe.update_bias(speed)
    assert loads.tolist() == [3.0, 1.0, 2.0, 2.0]
    sign = torch.tensor([-1.0, 1.0, 0.0, 0.0])
    assert torch.equal(moe.gate.e_score_correction_bias, start + speed * sign)
    delta = (moe.gate.e_score_correction_bias - start).double()
    torch.testing.assert_close(delta, speed * sign.double(), rtol=0, atol=1e-7)
    assert torch.equal(moe.gate.e_score_correction_bias[2:], start[2:])  # load == mean: unchanged
    assert torch.count_nonzero(moe.tokens_per_expert) == 0

    # speed 0 leaves the bias alone but still resets the counters
    moe.tokens_per_expert.copy_(torch.tensor([9.0, 0.0, 0.0, 0.0]))
    before = moe.gate.e_score_correction_bias.clone()
    moe.update_bias(0.0)
    assert torch.equal(moe.gate.e_score_correction_bias, before)
    assert torch.count_nonzero(moe.tokens_per_expert) == 0

    # loads passed in (e.g. summed over ranks) take precedence over the local counters
    moe.tokens_per_expert.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0]))
    moe.update_bias(0.5, torch.tensor([1.0, 5.0, 1.0, 1.0]))
    torch.testing.assert_close(moe.gate.e_score_correction_bias - before, torch.tensor([0.5, -0.5, 0.5, 0.5]))
    assert torch.count_nonzero(moe.tokens_per_expert) == 0


def test_model_update_router_biases():
    model = build_model(tiny(n_routed_experts=8, num_experts_per_tok=2), seed=0).train()
    names = [name for name, _ in model.named_moe_layers()]
    assert names == ["layers.1.mlp", "mtp.0.block.mlp"]
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(8))
    model.compute_loss(ids, ids)
    model.compute_loss(ids, ids)
    loads = {name: moe.tokens_per_expert.clone() for name, moe in model.named_moe_layers()}
    for load in loads.values():
        assert load.sum() == 2 * 2 * 6 * 2

    speed = 0.01
    used = model.update_router_biases(speed)
    assert set(used) == set(names)
    for name, moe in model.named_moe_layers():
        load = loads[name]
        assert torch.equal(used[name], load)
        torch.testing.assert_close(moe.gate.e_score_correction_bias, speed * torch.sign(load.mean() - load))
        assert torch.count_nonzero(moe.tokens_per_expert) == 0

    # eval mode does not count: nothing to update, biases unchanged
    biases = [moe.gate.e_score_correction_bias.clone() for moe in model.moe_layers()]
    model.eval()
    with torch.no_grad():
        model.compute_loss(ids, ids)
    assert all(torch.count_nonzero(moe.tokens_per_expert) == 0 for moe in model.moe_layers())
    assert model.update_router_biases(speed) == {}
    for before, moe in zip(biases, model.moe_layers()):
        assert torch.equal(before, moe.gate.e_score_correction_bias)

    # reduce_loads sees each layer's counts and its result is what the update uses
    model.train()
    model.compute_loss(ids, ids)
    seen = []

    def reduce(t):
        seen.append(t.clone())
        return t * 2

    model.update_router_biases(speed, reduce_loads=reduce)
    assert len(seen) == 2 and all(s.sum() == 2 * 6 * 2 for s in seen)


# ----------------------------------------------------------------------------- MTP


def test_mtp_inputs_and_targets_hand_example():
    input_ids = torch.tensor([[10, 11, 12, 13, 14],
                              [20, 21, 22, 23, 24]])
    labels = torch.tensor([[11, 12, 13, 14, -100],
                           [21, -100, 23, 24, 25]])
    # Inputs come from input_ids (a masked label never becomes an input token); t_S from labels.
    inputs, targets = mtp_inputs_and_targets(input_ids, labels, 1)
    assert inputs.tolist() == [[11, 12, 13, 14, 0], [21, 22, 23, 24, 25]]
    assert targets.tolist() == [[12, 13, 14, -100, -100], [-100, 23, 24, 25, -100]]
    inputs, targets = mtp_inputs_and_targets(input_ids, labels, 2)
    assert inputs.tolist() == [[12, 13, 14, 0, 0], [22, 23, 24, 25, 0]]
    assert targets.tolist() == [[13, 14, -100, -100, -100], [23, 24, 25, -100, -100]]
    inputs, targets = mtp_inputs_and_targets(input_ids, labels, 3)
    assert inputs.tolist() == [[13, 14, 0, 0, 0], [23, 24, 25, 0, 0]]
    assert targets.tolist() == [[14, -100, -100, -100, -100], [24, 25, -100, -100, -100]]


def test_losses_match_hand_computation():
    """lm loss, each MTP depth's loss (from the module pieces, by hand) and the total."""
    depth = 2
    cfg = tiny(num_nextn_predict_layers=depth, aux_loss_alpha=0.01, mtp_loss_weight=0.3)
    model = build_model(cfg, seed=3).train()
    batch, seq = 2, 7
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(9))
    ids, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[1, -1] = IGNORE_INDEX  # the second sequence has no next token at its end

    out = model.compute_loss(ids, labels)

    with torch.no_grad():
        cos, sin = model.rotary(torch.arange(seq))
        h = model.forward_stage(ids)
        head = model.lm_head.weight
        lm = ref_cross_entropy(rms(h, model.norm.weight) @ head.T, labels)
        mtp = []
        for k, module in enumerate(model.mtp, start=1):
            # position i sees token t_{i+k} = tokens[i+k] and predicts t_{i+k+1} = tokens[i+k+1]
            inp = torch.zeros(batch, seq, dtype=torch.long)
            tgt = torch.full((batch, seq), IGNORE_INDEX)
            for b in range(batch):
                for i in range(seq):
                    if i + k <= seq:
                        inp[b, i] = tokens[b, i + k]
                    if i + k + 1 <= seq and not (b == 1 and i + k + 1 == seq):
                        tgt[b, i] = tokens[b, i + k + 1]
            emb = model.embed_tokens.weight[inp]
            combined = torch.cat((rms(emb, module.enorm.weight), rms(h, module.hnorm.weight)), dim=-1)
            h = module.block(combined @ module.eh_proj.weight.T, cos, sin)
            mtp.append(ref_cross_entropy(rms(h, module.shared_head.norm.weight) @ head.T, tgt))

    torch.testing.assert_close(out.lm_loss, lm, rtol=1e-5, atol=1e-6)
    assert len(out.mtp_losses) == depth
    for got, want in zip(out.mtp_losses, mtp):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    balance = sum(m.balance_loss for m in model.moe_layers())
    assert len(list(model.moe_layers())) == 1 + depth
    torch.testing.assert_close(out.balance_loss, balance)
    assert out.balance_loss > 0
    total = lm + cfg.mtp_loss_weight * (mtp[0] + mtp[1]) / 2 + balance
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, (out.mtp_losses[0] + out.mtp_losses[1]) / 2)


def test_mtp_loss_zero_not_nan_when_all_targets_masked():
    cfg = tiny(num_nextn_predict_layers=2, aux_loss_alpha=0.01)
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(10))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 0] = ids[:, 1]  # the main loss has one target per row; every MTP target is masked
    out = model.compute_loss(ids, labels)
    assert all(loss.item() == 0.0 for loss in out.mtp_losses)
    assert torch.isfinite(out.loss) and out.lm_loss > 0
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name

    # fully masked labels: every loss term is 0, none NaN
    model.zero_grad()
    out = model.compute_loss(ids, torch.full_like(ids, IGNORE_INDEX))
    assert out.lm_loss.item() == 0.0 and all(loss.item() == 0.0 for loss in out.mtp_losses)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    assert masked_mean_cross_entropy(torch.randn(3, 5), torch.full((3,), IGNORE_INDEX)).item() == 0.0


def test_mtp_shares_embedding_and_head():
    depth = 2
    model = build_model(tiny(num_nextn_predict_layers=depth), seed=0).train()
    mtp_keys = [k for k in model.state_dict() if k.startswith("mtp.")]
    assert mtp_keys
    for key in mtp_keys:
        assert "embed" not in key and "lm_head" not in key and not key.endswith("shared_head.head.weight"), key
    assert {k for k in mtp_keys if "shared_head" in k} == {f"mtp.{d}.shared_head.norm.weight" for d in range(depth)}
    for module in model.mtp:
        for sub in module.modules():
            assert not isinstance(sub, torch.nn.Embedding)
            assert sub is not model.lm_head
            for p in sub.parameters(recurse=False):
                assert p.shape not in {model.embed_tokens.weight.shape, model.lm_head.weight.shape}

    # no parameter is a copy or a view of another one
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))

    # the one embedding and the one head are called for the main model and every depth
    calls = {"embed": [], "head": []}
    model.embed_tokens.register_forward_hook(lambda m, i, o: calls["embed"].append(m.weight.data_ptr()))
    # the head's weight goes straight into the fused head + cross-entropy: record what it is given
    import megads.model.model as model_module
    fused = model_module.linear_cross_entropy

    def recording(hidden, weight, labels):
        calls["head"].append(weight.data_ptr())
        return fused(hidden, weight, labels)

    ids = torch.randint(0, 64, (2, 5))
    model_module.linear_cross_entropy = recording
    try:
        out = model.compute_loss(ids, ids)
    finally:
        model_module.linear_cross_entropy = fused
    assert calls["embed"] == [model.embed_tokens.weight.data_ptr()] * (1 + depth)
    assert calls["head"] == [model.lm_head.weight.data_ptr()] * (1 + depth)

    # the MTP loss alone sends gradient into the shared tensors
    out.mtp_losses[-1].backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("first_k, layers", [(1, 3), (0, 2), (2, 2)])
def test_dense_then_moe_layers(first_k, layers):
    cfg = tiny(num_hidden_layers=layers, first_k_dense_replace=first_k, num_nextn_predict_layers=1)
    model = DeepSeekV3(cfg)
    for i in range(layers):
        mlp = model.layers[str(i)].mlp
        if i < first_k:
            assert isinstance(mlp, SwiGLU)
            assert mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
        else:
            assert isinstance(mlp, MoE)
            assert mlp.experts.gate_up_proj.shape == (8, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
            assert mlp.shared_experts.gate_proj.weight.shape == (cfg.moe_intermediate_size, cfg.hidden_size)
    assert isinstance(model.mtp[0].block.mlp, MoE)  # even when every main layer is dense
    assert model.mtp[0].block.layer_index == layers
    assert len(list(model.moe_layers())) == layers - first_k + 1


def test_main_model_is_causal():
    model = build_model(tiny(initializer_range=0.2), seed=0).eval()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(11))
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 64
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


# ----------------------------------------------------------------------------- RoPE / YaRN


def test_rope_frequencies_plain():
    dim, theta = 16, 10000.0
    inv_freq, magnitude = rope_frequencies(dim, theta, None)
    expected = torch.tensor([1.0 / theta ** (2 * i / dim) for i in range(dim // 2)])
    torch.testing.assert_close(inv_freq, expected)
    assert magnitude == 1.0


@pytest.mark.parametrize("factor, original", [(40.0, 4096), (4.0, 1024)])
def test_yarn_frequencies(factor, original):
    dim, theta, beta_fast, beta_slow = 64, 10000.0, 32, 1
    rs = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
          "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": 1.0, "mscale_all_dim": 1.0}
    plain, _ = rope_frequencies(dim, theta, None)
    scaled, magnitude = rope_frequencies(dim, theta, rs)
    rotations = original * plain / (2 * math.pi)  # full turns over the original context
    fast = rotations > beta_fast
    slow = rotations < beta_slow
    assert fast.any() and slow.any()
    torch.testing.assert_close(scaled[fast], plain[fast], rtol=0, atol=0)
    torch.testing.assert_close(scaled[slow], plain[slow] / factor, rtol=1e-6, atol=0)
    middle = ~fast & ~slow
    assert (scaled[middle] <= plain[middle]).all() and (scaled[middle] >= plain[middle] / factor * (1 - 1e-6)).all()
    assert math.isclose(magnitude, 1.0)  # mscale == mscale_all_dim

    # mscale without mscale_all_dim: cos/sin scaled by 0.1 ln(factor) + 1
    _, magnitude = rope_frequencies(dim, theta, {**rs, "mscale_all_dim": 0})
    assert math.isclose(magnitude, 0.1 * math.log(factor) + 1)


@pytest.mark.parametrize("mscale_all_dim", [1.0, 0.707])
def test_softmax_scale(mscale_all_dim):
    assert math.isclose(softmax_scale(192, None), 192 ** -0.5)
    rs = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0,
          "mscale_all_dim": mscale_all_dim}
    expected = 192 ** -0.5 * (0.1 * mscale_all_dim * math.log(40) + 1) ** 2
    assert math.isclose(softmax_scale(192, rs), expected, rel_tol=1e-12)
    assert math.isclose(softmax_scale(192, {**rs, "mscale_all_dim": 0}), 192 ** -0.5)
    assert yarn_mscale(1.0, 5.0) == 1.0


def test_rope_interleaved_equals_half_on_deinterleaved_input():
    dim, seq = 8, 6
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, seq, 3, dim, generator=gen)
    inter = RotaryEmbedding(dim, 10000.0, None, interleave=True)
    half = RotaryEmbedding(dim, 10000.0, None, interleave=False)
    cos, sin = inter(torch.arange(seq))
    perm = torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))

    a = inter.rotate(x, cos, sin)
    b = half.rotate(x[..., perm], cos, sin)
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    # reference: pair j of x (interleaved layout) is a complex number rotated by pos * inv_freq_j
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    angle = torch.arange(seq).double()[:, None] * inter.inv_freq.double()
    z = z * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    torch.testing.assert_close(a.double(), torch.cat((z.real, z.imag), dim=-1), rtol=1e-5, atol=1e-5)

    # q.k with both layouts agree and depend only on the position difference
    k = torch.randn(2, seq, 3, dim, generator=gen)
    dots_i = torch.einsum("bshd,bthd->bhst", a, inter.rotate(k, cos, sin))
    dots_h = torch.einsum("bshd,bthd->bhst", b, half.rotate(k[..., perm], cos, sin))
    torch.testing.assert_close(dots_i, dots_h, rtol=1e-5, atol=1e-5)
    same = torch.randn(1, 1, 1, dim, generator=gen).expand(1, seq, 1, dim)
    rq, rk = inter.rotate(same, cos, sin), inter.rotate(same, cos, sin)
    d = torch.einsum("bshd,bthd->st", rq, rk)
    torch.testing.assert_close(d[0, 2], d[3, 5], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- init and determinism


def test_init_is_seeded():
    cfg = tiny()
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for name, p in a.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name  # RMSNorm weights
            assert torch.equal(p, c.get_parameter(name))
        else:
            assert not torch.equal(p, c.get_parameter(name)), name
            assert 0.5 * cfg.initializer_range < p.std() < 1.5 * cfg.initializer_range, name
    for moe in a.moe_layers():
        assert torch.count_nonzero(moe.gate.e_score_correction_bias) == 0
        assert torch.count_nonzero(moe.tokens_per_expert) == 0
    # distinct parameters draw distinct values
    assert not torch.equal(a.layers["1"].mlp.experts.gate_up_proj[0], a.layers["1"].mlp.experts.gate_up_proj[1])


def test_forward_backward_is_bitwise_deterministic():
    cfg = tiny(aux_loss_alpha=0.001, num_nextn_predict_layers=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(13))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX

    def run():
        torch.manual_seed(0)
        model = build_model(cfg, seed=5).train()
        out = model.compute_loss(ids, labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = run()
    loss_b, grads_b = run()
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


# ----------------------------------------------------------------------------- fused head + loss


@pytest.mark.parametrize("num_tokens, chunk", [(7, 3), (16, 16), (33, 8)])
def test_fused_linear_cross_entropy_matches_unfused(num_tokens, chunk, monkeypatch):
    """Loss and both gradients equal logits -> F.cross_entropy (mean over non-ignored), across chunkings."""
    import megads.model.loss as loss_module
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", chunk)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(num_tokens, 12, generator=gen, requires_grad=True)
    weight = torch.randn(40, 12, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (num_tokens,), generator=gen)
    labels[::3] = IGNORE_INDEX
    fused = loss_module.linear_cross_entropy(hidden, weight, labels)
    (fused * 2.5).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX)
    (reference * 2.5).backward()
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-7)


def test_fused_linear_cross_entropy_all_ignored_is_zero():
    from megads.model.loss import linear_cross_entropy
    hidden = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(9, 6, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((4,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0

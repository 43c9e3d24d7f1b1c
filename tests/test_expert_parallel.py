"""Expert parallelism (parallel/expert.py AllToAllTokenDispatcher) against the single-process MoE.

Every rank builds, from fixed seeds, the tokens of ALL ranks (each rank its own number of tokens,
possibly zero), their routing and gates, the upstream gradient and the full expert weights. The
reference is one process holding all tokens and all experts: LocalTokenDispatcher + grouped_swiglu +
combine, backward. The EP run gives each rank its own tokens and its experts' slice of the weights
and compares: its tokens' outputs, the gradients w.r.t. its tokens and gates, its experts' weight
gradients, the per-local-expert counts and the EP group's global per-expert counts
(fp32, max |a - b| / max |b| <= 1e-5). Scenarios cover random routing, an EP rank without tokens,
all slots on one expert (ranks that receive nothing, ranks that send nothing) and experts with none.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megads.model.moe import grouped_swiglu
from parallel.expert import AllToAllTokenDispatcher, LocalTokenDispatcher, make_token_dispatcher
from parallel.group import Group
from tools.harness.distributed import run_distributed

H, I, K = 8, 6, 2
TOL = 1e-5


def tokens_per_rank(scenario: str, ep: int) -> list[int]:
    if scenario == "empty_rank":
        return [5 if r != 1 else 0 for r in range(ep)]
    return [3 + 2 * r for r in range(ep)]  # different on every rank


def routing(scenario: str, num_tokens: int, num_experts: int, ep: int, gen: torch.Generator):
    """topk_idx [T, K] of distinct experts per token (as a top-k router gives), and positive gates."""
    if scenario == "one_expert":  # every token -> the last rank's last expert, only (K = 1)
        topk = torch.full((num_tokens, 1), num_experts - 1, dtype=torch.long)
    elif scenario == "one_rank":  # every slot on rank 1's experts (its last unused when it has > 2;
        # with one expert per rank, K becomes 1)
        local = num_experts // ep
        topk = torch.stack([torch.randperm(local - 1 if local > 2 else local, generator=gen)[:K] + local
                            for _ in range(num_tokens)]) if num_tokens else torch.empty(0, K, dtype=torch.long)
    else:  # random; the last expert is never chosen (an expert with zero tokens)
        topk = torch.stack([torch.randperm(num_experts - 1, generator=gen)[:K]
                            for _ in range(num_tokens)]) if num_tokens else torch.empty(0, K, dtype=torch.long)
    gates = torch.rand(num_tokens, topk.shape[1], generator=gen) + 0.1
    return topk, gates


def build(scenario: str, ep: int, num_experts: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    counts = tokens_per_rank(scenario, ep)
    per_rank = []
    for t in counts:
        hidden = torch.randn(t, H, generator=gen)
        topk, gates = routing(scenario, t, num_experts, ep, gen)
        upstream = torch.randn(t, H, generator=gen)
        per_rank.append((hidden, topk, gates, upstream))
    gate_up = torch.randn(num_experts, 2 * I, H, generator=gen) * 0.3
    down = torch.randn(num_experts, H, I, generator=gen) * 0.3
    return per_rank, gate_up, down


def moe_forward_backward(dispatcher, hidden, topk, gates, upstream, gate_up, down):
    hidden = hidden.clone().requires_grad_(True)
    gates = gates.clone().requires_grad_(True)
    gate_up = gate_up.clone().requires_grad_(True)
    down = down.clone().requires_grad_(True)
    tokens, sorted_gates, tokens_per_expert, state = dispatcher.dispatch(hidden, topk, gates)
    out = dispatcher.combine(grouped_swiglu(tokens, sorted_gates, tokens_per_expert.tolist(), gate_up, down), state)
    (out * upstream).sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (hidden, gates, gate_up, down)]
    return out.detach(), grads, tokens_per_expert, state


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    if expected.numel() == 0:
        return
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()
    assert err <= TOL, f"{what}: max relative error {err:.3g} > {TOL:g} (rank {dist.get_rank()})"


def check_ep(scenarios, num_experts):
    """On every rank: EP vs the single-process reference for each scenario (rank-major token order)."""
    ep, rank = dist.get_world_size(), dist.get_rank()
    dispatcher = make_token_dispatcher(num_experts, Group.world("ep"))
    assert isinstance(dispatcher, AllToAllTokenDispatcher)
    local = slice(rank * num_experts // ep, (rank + 1) * num_experts // ep)
    assert dispatcher.local_experts == range(local.start, local.stop)
    report = {}
    for scenario in scenarios:
        per_rank, gate_up, down = build(scenario, ep, num_experts)
        cat = [torch.cat([r[i] for r in per_rank]) for i in range(4)]
        ref_out, ref_grads, ref_counts, _ = moe_forward_backward(LocalTokenDispatcher(num_experts), *cat, gate_up, down)
        mine = slice(sum(len(r[0]) for r in per_rank[:rank]), sum(len(r[0]) for r in per_rank[:rank + 1]))

        hidden, topk, gates, upstream = per_rank[rank]
        out, grads, counts, state = moe_forward_backward(dispatcher, hidden, topk, gates, upstream,
                                                         gate_up[local], down[local])
        what = f"{scenario} ep{ep}"
        assert_close(out, ref_out[mine], f"{what} output")
        assert_close(grads[0], ref_grads[0][mine], f"{what} d hidden")
        assert_close(grads[1], ref_grads[1][mine], f"{what} d gates")
        assert_close(grads[2], ref_grads[2][local], f"{what} d gate_up")
        assert_close(grads[3], ref_grads[3][local], f"{what} d down")
        assert counts.tolist() == ref_counts[local].tolist(), f"{what} local tokens_per_expert"
        assert dispatcher.global_tokens_per_expert(state).tolist() == ref_counts.tolist(), f"{what} global counts"
        assert state.local_tokens_per_expert.tolist() == torch.bincount(
            topk.reshape(-1), minlength=num_experts).tolist()
        report[scenario] = (sum(state.send_splits), sum(state.recv_splits))
    return report


SCENARIOS = ("random", "empty_rank", "one_expert", "one_rank")


@pytest.mark.parametrize("ep,num_experts", [pytest.param(2, 8, id="ep2"), pytest.param(4, 8, id="ep4"),
                                            pytest.param(4, 4, id="ep4-one-expert-per-rank")])
def test_all_to_all_dispatcher_matches_single_process(ep, num_experts):
    reports = run_distributed(check_ep, ep, args=(SCENARIOS, num_experts), timeout_s=45)
    # The edge cases really happened: a rank that sent nothing and ranks that received nothing.
    assert reports[1]["empty_rank"][0] == 0
    assert all(reports[r]["one_expert"][1] == 0 for r in range(ep - 1))
    assert all(reports[r]["one_rank"][1] == 0 for r in range(ep) if r != 1)


def test_factory_returns_local_dispatcher_without_expert_parallelism():
    assert type(make_token_dispatcher(8)) is LocalTokenDispatcher
    assert type(make_token_dispatcher(8, None)) is LocalTokenDispatcher


def _factory_on_size_one_group():
    return type(make_token_dispatcher(8, Group.world("ep"))).__name__


def test_factory_size_one_group_is_local():
    assert run_distributed(_factory_on_size_one_group, 1) == ["LocalTokenDispatcher"]

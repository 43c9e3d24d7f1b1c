"""Tensor and sequence parallelism (parallel/tensor/) against the unsharded single-process computation.

Multi-rank checks run on 2 and 4 CPU processes with gloo (parallel/distributed_testing.py). Every
rank builds the same full inputs and weights from fixed seeds, computes the plain PyTorch reference
itself, runs the parallel layers on its shard, and compares outputs, input gradients and gathered
weight gradients (fp32, max |a - b| / max |b| <= 1e-5). Layouts: TP 2 on 2 ranks, TP 4 on 4 ranks,
and two TP-2 groups on 4 ranks (group ranks differ from global ranks there).

At size 1 (no context, or a size-1 group) every piece must be the ordinary layer, bit for bit.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.context import ParallelContext
from parallel.grad_duties import declare_partial_grad, sum_partial_grads
from parallel.group import Group
from parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_along_dim,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
    shard_for_rank,
    vocab_parallel_cross_entropy,
)
from tools.harness.distributed import DistributedTestError, run_distributed

B, S, H, FFN, V = 2, 8, 16, 32, 32  # every split size divisible by 4
TOL = 1e-5

LAYOUTS = [pytest.param(2, 2, id="tp2"), pytest.param(4, 4, id="tp4"), pytest.param(4, 2, id="2xtp2")]



# ============================================================================ helpers (run in every rank)


def randn(*shape, seed, scale=1.0):
    """The same tensor on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def assert_close(actual, expected, what, tol=TOL):
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: max relative error {err:.3g} > {tol:g} (rank {dist.get_rank()})"


def tp_group(tp: int) -> Group:
    """This rank's TP group: the whole world, or consecutive blocks of `tp` ranks."""
    if tp == dist.get_world_size():
        return Group(dist.group.WORLD, "tp")
    group, _ = dist.new_subgroups(group_size=tp)
    return Group(group, "tp")


def context(group: Group, sequence_parallel: bool = False) -> ParallelContext:
    """A context whose TP group is `group` (the layers take their group and SP setting from it)."""
    return ParallelContext.from_groups(tp=group.pg, sequence_parallel=sequence_parallel)


def block(t, dim, group):
    """This rank's block of a full tensor along dim."""
    return shard_for_rank(t, dim, group.rank, group.size)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def rms_norm(x, weight, eps=1e-6):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ============================================================================ size 1: the ordinary layers


def _seeded(factory, seed=0):
    torch.manual_seed(seed)
    module = factory()
    return module, torch.rand(3)  # the RNG state after construction, as a fingerprint


@pytest.mark.parametrize("ours, plain", [
    (lambda: ColumnParallelLinear(H, FFN), lambda: nn.Linear(H, FFN, bias=False)),
    (lambda: RowParallelLinear(FFN, H), lambda: nn.Linear(FFN, H, bias=False)),
    (lambda: ColumnParallelLinear(H, FFN, ParallelContext.from_groups(sequence_parallel=True), gather_output=True,
                                  input_gathered=True),
     lambda: nn.Linear(H, FFN, bias=False)),
    (lambda: RowParallelLinear(FFN, H, ParallelContext.from_groups(sequence_parallel=True), input_is_parallel=False),
     lambda: nn.Linear(FFN, H, bias=False)),
    (lambda: VocabParallelEmbedding(V, H), lambda: nn.Embedding(V, H)),
    (lambda: VocabParallelEmbedding(V, H, ParallelContext.from_groups(sequence_parallel=True)),
     lambda: nn.Embedding(V, H)),
], ids=["column", "row", "column-flags", "row-flags", "embedding", "embedding-sp"])
def test_size_one_is_the_plain_layer(ours, plain):
    layer, after_ours = _seeded(ours)
    ref, after_ref = _seeded(plain)
    assert isinstance(layer, type(ref))
    assert torch.equal(layer.weight, ref.weight) and torch.equal(after_ours, after_ref)  # same init, same RNG use
    assert list(layer.state_dict()) == list(ref.state_dict()) == ["weight"]
    assert layer.tp_size == 1 and layer.full_shape == tuple(ref.weight.shape)

    x = torch.randint(0, V, (B, S)) if isinstance(ref, nn.Embedding) else torch.randn(B, S, ref.weight.shape[1])
    x_ours, x_ref = (x, x) if isinstance(ref, nn.Embedding) else (leaf(x), leaf(x))
    y_ours, y_ref = layer(x_ours), ref(x_ref)
    assert torch.equal(y_ours, y_ref)
    g = torch.randn_like(y_ref)
    (y_ours * g).sum().backward()
    (y_ref * g).sum().backward()
    assert torch.equal(layer.weight.grad, ref.weight.grad)
    if x_ours.requires_grad:
        assert torch.equal(x_ours.grad, x_ref.grad)

    # full-tensor helpers at size 1
    assert torch.equal(layer.full_weight(), layer.weight) and layer.full_weight() is not layer.weight
    new = torch.randn(layer.full_shape)
    layer.load_full_weight(new)
    assert torch.equal(layer.weight, new)
    with pytest.raises(ValueError, match="full weight of shape"):
        layer.load_full_weight(torch.randn(3, 3))


def test_size_one_cross_entropy_is_f_cross_entropy():
    logits = torch.randn(B, S, V) * 5
    labels = torch.randint(0, V, (B, S))
    labels[0, :3] = -100
    for ignore_index in (-100, 7):  # also an ignore_index inside the vocabulary
        labels = labels.masked_fill(labels == -100, ignore_index)
        a, b = leaf(logits), leaf(logits)
        ours = vocab_parallel_cross_entropy(a, labels, ignore_index)
        ref = F.cross_entropy(b.reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index,
                              reduction="none").reshape(B, S)
        assert torch.equal(ours, ref)
        assert (ours[labels == ignore_index] == 0).all()
        w = torch.randn(B, S)
        (ours * w).sum().backward()
        (ref * w).sum().backward()
        assert torch.equal(a.grad, b.grad)
    # 2-D input as the model passes it; low-precision logits computed in fp32
    labels = labels.masked_fill(labels == 7, -100)
    flat = vocab_parallel_cross_entropy(logits.reshape(-1, V).bfloat16(), labels.reshape(-1))
    assert flat.dtype == torch.float32
    assert torch.equal(flat, F.cross_entropy(logits.reshape(-1, V).bfloat16().float(), labels.reshape(-1),
                                             reduction="none"))
    with pytest.raises(ValueError, match="do not match"):
        vocab_parallel_cross_entropy(logits, labels[:, :-1])


def test_size_one_mappings_are_identities():
    x = torch.randn(B, S, H)
    single = Group(None, "tp")
    for mapping in (copy_to_tp_region, reduce_from_tp_region, scatter_to_tp_region, gather_from_tp_region,
                    scatter_to_sequence_parallel_region, gather_from_sequence_parallel_region,
                    reduce_scatter_to_sequence_parallel_region):
        assert mapping(x, single) is x
    assert torch.equal(gather_along_dim(x, 1, single), x)
    p = declare_partial_grad(nn.Parameter(x.clone()), "tp")
    p.grad = x.clone()
    sum_partial_grads([p], ParallelContext.single())  # no-op, no process group needed
    assert torch.equal(p.grad, x)


def test_shard_for_rank():
    full = torch.arange(24.0).reshape(4, 6)
    assert torch.equal(torch.cat([shard_for_rank(full, 1, r, 3) for r in range(3)], dim=1), full)
    assert torch.equal(shard_for_rank(full, 0, 1, 2), full[2:])
    assert torch.equal(shard_for_rank(full, -1, 0, 1), full)
    with pytest.raises(ValueError, match="divisible"):
        shard_for_rank(full, 0, 0, 3)
    with pytest.raises(ValueError, match="not in a group"):
        shard_for_rank(full, 0, 2, 2)


# ============================================================================ multi-rank checks (children)


def _check_mappings(tp):
    group = tp_group(tp)
    r, t = group.rank, group.size
    per_rank = [randn(B, S, H, seed=100 + i) for i in range(t)]  # rank i's own tensor, known to all
    grads = [randn(B, S, H, seed=200 + i) for i in range(t)]
    x, g = randn(B, S, H, seed=1), randn(B, S, H, seed=2)
    total, grad_total = torch.stack(per_rank).sum(0), torch.stack(grads).sum(0)

    # copy: identity; input gradient is the sum of every rank's gradient
    a = leaf(x)
    y = copy_to_tp_region(a, group)
    assert torch.equal(y, x)
    (y * grads[r]).sum().backward()
    assert_close(a.grad, grad_total, "copy_to_tp_region grad")

    # reduce: sum of the ranks' tensors; gradient passes through
    a = leaf(per_rank[r])
    y = reduce_from_tp_region(a, group)
    assert_close(y, total, "reduce_from_tp_region")
    (y * g).sum().backward()
    assert torch.equal(a.grad, g)

    # scatter / gather along the last dim
    a = leaf(x)
    y = scatter_to_tp_region(a, group)
    assert torch.equal(y, block(x, -1, group))
    y.backward(block(g, -1, group))
    assert torch.equal(a.grad, g)
    a = leaf(block(x, -1, group))
    y = gather_from_tp_region(a, group)
    assert torch.equal(y, x)
    y.backward(g)
    assert torch.equal(a.grad, block(g, -1, group))

    # sequence parallel: dim 1 of [B, S, H]
    a = leaf(x)
    y = scatter_to_sequence_parallel_region(a, group)
    assert torch.equal(y, block(x, 1, group)) and y.is_contiguous()
    y.backward(block(grads[r], 1, group))
    assert torch.equal(a.grad, torch.cat([shard_for_rank(grads[i], 1, i, t) for i in range(t)], dim=1))
    a = leaf(block(x, 1, group))
    y = gather_from_sequence_parallel_region(a, group)
    assert torch.equal(y, x) and y.is_contiguous()
    y.backward(grads[r])  # each rank's gradient is partial: reduce-scatter
    assert_close(a.grad, block(grad_total, 1, group), "gather_from_sequence_parallel_region grad")
    a = leaf(block(x, 1, group))
    gather_from_sequence_parallel_region(a, group, grad_is_partial=False).backward(g)  # replicated use
    assert torch.equal(a.grad, block(g, 1, group))
    a = leaf(per_rank[r])
    y = reduce_scatter_to_sequence_parallel_region(a, group)
    assert_close(y, block(total, 1, group), "reduce_scatter_to_sequence_parallel_region")
    y.backward(block(g, 1, group))
    assert torch.equal(a.grad, g)

    # gradients of replicated parameters used on sequence chunks: declared partial, summed over TP
    p = declare_partial_grad(nn.Parameter(torch.zeros(H)), "tp")
    p.grad = per_rank[r][0, 0].clone()
    q = declare_partial_grad(nn.Parameter(torch.zeros(S, B)), "tp")
    q.grad = per_rank[r][:, :, 0].t()  # strided: gloo would reduce the wrong memory if handed it
    sum_partial_grads([p, q], context(group))
    assert_close(p.grad, total[0, 0], "sum_partial_grads")
    assert_close(q.grad, total[:, :, 0].t(), "sum_partial_grads (strided grad)")

    # a [B, S, H] tensor with batch > 1 and an odd dim order still round-trips
    odd = randn(3, S, 5, seed=3)
    assert torch.equal(gather_along_dim(block(odd, 1, group), 1, group), odd)


def _check_column(tp):
    group = tp_group(tp)
    x, g = randn(B, S, H, seed=1), randn(B, S, FFN, seed=2)
    for sequence_parallel, gather_output in itertools.product((False, True), repeat=2):
        what = f"column(sp={sequence_parallel}, gather={gather_output})"
        torch.manual_seed(5)
        layer = ColumnParallelLinear(H, FFN, context(group, sequence_parallel), gather_output=gather_output)
        torch.manual_seed(5)
        ref = nn.Linear(H, FFN, bias=False)  # same seed, same full weight at any TP size
        assert layer.weight.shape == (FFN // tp, H)
        assert torch.equal(layer.full_weight(), ref.weight.detach()), what

        x_ref = leaf(x)
        y_ref = ref(x_ref)
        (y_ref * g).sum().backward()

        x_in = leaf(block(x, 1, group) if sequence_parallel else x)
        y = layer(x_in)
        expected, g_local = (y_ref, g) if gather_output else (block(y_ref, -1, group), block(g, -1, group))
        assert_close(y, expected.detach(), f"{what} output")
        (y * g_local).sum().backward()
        assert_close(x_in.grad, block(x_ref.grad, 1, group) if sequence_parallel else x_ref.grad, f"{what} input grad")
        assert_close(gather_along_dim(layer.weight.grad, 0, group), ref.weight.grad, f"{what} weight grad")

    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        ColumnParallelLinear(H, tp + 1, context(group))


def _check_row(tp):
    group = tp_group(tp)
    x, g = randn(B, S, FFN, seed=1), randn(B, S, H, seed=2)
    for sequence_parallel, input_is_parallel in itertools.product((False, True), repeat=2):
        what = f"row(sp={sequence_parallel}, input_is_parallel={input_is_parallel})"
        torch.manual_seed(6)
        layer = RowParallelLinear(FFN, H, context(group, sequence_parallel), input_is_parallel=input_is_parallel)
        torch.manual_seed(6)
        ref = nn.Linear(FFN, H, bias=False)
        assert layer.weight.shape == (H, FFN // tp)
        assert torch.equal(layer.full_weight(), ref.weight.detach()), what

        x_ref = leaf(x)
        y_ref = ref(x_ref)
        (y_ref * g).sum().backward()

        x_in = leaf(block(x, -1, group) if input_is_parallel else x)
        y = layer(x_in)
        expected, g_local = (block(y_ref, 1, group), block(g, 1, group)) if sequence_parallel else (y_ref, g)
        assert_close(y, expected.detach(), f"{what} output")
        (y * g_local).sum().backward()
        assert_close(x_in.grad, block(x_ref.grad, -1, group) if input_is_parallel else x_ref.grad, f"{what} input grad")
        assert_close(gather_along_dim(layer.weight.grad, 1, group), ref.weight.grad, f"{what} weight grad")


def _check_embedding(tp):
    group = tp_group(tp)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = torch.tensor([0, V // tp - 1, V // tp, V - 1])  # shard boundaries
    ids[1, :2] = 3  # a repeated id accumulates its gradient
    g = randn(B, S, H, seed=2)
    for sequence_parallel in (False, True):
        what = f"embedding(sp={sequence_parallel})"
        torch.manual_seed(7)
        layer = VocabParallelEmbedding(V, H, context(group, sequence_parallel))
        torch.manual_seed(7)
        ref = nn.Embedding(V, H)
        assert layer.weight.shape == (V // tp, H)
        assert torch.equal(layer.full_weight(), ref.weight.detach()), what

        y_ref = ref(ids)
        (y_ref * g).sum().backward()
        y = layer(ids)
        expected, g_local = (block(y_ref, 1, group), block(g, 1, group)) if sequence_parallel else (y_ref, g)
        assert_close(y, expected.detach(), f"{what} output")
        (y * g_local).sum().backward()
        assert_close(gather_along_dim(layer.weight.grad, 0, group), ref.weight.grad, f"{what} weight grad")


def _check_cross_entropy(tp):
    group = tp_group(tp)
    logits = randn(B, S, V, seed=1, scale=20.0)  # large logits: the max shift must be global
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    labels[0, :3] = -100
    labels[1, :4] = torch.tensor([0, V // tp - 1, V // tp, V - 1])
    w = randn(B, S, seed=3)

    # Record what crosses the group: O(tokens) numbers, never the logits.
    sent = []
    group.observer = lambda kind, nbytes, seconds, g: sent.append(nbytes // 4)    # fp32 numbers
    try:
        for ignore_index in (-100, 5):  # also an ignore_index inside the vocabulary (rank 0's shard)
            labels = labels.masked_fill(labels == -100, ignore_index)
            what = f"cross-entropy(ignore_index={ignore_index})"
            ref_in = leaf(logits)
            ref = F.cross_entropy(ref_in.reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index,
                                  reduction="none").reshape(B, S)
            (ref * w).sum().backward()
            shard = leaf(block(logits, -1, group))
            loss = vocab_parallel_cross_entropy(shard, labels, ignore_index, group)
            assert_close(loss, ref.detach(), f"{what} loss")
            assert (loss[labels == ignore_index] == 0).all()
            (loss * w).sum().backward()
            assert_close(shard.grad, block(ref_in.grad, -1, group), f"{what} grad")
    finally:
        group.observer = None
    assert sent and max(sent) <= 2 * B * S, f"all-reduced {max(sent)} numbers for {B * S} tokens"

    # 2-D logits as the model passes them, in bf16: fp32 loss, bf16 gradient
    labels = labels.masked_fill(labels == 5, -100)
    flat = leaf(block(logits, -1, group).reshape(-1, V // tp).bfloat16())
    loss = vocab_parallel_cross_entropy(flat, labels.reshape(-1), tp=group)
    ref_in = leaf(logits.reshape(-1, V).bfloat16())
    ref = F.cross_entropy(ref_in.float(), labels.reshape(-1), reduction="none")
    assert loss.dtype == torch.float32
    assert_close(loss, ref.detach(), "bf16 cross-entropy loss")
    loss.sum().backward()
    ref.sum().backward()
    assert flat.grad.dtype == torch.bfloat16
    assert_close(flat.grad.float(), block(ref_in.grad.float(), -1, group), "bf16 cross-entropy grad", tol=1e-2)

    # retain_graph: a second backward sees the same saved softmax
    shard = leaf(block(logits, -1, group))
    loss = vocab_parallel_cross_entropy(shard, labels, tp=group).sum()
    loss.backward(retain_graph=True)
    first = shard.grad.clone()
    loss.backward()
    assert torch.equal(shard.grad, 2 * first)


def _check_mlp(tp):
    """down(silu(gate(x)) * up(x)): column -> column -> row, with and without sequence parallelism."""
    group = tp_group(tp)
    x, g = randn(B, S, H, seed=1), randn(B, S, H, seed=2)
    full = {"gate": randn(FFN, H, seed=3, scale=0.2), "up": randn(FFN, H, seed=4, scale=0.2),
            "down": randn(H, FFN, seed=5, scale=0.2)}
    ref = {k: leaf(v) for k, v in full.items()}
    x_ref = leaf(x)
    y_ref = F.linear(F.silu(F.linear(x_ref, ref["gate"])) * F.linear(x_ref, ref["up"]), ref["down"])
    (y_ref * g).sum().backward()

    for sp in (False, True):
        ctx = context(group, sp)
        layers = {"gate": ColumnParallelLinear(H, FFN, ctx), "up": ColumnParallelLinear(H, FFN, ctx),
                  "down": RowParallelLinear(FFN, H, ctx)}
        for name, layer in layers.items():
            layer.load_full_weight(full[name])
        x_in = leaf(block(x, 1, group) if sp else x)
        y = layers["down"](F.silu(layers["gate"](x_in)) * layers["up"](x_in))
        expected, g_local = (block(y_ref, 1, group), block(g, 1, group)) if sp else (y_ref, g)
        assert_close(y, expected.detach(), f"mlp(sp={sp}) output")
        (y * g_local).sum().backward()
        assert_close(x_in.grad, block(x_ref.grad, 1, group) if sp else x_ref.grad, f"mlp(sp={sp}) input grad")
        for name, layer in layers.items():
            assert_close(gather_along_dim(layer.weight.grad, layer.partition_dim, group), ref[name].grad,
                         f"mlp(sp={sp}) {name} weight grad")


def _check_language_model(tp):
    """embedding -> norm -> MLP residual -> norm -> column head -> vocab-parallel CE (masked mean)."""
    group = tp_group(tp)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    labels[:, -2:] = -100
    full = {"embed": randn(V, H, seed=3), "gate": randn(FFN, H, seed=4, scale=0.2),
            "up": randn(FFN, H, seed=5, scale=0.2), "down": randn(H, FFN, seed=6, scale=0.2),
            "head": randn(V, H, seed=7, scale=0.3), "norm1": 1 + randn(H, seed=8, scale=0.1),
            "norm2": 1 + randn(H, seed=9, scale=0.1)}

    def forward(p, embed, gate, up, down, head, cross_entropy):
        h = embed(ids)
        a = rms_norm(h, p["norm1"])
        h = h + down(F.silu(gate(a)) * up(a))
        per_token = cross_entropy(head(rms_norm(h, p["norm2"])), labels)
        return per_token.sum() / (labels != -100).sum()

    ref = {k: leaf(v) for k, v in full.items()}
    loss_ref = forward(ref, lambda i: F.embedding(i, ref["embed"]), lambda a: F.linear(a, ref["gate"]),
                       lambda a: F.linear(a, ref["up"]), lambda a: F.linear(a, ref["down"]),
                       lambda a: F.linear(a, ref["head"]),
                       lambda z, y: F.cross_entropy(z.reshape(-1, V), y.reshape(-1), reduction="none"))
    loss_ref.backward()

    for sp in (False, True):
        ctx = context(group, sp)
        layers = {"embed": VocabParallelEmbedding(V, H, ctx), "gate": ColumnParallelLinear(H, FFN, ctx),
                  "up": ColumnParallelLinear(H, FFN, ctx), "down": RowParallelLinear(FFN, H, ctx),
                  "head": ColumnParallelLinear(H, V, ctx)}
        for name, layer in layers.items():
            layer.load_full_weight(full[name])
        norms = {k: nn.Parameter(full[k].clone()) for k in ("norm1", "norm2")}
        loss = forward(norms, *layers.values(),
                       lambda z, y: vocab_parallel_cross_entropy(z, y, tp=group))
        assert_close(loss, loss_ref.detach(), f"lm(sp={sp}) loss")
        loss.backward()
        for name, layer in layers.items():
            assert_close(gather_along_dim(layer.weight.grad, layer.partition_dim, group), ref[name].grad,
                         f"lm(sp={sp}) {name} weight grad")
        if sp:  # norms saw only this rank's tokens: their gradients are partial, summed over TP
            assert not torch.allclose(norms["norm1"].grad, ref["norm1"].grad)
            for p in norms.values():
                declare_partial_grad(p, "tp")
            sum_partial_grads(norms.values(), ctx)
        for name, p in norms.items():
            assert_close(p.grad, ref[name].grad, f"lm(sp={sp}) {name} grad")


# ============================================================================ multi-rank tests


@pytest.mark.parametrize("world_size, tp", LAYOUTS)
@pytest.mark.parametrize("check", [_check_mappings, _check_column, _check_row, _check_embedding,
                                   _check_cross_entropy, _check_mlp, _check_language_model],
                         ids=lambda f: f.__name__.removeprefix("_check_"))
def test_tensor_parallel_matches_single_process(check, world_size, tp):
    run_distributed(check, world_size, args=(tp,), timeout_s=60)


# ============================================================================ the test harness itself


def _rank_and_sum():
    x = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(x)
    return dist.get_rank(), x.item(), torch.get_num_threads()


def _fails_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()


def _hangs_on_rank_zero():
    if dist.get_rank() == 0:
        time.sleep(300)
    dist.barrier()


def _exits_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def test_run_distributed_returns_results_in_rank_order():
    assert run_distributed(_rank_and_sum, 3) == [(r, 3.0, 1) for r in range(3)]


def test_run_distributed_reports_the_failing_rank_first():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fails_on_rank_one, 2, timeout_s=30)
    message = str(info.value)
    assert "ValueError: rank one is unhappy" in info.value.failures[1]
    assert "_fails_on_rank_one" in info.value.failures[1]  # the child's traceback
    assert message.index("rank 1 ---") < message.index("rank 0 ---")  # root cause before its consequence


def test_run_distributed_turns_a_hang_into_a_failure():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_hangs_on_rank_zero, 2, timeout_s=2)
    assert "timed out after 2 s" in info.value.failures[0]
    assert "_hangs_on_rank_zero" in info.value.failures[0]  # where it hung


def test_run_distributed_reports_a_silent_death():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_exits_on_rank_one, 2, timeout_s=30)
    assert "exit code 3" in info.value.failures[1]

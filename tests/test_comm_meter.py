"""parallel.comm_meter.count_collectives: exact calls and bytes, through the Groups' observers, on 2 gloo ranks.

- Every Group collective (all_reduce, sum, all_gather_into, reduce_scatter_into sync and async,
  all_to_all with uneven splits, broadcast, gather, all_gather_object, barrier, exchange) on known
  tensors: calls and bytes per kind and per group name; size-1 groups issue nothing; nested blocks
  (an explicit list of Groups inside a ParallelContext's block); a Group's previous observer keeps
  being called and every observer is restored on exit; torch.distributed itself is not touched.
- A real training step (megads.train.trainer.train_step: model, ZeRO-1 optimizer, router-bias
  update) at DP 2 with EP 1 and with EP 2: the ZeRO-1 reduce-scatter and all-gather bytes on the
  dp / edp groups are exactly the padded gradient buckets of the parameters they hold, the
  gradient norm is one 4-byte all-reduce per group, and EP 2's token exchange is counted on "ep".
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megads.train.model_stages import ModelStages
from megads.train.optimizer import build_optimizer, expert_parameters
from megads.train.trainer import train_step
from parallel.context import GROUP_NAMES, ParallelContext
from parallel.group import Group
from parallel.zero1_buckets import DEFAULT_BUCKET_SIZE, plan_buckets
from test_layouts import MODEL
from test_layouts import TRAIN as LAYOUT_TRAIN
from tiny_model import tiny_config
from parallel.comm_meter import KINDS, count_collectives
from tools.harness.distributed import run_distributed

F32, F64, I64 = 4, 8, 8  # bytes per element


# ============================================================================ every collective, known tensors


def _known_collectives_worker():
    rank, other = dist.get_rank(), 1 - dist.get_rank()
    torch_functions = (dist.all_reduce, dist.all_to_all_single, dist.batch_isend_irecv)
    ctx = ParallelContext.from_groups(dp=dist.group.WORLD, tp=dist.new_group([0, 1]))
    pair = Group(dist.new_group([0, 1]), "pair")  # not in the context
    earlier: list[str] = []
    ctx.dp.observer = lambda kind, nbytes, seconds, group: earlier.append(kind)  # a tool's own observer

    with count_collectives(ctx) as stats:
        x = torch.ones(10)
        ctx.dp.all_reduce(x)  # 40 B
        assert x.tolist() == [2.0] * 10
        assert ctx.tp.sum(torch.ones(3, dtype=torch.float64)).tolist() == [2.0] * 3  # 24 B, on "tp"

        out = torch.empty(12, dtype=torch.float64)
        ctx.dp.all_gather_into(out, torch.full((6,), float(rank), dtype=torch.float64))  # 96 B
        assert out.tolist() == [0.0] * 6 + [1.0] * 6
        shard = torch.empty(4)
        ctx.dp.reduce_scatter_into(shard, torch.arange(8.0))  # 32 B
        assert shard.tolist() == [2 * v for v in range(4 * rank, 4 * rank + 4)]
        ctx.dp.reduce_scatter_into(shard, torch.ones(8), async_op=True).wait()  # 32 B, counted when issued
        assert shard.tolist() == [2.0] * 4

        # uneven all-to-all of 5-float rows: rank 0 sends [1, 3] rows, rank 1 sends [2, 1]
        send = [[1, 3], [2, 1]]
        inp = torch.full((sum(send[rank]), 5), float(rank))
        recv = [send[0][rank], send[1][rank]]
        got = torch.empty(sum(recv), 5)
        ctx.dp.all_to_all(got, inp, recv, send[rank])  # 80 B on rank 0, 60 B on rank 1
        assert got[:recv[0]].eq(0).all() and got[recv[0]:].eq(1).all()

        b = torch.arange(3) if rank == 0 else torch.zeros(3, dtype=torch.long)
        ctx.dp.broadcast(b, src=0)  # 24 B
        assert b.tolist() == [0, 1, 2]
        parts = [torch.empty(5) for _ in range(2)] if rank == 0 else None
        ctx.dp.gather(torch.full((5,), float(rank)), parts, dst=0)  # 20 B
        assert rank != 0 or [p[0].item() for p in parts] == [0.0, 1.0]
        assert ctx.dp.all_gather_object({"rank": rank}) == [{"rank": 0}, {"rank": 1}]  # 0 B
        ctx.dp.barrier()  # 0 B

        sent, received = torch.full((7,), float(rank)), torch.empty(7)
        for work in ctx.dp.exchange([("send", sent, other), ("recv", received, other)]):  # 56 B, one call
            work.wait()
        assert received.eq(other).all()

        # size-1 groups issue nothing (and so count nothing)
        ctx.pp.all_reduce(torch.ones(4))
        assert ctx.ep.sum(torch.ones(4)).tolist() == [1.0] * 4
        # torch.distributed called directly is not the runtime's: not counted
        dist.all_reduce(torch.ones(6))

        with count_collectives([pair, ctx.dp]) as inner:
            pair.all_reduce(torch.ones(2))  # 8 B on "pair": the inner block only
            ctx.dp.all_reduce(torch.ones(5))  # 20 B on "dp": both blocks
        pair.all_reduce(torch.ones(3))  # "pair" is no longer observed
        inner_restored = pair.observer is None

    ctx.dp.all_reduce(torch.ones(100))  # after the block: not counted
    return {"stats": stats, "inner": inner, "earlier": earlier, "inner_restored": inner_restored,
            "restored": ctx.dp.observer is not None and pair.observer is None
            and all(g.observer is None for g in ctx.groups() if g is not ctx.dp),
            "torch_untouched": torch_functions == (dist.all_reduce, dist.all_to_all_single, dist.batch_isend_irecv)}


def test_counts_every_group_collective_with_exact_bytes():
    results = run_distributed(_known_collectives_worker, world_size=2, timeout_s=60)
    for rank, r in enumerate(results):
        s, inner = r["stats"], r["inner"]
        assert r["restored"] and r["inner_restored"] and r["torch_untouched"]
        by_group = {key: (v.calls, v.bytes) for key, v in s.by_group().items()}
        assert by_group == {
            ("all_reduce", "dp"): (2, 10 * F32 + 5 * F32),
            ("all_reduce", "tp"): (1, 3 * F64),
            ("all_gather", "dp"): (1, 12 * F64),
            ("reduce_scatter", "dp"): (2, 8 * F32 + 8 * F32),
            ("all_to_all", "dp"): (1, (4 if rank == 0 else 3) * 5 * F32),
            ("broadcast", "dp"): (1, 3 * I64),
            ("gather", "dp"): (1, 5 * F32),
            ("all_gather_object", "dp"): (1, 0),
            ("barrier", "dp"): (1, 0),
            ("send_recv", "dp"): (1, 2 * 7 * F32),
        }, by_group
        assert set(s.by_kind()) == set(KINDS)
        assert s.bytes("all_reduce") == 15 * F32 + 3 * F64 and s.calls("all_reduce", "tp") == 1
        assert s.total_bytes == sum(b for _, b in by_group.values())
        # the call times add up per kind (their values are wall time: benchmarks look at them, not tests)
        assert s.seconds() == pytest.approx(sum(v.seconds for v in s.by_kind().values()), rel=1e-12, abs=0)
        assert "send_recv" in s.table(per=2)
        assert {key: (v.calls, v.bytes) for key, v in inner.by_group().items()} == {
            ("all_reduce", "pair"): (1, 2 * F32), ("all_reduce", "dp"): (1, 5 * F32)}
        # the observer dp had before the block saw every dp collective, in order, and still sees them after
        assert r["earlier"] == ["all_reduce", "all_gather", "reduce_scatter", "reduce_scatter", "all_to_all",
                                "broadcast", "gather", "all_gather_object", "barrier", "send_recv", "all_reduce",
                                "all_reduce"]


# ============================================================================ a real training step

TRAIN = {**LAYOUT_TRAIN, "max_steps": 1, "grad_clip": 1.0}     # test_layouts' model and batch, one step


def _padded_bucket_bytes(params, group_size: int) -> int:
    """Bytes of the gradient buckets ZeRO-1 reduce-scatters (and parameter buckets it all-gathers)
    for `params` over a group of `group_size`: the bucket plan of parallel/zero1_buckets.py."""
    buckets = plan_buckets(params, DEFAULT_BUCKET_SIZE, group_size)
    return sum(b.padded_numel for b in buckets) * params[0].element_size()


def _train_step_worker():
    world, rank = dist.get_world_size(), dist.get_rank()
    world_group = dist.group.WORLD
    out = {}
    for ep in (1, 2):
        # DP 2 over both ranks; EP 1: experts replicated over EDP = both ranks; EP 2: split, EDP size 1
        groups = dict(dp=world_group, stage=world_group, **({"edp": world_group} if ep == 1 else {"ep": world_group}))
        ctx = ParallelContext.from_groups(**groups)
        cfg = tiny_config({"model": MODEL, "train": TRAIN, "parallel": {"expert_parallel": ep}})
        model = ModelStages(cfg, ctx).train()
        optimizer = build_optimizer(model, cfg.train, ctx)
        gen = torch.Generator().manual_seed(3)
        batch = torch.randint(0, MODEL["vocab_size"], (TRAIN["global_batch_size"], TRAIN["seq_length"] + 1),
                              generator=gen)
        per_rank, mbs = TRAIN["global_batch_size"] // world, TRAIN["micro_batch_size"]
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        micro = [(mine[i:i + mbs, :-1], mine[i:i + mbs, 1:]) for i in range(0, per_rank, mbs)]
        with count_collectives(ctx) as stats:
            record = train_step(model, optimizer, cfg, 0, micro)
        assert not record["skipped"]
        experts = expert_parameters(model)
        expert_ids = {id(p) for p in experts}
        dense = list({id(p): p for p in model.parameters() if id(p) not in expert_ids and p.requires_grad}.values())
        out[ep] = {"stats": stats, "dense_bytes": _padded_bucket_bytes(dense, world),
                   "dense_numel_bytes": sum(p.numel() * p.element_size() for p in dense),
                   "expert_bytes": _padded_bucket_bytes(experts, world) if ep == 1 else 0}
    return out


def test_counts_the_bytes_of_a_real_training_step():
    results = run_distributed(_train_step_worker, world_size=2, timeout_s=120)
    for rank, per_layout in enumerate(results):
        for ep, r in per_layout.items():
            s, where = r["stats"], f"rank {rank} EP {ep}"
            assert r["dense_numel_bytes"] > 10_000, where  # a real model: every dense gradient crosses dp
            assert r["dense_numel_bytes"] <= r["dense_bytes"] < r["dense_numel_bytes"] + 4 * 8, where
            # ZeRO-1: each gradient bucket is reduce-scattered and each parameter bucket all-gathered, once
            assert s.bytes("reduce_scatter", "dp") == r["dense_bytes"], (where, s)
            assert s.bytes("all_gather", "dp") == r["dense_bytes"], (where, s)
            assert s.bytes("reduce_scatter", "edp") == r["expert_bytes"], (where, s)
            assert s.bytes("all_gather", "edp") == r["expert_bytes"], (where, s)
            assert s.calls("reduce_scatter") == s.calls("all_gather") == (2 if ep == 1 else 1), (where, s)
            # the gradient norm's sum of squares (one fp32) crosses dp once; the metrics' mean too
            assert s.calls("all_reduce", "dp") >= 2 and s.bytes("all_reduce", "dp") >= F32 + 2 * F64, (where, s)
            # router-bias update: expert loads summed over the stage (TP x DP) group
            assert s.calls("all_reduce", "stage") >= 1, (where, s)
            if ep == 2:  # the token exchange: dispatch and combine, forward and backward, per MoE layer
                assert s.calls("all_to_all", "ep") >= 4 * 2 and s.bytes("all_to_all", "ep") > 0, (where, s)
            else:
                assert s.calls("all_to_all") == 0, (where, s)
            assert {label for _, label in s.records} <= set(GROUP_NAMES), (where, s)
            assert s.total_bytes == sum(v.bytes for v in s.by_kind().values())

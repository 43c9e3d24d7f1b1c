"""parallel.comm_stats.count_collectives: exact calls and bytes for known tensors on 2 gloo ranks.

Covers every collective parallel/*.py calls (all_reduce, all_gather_single, reduce_scatter_single,
all_to_all_single with uneven splits) plus the deprecated spellings, broadcast, barrier and
batched point-to-point; the module-level aliases of parallel/tensor.py and parallel/data.py
(bound at import, so a patch of torch.distributed alone would miss them); group labels; nested
blocks; and that everything is restored on exit.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

import parallel.data as pdata
import parallel.tensor as ptensor
from parallel.comm_stats import count_collectives, patched_names
from parallel.distributed_testing import run_distributed

F32, F64, I64 = 4, 8, 8  # bytes per element


def _worker():
    rank, other = dist.get_rank(), 1 - dist.get_rank()
    originals = (dist.all_reduce, dist.isend, ptensor._all_gather_single, pdata._reduce_scatter_single)
    pair = dist.new_group([0, 1])
    early_in = torch.empty(5)
    made_before = [dist.P2POp(dist.isend, torch.full((5,), float(rank)), other),
                   dist.P2POp(dist.irecv, early_in, other)]  # committed inside the block
    with count_collectives(group_labels={pair: "pair"}) as stats:
        names = patched_names()
        x = torch.ones(10)
        dist.all_reduce(x)  # 40 B
        assert x.tolist() == [2.0] * 10
        dist.all_reduce(torch.ones(3, dtype=torch.float64), group=pair)  # 24 B, labelled "pair"

        out = torch.empty(12, dtype=torch.float64)
        dist.all_gather_single(out, torch.full((6,), float(rank), dtype=torch.float64))  # 96 B
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dist.all_gather_into_tensor(out, torch.zeros(6, dtype=torch.float64))  # 96 B, counted once
        shard = torch.empty(4)
        dist.reduce_scatter_single(shard, torch.arange(8.0))  # 32 B
        assert shard.tolist() == [2 * v for v in range(4 * rank, 4 * rank + 4)]

        # uneven all-to-all of 5-float rows: rank 0 sends [1, 3] rows, rank 1 sends [2, 1]
        send = [[1, 3], [2, 1]]
        inp = torch.full((sum(send[rank]), 5), float(rank))
        recv = [send[0][rank], send[1][rank]]
        got = torch.empty(sum(recv), 5)
        dist.all_to_all_single(got, inp, output_split_sizes=recv, input_split_sizes=send[rank])  # 80 B
        assert got[:recv[0]].eq(0).all() and got[recv[0]:].eq(1).all()

        b = torch.arange(3) if rank == 0 else torch.zeros(3, dtype=torch.long)
        dist.broadcast(b, src=0)  # 24 B
        assert b.tolist() == [0, 1, 2]
        dist.barrier()

        # batched point-to-point: P2POps made inside the block (with the patched names) and before it
        sent = torch.full((7,), float(rank))
        received = torch.empty(7)
        ops = [dist.P2POp(dist.isend, sent, other), dist.P2POp(dist.irecv, received, other)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        assert received.eq(other).all()
        for work in dist.batch_isend_irecv(made_before):
            work.wait()
        assert early_in.eq(other).all()

        # the repo's own helpers, through the aliases bound at import
        full = ptensor._all_gather_along_dim(torch.ones(2, 3), 0, dist.group.WORLD)  # 4x3 f32 = 48 B
        assert full.shape == (4, 3)
        with count_collectives() as inner:
            dist.all_reduce(torch.ones(2))  # 8 B, seen by both blocks
        rs = torch.empty(2)
        pdata._reduce_scatter_single(rs, torch.ones(4))  # 16 B

    dist.all_reduce(torch.ones(100))  # after the block: not counted
    restored = (dist.all_reduce, dist.isend, ptensor._all_gather_single, pdata._reduce_scatter_single)
    # P2POps created inside the block (holding the wrappers) still work outside it
    ops = [dist.P2POp(dist.isend, sent, other), dist.P2POp(dist.irecv, received, other)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return {"stats": stats, "inner": inner, "names": names,
            "restored": all(a is b for a, b in zip(originals, restored))}


def test_counts_known_collectives():
    results = run_distributed(_worker, world_size=2, timeout_s=60)
    for rank, r in enumerate(results):
        s, inner = r["stats"], r["inner"]
        assert r["restored"]
        assert "parallel.tensor._all_gather_single" in r["names"]
        assert "parallel.data._reduce_scatter_single" in r["names"]
        by_name = {name: (v.calls, v.bytes) for name, v in s.by_name().items()}
        assert by_name == {
            "all_reduce": (3, 10 * F32 + 3 * F64 + 2 * F32),
            "all_gather_single": (2, 12 * F64 + 4 * 3 * F32),
            "all_gather_into_tensor": (1, 12 * F64),
            "reduce_scatter_single": (2, 8 * F32 + 4 * F32),
            "all_to_all_single": (1, (4 if rank == 0 else 3) * 5 * F32),
            "broadcast": (1, 3 * I64),
            "barrier": (1, 0),
            "isend": (2, 7 * F32 + 5 * F32),
            "irecv": (2, 7 * F32 + 5 * F32),
            "batch_isend_irecv": (2, 0),
        }, by_name
        kinds = s.by_kind()
        assert kinds["all_gather"].calls == 3 and kinds["all_gather"].bytes == 2 * 12 * F64 + 48
        assert s.bytes("all_reduce", label="pair") == 3 * F64
        assert s.bytes("all_reduce", label="world") == 10 * F32 + 2 * F32
        assert s.total_bytes == sum(b for _, b in by_name.values())
        assert {n: (v.calls, v.bytes) for n, v in inner.by_name().items()} == {"all_reduce": (1, 8)}
        assert "all_reduce" in s.table(per=2)

"""Overlapped F&B (parallel/pipeline/overlap.py) and its lanes and twin groups (parallel/twin_groups.py).

- With ``parallel.overlap: true`` a DualPipe / DualPipeV training step through `ModelStages`
  (the full model: MLA, MoE with expert parallelism or tensor parallelism, MTP, ZeRO-1 AdamW with
  clipping) gives exactly the step it gives without overlap: the same loss and gradient norm and
  bitwise the same parameters after the optimizer step, on every rank. Same ops in the same order
  per lane, same reduction algorithm on the twin groups: nothing may differ.
- The two halves of an FB op really run at the same time (their recorded intervals intersect):
  a property of threads, not a timing ratio.
- A Group issues on its twin only in the backward lane, and two threads can run collectives
  concurrently on a group and its twin.
"""

import threading

import pytest
import torch
import torch.distributed as dist

from megads.train.model_stages import ModelStages
from megads.train.optimizer import build_optimizer
from megads.train.trainer import parallel_context, train_step
from parallel.group import Group
from parallel.twin_groups import BACKWARD_LANE, FORWARD_LANE, Lanes, create_twins
from test_pipeline_train import MODEL, TRAIN, global_batch, my_micro_batches
from tools.harness.distributed import run_distributed
from tiny_model import tiny_config

RECORD_KEYS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "skipped")


def make_config(schedule, overlap, n, sp=False, mbs=1, dp=1, tp=1, ep=1):
    return tiny_config({
        "model": MODEL, "train": {**TRAIN, "global_batch_size": n * mbs * dp, "micro_batch_size": mbs},
        "parallel": {"pipeline_parallel": 2, "schedule": schedule, "tensor_parallel": tp, "expert_parallel": ep,
                     "sequence_parallel": sp, "overlap": overlap}})


def step_worker(cases, layout):
    """One rank: per (schedule, micro-batches, sequence parallel, overlap) one training step from the
    same seed; returns the record, this rank's parameters after the step and, with overlap, the FB
    timings."""
    results = []
    for schedule, n, sp, overlap in cases:
        cfg = make_config(schedule, overlap, n, sp, **layout)
        ctx = parallel_context(cfg)
        model = ModelStages(cfg, ctx).train()
        runner = model.executor.fb_runner
        assert (runner is not None) == overlap
        optimizer = build_optimizer(model, cfg.train, ctx)
        batches = my_micro_batches(global_batch(cfg.train.global_batch_size), ctx.dp.rank, ctx.dp.size,
                                   cfg.train.micro_batch_size)
        record = train_step(model, optimizer, cfg, 0, batches)
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        timings = [(t.forward_start, t.forward_end, t.backward_start, t.backward_end)
                   for t in runner.timings] if overlap else None
        results.append(({k: record[k] for k in RECORD_KEYS}, params, timings))
    return results


def check_overlap_matches(results, cases):
    """Each overlapped case equals its plain twin exactly, and its FB halves ran concurrently."""
    by_case = {case: [rank[i] for rank in results] for i, case in enumerate(cases)}
    for schedule, n, sp, overlap in cases:
        if not overlap:
            continue
        plain, overlapped = by_case[(schedule, n, sp, False)], by_case[(schedule, n, sp, True)]
        for rank, ((want_rec, want_params, _), (got_rec, got_params, timings)) in enumerate(zip(plain, overlapped)):
            where = (schedule, n, "sequence parallel" if sp else "", "rank", rank)
            assert not got_rec["skipped"], where
            assert got_rec == want_rec, (where, got_rec, want_rec)      # exactly: loss, grad norm, ...
            assert got_params.keys() == want_params.keys(), where
            for name, want in want_params.items():
                assert torch.equal(got_params[name], want), (where, name,
                                                             (got_params[name] - want).abs().max().item())
            # Every FB op ran both halves, and in at least one they ran at the same time: the
            # second half started before the first ended.
            assert timings, (where, "no FB op recorded")
            assert any(max(fs, bs) < min(fe, be) for fs, fe, bs, be in timings), (where, timings)


def _cases(sequence_parallel=(False, False)):
    """DualPipe and DualPipeV with 4 micro-batches (1 and 3 FB ops per rank), each plain then
    overlapped; `sequence_parallel` per schedule."""
    return [(schedule, 4, sp, overlap) for schedule, sp in zip(("dualpipe", "dualpipev"), sequence_parallel)
            for overlap in (False, True)]


def test_overlap_with_expert_parallel_matches_plain_step():
    """World 4 = PP 2 x DP 2, EP 2 (experts split over the stage's two DP ranks): the backward
    half's token exchanges run on the EP group's twin."""
    cases = _cases()
    results = run_distributed(step_worker, 4, args=(cases, {"dp": 2, "ep": 2}), timeout_s=300)
    check_overlap_matches(results, cases)


def test_overlap_with_tensor_parallel_matches_plain_step():
    """World 4 = PP 2 x TP 2 (the MoE layers split each micro-batch's 2 sequences over TP): the
    backward half's all-reduces run on the TP group's twin. DualPipeV runs with sequence
    parallelism (all-gathers, reduce-scatters and the balance loss's all-reduces instead)."""
    cases = _cases(sequence_parallel=(False, True))
    results = run_distributed(step_worker, 4, args=(cases, {"tp": 2, "mbs": 2}), timeout_s=300)
    check_overlap_matches(results, cases)


# ----------------------------------------------------------------------------- lanes


class _LaneProbe(torch.autograd.Function):
    """Records the lane its backward runs in."""

    seen = []
    lanes = None

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _LaneProbe.seen.append(BACKWARD_LANE if _LaneProbe.lanes.in_backward_lane() else FORWARD_LANE)
        return grad


def lanes_worker():
    rank, world = dist.get_rank(), dist.get_world_size()
    lanes = Lanes()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]       # every rank creates every group
    singles = [dist.new_group([r]) for r in range(world)]
    pair, single = Group(pairs[rank // 2], "pair", lanes), Group(singles[rank], "single", lanes)
    other_pair = Group(dist.new_group([0, 1]), "other", lanes)     # same ranks as `pairs[0]`: shares its twin
    none = Group(None, "none", lanes)
    out = {}
    create_twins([pair, single, none] + ([other_pair] if rank < 2 else []))
    twin = pair.twin
    out["twinned"] = [g.name for g in (pair, single, none, other_pair) if g.twin is not None]
    out["twin_ranks"] = dist.get_process_group_ranks(twin)
    out["twin_is_new"] = twin is not pair.pg
    out["shared_twin"] = (other_pair.twin is twin) if rank < 2 else True
    out["lane0"] = pair.current() is pair.pg
    with lanes.use(BACKWARD_LANE):
        out["lane1"] = pair.current() is twin
        out["lane1_single"] = single.current() is single.pg
        out["lane1_none"] = none.current() is None
        untwinned = Group(dist.new_group([0, 1, 2, 3]), "untwinned", lanes)
        try:
            untwinned.current()
            out["untwinned_raises"] = False
        except RuntimeError:
            out["untwinned_raises"] = True
    out["lane_after"] = lanes.in_backward_lane()

    # Rule 2: in an overlap window a thread without its own lane is in the backward lane while in a backward.
    x = torch.ones(2, requires_grad=True)
    _LaneProbe.seen.clear()
    _LaneProbe.lanes = lanes
    _LaneProbe.apply(x).sum().backward()
    with lanes.window():
        _LaneProbe.apply(x).sum().backward()
        out["window_forward_lane"] = lanes.in_backward_lane()
    out["probe_lanes"] = list(_LaneProbe.seen)

    # Two threads, one on the group and one on its twin, running collectives at the same time:
    # every result is right (on one shared group they would pair up wrongly or hang).
    results = {}

    def reduce_many(lane, base):
        with lanes.use(lane):
            values = []
            for i in range(50):
                t = torch.tensor([float(base + i + pair.rank)])
                pair.all_reduce(t)
                values.append(t.item())
            results[lane] = values

    worker = threading.Thread(target=reduce_many, args=(BACKWARD_LANE, 1000))
    worker.start()
    reduce_many(FORWARD_LANE, 0)
    worker.join()
    out["concurrent_ok"] = (results[0] == [2.0 * i + 1 for i in range(50)]
                            and results[1] == [2.0 * (1000 + i) + 1 for i in range(50)])
    return out


def test_twin_groups_and_lanes():
    results = run_distributed(lanes_worker, 4, timeout_s=60)
    for rank, out in enumerate(results):
        assert out["twinned"] == (["pair", "other"] if rank < 2 else ["pair"]), rank   # not size 1
        mine = [0, 1] if rank < 2 else [2, 3]
        assert out["twin_ranks"] == mine and out["twin_is_new"] and out["shared_twin"], rank
        for key in ("lane0", "lane1", "lane1_single", "lane1_none", "untwinned_raises", "concurrent_ok"):
            assert out[key], (rank, key)
        assert out["lane_after"] is False and out["window_forward_lane"] is False
        assert out["probe_lanes"] == [FORWARD_LANE, BACKWARD_LANE], rank


def test_runner_reraises_either_half_after_both_finished():
    from parallel.pipeline.overlap import OverlapRunner

    lanes = Lanes()
    runner = OverlapRunner(lanes)
    finished = []

    def slow_forward():
        threading.Event().wait(0.05)
        finished.append("forward")

    def failing_backward():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as info:
        runner(slow_forward, failing_backward)
    assert finished == ["forward"]            # the forward half was not abandoned
    assert any("backward half" in note for note in info.value.__notes__)
    assert not runner.timings                 # a failed op records no timing

    seen = {}

    def forward():
        seen["forward"] = (torch.is_grad_enabled(), lanes.in_backward_lane())

    def backward():
        seen["backward"] = (torch.is_grad_enabled(), lanes.in_backward_lane(), threading.current_thread().name)

    with torch.no_grad():
        runner(forward, backward)
    assert seen["forward"] == (False, False)
    assert seen["backward"] == (False, True, "fb-backward")                    # the caller's grad mode
    assert len(runner.timings) == 1

    def autocast_state():
        seen["autocast"] = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        runner(lambda: None, autocast_state)
    assert seen["autocast"] == (True, torch.bfloat16)                          # and its autocast state

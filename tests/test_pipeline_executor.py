"""PipelineExecutor (parallel/pipeline/executor.py) runs every schedule to the same loss and
gradients as one process running the whole stack of stages.

Multi-rank checks run PP = 2 and 4 CPU processes with gloo (tools/harness/distributed.py): for
each schedule at its minimum micro-batch count and a larger valid one, the mean loss and every
parameter gradient of every stage match a single-process reference (fp32, relative error <= 1e-5;
DualPipe's two copies of a stage summed first). One rank process per PP runs all the cases, so
the processes start once. Single-process checks cover the graph-level B/W split on awkward graphs
(tied weights, casts, shared parameter-side nodes), a PP=1 executor (DualPipeV's local turn with
no messages), and clear errors.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from parallel.pipeline import Kind, Op, Schedule, build_schedule
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.stage_copies import sum_duplicate_stage_grads
from parallel.pipeline.weight_grad_split import _split_input_backward
from tools.harness.distributed import run_distributed
from tools.harness.pipeline import make_stage_modules, pipeline_mean_loss

HIDDEN = 16
ROWS = 3          # rows per micro-batch
RTOL = 1e-5


class Stage(nn.Module):
    """One pipeline stage: Linear + tanh, then a per-feature scale (a parameter fed straight into
    a multiply, next to the Linear whose weight goes through a transpose)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(HIDDEN, HIDDEN)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(HIDDEN))

    def forward(self, x):
        return torch.tanh(self.linear(x)) * self.scale


def build_stage(stage: int) -> Stage:
    torch.manual_seed(1000 + stage)          # both DualPipe copies of a stage start identical
    return Stage()


def micro_batches(n: int):
    g = torch.Generator().manual_seed(7 + n)
    inputs = [torch.randn(ROWS, HIDDEN, generator=g) for _ in range(n)]
    targets = [torch.randn(ROWS, HIDDEN, generator=g) for _ in range(n)]
    return inputs, targets


def reference(num_stages: int, n: int):
    """Mean loss over the micro-batches and every stage's parameter gradients, one process."""
    stages = [build_stage(s) for s in range(num_stages)]
    inputs, targets = micro_batches(n)
    losses = []
    for x, y in zip(inputs, targets):
        for stage in stages:
            x = stage(x)
        losses.append(F.mse_loss(x, y))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.item(), {s: [p.grad.clone() for p in stage.parameters()] for s, stage in enumerate(stages)}


def cases(pp: int):
    """(schedule, micro-batches, weight_grad): each schedule at its minimum and one larger count,
    plus the "recompute" B/W split on the schedules that split the backward."""
    out = []
    for name, counts in (("1f1b", (1, 5)), ("interleaved-1f1b", (pp, 2 * pp)), ("zbh1", (1, 2 * pp + 1)),
                         ("dualpipe", (2 * pp, 2 * pp + 2)), ("dualpipev", (2 * pp, 2 * pp + 1))):
        out += [(name, n, "split") for n in counts]
    out += [(name, 2 * pp + 2, "recompute") for name in ("zbh1", "dualpipe", "dualpipev")]
    return out


def run_cases(case_list):
    """One rank: run every case; return what the parent compares (losses, grads, op times)."""
    rank, pp = dist.get_rank(), dist.get_world_size()
    results = []
    for name, n, weight_grad in case_list:
        sched = build_schedule(name, pp, n)
        modules = make_stage_modules(sched, rank, build_stage)
        ex = PipelineExecutor(sched, rank, modules, F.mse_loss, None, "cpu",
                              activation_meta=((ROWS, HIDDEN), torch.float32), weight_grad=weight_grad)
        # Which op is running whenever a weight gradient lands in .grad (the timeline gets an op
        # when it ends, so its length is the index of the running compute op).
        compute = [op for op in sched.ops[rank] if op.is_compute]
        accumulated_in = set()

        def record(_, compute=compute, ex=ex, accumulated_in=accumulated_in):
            op = compute[len(ex.timeline)]
            accumulated_in.add(f"FB+{op.backward.kind}" if op.kind is Kind.FB else str(op.kind))
        for m in modules.values():
            for p in m.parameters():
                p.register_post_accumulate_grad_hook(record)
        inputs, targets = micro_batches(n)
        losses = ex.run(inputs, targets)
        sum_duplicate_stage_grads(sched, rank, modules)
        mean = pipeline_mean_loss(losses, n).item()
        grads = [(sched.stage_of(rank, c), [p.grad.clone() for p in m.parameters()]) for c, m in modules.items()]
        results.append({
            "mean_loss": mean,
            "losses": None if losses is None else [None if l is None else l.item() for l in losses],
            "grads": grads,
            "compute_ops": [str(op) for op in sched.ops[rank] if op.is_compute],
            "n_batches": sum(1 for i, op in enumerate(sched.ops[rank])
                             if op.is_comm and (i == 0 or not sched.ops[rank][i - 1].is_comm)),
            "timeline": [(str(t.op), t.start, t.end) for t in ex.timeline],
            "comm_timeline": [(t.start, t.end) for t in ex.comm_timeline],
            "step": (ex.step_start, ex.step_end),
            "bubble": ex.measured_bubble(),
            "accumulated_in": accumulated_in,
        })
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda pp: f"pp{pp}")
def distributed_run(request):
    pp = request.param
    case_list = cases(pp)
    per_rank = run_distributed(run_cases, pp, args=(case_list,), timeout_s=60)
    return pp, case_list, per_rank


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_loss_and_gradients_match_single_process(distributed_run):
    pp, case_list, per_rank = distributed_run
    failures = []
    for i, (name, n, weight_grad) in enumerate(case_list):
        sched = build_schedule(name, pp, n)
        ref_loss, ref_grads = reference(sched.num_stages, n)
        tag = f"{name} PP={pp} N={n} {weight_grad}"
        covered = set()
        per_mb = {}
        for rank in range(pp):
            res = per_rank[rank][i]
            if abs(res["mean_loss"] - ref_loss) > RTOL * abs(ref_loss):
                failures.append(f"{tag} rank {rank}: loss {res['mean_loss']} != {ref_loss}")
            for mb, loss in enumerate(res["losses"] or []):
                if loss is not None:
                    assert mb not in per_mb, f"{tag}: loss of micro-batch {mb} computed twice"
                    per_mb[mb] = loss
            for stage, grads in res["grads"]:
                covered.add(stage)
                for k, (g, r) in enumerate(zip(grads, ref_grads[stage])):
                    if _rel(g, r) > RTOL:
                        failures.append(f"{tag} rank {rank} stage {stage} param {k}: relative error {_rel(g, r):.2e}")
        assert sorted(per_mb) == list(range(n)), f"{tag}: losses returned for micro-batches {sorted(per_mb)}"
        assert math.isclose(sum(per_mb.values()) / n, ref_loss, rel_tol=RTOL), tag
        assert covered == set(range(sched.num_stages)), f"{tag}: stages {covered}"
    assert not failures, "\n".join(failures)


def test_weight_gradients_accumulate_only_in_weight_passes(distributed_run):
    # B computes input gradients only: every weight gradient lands during a W, BW or FB's BW.
    pp, case_list, per_rank = distributed_run
    for i, (name, n, weight_grad) in enumerate(case_list):
        kinds = set().union(*(per_rank[rank][i]["accumulated_in"] for rank in range(pp)))
        assert kinds <= {"W", "BW", "FB+BW"}, (name, n, weight_grad, kinds)
        has_w = any(op.kind is Kind.W for ops in build_schedule(name, pp, n).ops for op in ops)
        assert ("W" in kinds) == has_w, (name, n, weight_grad, kinds)


def test_op_times_are_recorded_in_order(distributed_run):
    pp, case_list, per_rank = distributed_run
    for i, (name, n, weight_grad) in enumerate(case_list):
        for rank in range(pp):
            res = per_rank[rank][i]
            tag = f"{name} PP={pp} N={n} rank {rank}"
            assert [op for op, _, _ in res["timeline"]] == res["compute_ops"], tag
            assert len(res["comm_timeline"]) == res["n_batches"], tag
            t0, t1 = res["step"]
            prev = t0
            for op, start, end in res["timeline"]:
                assert prev <= start <= end <= t1, f"{tag}: {op} at [{start}, {end}] after {prev}"
                prev = end
            for start, end in res["comm_timeline"]:
                assert t0 <= start <= end <= t1, tag
            b = res["bubble"]
            assert b["makespan"] == pytest.approx(t1 - t0)
            assert 0 < b["busy"] <= b["makespan"] and 0 <= b["bubble_fraction"] < 1, (tag, b)
            assert b["busy"] == pytest.approx(sum(e - s for _, s, e in res["timeline"]))


# ----------------------------------------------------------------------------- single process

class Awkward(nn.Module):
    """Tied weights, a residual, a norm, a parameter-side subgraph with saved tensors, casts and
    an unused parameter: the graph shapes the B/W split must cut correctly."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.ln = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.scale = nn.Parameter(torch.randn(8))
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = self.ln(torch.tanh(self.l1(x)) + x)
        wn = self.w * self.w / (self.w * self.w).sum()
        h = h @ wn.double().float()
        h = self.l2(h) + self.l1(h) * self.scale
        return h @ self.l2.weight.t()


# ----------------------------------------------------------------------------- forward-only schedules


class StatefulStage(nn.Module):
    """A stage that also takes this rank's per-micro-batch state: it adds the state's shift and
    records which stage ran."""

    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage
        self.inner = build_stage(stage)

    def forward(self, x, state):
        state["ran"].append(self.stage)
        return self.inner(x) + state["shift"]


def run_forward_only(case_list):
    """One rank: every schedule's forward-only twin with per-micro-batch state; returns the last
    stage's outputs (None on other ranks), the stages each micro-batch's state saw here, and whether
    any output or stage input required grad."""
    from parallel.pipeline import forward_only
    rank, pp = dist.get_rank(), dist.get_world_size()
    results = []
    for name, n in case_list:
        sched = forward_only(build_schedule(name, pp, max(n, 2 * pp), 2 if name == "interleaved-1f1b" else 1), n)
        modules = make_stage_modules(sched, rank, StatefulStage)
        grads_seen = []
        head = lambda out, target: (grads_seen.append(out.requires_grad), out.sum(dim=-1) * target)[1]  # noqa: E731
        ex = PipelineExecutor(sched, rank, modules, head, None, "cpu", activation_meta=((ROWS, HIDDEN), torch.float32))
        inputs, _ = micro_batches(n)
        states = [{"shift": 0.1 * mb, "ran": []} for mb in range(n)]
        with torch.enable_grad():                  # forward-only must not build graphs even so
            outputs = ex.run(inputs, [2.0] * n, states)
        results.append((None if outputs is None else [None if o is None else o.clone() for o in outputs],
                        [st["ran"] for st in states],
                        any(grads_seen)))
    return results


FORWARD_ONLY_CASES = [("1f1b", 3), ("interleaved-1f1b", 2), ("zbh1", 1), ("dualpipe", 3), ("dualpipev", 5)]


def test_forward_only_schedules_return_the_last_stage_outputs():
    """Every schedule's forward-only twin computes what one process chaining the stages computes,
    keeps no autograd graph, and hands every stage module its rank's per-micro-batch state."""
    pp = 2
    per_rank = run_distributed(run_forward_only, pp, args=(FORWARD_ONLY_CASES,), timeout_s=120)
    from parallel.pipeline import forward_only
    for case_index, (name, n) in enumerate(FORWARD_ONLY_CASES):
        sched = forward_only(build_schedule(name, pp, max(n, 2 * pp), 2 if name == "interleaved-1f1b" else 1), n)
        stages = [build_stage(s) for s in range(sched.num_stages)]
        with torch.no_grad():
            want = []
            for mb, x in enumerate(micro_batches(n)[0]):
                for stage in stages:
                    x = stage(x) + 0.1 * mb
                want.append(x.sum(dim=-1) * 2.0)
        for rank, results in enumerate(per_rank):
            outputs, ran, any_grad = results[case_index]
            assert not any_grad, name
            mine = [[s for s in range(sched.num_stages) if sched.locate(mb, s)[0] == rank] for mb in range(n)]
            assert ran == mine, (name, rank, ran)
            holds = [sched.locate(mb, sched.num_stages - 1)[0] == rank for mb in range(n)]
            if not any(holds):
                assert outputs is None, (name, rank)
                continue
            for mb, (got, expected) in enumerate(zip(outputs, want)):
                if holds[mb]:
                    torch.testing.assert_close(got, expected, rtol=RTOL, atol=1e-6)
                else:
                    assert got is None, (name, rank, mb)


@pytest.mark.parametrize("module", [lambda: Awkward(), lambda: nn.Sequential(nn.Linear(8, 8), nn.Tanh(),
                                                                           nn.Linear(8, 8), nn.LayerNorm(8))],
                         ids=["awkward", "mlp"])
def test_split_backward_matches_full_backward(module):
    torch.manual_seed(0)
    m = module()
    x0, g = torch.randn(5, 8), torch.randn(5, 8)
    x = x0.clone().requires_grad_()
    m(x).backward(g)
    ref = {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}
    ref_x = x.grad.clone()
    m.zero_grad(set_to_none=True)

    x = x0.clone().requires_grad_()
    out = m(x)
    root = get_gradient_edge(out)
    del out
    gx, deferred = _split_input_backward(root, g, x)
    assert torch.allclose(gx, ref_x, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in m.parameters()), "B must not touch weight gradients"
    del root, x
    deferred.run()
    for name, p in m.named_parameters():
        if name in ref:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert p.grad is None, name


def _single_rank(name, n, weight_grad="split"):
    sched = build_schedule(name, 1, n)
    modules = make_stage_modules(sched, 0, build_stage)
    ex = PipelineExecutor(sched, 0, modules, F.mse_loss, weight_grad=weight_grad)
    inputs, targets = micro_batches(n)
    losses = ex.run(inputs, targets)
    return sched, modules, losses


@pytest.mark.parametrize("name,n,weight_grad", [("1f1b", 3, "split"), ("zbh1", 2, "split"),
                                                ("dualpipev", 2, "split"), ("dualpipev", 3, "recompute")])
def test_single_rank_matches_reference(name, n, weight_grad):
    # PP = 1 needs no process group; dualpipev's two stages on one rank exercise the local turn.
    sched, modules, losses = _single_rank(name, n, weight_grad)
    ref_loss, ref_grads = reference(sched.num_stages, n)
    assert math.isclose(sum(losses) / n, ref_loss, rel_tol=RTOL)
    for c, m in modules.items():
        for g, r in zip((p.grad for p in m.parameters()), ref_grads[sched.stage_of(0, c)]):
            assert _rel(g, r) <= RTOL


def test_out_of_order_weight_gradient_is_an_error():
    sched = Schedule("bad", "linear", 1, 1, 2, 1)
    sched.ops.append([Op(Kind.F, 0, 0, 0), Op(Kind.B, 0, 0, 0), Op(Kind.F, 1, 0, 0), Op(Kind.B, 1, 0, 0),
                      Op(Kind.W, 1, 0, 0), Op(Kind.W, 0, 0, 0)])
    ex = PipelineExecutor(sched, 0, {0: build_stage(0)}, F.mse_loss)
    inputs, targets = micro_batches(2)
    with pytest.raises(RuntimeError, match="oldest pending weight gradient"):
        ex.run(inputs, targets)


def test_multi_rank_schedule_needs_activation_meta():
    sched = build_schedule("1f1b", 2, 2)
    with pytest.raises(ValueError, match="activation_meta"):
        PipelineExecutor(sched, 0, {0: build_stage(0)}, F.mse_loss)

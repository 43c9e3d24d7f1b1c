"""Data parallelism and ZeRO-1 (parallel/data_parallel.py, parallel/zero1*.py) against single-process AdamW.

The model is a tiny MoE block: dense linears (with a bias), an RMS-norm weight, a router, and
routed experts split by expert parallelism (EP) with an all-gather token dispatcher (tokens of the
EP group gathered, partial expert outputs reduce-scattered back, parallel.tensor's sequence-
parallel mappings over the EP group). Layouts on DP ranks: dp2-ep1 (expert-data-parallel group
= all ranks, a separate group), dp4-ep2 (EDP groups {0,2} and {1,3}) and dp2-ep2 (EDP size 1).
Groups are parallel.group.Groups over process groups made here (None: size 1).

Each rank runs 3 optimizer steps over 2 micro-batches of its own data; the reference is
torch.optim.AdamW (+ clip_grad_norm_, active) on the full model over the union of all ranks'
data, loss the mean over the global batch, in the pytest process. fp32, max |a - b| / max |b| <= 1e-5.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.data_parallel import allreduce_gradients
from parallel.group import Group
from parallel.tensor import gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region
from parallel.zero1 import NONFINITE_GRAD_NORM, DataParallelParams, DistributedOptimizer
from parallel.zero1_buckets import plan_buckets
from tools.harness.distributed import run_distributed

H, FFN, E = 6, 9, 4  # odd sizes: buckets whose sizes do not divide by dp
T, MICRO, STEPS = 4, 2, 3  # tokens per micro-batch, micro-batches per rank, optimizer steps
LRS = (2e-2, 1.5e-2, 1e-2)  # a schedule, set through param_groups every step
BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1
MAX_NORM = 0.05  # below every step's norm: clipping is active
SMALL_BUCKET = 40  # elements: w_in / w_out / experts are larger than a bucket
TOL = 1e-5



# ============================================================================ the model (every process)


class TinyMoE(nn.Module):
    """x + w_out(tanh(w_in x)) -> RMS norm -> + sum_e gate_e * (h @ expert_e); experts [first, first+n) here."""

    def __init__(self, num_local_experts: int = E, first_expert: int = 0, ep_group: Group | None = None):
        super().__init__()
        self.w_in = nn.Linear(H, FFN)
        self.w_out = nn.Linear(FFN, H, bias=False)
        self.norm = nn.Parameter(torch.ones(H))
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.Parameter(torch.empty(num_local_experts, H, H))
        self.first_expert, self.ep_group = first_expert, ep_group or Group(None, "ep")

    def forward(self, x):  # [T, H]
        h = x + self.w_out(torch.tanh(self.w_in(x)))
        h = self.norm * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        gates = F.softmax(self.router(h), dim=-1)
        # all-gather dispatch over the EP group: every rank's local experts see the group's tokens
        z = gather_from_sequence_parallel_region(torch.cat([h, gates], -1)[None], self.ep_group)[0]
        h_all, gates_all = z[:, :H], z[:, H:]
        local_gates = gates_all[:, self.first_expert:self.first_expert + self.experts.shape[0]]
        partial = torch.einsum("th,eho,te->to", h_all, self.experts, local_gates)
        return h + reduce_scatter_to_sequence_parallel_region(partial[None], self.ep_group)[0]

    def dense_parameters(self):
        return [p for name, p in self.named_parameters() if name != "experts"]


def full_model(seed: int = 0) -> TinyMoE:
    torch.manual_seed(seed)
    model = TinyMoE()
    with torch.no_grad():
        model.norm.add_(0.1 * torch.randn(H))
        model.experts.copy_(torch.randn(E, H, H) * 0.3)
    return model


def ep_model(ep: int, ep_rank: int, ep_group, seed: int = 0) -> TinyMoE:
    """This EP rank's part of full_model(seed): all dense parameters, experts [ep_rank*E/ep, ...)."""
    full = full_model(seed)
    n = E // ep
    model = TinyMoE(n, ep_rank * n, ep_group)
    state = full.state_dict()
    state["experts"] = state["experts"][ep_rank * n:(ep_rank + 1) * n]
    model.load_state_dict(state)
    return model


def global_batch(step: int, dp: int):
    g = torch.Generator().manual_seed(1000 + step)
    n = dp * MICRO * T
    return torch.randn(n, H, generator=g), torch.randn(n, H, generator=g)


def micro_batch(step: int, dp: int, rank: int, m: int):
    x, y = global_batch(step, dp)
    block = slice((rank * MICRO + m) * T, (rank * MICRO + m + 1) * T)
    return x[block], y[block]


def loss_fn(model, x, y):
    return (model(x) - y).pow(2).mean()


def rel_err(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


# ============================================================================ parallel runs (in the ranks)


class Layout:
    """Groups of a dp x ep layout: EP groups are consecutive ranks, EDP groups ranks with the same EP rank."""

    def __init__(self, ep: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.dp, self.ep, self.rank = world, ep, rank
        self.ep_rank = rank % ep
        self.dp_group = Group(dist.group.WORLD, "dp")
        self.ep_group = self.edp_group = None
        for k in range(world // ep):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(k * ep, (k + 1) * ep)))
            if rank // ep == k and ep > 1:
                self.ep_group = Group(g, "ep")
        for e in range(ep):
            g = dist.new_group(list(range(e, world, ep)))
            if self.ep_rank == e:
                self.edp_group = Group(g, "edp")

    def model(self, seed: int = 0) -> TinyMoE:
        return ep_model(self.ep, self.ep_rank, self.ep_group, seed)

    def optimizer(self, model: TinyMoE, bucket_size: int) -> DistributedOptimizer:
        return DistributedOptimizer(
            [(model.dense_parameters(), self.dp_group),
             DataParallelParams([model.experts], self.edp_group, grad_divisor=self.dp)],
            lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, bucket_size=bucket_size)


def train_step(layout: Layout, model, opt, step: int, data_step: int | None = None, poison=None):
    for group in opt.param_groups:
        group["lr"] = LRS[step % len(LRS)]
    opt.zero_grad()
    for m in range(MICRO):
        x, y = micro_batch(step if data_step is None else data_step, layout.dp, layout.rank, m)
        (loss_fn(model, x, y) / MICRO).backward()
    if poison is not None:
        poison(model)
    return opt.step(max_grad_norm=MAX_NORM)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_parity(ep: int, bucket_size: int):
    layout = Layout(ep)
    model = layout.model()
    opt = layout.optimizer(model, bucket_size)
    results = [train_step(layout, model, opt, step) for step in range(STEPS)]
    full = opt.full_state_dict()
    return {"params": snapshot(model), "norms": [r.grad_norm for r in results],
            "skipped": [r.skipped for r in results], "dense_state": full["params"][0],
            "expert_state": full["params"][1], "steps": opt.steps}


def run_nonfinite_skip(ep: int):
    layout = Layout(ep)
    model = layout.model()
    opt = layout.optimizer(model, SMALL_BUCKET)
    assert not train_step(layout, model, opt, 0).skipped
    before, shards_before = snapshot(model), _clone_state(opt.state_dict()["shards"])

    def nan_in_dense_on_rank_1(m):
        if layout.rank == 1:
            m.w_in.weight.grad[2, 3] = float("nan")

    def inf_in_experts_on_last_rank(m):
        if layout.rank == layout.dp - 1:
            m.experts.grad[0, 1, 2] = float("inf")

    for step, poison in ((1, nan_in_dense_on_rank_1), (2, inf_in_experts_on_last_rank)):
        result = train_step(layout, model, opt, step, poison=poison)
        assert result.skipped, f"step {step} was not skipped on rank {layout.rank}"
        assert result.reason == NONFINITE_GRAD_NORM
        assert not torch.isfinite(torch.tensor(result.grad_norm))
        after = snapshot(model)
        assert all(torch.equal(after[k], before[k]) for k in before), "a skipped step changed parameters"
        assert _states_equal(opt.state_dict()["shards"], shards_before), "a skipped step changed the optimizer state"
    assert opt.steps == 1
    result = train_step(layout, model, opt, 3)
    assert not result.skipped and opt.steps == 2
    # The skipped steps left no trace: the same as two plain steps on the same data.
    model_b = layout.model()
    opt_b = layout.optimizer(model_b, SMALL_BUCKET)
    train_step(layout, model_b, opt_b, 0)
    result_b = train_step(layout, model_b, opt_b, 3)
    assert result_b.grad_norm == result.grad_norm
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))
    return True


def _clone_state(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone_state(v) for v in state)
    return state


def _states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


def run_state_dict_round_trip(ep: int):
    layout = Layout(ep)
    # A: three steps straight
    model_a = layout.model()
    opt_a = layout.optimizer(model_a, SMALL_BUCKET)
    norms_a = [train_step(layout, model_a, opt_a, s).grad_norm for s in range(STEPS)]

    # B: two steps, checkpoint (through torch.save / weights_only load), fresh objects, one more step
    model = layout.model()
    opt = layout.optimizer(model, SMALL_BUCKET)
    for s in range(STEPS - 1):
        train_step(layout, model, opt, s)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    full = opt.full_state_dict()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b = layout.model(seed=123)  # different weights: everything must come from the checkpoint
    opt_b = layout.optimizer(model_b, SMALL_BUCKET)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["optim"])
    assert opt_b.steps == STEPS - 1 and opt_b.param_groups[0]["lr"] == LRS[STEPS - 2]
    norm_b = train_step(layout, model_b, opt_b, STEPS - 1).grad_norm
    assert norm_b == norms_a[-1]
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), f"{name} differs after the round trip (rank {layout.rank})"

    # The shard state does not load under another layout ...
    other = layout.optimizer(layout.model(), 100)  # buckets 63, 60, 3: another layout
    with pytest.raises(ValueError, match="another layout"):
        other.load_state_dict(ckpt["optim"])
    # ... the full state does: reshard into a one-bucket layout and continue (fp32 reordering only).
    everyone = [None] * layout.dp
    dist.all_gather_object(everyone, full)
    full = dict(full, params=[everyone[0]["params"][0], everyone[layout.ep_rank]["params"][1]])
    model_c = layout.model(seed=7)
    model_c.load_state_dict(ckpt["model"])
    opt_c = layout.optimizer(model_c, 1 << 20)
    opt_c.load_full_state_dict(full)
    norm_c = train_step(layout, model_c, opt_c, STEPS - 1).grad_norm
    assert abs(norm_c - norms_a[-1]) <= TOL * norms_a[-1]
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert rel_err(c, a) <= TOL
    return True


def run_allreduce_gradients():
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = [(3, 5), (7,), (2, 2), (11, 3)]

    def grad(i, r):
        return torch.randn(shapes[i], generator=torch.Generator().manual_seed(10 * i + r))

    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = grad(i, rank)
    params[3].grad = grad(3, rank).t().contiguous().t()  # strided .grad
    params[1].grad = None if rank == 0 else params[1].grad  # None counts as zero
    allreduce_gradients(params, Group(dist.group.WORLD, "dp"), bucket_bytes=64)  # 16 fp32 per bucket: some larger
    for i, p in enumerate(params):
        expected = sum(grad(i, r) for r in range(world) if not (i == 1 and r == 0)) / world
        assert rel_err(p.grad, expected) <= TOL, f"param {i}"

    # expert-style: summed over a subgroup, divided by the full dp
    subgroups = [dist.new_group([r for r in range(world) if r % 2 == parity]) for parity in (0, 1)]
    sub = Group(subgroups[rank % 2], "edp")
    p = nn.Parameter(torch.zeros(5))
    p.grad = torch.full((5,), float(rank))
    allreduce_gradients([p], sub, grad_divisor=world)
    with pytest.raises(TypeError, match="Group"):  # a raw process group is a mistake, not size 1
        allreduce_gradients([p], dist.group.WORLD)
    assert torch.allclose(p.grad, torch.full((5,), sum(r for r in range(world) if r % 2 == rank % 2) / world))
    return True


def _seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MP_KWARGS = dict(lr=0.1, betas=BETAS, eps=EPS, weight_decay=WD)


def run_model_parallel_norm():
    """4 ranks = dp 2 x mp 2. `w` is split over mp (distinct shards), `n` replicated over mp."""
    rank = dist.get_rank()
    dp_rank, mp_rank = rank // 2, rank % 2
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_group, mp_group = Group(dp_groups[mp_rank], "dp"), Group(mp_groups[dp_rank], "model")
    w = nn.Parameter(_seeded(10 + mp_rank, 3, 5))
    n = nn.Parameter(_seeded(20, 5))
    kwargs = dict(MP_KWARGS, bucket_size=7, model_parallel_group=mp_group)
    with pytest.raises(ValueError, match="replicated_in_model_parallel"):
        DistributedOptimizer([([w, n], dp_group)], **kwargs)
    opt = DistributedOptimizer([([w, n], dp_group)], replicated_in_model_parallel=lambda p: p is n, **kwargs)
    opt.zero_grad()
    w.grad.copy_(_seeded(100 + 10 * mp_rank + dp_rank, 3, 5))
    n.grad.copy_(_seeded(200 + dp_rank, 5))  # the same on both mp ranks, as TP-replicated gradients are
    result = opt.step(max_grad_norm=0.5)
    return mp_rank, result.grad_norm, w.detach().clone(), n.detach().clone()


# ============================================================================ the reference (pytest process)


def reference_run(dp: int):
    model = full_model()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LRS[0], betas=BETAS, eps=EPS)
    norms = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LRS[step % len(LRS)]
        opt.zero_grad()
        x, y = global_batch(step, dp)
        loss_fn(model, x, y).backward()  # the mean over the global batch
        norms.append(torch.nn.utils.clip_grad_norm_(list(model.parameters()), MAX_NORM).item())
        opt.step()
    return model, opt, norms


_REFERENCES: dict[int, tuple] = {}


def reference(dp: int):
    if dp not in _REFERENCES:
        _REFERENCES[dp] = reference_run(dp)
    return _REFERENCES[dp]


# ============================================================================ tests


@pytest.mark.parametrize("dp, ep, bucket_size", [
    pytest.param(2, 1, SMALL_BUCKET, id="dp2-ep1-small-buckets"),
    pytest.param(4, 2, SMALL_BUCKET, id="dp4-ep2-small-buckets"),
    pytest.param(2, 2, 4_000_000, id="dp2-ep2-one-bucket"),
])
def test_zero1_matches_single_process_adamw(dp, ep, bucket_size):
    results = run_distributed(run_parity, dp, args=(ep, bucket_size), timeout_s=60)
    ref_model, ref_opt, ref_norms = reference(dp)
    assert all(n > MAX_NORM for n in ref_norms), f"clipping must be active: norms {ref_norms}"
    ref_params = dict(ref_model.named_parameters())
    n_local = E // ep
    for rank, res in enumerate(results):
        assert res["skipped"] == [False] * STEPS and res["steps"] == STEPS
        for step, (norm, ref_norm) in enumerate(zip(res["norms"], ref_norms)):
            assert abs(norm - ref_norm) <= TOL * ref_norm, f"rank {rank} step {step}: norm {norm} != {ref_norm}"
        for name, value in res["params"].items():
            expected = ref_params[name].detach()
            if name == "experts":
                ep_rank = rank % ep
                expected = expected[ep_rank * n_local:(ep_rank + 1) * n_local]
            assert rel_err(value, expected) <= TOL, f"rank {rank}: {name}"
    # The gathered optimizer state is AdamW's (rank 0 of each group holds it).
    dense = [p for name, p in ref_model.named_parameters() if name != "experts"]
    for p, state in zip(dense, results[0]["dense_state"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(state[key], ref_opt.state[p][key]) <= TOL, key
        assert rel_err(state["param"], p.detach()) <= TOL
    for ep_rank in range(ep):  # global rank ep_rank is EDP rank 0 of EP rank ep_rank's experts
        (state,) = results[ep_rank]["expert_state"]
        block = slice(ep_rank * n_local, (ep_rank + 1) * n_local)
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(state[key], ref_opt.state[ref_model.experts][key][block]) <= TOL, key
    assert all(res["dense_state"] is None for res in results[1:])


@pytest.mark.parametrize("dp, ep", [pytest.param(2, 1, id="dp2"), pytest.param(4, 2, id="dp4-ep2")])
def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(dp, ep):
    assert run_distributed(run_nonfinite_skip, dp, args=(ep,), timeout_s=60) == [True] * dp


def test_state_dict_round_trip_continues_bit_identically():
    assert run_distributed(run_state_dict_round_trip, 4, args=(2,), timeout_s=60) == [True] * 4


def test_allreduce_gradients_averages_in_buckets():
    assert run_distributed(run_allreduce_gradients, 4, timeout_s=60) == [True] * 4


def test_grad_norm_counts_model_parallel_replicas_once():
    results = run_distributed(run_model_parallel_norm, 4, timeout_s=60)
    # the whole model (both shards of w, one n) with DP-averaged gradients
    ref = [nn.Parameter(_seeded(10, 3, 5)), nn.Parameter(_seeded(11, 3, 5)), nn.Parameter(_seeded(20, 5))]
    ref[0].grad = (_seeded(100, 3, 5) + _seeded(101, 3, 5)) / 2
    ref[1].grad = (_seeded(110, 3, 5) + _seeded(111, 3, 5)) / 2
    ref[2].grad = (_seeded(200, 5) + _seeded(201, 5)) / 2
    norm = torch.nn.utils.clip_grad_norm_(ref, 0.5).item()
    torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}], **MP_KWARGS).step()
    assert norm > 0.5
    for mp_rank, grad_norm, w, n in results:
        assert abs(grad_norm - norm) <= TOL * norm, (grad_norm, norm)
        assert rel_err(w, ref[mp_rank]) <= TOL and rel_err(n, ref[2]) <= TOL


# ---------------------------------------------------------------------------- single process


def test_bucket_layout_edge_cases():
    params = [torch.empty(9, 6), torch.empty(9), torch.empty(6, 9), torch.empty(6), torch.empty(4, 6),
              torch.empty(3, dtype=torch.float64)]
    for size in (1, 2, 3, 4):
        buckets = plan_buckets(params, SMALL_BUCKET, size)
        # 54 > 40 alone; 9 (+54 would exceed); 54 alone; 6 + 24; the float64 parameter by itself
        assert [b.numel for b in buckets] == [54, 9, 54, 30, 3]
        assert [[s.index for s in b.slots] for b in buckets] == [[0], [1], [2], [3, 4], [5]]
        for b in buckets:
            assert b.padded_numel % size == 0 and 0 <= b.padded_numel - b.numel < size
            covered = {}
            for rank in range(size):
                start, end = b.shard_range(rank)
                assert end - start == b.padded_numel // size
                for slot, lo, hi, in_param in b.segments(rank):
                    assert 0 <= lo < hi <= end - start
                    covered.setdefault(slot.index, []).append((in_param, in_param + hi - lo))
            for slot in b.slots:  # every element of every parameter is owned by exactly one rank
                ranges = sorted(covered[slot.index])
                assert ranges[0][0] == 0 and ranges[-1][1] == slot.numel
                assert all(a[1] == b_[0] for a, b_ in zip(ranges, ranges[1:]))
    assert plan_buckets(params[:4], 10**9, 4)[0].numel == 54 + 9 + 54 + 6  # everything in one bucket
    with pytest.raises(ValueError, match="bucket_size"):
        plan_buckets(params, 0, 2)


def test_group_none_is_plain_adamw_and_skips_nonfinite():
    """Without data parallelism (group None, no process group) it is AdamW with clip_grad_norm_."""
    ref_model, _, ref_norms = reference(1)
    model = full_model()
    opt = DistributedOptimizer([(model.dense_parameters(), None), ([model.experts], None)],
                               lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, bucket_size=SMALL_BUCKET)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LRS[step % len(LRS)]
        model.zero_grad(set_to_none=True)  # replaces the .grad views: step must still see the gradients
        x, y = global_batch(step, 1)
        for m in range(MICRO):
            rows = slice(m * T, (m + 1) * T)
            (loss_fn(model, x[rows], y[rows]) / MICRO).backward()
        result = opt.step(max_grad_norm=MAX_NORM)
        assert not result.skipped and abs(result.grad_norm - ref_norms[step]) <= TOL * ref_norms[step]
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p, ref) <= TOL, name

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn(model, *global_batch(0, 1)).backward()
    model.norm.grad[0] = float("nan")
    result = opt.step(max_grad_norm=MAX_NORM)
    assert result.skipped and result.reason == NONFINITE_GRAD_NORM and opt.steps == STEPS
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_bf16_moments_store_rounded_state_and_track_fp32_moments():
    """moments_dtype=bfloat16 (DeepSeek-V3's AdamW moments): the moments are stored in BF16, the
    update is computed in FP32 from them, so parameters follow the FP32-moment run closely but not
    exactly; the state round-trips and the full state is FP32."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = full_model()
        opt = DistributedOptimizer([(model.dense_parameters(), None), ([model.experts], None)], lr=LRS[0],
                                   betas=BETAS, eps=EPS, weight_decay=WD, bucket_size=SMALL_BUCKET,
                                   moments_dtype=dtype)
        for step in range(STEPS):
            opt.zero_grad()
            loss_fn(model, *global_batch(step, 1)).backward()
            assert not opt.step(max_grad_norm=MAX_NORM).skipped
        runs[dtype] = (model, opt)
    (fp32_model, _), (bf16_model, bf16_opt) = runs[torch.float32], runs[torch.bfloat16]
    state = bf16_opt.state_dict()
    assert all(t.dtype == torch.bfloat16 for shard in state["shards"] for t in shard["exp_avg"] + shard["exp_avg_sq"])
    assert all(t.dtype == torch.float32 for shard in state["shards"] for t in shard["master"])
    errors = [rel_err(a, b) for a, b in zip(bf16_model.parameters(), fp32_model.parameters())]
    assert 0 < max(errors) <= 2e-3, errors        # rounded moments move the update a little (seen 2.6e-4)
    full = bf16_opt.full_state_dict()
    assert all(entry["exp_avg"].dtype == torch.float32 for group in full["params"] for entry in group)
    with pytest.raises(ValueError, match="moments_dtype"):
        DistributedOptimizer([(full_model().dense_parameters(), None)], moments_dtype=torch.float16)

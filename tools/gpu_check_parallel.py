"""Check the parallel layers and the model on one CUDA GPU against CPU; exit 1 on any failure.

    python tools/gpu_check_parallel.py [--skip-two-rank] [--timeout 300]

On a machine without CUDA it prints "skipped: no CUDA" and exits 0.

What one GPU allows. NCCL refuses two ranks on the same device ("Duplicate GPU detected : rank 1
and rank 0 both on CUDA device ...", ncclInvalidUsage since NCCL 2.5; NVIDIA: it would not work
even without the check, NVIDIA/nccl#418). So this script runs:

A. NCCL, world size 1 (one process): every collective helper of parallel/tensor/mappings.py and
   parallel/expert.py on CUDA tensors over a real size-1 NCCL group wrapped in a parallel.group.Group
   (the public wrappers skip communication at size 1, so the autograd Functions are called
   directly, forward and backward: their gathers, reduce-scatters and all-to-alls then run through
   NCCL, backward ones on autograd's device thread; a Group issues no all-reduce at size 1, so
   all-reduce is also called on the NCCL group itself), the
   vocab-parallel cross-entropy against F.cross_entropy on CPU, the all-to-all token dispatcher
   against the local one, parallel.comm_meter counting under NCCL, the model's forward/backward
   on CUDA against the same model on CPU, and 3 train_steps (megads.train.model_stages.ModelStages,
   ZeRO-1 AdamW, router-bias update) on CUDA under megads.train.trainer.parallel_context's NCCL
   ParallelContext against CPU.
B. Two ranks sharing the GPU over gloo (which, unlike NCCL, accepts that; gloo handles CUDA
   tensors by staging them through host memory): first a probe of each collective the layers use
   on CUDA tensors; if all work, the layouts TP2, DP2, DP2+EP2 and TP2+EP2 train 3 steps on CUDA
   and are compared with a single-process CPU run (losses, gradient norms, parameters), as
   tests/test_layouts.py does on CPU. If gloo cannot do one of the collectives on CUDA tensors,
   part B is reported as skipped (not a failure of this repository).

Tolerances: max |a - b| / max |b| per tensor. FP32 with TF32 off; CUDA and CPU kernels sum in
different orders, so agreement is to FP32 rounding: losses 1e-4, single-step gradients 1e-3,
parameters after 3 AdamW steps 2e-3 (see tests/test_layouts.py: Adam turns tiny gradient
differences into full-size updates). A routing decision that flips between CPU and CUDA (a
near-tie in the top-k) would show as a large error on one expert's gradient.

Known CUDA problems outside parallel/ are probed and printed as WARN lines (they do not fail
the run): see the end of the output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from parallel.context import ParallelContext  # noqa: E402
from tools.harness.distributed import DistributedTestError, run_distributed  # noqa: E402

# The model of tests/test_layouts.py (every feature: MLA, dense + MoE layers, MTP, balance loss).
SMALL_MODEL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=64,
                   num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                   moe_intermediate_size=16, n_group=2, topk_group=1, routed_scaling_factor=2.0,
                   num_nextn_predict_layers=1, aux_loss_alpha=0.01, bias_update_speed=0.01, initializer_range=0.006)
SMALL_TRAIN = dict(global_batch_size=4, micro_batch_size=2, seq_length=16, lr=0.01, warmup_steps=1, max_steps=3,
                   grad_clip=0.05, seed=7)
STEPS = 3
TOL_LOSS, TOL_GRAD, TOL_PARAM, TOL_EXACT = 1e-4, 1e-3, 2e-3, 1e-6
LAYOUTS = [(2, 1), (1, 1), (1, 2), (2, 2)]  # (tp, ep) on 2 ranks: TP2, DP2, DP2+EP2, TP2+EP2


# ============================================================================ helpers (run in any process)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() if b.numel() else 0.0


def check(results: list, name: str, err: float, tol: float) -> None:
    results.append((name, err, tol))


def _strict_fp32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def make_config(tp: int = 1, ep: int = 1, model: dict | None = None, train: dict | None = None):
    from megads.config import config_from_dict
    return config_from_dict({"model": model or SMALL_MODEL, "train": train or SMALL_TRAIN,
                             "parallel": {"tensor_parallel": tp, "expert_parallel": ep}})


def global_batches(cfg, steps: int = STEPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    t = cfg.train
    return [torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_length + 1), generator=gen)
            for _ in range(steps)]


def run_steps(cfg, ctx: ParallelContext) -> tuple[list[dict], dict]:
    """STEPS train_steps of this rank's share of the global batches on ``ctx.device`` (the trainer's
    path: ModelStages under ctx); records and full parameters (CPU)."""
    from megads.train.model_stages import ModelStages
    from megads.train.optimizer import build_optimizer
    from megads.train.trainer import train_step
    model = ModelStages(cfg, ctx).train()
    optimizer = build_optimizer(model, cfg.train, ctx)
    per_rank = cfg.train.global_batch_size // ctx.dp.size
    mbs = cfg.train.micro_batch_size
    records = []
    for step, batch in enumerate(global_batches(cfg)):
        mine = batch[ctx.dp.rank * per_rank:(ctx.dp.rank + 1) * per_rank].to(ctx.device)
        micro = [(mine[i:i + mbs, :-1], mine[i:i + mbs, 1:]) for i in range(0, per_rank, mbs)]
        record = train_step(model, optimizer, cfg, step, micro)
        records.append({k: record[k] for k in ("loss", "mtp_loss", "balance_loss", "grad_norm", "skipped")})
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.full_state()}
    return records, state


def compare_runs(results: list, prefix: str, got: tuple, want: tuple) -> None:
    """Losses and gradient norms of every step (one line: the worst), then the final parameters."""
    (records, state), (ref_records, ref_state) = got, want
    worst, where = 0.0, "-"
    for step, (g, w) in enumerate(zip(records, ref_records), start=1):
        if g["skipped"] or w["skipped"]:
            worst, where = float("inf"), f"step {step} skipped"
            break
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            if w[key] is None:
                continue
            err = abs(g[key] - w[key]) / max(abs(w[key]), 1e-30) if g[key] is not None else float("inf")
            if err >= worst:
                worst, where = err, f"step {step} {key}"
    if len(records) != len(ref_records):
        worst, where = float("inf"), f"{len(records)} steps, expected {len(ref_records)}"
    check(results, f"{prefix} losses and grad norms of {STEPS} steps (worst: {where})", worst, TOL_LOSS)
    if set(ref_state) != set(state):
        check(results, f"{prefix} parameter names ({sorted(set(ref_state) ^ set(state))[:3]})", float("inf"), 0.0)
    errors = {name: rel_err(state[name], ref_state[name]) for name in ref_state if name in state}
    worst_param = max(errors, key=errors.get)
    check(results, f"{prefix} parameters after {STEPS} steps (worst: {worst_param})", errors[worst_param],
          TOL_PARAM)


# ============================================================================ part A: NCCL, world size 1


def _collective_checks(results: list, device: torch.device) -> None:
    """Each helper on CUDA tensors over the size-1 group: at size 1 every collective is the identity."""
    import parallel.expert as pexpert
    import parallel.tensor.mappings as ptensor
    from parallel.group import Group
    from parallel.comm_meter import count_collectives

    group = Group(dist.group.WORLD, "world")  # counted through its observer
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 6, 8, generator=gen).to(device=device, dtype=dtype)
        tag = str(dtype).replace("torch.", "")
        with count_collectives(group) as stats:
            summed = x.clone()
            dist.all_reduce(summed, group=group.pg)  # NCCL itself (a Group skips size 1)
            check(results, f"A all_reduce {tag}", rel_err(summed, x), 0.0)
            check(results, f"A Group.sum {tag}", rel_err(group.sum(x), x), 0.0)
            check(results, f"A all_gather dim 1 {tag}", rel_err(ptensor._all_gather_along_dim(x, 1, group), x), 0.0)
            check(results, f"A reduce_scatter dim 1 {tag}",
                  rel_err(ptensor._reduce_scatter_along_dim(x, 1, group), x), 0.0)
            flat = x.reshape(-1, 8)
            check(results, f"A all_to_all {tag}", rel_err(pexpert._all_to_all(flat, [flat.shape[0]],
                                                                              [flat.shape[0]], group), flat), 0.0)
            m = x.float().amax(dim=-1)
            got = m.clone()
            dist.all_reduce(got, op=dist.ReduceOp.MAX, group=group.pg)  # NCCL itself (a Group skips size 1)
            check(results, f"A all_reduce MAX {tag}", rel_err(got, m), 0.0)
        # counted: the collectives issued through the Group (it issues no all-reduce at size 1)
        expected = {"all_gather": 1, "reduce_scatter": 1, "all_to_all": 1}
        counted = {k: v.calls for k, v in stats.by_kind().items()}
        check(results, f"A comm_meter counts under NCCL {tag} ({counted})", 0.0 if counted == expected else 1.0, 0.0)
    counts = torch.tensor([3, 0, 5], device=device)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group.pg)  # what the dispatcher does with int64 counts
    check(results, "A all_to_all_single int64", rel_err(out, counts), 0.0)


def _mapping_checks(results: list, device: torch.device) -> None:
    """The autograd Functions of parallel/tensor/mappings.py over the NCCL group, forward and backward."""
    import parallel.tensor.mappings as ptensor
    from parallel.group import Group
    from parallel.comm_meter import count_collectives

    group = Group(dist.group.WORLD, "world")  # counted through its observer
    gen = torch.Generator().manual_seed(1)
    x_cpu = torch.randn(2, 6, 8, generator=gen)
    w_cpu = torch.randn(2, 6, 8, generator=gen)
    mappings = [("_CopyToTPRegion", ()), ("_ReduceFromTPRegion", ()), ("_ScatterToTPRegion", ()),
                ("_GatherFromTPRegion", ()), ("_ScatterToSequenceParallelRegion", ()),
                ("_GatherFromSequenceParallelRegion", (True,)), ("_ReduceScatterToSequenceParallelRegion", ()),
                ("_SplitBatch", ()), ("_GatherBatch", ()), ("_AllReduceSumOfShares", ())]
    for name, extra in mappings:
        fn = getattr(ptensor, name, None)
        if fn is None:
            continue  # not in this version of parallel/tensor/mappings.py
        x = x_cpu.to(device, copy=True).requires_grad_(True)
        with count_collectives(group) as stats:
            y = fn.apply(x, group, *extra)
            (y * w_cpu.to(device)).sum().backward()
        check(results, f"A {name} forward", rel_err(y, x_cpu), 0.0)
        check(results, f"A {name} backward", rel_err(x.grad, w_cpu), 0.0)
    # the backward reduce-scatter of _GatherFromSequenceParallelRegion runs on autograd's CUDA thread:
    # still counted (a Group issues it at size 1, unlike an all-reduce)
    x = x_cpu.to(device, copy=True).requires_grad_(True)
    with count_collectives(group) as stats:
        (ptensor._GatherFromSequenceParallelRegion.apply(x, group, True) * 2).sum().backward()
    check(results, "A comm_meter counts a backward collective",
          0.0 if stats.calls("reduce_scatter") == 1 else 1.0, 0.0)


def _cross_entropy_checks(results: list, device: torch.device) -> None:
    from parallel.group import Group
    from parallel.tensor.cross_entropy import _VocabParallelCrossEntropy
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(37, 50, generator=gen) * 3
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[::7] = -100
    ref_in = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in, labels, ignore_index=-100, reduction="none")
    ref.sum().backward()
    got_in = logits.to(device, copy=True).requires_grad_(True)
    got = _VocabParallelCrossEntropy.apply(got_in, labels.to(device), -100, Group(dist.group.WORLD, "tp"))
    got.sum().backward()
    check(results, "A vocab_parallel_cross_entropy loss vs CPU F.cross_entropy", rel_err(got, ref), TOL_EXACT * 10)
    check(results, "A vocab_parallel_cross_entropy grad vs CPU", rel_err(got_in.grad, ref_in.grad), TOL_EXACT * 10)


def _dispatcher_checks(results: list, device: torch.device) -> None:
    from parallel.expert import AllToAllTokenDispatcher, LocalTokenDispatcher
    from parallel.group import Group
    gen = torch.Generator().manual_seed(3)
    experts, tokens, top_k, hidden = 8, 20, 2, 6
    hidden_cpu = torch.randn(tokens, hidden, generator=gen)
    topk = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    gates_cpu = torch.rand(tokens, top_k, generator=gen)
    outs = []
    for dispatcher in (LocalTokenDispatcher(experts), AllToAllTokenDispatcher(experts, Group(dist.group.WORLD, "ep"))):
        h = hidden_cpu.to(device, copy=True).requires_grad_(True)
        g = gates_cpu.to(device, copy=True).requires_grad_(True)
        sorted_tokens, sorted_gates, per_expert, state = dispatcher.dispatch(h, topk.to(device), g)
        out = dispatcher.combine(sorted_tokens * sorted_gates.unsqueeze(-1) * 1.5, state)
        out.pow(2).sum().backward()
        outs.append((out, per_expert, h.grad, g.grad))
    (lo, lc, lh, lg), (ao, ac, ah, ag) = outs
    check(results, "A all-to-all dispatcher output vs local dispatcher", rel_err(ao, lo), TOL_EXACT)
    check(results, "A all-to-all dispatcher tokens per expert", rel_err(ac, lc), 0.0)
    check(results, "A all-to-all dispatcher hidden grad", rel_err(ah, lh), TOL_EXACT)
    check(results, "A all-to-all dispatcher gate grad", rel_err(ag, lg), TOL_EXACT)


def _model_checks(results: list, device: torch.device) -> None:
    """tiny.yaml's model: one forward/backward on CUDA against CPU, every gradient compared.

    Routing is a discrete choice: if CUDA and CPU pick different experts for one token (a near-tie
    in the top-k, rounding deciding it) the gradients differ for reasons that are no bug, so a
    batch whose routing differs is retried once with another seed; differing twice fails.
    """
    import yaml
    from megads.model.model import build_model
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/configs/tiny.yaml").read_text())
    cfg = make_config(model=raw["model"], train={**SMALL_TRAIN, "seq_length": 64})
    for attempt, seed in enumerate((3, 5)):
        batch = torch.randint(0, cfg.model.vocab_size, (4, 65), generator=torch.Generator().manual_seed(seed))
        outs = {}
        for where in ("cpu", "cuda"):
            dev = torch.device("cpu") if where == "cpu" else device
            model = build_model(cfg.model, seed=seed, device=dev, ctx=ParallelContext.single(dev)).train()
            ids = batch.to(dev)
            out = model.compute_loss(ids[:, :-1], ids[:, 1:])
            out.loss.backward()
            outs[where] = (out, {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                                 if p.grad is not None},
                           [m.tokens_per_expert.cpu() for m in model.moe_layers()])
        (c_out, c_grads, c_loads), (g_out, g_grads, g_loads) = outs["cpu"], outs["cuda"]
        routing_same = all(torch.equal(a, b) for a, b in zip(g_loads, c_loads))
        if routing_same or attempt == 1:
            break
        print(f"  NOTE  model check: CUDA and CPU routed some token differently with seed {seed} (a near-tie?); "
              f"retrying with another seed", flush=True)
    check(results, "A model routing (tokens per expert) CUDA == CPU", 0.0 if routing_same else 1.0, 0.0)
    for key in ("lm_loss", "mtp_loss", "balance_loss", "loss"):
        a, b = getattr(g_out, key), getattr(c_out, key)
        if b is not None:
            check(results, f"A model {key} CUDA vs CPU", rel_err(a, b), TOL_LOSS)
    if set(c_grads) != set(g_grads):
        check(results, "A model gradients present on both", float("inf"), 0.0)
    errors = {n: rel_err(g_grads[n], c_grads[n]) for n in c_grads if n in g_grads}
    worst = max(errors, key=errors.get)
    check(results, f"A model gradients CUDA vs CPU ({len(errors)} tensors; worst: {worst})", errors[worst], TOL_GRAD)


def _probe_known_issues(device: torch.device) -> list[str]:
    """Problems outside parallel/ that only show on GPU; reported, not failed."""
    warnings_ = []
    try:
        from megads.train.data import autocast
        cfg = make_config(train={**SMALL_TRAIN, "precision": "bf16"})
        with autocast(cfg, device):
            y = F.linear(torch.randn(2, 4, device=device), torch.randn(3, 4, device=device))
        if y.dtype != torch.bfloat16:
            warnings_.append(f"megads/train/data.py autocast(cfg, {device}): with precision bf16 the "
                             f"CUDA matmuls run in {y.dtype} (no bf16 autocast on GPU).")
    except Exception as err:  # noqa: BLE001
        warnings_.append(f"autocast probe failed: {err!r}")
    if dist.get_backend() == "nccl":
        try:
            # NCCL refuses CPU tensors: _average_metrics (multi-rank only) must all-reduce on ctx.device.
            # World size 1 skips it, so it runs here under a context that claims several ranks, with
            # size-1 groups that record the device of what they are asked to sum.
            devices = _average_metrics_devices(device)
            if any(d.type != device.type for d in devices):
                warnings_.append("megads/train/trainer.py _average_metrics all-reduces a tensor on "
                                 f"{sorted({str(d) for d in devices})}, not {device}: under NCCL with more than "
                                 "one rank that raises (NCCL takes CUDA tensors only).")
        except Exception as err:  # noqa: BLE001
            warnings_.append(f"_average_metrics probe failed: {err!r}")
    return warnings_


def _average_metrics_devices(device: torch.device) -> list[torch.device]:
    """Devices of the tensors megads.train.trainer._average_metrics sums over its groups, on a
    context (of size-1 groups) that says it is distributed."""
    from megads.train import trainer
    from parallel.context import GROUP_NAMES
    from parallel.group import Group

    seen: list[torch.device] = []

    class Recording(Group):
        def sum(self, tensor):
            seen.append(tensor.device)
            return tensor

    class Distributed(ParallelContext):
        is_distributed = True                      # (a property in ParallelContext)

    ctx = Distributed(**{name: Recording(None, name) for name in GROUP_NAMES}, device=device)
    trainer._average_metrics({"loss": 1.0, "balance_loss": 0.5}, ctx)
    return seen


def nccl_world1_worker(simulate: bool) -> dict:
    """Part A, in a child process whose default group is NCCL with one rank (gloo on CPU when simulating)."""
    _strict_fp32()
    os.environ.setdefault("LOCAL_RANK", "0")
    device = torch.device("cpu") if simulate else torch.device("cuda", 0)
    if not simulate:
        torch.cuda.set_device(device)
    results: list = []
    failures: list[str] = []
    for part in (_collective_checks, _mapping_checks, _cross_entropy_checks, _dispatcher_checks, _model_checks):
        try:
            part(results, device)
        except Exception:  # noqa: BLE001 - report and go on with the other parts
            failures.append(f"{part.__name__}:\n{traceback.format_exc()}")
    try:  # train_step under the trainer's ParallelContext (NCCL groups of size 1, device cuda)
        from megads.train.trainer import parallel_context
        cfg = make_config()
        ctx = parallel_context(cfg)
        if not simulate and ctx.device.type != "cuda":
            failures.append(f"ParallelContext.create chose device {ctx.device} with CUDA available")
        got = run_steps(cfg, ctx)
        want = run_steps(cfg, ParallelContext.single())
        compare_runs(results, "A train_step CUDA (NCCL world 1) vs CPU,", got, want)
    except Exception:  # noqa: BLE001
        failures.append(f"train_step:\n{traceback.format_exc()}")
    return {"results": results, "failures": failures, "warnings": _probe_known_issues(device),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (simulated)",
            "backend": dist.get_backend()}


# ============================================================================ part B: 2 ranks, gloo, one GPU


def gloo_probe_worker(simulate: bool) -> dict:
    """Which collectives gloo runs on CUDA tensors here: {op: None | error text}."""
    device = torch.device("cpu") if simulate else torch.device("cuda", 0)
    if not simulate:
        torch.cuda.set_device(device)
    rank = dist.get_rank()
    outcome = {}

    def attempt(name, fn):
        try:
            ok = fn()
            outcome[name] = None if ok else "wrong result"
        except Exception as err:  # noqa: BLE001
            outcome[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"

    def all_reduce():
        x = torch.full((5,), float(rank + 1), device=device)
        dist.all_reduce(x)
        m = torch.full((3,), float(rank), device=device)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return x.eq(3).all().item() and m.eq(1).all().item()

    def all_gather():
        out = torch.empty(4, 3, device=device)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, torch.full((2, 3), float(rank), device=device))
        return out[:2].eq(0).all().item() and out[2:].eq(1).all().item()

    def reduce_scatter():
        out = torch.empty(2, device=device)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(out, torch.arange(4.0, device=device))
        return out.tolist() == [2.0 * v for v in range(2 * rank, 2 * rank + 2)]

    def all_to_all():
        # uneven float rows (rank 0 sends [1, 2] rows, rank 1 [3, 1]) and int64 counts, as the dispatcher does
        send = [[1, 2], [3, 1]]
        inp = torch.full((sum(send[rank]), 4), float(rank), device=device)
        recv = [send[0][rank], send[1][rank]]
        out = torch.empty(sum(recv), 4, device=device)
        dist.all_to_all_single(out, inp, output_split_sizes=recv, input_split_sizes=send[rank])
        rows_ok = out[:recv[0]].eq(0).all().item() and out[recv[0]:].eq(1).all().item()
        counts = torch.tensor([rank, 7], device=device)  # element i goes to rank i
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts)
        return rows_ok and got.tolist() == ([0, 1] if rank == 0 else [7, 7])

    for name, fn in (("all_reduce", all_reduce), ("all_gather_single", all_gather),
                     ("reduce_scatter_single", reduce_scatter), ("all_to_all_single", all_to_all)):
        attempt(name, fn)
    return outcome


def gloo_layout_worker(tp: int, ep: int, simulate: bool):
    _strict_fp32()
    os.environ["LOCAL_RANK"] = "0"  # both ranks on the one GPU
    from megads.train.trainer import parallel_context
    cfg = make_config(tp, ep)
    ctx = parallel_context(cfg)  # the default group is gloo already: the context keeps it
    device = torch.device("cpu") if simulate else torch.device("cuda", 0)
    if not simulate and ctx.device != device:
        raise AssertionError(f"ParallelContext.create chose {ctx.device}, expected {device}")
    records, state = run_steps(cfg, ctx)
    return records, state if ctx.rank == 0 else None


# ============================================================================ driver


def _print_results(results: list) -> int:
    failed = 0
    for name, err, tol in results:
        ok = err <= tol
        failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: max rel err {err:.2e} (tol {tol:.0e})")
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-two-rank", action="store_true", help="only part A (NCCL, world size 1)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per multi-process run")
    ap.add_argument("--simulate-on-cpu", action="store_true",
                    help="debug this script without a GPU: the same code paths with gloo on CPU tensors")
    args = ap.parse_args(argv)
    simulate = args.simulate_on_cpu
    if not simulate and not torch.cuda.is_available():
        print(f"skipped: no CUDA (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
        return 0
    if not simulate and not dist.is_nccl_available():
        print("FAIL: CUDA is available but this torch build has no NCCL")
        return 1
    _strict_fp32()
    started = time.perf_counter()
    failed = 0
    warnings_: list[str] = []

    print("A. NCCL process group of one rank on cuda:0" + (" [SIMULATED: gloo on CPU]" if simulate else ""))
    try:
        [a] = run_distributed(nccl_world1_worker, 1, args=(simulate,), backend="gloo" if simulate else "nccl",
                              timeout_s=args.timeout, num_threads=4)
        print(f"  device: {a['device']}, backend: {a['backend']}")
        failed += _print_results(a["results"])
        for text in a["failures"]:
            failed += 1
            print(f"  FAIL  exception in {text}")
        warnings_ += a["warnings"]
    except DistributedTestError as err:
        failed += 1
        print(f"  FAIL  part A did not complete:\n{err}")

    if not args.skip_two_rank:
        print("B. two ranks sharing the GPU over gloo (NCCL refuses two ranks on one device)")
        try:
            probes = run_distributed(gloo_probe_worker, 2, args=(simulate,), timeout_s=min(args.timeout, 60))
            unsupported = {op: why for p in probes for op, why in p.items() if why}
            if unsupported:
                for op, why in unsupported.items():
                    print(f"  SKIP  gloo {op} on CUDA tensors: {why}")
                print("  SKIP  layouts on 2 ranks: gloo here lacks the collectives above on CUDA tensors "
                      "(run multi-rank checks on 2+ GPUs with NCCL)")
            else:
                print("  gloo runs all_reduce, all_gather_single, reduce_scatter_single, all_to_all_single on "
                      "CUDA tensors")
                results: list = []
                ref = run_steps(make_config(), ParallelContext.single())
                for tp, ep in LAYOUTS:
                    name = "+".join(s for s in (f"TP{tp}" if tp > 1 else "", f"DP{2 // tp}" if tp == 1 else "",
                                                f"EP{ep}" if ep > 1 else "") if s)
                    try:
                        out = run_distributed(gloo_layout_worker, 2, args=(tp, ep, simulate), timeout_s=args.timeout)
                    except DistributedTestError as err:
                        failed += 1
                        print(f"  FAIL  layout {name} did not complete:\n{err}")
                        continue
                    (records0, state0), (records1, _) = out
                    check(results, f"B {name}: both ranks report the same metrics",
                          0.0 if records0 == records1 else 1.0, 0.0)
                    compare_runs(results, f"B {name} on CUDA vs 1 process on CPU,", (records0, state0), ref)
                failed += _print_results(results)
        except DistributedTestError as err:
            failed += 1
            print(f"  FAIL  part B did not complete:\n{err}")

    for text in warnings_:
        print(f"  WARN  {text}")
    print(f"{'FAIL' if failed else 'PASS'}: {failed} failure(s) in {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

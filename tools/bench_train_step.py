"""Time one full training step (forward, loss, backward, clipping, AdamW) of megads and of
transformers' DeepseekV3ForCausalLM on the same config and the same weights, in one process.

    python tools/bench_train_step.py [--steps 4] [--warmup 2] [--rounds 3] [--threads N]
                                     [--precisions fp32[,bf16]] [--skip-transformers] [--profile]

Rows: transformers, megads, and megads with one MTP module (transformers does not train MTP, so the
comparison rows have it off), per precision (bf16 autocast is opt-in: ~15x slower than fp32 on CPUs
without AVX512-BF16/AMX). A precision's rows are measured interleaved: --rounds rounds, each running
--steps steps of every row in turn (after --warmup steps per row), so a change of load on a shared
machine hits all rows alike; a row's step time is the median of its --rounds x --steps steps. The
precisions run one after the other, fp32 first.

Per row: tokens/s, TFLOP/s from the project's FLOP model (megads.train.flops, the count the
trainer's MFU uses: matmuls only, backward = 2 x forward, causal attention halved), MFU against
this CPU's FP32 GEMM peak measured in the same run (megads.train.device_peak's measurement, once per
round, the best kept; bf16 rows are against it too), the ratio against transformers at the same
precision, and for the MTP row its speed relative to megads without MTP next to what the FLOP model
expects (FLOPs without MTP / FLOPs with it: the ratio at which MTP costs exactly its FLOP share).

--profile: torch.profiler on one megads fp32 step (with --profile-mtp, the MTP row's model), as a
table of where the time goes (see `profile_breakdown`) and the ops with the most self time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from megads.config import ModelConfig  # noqa: E402
from megads.model.model import build_model  # noqa: E402
from megads.train.device_peak import measure_cpu_gemm_flops  # noqa: E402
from megads.train.flops import training_flops_per_token  # noqa: E402

BENCH_MODEL = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=704,
    num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=128,
    n_group=1, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=1024,
    num_nextn_predict_layers=0, aux_loss_alpha=0.0001, initializer_range=0.006,
)
BATCH, SEQ = 8, 256


def transformers_model(cfg: ModelConfig, megads_state: dict):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megads.hf import hf_config_from_model_config

    # The same config.json mapping `megads export-hf` writes, so both models are built alike.
    hf_cfg = DeepseekV3Config.from_dict(hf_config_from_model_config(cfg))
    model = DeepseekV3ForCausalLM(hf_cfg)
    state = {(k if k == "lm_head.weight" else "model." + k): v for k, v in megads_state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    return model


def make_step(model, optimizer, loss_fn, precision: str):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step():
        with record_function("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        with record_function("forward"), autocast:
            loss = loss_fn()
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return step


class Row:
    """One benchmarked model: its step, its FLOPs per step and the step times measured so far."""

    def __init__(self, name: str, precision: str, model, loss_fn, cfg: ModelConfig):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        self.name, self.precision, self.model = name, precision, model
        self.step = make_step(model, optimizer, loss_fn, precision)
        self.flops = training_flops_per_token(cfg, SEQ) * BATCH * SEQ
        self.times: list[float] = []

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            if record:
                self.times.append(time.perf_counter() - start)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def build_rows(precision: str, with_transformers: bool, inputs, labels) -> list[Row]:
    cfg = ModelConfig(**BENCH_MODEL)
    mtp_cfg = ModelConfig(**{**BENCH_MODEL, "num_nextn_predict_layers": 1})
    megads = build_model(cfg, seed=0)
    rows = []
    if with_transformers:
        hf = transformers_model(cfg, megads.state_dict())
        rows.append(Row("transformers", precision, hf, lambda: hf(input_ids=inputs, labels=inputs).loss, cfg))
    rows.append(Row("megads", precision, megads, lambda: megads.compute_loss(inputs, labels).loss, cfg))
    megads_mtp = build_model(mtp_cfg, seed=0)
    rows.append(Row("megads +MTP", precision, megads_mtp, lambda: megads_mtp.compute_loss(inputs, labels).loss,
                    mtp_cfg))
    return rows


def print_table(rows: list[Row], peak: float) -> None:
    def find(name, precision):
        return next((r for r in rows if r.name == name and r.precision == precision), None)

    print(f"{'model':<13} {'precision':<9} {'tokens/s':>9} {'step (s)':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'vs transformers':>15}  MTP: vs megads (FLOP model)")
    for r in rows:
        tokens_per_s = BATCH * SEQ / r.seconds
        baseline = find("transformers", r.precision)
        ratio = f"{baseline.seconds / r.seconds:.2f}x" if baseline else "-"
        mtp = ""
        without = find("megads", r.precision)
        if r.name == "megads +MTP" and without:
            mtp = f"{without.seconds / r.seconds:.2f}x ({without.flops / r.flops:.2f}x)"
        print(f"{r.name:<13} {r.precision:<9} {tokens_per_s:>9,.0f} {r.seconds:>9.3f} "
              f"{r.flops / r.seconds / 1e12:>8.4f} {r.flops / r.seconds / peak:>6.1%} {ratio:>15}  {mtp}")


# ------------------------------------------------------------------------------------- profiling

# Forward scopes: the module classes whose forward (and, through autograd's sequence numbers, whose
# backward) the breakdown names; the innermost one wins (MLA's q/kv norms count as norms).
SCOPES = {"RMSNorm": "norms", "MultiHeadLatentAttention": "attention", "MoE": "MoE routing/dispatch/combine",
          "RoutedExperts": "FFN activations (SwiGLU)", "SwiGLU": "FFN activations (SwiGLU)",
          "VocabParallelEmbedding": "embedding", "_FusedLinearCrossEntropy": "head softmax + cross-entropy"}
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_"}
PHASES = {"optimizer": "optimizer (clip + AdamW)", "zero_grad": "optimizer (clip + AdamW)"}


@contextmanager
def module_scopes(model):
    """record_function ranges named after SCOPES around the forwards of `model`'s modules."""
    handles, open_ranges = [], []

    def enter(label):
        def hook(module, args):
            scope = record_function(f"scope:{label}")
            scope.__enter__()
            open_ranges.append(scope)
        return hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for module in model.modules():
        label = SCOPES.get(type(module).__name__)
        if label:
            handles += [module.register_forward_pre_hook(enter(label)), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profile_breakdown(events, wall_s: float) -> list[tuple[str, float]]:
    """Self time of every aten op of one profiled step, by where it goes: GEMMs by the scope that ran
    them, the fused attention kernel, then the other ops by scope (a backward op takes the scope of
    the forward op it differentiates, matched by autograd sequence number), the optimizer; the
    step's wall time not spent in any op is framework overhead (Python, dispatch, autograd engine,
    and the profiler's own cost)."""
    def scope_of(event):
        while event is not None:
            name = event.name
            if name in PHASES:
                return PHASES[name]
            if name.startswith("scope:"):
                return name[len("scope:"):]
            if name in SCOPES:
                return SCOPES[name]
            if name.startswith("autograd::engine::evaluate_function"):
                return forward_scope.get(event.sequence_nr, "other")
            event = event.cpu_parent
        return "other"

    forward_scope = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            forward_scope.setdefault(event.sequence_nr, scope_of(event))
    totals: dict[str, float] = {}
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        scope = scope_of(event)
        if event.name in GEMMS and not scope.startswith("optimizer"):
            part = "GEMMs: " + {"head softmax + cross-entropy": "head", "FFN activations (SwiGLU)": "FFNs",
                                "MoE routing/dispatch/combine": "router"}.get(scope, scope)
        elif "scaled_dot_product" in event.name:
            part = "attention kernel (SDPA fwd+bwd)"
        elif scope == "attention":
            part = "attention: RoPE, cat, pad, copies"
        else:
            part = scope
        totals[part] = totals.get(part, 0.0) + event.self_cpu_time_total / 1e6
    totals["framework overhead (Python, dispatch, autograd)"] = max(wall_s - sum(totals.values()), 0.0)
    return sorted(totals.items(), key=lambda item: -item[1])


def profile_step(row: Row) -> None:
    from torch.profiler import ProfilerActivity, profile

    row.run(2, record=False)
    with module_scopes(row.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        row.step()
        wall = time.perf_counter() - start
    print(f"\nwhere one {row.name} {row.precision} step's time goes (torch.profiler, {wall:.3f} s under the profiler)")
    for part, seconds in profile_breakdown(prof.events(), wall):
        print(f"  {part:<50} {seconds * 1e3:8.1f} ms {seconds / wall:6.1%}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per row per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="profile one megads fp32 step (see the doc)")
    parser.add_argument("--profile-mtp", action="store_true", help="with --profile: the megads +MTP model")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--precisions", default="fp32",
                        help="comma-separated subset of fp32,bf16 (bf16 autocast is only fast on CPUs with "
                             "AVX512-BF16/AMX)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    tokens = torch.randint(0, BENCH_MODEL["vocab_size"], (BATCH, SEQ + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]   # transformers shifts its labels (= inputs) itself
    rows, peak = [], 0.0
    # One precision after the other, its rows interleaved: once bf16 autocast has run in the process,
    # transformers' fp32 step is ~40% slower (seen with torch 2.13), which would skew the fp32 rows.
    for precision in sorted(set(args.precisions.split(",")), key=lambda p: p != "fp32"):
        group = build_rows(precision, not args.skip_transformers, inputs, labels)
        for row in group:
            row.run(args.warmup, record=False)
        for round_index in range(args.rounds):
            peak = max(peak, measure_cpu_gemm_flops())
            for row in group:
                row.run(args.steps)
            print(f"  {precision} round {round_index + 1}/{args.rounds}: "
                  + ", ".join(f"{r.name} {BATCH * SEQ / statistics.median(r.times[-args.steps:]):,.0f}"
                              for r in group) + " tokens/s", flush=True)
        rows += group

    cfg = ModelConfig(**BENCH_MODEL)
    print(f"\nconfig: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, "
          f"batch {BATCH}x{SEQ}, threads {torch.get_num_threads()}, torch {torch.__version__}; median of "
          f"{args.rounds} rounds x {args.steps} steps; FP32 GEMM peak {peak / 1e9:.1f} GFLOP/s (measured, best "
          f"of {args.rounds} rounds)")
    print_table(rows, peak)

    if args.profile:
        wanted = "megads +MTP" if args.profile_mtp else "megads"
        profile_step(next(r for r in rows if r.name == wanted and r.precision == "fp32"))


if __name__ == "__main__":
    main()

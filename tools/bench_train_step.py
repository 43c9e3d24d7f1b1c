"""Time one full training step (forward, loss, backward, AdamW) of megads and of transformers'
DeepseekV3ForCausalLM on the same config and the same weights, in one process, fp32 and bf16
autocast. Prints tokens/s per row and the ratio against the best transformers row.

    python tools/bench_train_step.py [--steps 6] [--warmup 2] [--threads N] [--precisions fp32,bf16] [--profile]

Both models start from identical weights (megads' state dict copied into transformers'); MTP is
off for the comparison rows because transformers does not train MTP modules; one extra row shows
megads with its MTP module on. Shared machines vary 10-30% between runs: compare rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from megads.config import ModelConfig  # noqa: E402
from megads.model.model import build_model  # noqa: E402

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


def time_steps(step_fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_step(model, optimizer, loss_fn, precision: str):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table for megads fp32")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="comma-separated subset of fp32,bf16 (bf16 autocast is only fast on CPUs with "
                             "AVX512-BF16/AMX)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    tokens = torch.randint(0, BENCH_MODEL["vocab_size"], (BATCH, SEQ + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    cfg = ModelConfig(**BENCH_MODEL)
    rows = []

    def bench(name, model, loss_fn, precision):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        seconds = time_steps(make_step(model, optimizer, loss_fn, precision), args.steps, args.warmup)
        rows.append((name, precision, BATCH * SEQ / seconds, seconds))
        print(f"  measured {name} {precision}: {BATCH * SEQ / seconds:,.0f} tokens/s", flush=True)

    for precision in args.precisions.split(","):
        megads = build_model(cfg, seed=0)
        if not args.skip_transformers:
            hf = transformers_model(cfg, megads.state_dict())
            bench("transformers", hf, lambda: hf(input_ids=inputs, labels=tokens[:, :-1]).loss, precision)
            del hf
        bench("megads", megads, lambda: megads.compute_loss(inputs, labels).loss, precision)
        mtp_cfg = ModelConfig(**{**BENCH_MODEL, "num_nextn_predict_layers": 1})
        megads_mtp = build_model(mtp_cfg, seed=0)
        bench("megads +MTP", megads_mtp, lambda: megads_mtp.compute_loss(inputs, labels).loss, precision)

    baseline = max((r[2] for r in rows if r[0] == "transformers"), default=None)
    print(f"\nconfig: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, "
          f"batch {BATCH}x{SEQ}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'model':<14} {'precision':<9} {'tokens/s':>10} {'step (s)':>9} {'vs best transformers':>21}")
    for name, precision, tps, seconds in rows:
        ratio = f"{tps / baseline:.2f}x" if baseline else "-"
        print(f"{name:<14} {precision:<9} {tps:>10,.0f} {seconds:>9.3f} {ratio:>21}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model = build_model(cfg, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        step = make_step(model, optimizer, lambda: model.compute_loss(inputs, labels).loss, "fp32")
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()

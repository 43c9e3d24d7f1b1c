"""Train the default small model three ways from the same seed and data and compare the loss curves:
the high-precision baseline (the config's precision, fp32 in tiny.yaml), FP8 with the emulated
backend and FP32 accumulation, and FP8 with the emulated backend and Hopper's tensor-core
accumulation (promoted every 128). Also counts the activation memory one step saves for backward
with and without FP8 activation caching.

    python tools/bench_fp8_training.py [--config examples/configs/tiny.yaml] [--steps 300] [--every 10]
        [--seq-length 256] [--batch-size 8] [--model-overrides hidden_size=128 num_hidden_layers=2]
        [--set train.lr=1e-3 ...] [--modes baseline,fp8,fp8-hopper] [--threads N]

Every run builds the model from the same seed (train.seed), reads the same windows of the same
cached corpus in the same order (megads.data), and steps with megads.train.trainer.train_step
(AdamW over FP32 masters, warm-up + cosine schedule over --steps, gradient clipping, router-bias
updates) on megads.train.model_stages.ModelStages in one process (ParallelContext.single(): the
whole model as one stage), so the runs differ only in the GEMMs of the converted layers
(megads.fp8.convert).

Printed: a table of the loss averaged over each --every steps (per-step losses are noisy), the
mean loss over the last min(50, steps/4) steps of each run with its relative gap to the baseline,
seconds per step, FP8 counters (non-finite detections, eps-clamped tiles, skipped steps), and the
memory table: bytes of the distinct tensors saved for backward during one forward pass
(torch.autograd.graph.saved_tensors_hooks), parameters excluded, for the baseline, FP8 saving its
inputs in FP32 (cache_activations=False) and FP8 saving them as E4M3 + scales (the default).

The emulated Hopper accumulation materialises every product of every GEMM, so it is tens of times
slower than the others on a CPU: use a smaller model, sequence and step count on CPU runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from megads.config import Fp8Config, load_config  # noqa: E402
from megads.data import GlobalBatchSampler, PackedWindows, build_or_load_corpus, micro_batches  # noqa: E402
from megads.fp8 import convert_to_fp8, fp8_stats  # noqa: E402
from megads.fp8.convert import fp8_modules  # noqa: E402
from megads.fp8.quantize import BLOCK, ceil_div  # noqa: E402
from megads.train.model_stages import ModelStages  # noqa: E402
from megads.train.optimizer import build_optimizer  # noqa: E402
from megads.train.trainer import train_step  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402

MODES = {
    "baseline": None,
    "fp8": Fp8Config(backend="emulated", accumulation="fp32"),
    "fp8-hopper": Fp8Config(backend="emulated", accumulation="hopper"),
}
LABELS = {"baseline": "baseline", "fp8": "fp8 acc=fp32", "fp8-hopper": "fp8 acc=hopper"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(args):
    overrides = [f"model.{kv}" for kv in args.model_overrides] + list(args.set)
    overrides.append(f"train.max_steps={args.steps}")
    if args.seq_length:
        overrides.append(f"train.seq_length={args.seq_length}")
    if args.batch_size:
        overrides += [f"train.global_batch_size={args.batch_size}", f"train.micro_batch_size={args.batch_size}"]
    return load_config(args.config, overrides)


def build(cfg, mode: str, fp8_config: Fp8Config | None = None) -> ModelStages:
    """The model as the trainer holds it in one process (one stage: ``.models[0]`` is the whole
    model), converted to FP8 with `fp8_config` (default: the mode's)."""
    torch.manual_seed(cfg.train.seed)
    model = ModelStages(cfg, ParallelContext.single())
    model.train()
    if fp8_config is None:
        fp8_config = MODES[mode]
    if fp8_config is not None:
        for stage_model in model.models.values():
            convert_to_fp8(stage_model, fp8_config)
    return model


def run(cfg, mode: str, windows, sampler) -> dict:
    model = build(cfg, mode)
    optimizer = build_optimizer(model, cfg.train, model.ctx)
    t = cfg.train
    losses, times, skipped = [], [], 0
    totals = {"nonfinite": 0, "clamped_tiles": 0, "tiles": 0, "gemms": 0}
    started = time.perf_counter()
    for step in range(t.max_steps):
        record = train_step(model, optimizer, cfg, step, micro_batches(windows, sampler, step, 0, 1,
                                                                      t.micro_batch_size))
        losses.append(record["loss"])
        times.append(record["step_time_s"])
        skipped += bool(record["skipped"])
        if MODES[mode] is not None:
            stats = fp8_stats(model, reset=True)
            for k in totals:
                totals[k] += stats[k]
        if (step + 1) % max(1, t.max_steps // 10) == 0 or step + 1 == t.max_steps:
            elapsed = time.perf_counter() - started
            log(f"  {LABELS[mode]:15s} step {step + 1:4d}/{t.max_steps} loss {record['loss']:.4f} "
                f"({elapsed:.0f}s, eta {elapsed / (step + 1) * (t.max_steps - step - 1):.0f}s)")
    return {"losses": losses, "step_s": statistics.median(times), "skipped": skipped,
            "fp8": totals if MODES[mode] is not None else None}


# ---------------------------------------------------------------------------------------------- memory


def saved_for_backward(model, batch) -> dict:
    """Bytes of the distinct storages saved for backward by one forward pass, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes and ptr not in params and ptr not in seen:      # a parameter costs no memory of its own
            seen[ptr] = (nbytes, t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.compute_loss(*batch)          # kept alive until counted: no storage is reused
        by_dtype: dict[str, int] = {}
        for nbytes, dtype in seen.values():
            name = str(dtype).replace("torch.", "")
            by_dtype[name] = by_dtype.get(name, 0) + nbytes
    del out
    weight_copies = 0                             # FP8 codes + block scales of the weights, saved per layer
    for _, m in fp8_modules(model):
        for p in m.parameters(recurse=False):
            if p.dim() >= 2:
                n, k = p.shape[-2:]
                lead = p.numel() // (n * k)
                weight_copies += p.numel() + 4 * lead * ceil_div(n, BLOCK) * ceil_div(k, BLOCK)
    return {"total": sum(by_dtype.values()), "by_dtype": by_dtype, "fp8_weight_copies": weight_copies}


def memory_table(cfg, batch) -> list[str]:
    rows = []
    for label, fp8_cfg in (("baseline", None),
                           ("fp8, inputs saved fp32", Fp8Config(cache_activations=False)),
                           ("fp8, inputs cached e4m3", Fp8Config(cache_activations=True))):
        model = build(cfg, "baseline", fp8_cfg).models[0]     # the whole model (one stage)
        rows.append((label, saved_for_backward(model, batch)))
    base = rows[0][1]["total"]
    mb = 2.0 ** 20
    lines = [f"{'':26s} {'saved MiB':>10s} {'vs baseline':>12s} {'of which fp8 weights':>21s}   by dtype (MiB)"]
    for label, r in rows:
        dtypes = ", ".join(f"{k} {v / mb:.2f}" for k, v in sorted(r["by_dtype"].items()))
        weights = f"{r['fp8_weight_copies'] / mb:.2f}" if label != "baseline" else "-"
        lines.append(f"{label:26s} {r['total'] / mb:10.2f} {(r['total'] - base) / base:+11.1%} {weights:>21s}   "
                     f"{dtypes}")
    act = {label: r["total"] - r["fp8_weight_copies"] * (label != "baseline") for label, r in rows}
    lines.append(f"activations only (fp8 weight copies excluded): baseline {act['baseline'] / mb:.2f} MiB, "
                 f"fp8 cached {act['fp8, inputs cached e4m3'] / mb:.2f} MiB "
                 f"({(act['fp8, inputs cached e4m3'] - act['baseline']) / act['baseline']:+.1%}); caching saves "
                 f"{(act['fp8, inputs saved fp32'] - act['fp8, inputs cached e4m3']) / mb:.2f} MiB vs fp8 without it")
    return lines


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=None, help="table row every k steps (default steps/15)")
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (one micro-batch)")
    parser.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model settings, e.g. hidden_size=128 num_hidden_layers=2")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="any other override")
    parser.add_argument("--modes", default="baseline,fp8,fp8-hopper", help=f"subset of {','.join(MODES)}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")

    cfg = load(args)
    t, m = cfg.train, cfg.model
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else Path.home() / ".cache" / "megads"
    _, corpus = build_or_load_corpus(cfg.data.source, m.vocab_size, cfg.data.tokenizer, cfg.data.max_bytes,
                                     cache_dir, log=log)
    windows, _ = PackedWindows(corpus.tokens, t.seq_length).split(cfg.data.valid_fraction)
    sampler = GlobalBatchSampler(len(windows), t.global_batch_size, t.seed)
    settings = (f"model: hidden {m.hidden_size}, {m.num_hidden_layers} layers ({m.first_k_dense_replace} dense), "
                f"{m.n_routed_experts} experts top-{m.num_experts_per_tok} (I={m.moe_intermediate_size}), "
                f"MTP {m.num_nextn_predict_layers}, vocab {m.vocab_size}; batch {t.global_batch_size} x seq "
                f"{t.seq_length}; {t.max_steps} steps, lr {t.lr} -> {t.min_lr} (warm-up {t.warmup_steps}); "
                f"precision {t.precision}; seed {t.seed}; threads {torch.get_num_threads()}")
    log(settings)

    results = {}
    for mode in modes:
        log(f"training {LABELS[mode]}")
        results[mode] = run(cfg, mode, windows, sampler)

    print(settings)
    every = args.every or max(1, t.max_steps // 15)
    print(f"\nloss (mean over each {every} steps ending at 'step')")
    header = f"{'step':>6s}" + "".join(f"{LABELS[m]:>16s}" for m in modes)
    if "baseline" in modes:
        header += "".join(f"{'gap ' + LABELS[m].replace('fp8 ', ''):>16s}" for m in modes if m != "baseline")
    print(header)
    for end in list(range(every, t.max_steps + 1, every)) + ([t.max_steps] if t.max_steps % every else []):
        means = {m: statistics.fmean(results[m]["losses"][end - every:end]) for m in modes}
        row = f"{end:6d}" + "".join(f"{means[m]:16.4f}" for m in modes)
        if "baseline" in modes:
            row += "".join(f"{(means[m] - means['baseline']) / means['baseline']:+16.3%}" for m in modes
                           if m != "baseline")
        print(row)

    last = min(50, max(1, t.max_steps // 4))
    print(f"\nmean loss over the last {last} steps, relative gap to the baseline, median s/step, FP8 counters:")
    for mode in modes:
        r = results[mode]
        mean = statistics.fmean(r["losses"][-last:])
        gap = ""
        if "baseline" in modes and mode != "baseline":
            base = statistics.fmean(results["baseline"]["losses"][-last:])
            gap = f"gap {(mean - base) / base:+.3%}"
        counters = ""
        if r["fp8"] is not None:
            f = r["fp8"]
            counters = (f"non-finite {f['nonfinite']}, clamped tiles {f['clamped_tiles']:,} of {f['tiles']:,}, "
                        f"{f['gemms']:,} FP8 GEMMs")
        print(f"  {LABELS[mode]:15s} {mean:.4f} {gap:14s} {r['step_s']:7.2f} s/step  skipped {r['skipped']}  "
              f"{counters}")

    if not args.skip_memory:
        batch = micro_batches(windows, sampler, 0, 0, 1, t.micro_batch_size)[0]
        print(f"\nsaved for backward by one forward pass (batch {t.micro_batch_size} x {t.seq_length}, distinct "
              f"storages, parameters excluded):")
        for line in memory_table(cfg, batch):
            print("  " + line)


if __name__ == "__main__":
    main()

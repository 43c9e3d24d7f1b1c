"""Generation for GRPO (issue #10): megads' KV-cached decode against transformers' generate on the
same weights, the latent KV cache against a multi-head cache, and the rollout's share of a GRPO step.

    python tools/bench_generate.py [--model tiny|bench] [--rows 64] [--prompt-length 12] [--new-tokens 52]
                                   [--micro-batch-size ROWS] [--repeats 5] [--threads 2] [--grpo-steps 3]
                                   [--skip-transformers] [--skip-grpo] [--profile]

1. Decode speed. megads: `megads.rl.generation.generate` on `ModelStages` (one process; prefill of
   the prompts, then one token per call through MLA's absorbed form on the latent cache), greedy.
   transformers: `DeepseekV3ForCausalLM.generate` (greedy, its own KV cache) with megads' weights
   copied in (as tools/bench_train_step.py does; the logits of one full forward are compared first).
   Both are forced to generate exactly --new-tokens tokens: the last vocabulary id is the
   end-of-text id for megads and is never sampled by either (megads: valid_vocab_size, transformers:
   suppress_tokens), transformers gets no eos at all. Each is warmed up once, then the median of
   --repeats runs, the two interleaved (a change of load on a shared machine hits both alike).
   tokens/s = rows x new tokens / seconds, prefill INCLUDED; the "decode only" column removes a
   prefill measured alone (generate with one new token, same prompts):
   rows x (new tokens - 1) / (t(N) - t(1)). The greedy tokens of both are compared position by
   position (they should agree except after rare near-ties, after which a row's continuations differ).
2. KV-cache bytes per token (all layers): megads' latent cache ((kv_lora_rank + qk_rope_head_dim)
   per layer, measured from the rollout's cache_bytes) against a plain multi-head cache of the same
   model (heads x (qk_head_dim + v_head_dim) per layer), for the benchmarked model in fp32 and for
   DeepSeek-V3 671B itself (ModelConfig()'s defaults) in bf16.
3. GRPO step: `megads.rl.grpo.GRPOTrainer` from a freshly initialised checkpoint with
   examples/configs/grpo_tiny.yaml's rl and train settings (and --model's model section), one
   warm-up step then --grpo-steps measured: the records' rollout_s and update_s and their shares.
   An untrained model emits random bytes; a row stops only when it happens to draw end-of-text and
   the batch decodes until every row has stopped, so each rollout runs all rl.max_new_tokens steps:
   the worst case for the rollout's share.

--model tiny is examples/configs/sft_tiny.yaml's model (the one grpo_tiny.yaml trains); --model bench
is tools/bench_train_step.py's BENCH_MODEL (MTP off there). MTP never takes part in generation.
Shared machines vary 10-30% between runs: compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from megads.config import Config, ModelConfig, apply_overrides, config_from_dict  # noqa: E402
from megads.rl.generation import generate  # noqa: E402
from megads.rl.sampling import SamplingParams  # noqa: E402
from megads.train.model_stages import ModelStages  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402
from tools.bench_train_step import BENCH_MODEL  # noqa: E402

GRPO_CONFIG = ROOT / "examples" / "configs" / "grpo_tiny.yaml"
SFT_CONFIG = ROOT / "examples" / "configs" / "sft_tiny.yaml"


def model_section(name: str) -> dict:
    if name == "tiny":
        return dict(yaml.safe_load(SFT_CONFIG.read_text())["model"])
    return dict(BENCH_MODEL)


def decode_config(model: dict, rows: int, micro_batch_size: int, seq_length: int) -> Config:
    return config_from_dict({"model": model, "train": {"global_batch_size": rows, "micro_batch_size": micro_batch_size,
                                                       "seq_length": seq_length, "precision": "fp32"}})


def transformers_model(cfg: ModelConfig, megads_state: dict):
    """DeepseekV3ForCausalLM with megads' weights (tools/bench_train_step.py's mapping; MTP left out:
    transformers has no MTP module)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megads.hf import hf_config_from_model_config

    hf_cfg = DeepseekV3Config.from_dict(hf_config_from_model_config(cfg))
    model = DeepseekV3ForCausalLM(hf_cfg)
    state = {(k if k == "lm_head.weight" else "model." + k): v for k, v in megads_state.items()
             if not k.startswith("mtp.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    return model.eval()


def cache_nbytes(cache) -> int:
    """Bytes of the tensors a transformers cache holds (whatever its layer classes call them)."""
    total, seen = 0, set()
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.nbytes
    return total


def profile_table(fn, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ----------------------------------------------------------------------------- 1. decode speed


def bench_decode(args, model: dict) -> dict:
    rows, prompt_length, new = args.rows, args.prompt_length, args.new_tokens
    mbs = args.micro_batch_size or rows
    cfg = decode_config(model, rows, mbs, prompt_length + new)
    stages = ModelStages(cfg, ParallelContext.single())
    vocab = cfg.model.vocab_size
    never = vocab - 1                                      # the end-of-text id neither model may produce
    torch.manual_seed(0)
    prompts = torch.randint(0, never, (rows, prompt_length))
    keys = [(0, i) for i in range(rows)]
    greedy = SamplingParams(temperature=0.0)

    def megads_run(tokens: int):
        return lambda: generate(stages, prompts, keys, greedy, tokens, never, mbs, valid_vocab_size=never)

    runs = {("megads", new): megads_run(new), ("megads", 1): megads_run(1)}
    results = {"cfg": cfg}
    if not args.skip_transformers:
        hf = transformers_model(cfg.model, stages.models[0].state_dict())
        with torch.no_grad():
            ours = stages.models[0].eval()(prompts)
            theirs = hf(input_ids=prompts).logits
        results["logits_diff"] = (ours - theirs).abs().max().item()
        stages.train()
        results["hf_impl"] = (hf.config._attn_implementation, getattr(hf.config, "_experts_implementation", None))
        mask = torch.ones_like(prompts)

        def hf_run(tokens: int):
            return lambda: hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=tokens,
                                       min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=never,
                                       suppress_tokens=[never], use_cache=True, return_dict_in_generate=True)

        runs.update({("transformers", new): hf_run(new), ("transformers", 1): hf_run(1)})

    # One warm-up call each, then the repeats interleaved (megads, transformers, megads, ...), so a
    # change of load on a shared machine hits both alike.
    last = {key: fn() for key, fn in runs.items()}
    times: dict = {key: [] for key in runs}
    for repeat in range(args.repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            last[key] = fn()
            times[key].append(time.perf_counter() - start)
        print(f"  repeat {repeat + 1}: " + ", ".join(f"{name} {tokens} new {times[name, tokens][-1]:.3f}s"
                                                   for name, tokens in runs), flush=True)
    for name in ("megads", "transformers"):
        if (name, new) in runs:
            results[name] = (statistics.median(times[name, new]), statistics.median(times[name, 1]),
                             min(times[name, new]), max(times[name, new]))

    rollout = last["megads", new]
    if rollout.tokens.shape[1] - prompt_length != new or bool((rollout.lengths != new).any()):
        raise RuntimeError("megads did not generate exactly --new-tokens tokens per row")
    results["cache_bytes"] = rollout.cache_bytes
    results["cache_tokens"] = rows * (prompt_length + new)
    if args.profile:
        print("\nmegads generate, by self CPU time:")
        print(profile_table(runs["megads", new]))
    if args.skip_transformers:
        return results

    out = last["transformers", new]
    if out.sequences.shape[1] - prompt_length != new:
        raise RuntimeError(f"transformers generated {out.sequences.shape[1] - prompt_length} tokens, not {new}")
    results["hf_cache_bytes"] = cache_nbytes(out.cache if hasattr(out, "cache") else out.past_key_values)
    results["hf_cache_tokens"] = rows * (prompt_length + new - 1)   # the last token is never fed back
    ours, theirs = rollout.tokens[:, prompt_length:], out.sequences[:, prompt_length:]
    same = ours == theirs
    first_diff = torch.where(same.all(dim=1), torch.full((rows,), new), (~same).int().argmax(dim=1))
    results["agreement"] = (int(same.sum()), same.numel(), int(same.all(dim=1).sum()), first_diff.float().mean().item())
    if args.profile:
        print("\ntransformers generate, by self CPU time:")
        print(profile_table(runs["transformers", new]))
    return results


def print_decode(args, r: dict) -> None:
    cfg, rows, new = r["cfg"].model, args.rows, args.new_tokens
    print(f"\n== 1. decode: {args.model} model (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, "
          f"vocab {cfg.vocab_size}), fp32, {rows} rows x {args.prompt_length} prompt + {new} new tokens, "
          f"micro-batch {args.micro_batch_size or rows}, greedy, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}, torch {torch.__version__}")
    if "transformers" in r:
        import transformers
        attn, experts = r["hf_impl"]
        print(f"   transformers {transformers.__version__} (attention {attn}, experts {experts}); "
              f"full-forward logits max |megads - transformers| = {r['logits_diff']:.2e}")
    print(f"{'':<13} {'generate (s)':>12} {'min-max (s)':>13} {'tokens/s':>10} {'vs transformers':>16} "
          f"{'prefill (s)':>12} {'decode-only tok/s':>18} {'vs transformers':>16}")
    base = r.get("transformers")
    for name in ("transformers", "megads"):
        if name not in r:
            continue
        seconds, prefill, low, high = r[name]
        tps, decode_tps = rows * new / seconds, rows * (new - 1) / max(seconds - prefill, 1e-9)
        ratio = f"{base[0] / seconds:.2f}x" if base else "-"
        decode_ratio = f"{(base[0] - base[1]) / max(seconds - prefill, 1e-9):.2f}x" if base else "-"
        print(f"{name:<13} {seconds:>12.3f} {f'{low:.3f}-{high:.3f}':>13} {tps:>10,.0f} {ratio:>16} {prefill:>12.4f} "
              f"{decode_tps:>18,.0f} {decode_ratio:>16}")
    print("   tokens/s = rows x new tokens / generate time, prefill included; decode-only = rows x (new - 1) / "
          "(generate time - prefill time)")
    if "agreement" in r:
        match, total, identical, first = r["agreement"]
        print(f"   greedy tokens agree: {match}/{total} ({match / total:.1%}); rows identical {identical}/{rows}; "
              f"mean position of a row's first difference {first:.1f} of {new}")


# ----------------------------------------------------------------------------- 2. KV-cache bytes


def print_cache(r: dict) -> None:
    print("\n== 2. KV-cache bytes per token (all layers)")
    print(f"{'model':<28} {'bytes':>5} {'latent (MLA)':>13} {'multi-head':>12} {'multi-head / latent':>20}")
    bench = r["cfg"].model
    v3 = ModelConfig()
    for name, cfg, width in ((f"benchmarked ({bench.num_hidden_layers} layers)", bench, 4),
                             ("DeepSeek-V3 671B (61 layers)", v3, 2)):
        latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * width * cfg.num_hidden_layers
        heads = (cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * width
                 * cfg.num_hidden_layers)
        print(f"{name:<28} {width:>5} {latent:>13,} {heads:>12,} {heads / latent:>19.1f}x")
        v3_sizes = (latent, heads)
    measured = r["cache_bytes"] / r["cache_tokens"]
    print(f"   measured: megads rollout.cache_bytes / (rows x (prompt + new)) = {measured:,.0f} bytes "
          f"(the cache is allocated for prompt + max_new_tokens up front)")
    if "hf_cache_bytes" in r:
        hf = r["hf_cache_bytes"] / r["hf_cache_tokens"]
        kind = ("like megads it caches the latent, and expands it with kv_b_proj over every cached token at every "
                "step" if abs(hf - measured) < 1 else "not the latent size")
        print(f"   measured: transformers' returned cache / cached tokens = {hf:,.0f} bytes ({kind})")
    print(f"   DeepSeek-V3 671B, bf16, one 32K-token sequence: latent {v3_sizes[0] * 32768 / 2**30:.2f} GiB, "
          f"multi-head {v3_sizes[1] * 32768 / 2**30:.1f} GiB")


# ----------------------------------------------------------------------------- 3. GRPO step


def bench_grpo(args, model: dict) -> dict:
    from megads.rl.grpo import GRPOTrainer
    from megads.train.checkpoint import save_checkpoint
    from megads.train.optimizer import build_optimizer

    ctx = ParallelContext.single()
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        init, run = Path(tmp) / "init", Path(tmp) / "run"
        raw = yaml.safe_load(GRPO_CONFIG.read_text())
        raw["model"] = model
        cfg = config_from_dict(apply_overrides(raw, [
            f"rl.init_from={init}", f"train.output_dir={run}", f"train.max_steps={args.grpo_steps + 2}",
            "rl.eval_problems=8"]))
        stages = ModelStages(cfg, ctx)
        save_checkpoint(init / "checkpoints", 0, cfg, stages, build_optimizer(stages, cfg.train), {})
        del stages
        trainer = GRPOTrainer(cfg, ctx, lambda *_: None)
        trainer.load(run / "checkpoints")
        records = []
        for step in range(args.grpo_steps + 1):
            record = trainer.step(step)
            if step > 0:                                   # step 0 warms up
                records.append(record)
            print(f"  GRPO step {step + 1}{' (warm-up)' if step == 0 else ''}: rollout {record['rollout_s']:.2f}s, "
                  f"update {record['update_s']:.2f}s", flush=True)
            if args.profile and step == args.grpo_steps:
                print("\nGRPO step, by self CPU time:")
                print(profile_table(lambda: trainer.step(step + 1)))
    noise_s, v3_row_s = sampling_noise_seconds(cfg, records)
    return {"cfg": cfg, "records": records, "noise_s": noise_s, "v3_row_s": v3_row_s}


def sampling_noise_seconds(cfg: Config, records: list) -> tuple[float, float]:
    """(What a rollout spends computing its Gumbel noise (megads.rl.sampling: a counter-based hash of
    (row key, token id) over the vocabulary), estimated from one position's noise for every row
    times the decode steps the rollouts ran (about rl.max_new_tokens); seconds of one row's noise at
    DeepSeek-V3's vocabulary)."""
    from megads.rl.sampling import _gumbel_noise, sampling_key

    if cfg.rl.temperature <= 0:
        return 0.0, 0.0
    rows, vocab = cfg.rl.prompts_per_step * cfg.rl.group_size, cfg.model.vocab_size
    keys = [sampling_key(0, row) for row in range(rows)]
    _gumbel_noise(keys, 0, vocab, "cpu")
    start = time.perf_counter()
    _gumbel_noise(keys, 0, vocab, "cpu")
    seconds = time.perf_counter() - start
    steps = max(round(max(rec["completion_length_mean"] for rec in records)), cfg.rl.max_new_tokens)
    v3_vocab = ModelConfig().vocab_size
    start = time.perf_counter()
    _gumbel_noise(keys[:8], 0, v3_vocab, "cpu")
    return seconds * steps, (time.perf_counter() - start) / 8


def print_grpo(r: dict) -> None:
    cfg, records = r["cfg"], r["records"]
    rl, t, m = cfg.rl, cfg.train, cfg.model
    mean = lambda key: statistics.fmean(rec[key] for rec in records)  # noqa: E731
    rollout, update = mean("rollout_s"), mean("update_s")
    print(f"\n== 3. GRPO step (examples/configs/grpo_tiny.yaml's rl/train, hidden {m.hidden_size}, "
          f"{m.num_hidden_layers} layers, untrained): {rl.prompts_per_step} prompts x {rl.group_size} samples = "
          f"{rl.prompts_per_step * rl.group_size} rows, micro-batch {t.micro_batch_size}, prompt "
          f"{rl.max_prompt_length} + up to {rl.max_new_tokens} new tokens, temperature {rl.temperature}, "
          f"mean of {len(records)} steps after 1 warm-up")
    print(f"{'part':<10} {'seconds':>8} {'min-max (s)':>13} {'share':>7}")
    steps = [rec["rollout_s"] + rec["update_s"] for rec in records]
    for name, value, values in (("rollout", rollout, [rec["rollout_s"] for rec in records]),
                                ("update", update, [rec["update_s"] for rec in records]),
                                ("step", rollout + update, steps)):
        spread = f"{min(values):.3f}-{max(values):.3f}"
        print(f"{name:<10} {value:>8.3f} {spread:>13} {value / (rollout + update):>6.1%}")
    if r["noise_s"]:
        print(f"   of the rollout, about {r['noise_s']:.3f}s ({r['noise_s'] / rollout:.0%}) draws the sampling noise "
              f"(megads.rl.sampling._gumbel_noise: a hash of (row key, token id) over all {m.vocab_size} ids, on "
              f"the model's device);\n   at DeepSeek-V3's vocabulary ({ModelConfig().vocab_size:,}) that is "
              f"{r['v3_row_s'] * 1e3:.2f} ms per row per token on this CPU")
    print(f"   completion length mean {mean('completion_length_mean'):.1f} of {rl.max_new_tokens}, truncated "
          f"{mean('truncated_fraction'):.0%}, KV cache {mean('kv_cache_bytes') / 2**20:.2f} MiB; rollout_s includes "
          f"rewards (and the reference pass when beta > 0)")
    print("   an untrained model emits random bytes: a row stops only if it happens to draw end-of-text, and the "
          "batch decodes\n   until every row has stopped, so each rollout runs all max_new_tokens steps "
          "(the worst case)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model", choices=("tiny", "bench"), default="tiny")
    parser.add_argument("--rows", type=int, default=64, help="sequences generated at once")
    parser.add_argument("--prompt-length", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=52)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="megads' micro-batch (default: --rows)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grpo-steps", type=int, default=3, help="measured GRPO steps (after one warm-up step)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-grpo", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler tables of one megads and one transformers generate and a GRPO step")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    torch.set_num_threads(args.threads)
    model = model_section(args.model)

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    decode = bench_decode(args, model)
    grpo = None if args.skip_grpo else bench_grpo(args, model)
    print_decode(args, decode)
    print_cache(decode)
    if grpo is not None:
        print_grpo(grpo)
    load_after, cores = os.getloadavg()[0], os.cpu_count()
    print(f"\n(total {time.perf_counter() - started:.0f}s; 1-minute load average {load_before:.1f} before, "
          f"{load_after:.1f} after, {cores} cores)")
    if max(load_before, load_after) > cores:
        print("   the machine was busy with other work: OpenMP threads then wait for each other's time slices and "
              "timings can be many times slower and erratic (the min-max columns); try --threads 1")


if __name__ == "__main__":
    main()

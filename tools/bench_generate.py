"""Generation for GRPO (issue #10): megads' KV-cached decode against transformers' generate on the
same weights, the latent KV cache against a multi-head cache, and the rollout's share of a GRPO step.

    python tools/bench_generate.py [--model tiny|bench] [--rows 64] [--prompt-length 12] [--new-tokens 52]
                                   [--micro-batch-size ROWS] [--repeats 3] [--threads 2] [--grpo-steps 3]
                                   [--skip-transformers] [--skip-grpo] [--profile]

1. Decode speed. megads: `megads.rl.generation.generate` on `ModelStages` (one process; prefill of
   the prompts, then one token per call through MLA's absorbed form on the latent cache), greedy.
   transformers: `DeepseekV3ForCausalLM.generate` (greedy, its own KV cache) with megads' weights
   copied in (as tools/bench_train_step.py does; the logits of one full forward are compared first).
   Both are forced to generate exactly --new-tokens tokens: the last vocabulary id is the
   end-of-text id for megads and is never sampled by either (megads: valid_vocab_size, transformers:
   suppress_tokens), transformers gets no eos at all. Each is warmed up once, then the median of
   --repeats runs. tokens/s = rows x new tokens / seconds, prefill INCLUDED; the "decode only"
   column removes a prefill measured alone (generate with one new token, same prompts):
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


def median_time(fn, repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls after one warm-up call, the last call's result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


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

    results = {"cfg": cfg}
    seconds, rollout = median_time(megads_run(new), args.repeats)
    if rollout.tokens.shape[1] - prompt_length != new or bool((rollout.lengths != new).any()):
        raise RuntimeError("megads did not generate exactly --new-tokens tokens per row")
    prefill, _ = median_time(megads_run(1), args.repeats)
    results["megads"] = (seconds, prefill)
    results["cache_bytes"] = rollout.cache_bytes
    results["cache_tokens"] = rows * (prompt_length + new)
    print(f"  measured megads: {rows * new / seconds:,.0f} tokens/s", flush=True)
    if args.profile:
        print("\nmegads generate, by self CPU time:")
        print(profile_table(megads_run(new)))

    if args.skip_transformers:
        return results
    hf = transformers_model(cfg.model, stages.models[0].state_dict())
    with torch.no_grad():
        ours = stages.models[0].eval()(prompts)
        theirs = hf(input_ids=prompts).logits
    results["logits_diff"] = (ours - theirs).abs().max().item()
    stages.train()
    mask = torch.ones_like(prompts)

    def hf_run(tokens: int):
        return lambda: hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=tokens,
                                   min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=never,
                                   suppress_tokens=[never], use_cache=True, return_dict_in_generate=True)

    seconds, out = median_time(hf_run(new), args.repeats)
    if out.sequences.shape[1] - prompt_length != new:
        raise RuntimeError(f"transformers generated {out.sequences.shape[1] - prompt_length} tokens, not {new}")
    prefill, _ = median_time(hf_run(1), args.repeats)
    results["transformers"] = (seconds, prefill)
    results["hf_cache_bytes"] = cache_nbytes(out.past_key_values)
    results["hf_cache_tokens"] = rows * (prompt_length + new - 1)   # the last token is never fed back
    results["hf_impl"] = (hf.config._attn_implementation, getattr(hf.config, "_experts_implementation", None))
    print(f"  measured transformers: {rows * new / seconds:,.0f} tokens/s", flush=True)

    ours, theirs = rollout.tokens[:, prompt_length:], out.sequences[:, prompt_length:]
    same = ours == theirs
    first_diff = torch.where(same.all(dim=1), torch.full((rows,), new), (~same).int().argmax(dim=1))
    results["agreement"] = (int(same.sum()), same.numel(), int(same.all(dim=1).sum()), first_diff.float().mean().item())
    if args.profile:
        print("\ntransformers generate, by self CPU time:")
        print(profile_table(hf_run(new)))
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
    print(f"{'':<13} {'generate (s)':>12} {'tokens/s':>10} {'vs transformers':>16} {'prefill (s)':>12} "
          f"{'decode-only tok/s':>18} {'vs transformers':>16}")
    base = r.get("transformers")
    for name in ("transformers", "megads"):
        if name not in r:
            continue
        seconds, prefill = r[name]
        tps, decode_tps = rows * new / seconds, rows * (new - 1) / max(seconds - prefill, 1e-9)
        ratio = f"{base[0] / seconds:.2f}x" if base else "-"
        decode_ratio = f"{(base[0] - base[1]) / max(seconds - prefill, 1e-9):.2f}x" if base else "-"
        print(f"{name:<13} {seconds:>12.3f} {tps:>10,.0f} {ratio:>16} {prefill:>12.4f} {decode_tps:>18,.0f} "
              f"{decode_ratio:>16}")
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
        print(f"   measured: transformers' returned cache / cached tokens = {hf:,.0f} bytes (its DeepseekV3Attention "
              f"also caches the latent and expands it with kv_b_proj at every step)")
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
    return {"cfg": cfg, "records": records}


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
    print(f"{'part':<10} {'seconds':>8} {'share':>7}")
    for name, value in (("rollout", rollout), ("update", update), ("step", rollout + update)):
        print(f"{name:<10} {value:>8.3f} {value / (rollout + update):>6.1%}")
    print(f"   completion length mean {mean('completion_length_mean'):.1f} of {rl.max_new_tokens}, truncated "
          f"{mean('truncated_fraction'):.0%}, KV cache {mean('kv_cache_bytes') / 2**20:.2f} MiB; rollout_s includes "
          f"rewards (and the reference pass when beta > 0)")
    print("   an untrained model emits random bytes: a row stops only if it happens to draw end-of-text, and the "
          "batch decodes\n   until every row has stopped, so each rollout runs all max_new_tokens steps (the worst case)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model", choices=("tiny", "bench"), default="tiny")
    parser.add_argument("--rows", type=int, default=64, help="sequences generated at once")
    parser.add_argument("--prompt-length", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=52)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="megads' micro-batch (default: --rows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median), after one warm-up")
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

    started = time.perf_counter()
    decode = bench_decode(args, model)
    grpo = None if args.skip_grpo else bench_grpo(args, model)
    print_decode(args, decode)
    print_cache(decode)
    if grpo is not None:
        print_grpo(grpo)
    print(f"\n(total {time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()

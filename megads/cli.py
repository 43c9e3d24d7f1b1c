"""The `megads` command.

    megads train CONFIG [--set SECTION.KEY=VALUE ...]   train (resumes from OUTPUT_DIR/checkpoints)
    megads sft CONFIG [--set ...]                        cold-start SFT on a task's demonstrations (rl section)
    megads grpo CONFIG [--set ...]                       GRPO from rl.init_from (rl section)
    megads import-hf HF_DIR CKPT_DIR                     Hugging Face DeepSeek-V3 dir (BF16/FP32 or DeepSeek's
                                                         FP8) -> megads checkpoint
    megads export-hf CKPT_DIR HF_DIR [--fp8]             megads checkpoint (or run dir) -> Hugging Face dir
    megads convert-checkpoint SRC DST --set parallel.…   a checkpoint for another layout (resume with it)
    megads preprocess INPUT... --output PREFIX --tokenizer FILE   JSONL / text -> PREFIX.bin/.idx (data.datasets)
    megads profile CONFIG [--set ...] [--vary K=V1,V2]   a few steps: tokens/s, MFU, time split, comm, memory
    megads plot RUN_DIR... [--output DIR]                PNG figures from runs' metrics.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

from megads.config import ConfigError, describe_fields, load_config
from megads.errors import RunFailure
from parallel.group import CollectiveError
from megads.shards import CheckpointFormatError


def _train(args) -> int:
    if args.help_config:
        print(describe_fields())
        return 0
    if args.config is None:
        print("megads train: a CONFIG file is required (e.g. examples/configs/tiny.yaml)", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set)
    from megads.train.trainer import train  # imported late: `--help` should not pay for torch

    train(cfg)
    return 0


def _post_train(args) -> int:
    if args.config is None:
        print(f"megads {args.command}: a CONFIG file is required (e.g. examples/configs/{args.command}_tiny.yaml)",
              file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set)
    if args.command == "sft":
        from megads.rl.sft import sft as run
    else:
        from megads.rl.grpo import grpo as run
    run(cfg)
    return 0


def _import_hf(args) -> int:
    from megads.hf import import_hf

    import_hf(args.hf_dir, args.ckpt_dir)
    return 0


def _export_hf(args) -> int:
    from megads.hf import export_hf

    export_hf(args.ckpt_dir, args.hf_dir, max_shard_bytes=int(args.max_shard_gb * 1024**3), fp8=args.fp8)
    return 0


def _convert_checkpoint(args) -> int:
    from megads.train.convert_checkpoint import convert_checkpoint

    convert_checkpoint(args.source, args.target, args.set)
    return 0


def _preprocess(args) -> int:
    from megads.data.preprocess import PreprocessOptions, preprocess

    options = PreprocessOptions(
        input_format=args.format, json_key=args.json_key, document_per_line=args.document_per_line,
        eod_token=args.eod_token, workers=args.workers, skip_malformed=args.skip_malformed,
        max_reported=args.max_reported, progress_every_s=args.progress_every)
    try:
        preprocess(args.inputs, args.output, args.tokenizer, options, log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:  # not main's message: there is no checkpoint here
        print(f"megads preprocess: interrupted; nothing was written ({args.output}.bin/.idx are as they were).",
              file=sys.stderr)
        return 130
    return 0


def _plot(args) -> int:
    from pathlib import Path

    from megads.plot import plot_runs

    output = Path(args.output) if args.output else Path(args.run_dirs[0]) / "plots"
    for path in plot_runs([Path(d) for d in args.run_dirs], output):
        print(path)
    return 0


def _profile(args) -> int:
    from pathlib import Path

    from megads.profile import format_table, profile_config, write_json

    rank_zero = int(os.environ.get("RANK", "0")) == 0     # torchrun's; the process group is gone by now
    results = profile_config(args.config, args.set, args.steps, args.warmup, args.vary,
                             log=print if rank_zero else (lambda *_: None), top=args.top)
    if rank_zero:
        print(format_table(results, f"megads profile {args.config}: {args.steps} steps after {args.warmup} "
                                    f"warm-up"))
        if args.json:
            write_json(results, Path(args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megads", description="Train DeepSeek-V3-style models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", nargs="?", help="YAML config, e.g. examples/configs/tiny.yaml")
    train.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                       help="override config values, e.g. --set train.max_steps=20 model.hidden_size=128")
    train.add_argument("--help-config", action="store_true", help="list every config field with its meaning")
    train.set_defaults(func=_train)

    for name, what in (("sft", "cold-start SFT on a verifiable task's demonstrations (the rl section)"),
                       ("grpo", "GRPO with rule-based rewards from an SFT checkpoint (the rl section)")):
        job = sub.add_parser(name, help=what)
        job.add_argument("config", nargs="?", help=f"YAML config, e.g. examples/configs/{name}_tiny.yaml")
        job.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", help="override config values")
        job.set_defaults(func=_post_train)

    imp = sub.add_parser("import-hf", help="convert a Hugging Face DeepSeek-V3 directory to a megads checkpoint "
                                           "(DeepSeek's FP8 weights are dequantized to float32)")
    imp.add_argument("hf_dir")
    imp.add_argument("ckpt_dir")
    imp.set_defaults(func=_import_hf)

    exp = sub.add_parser("export-hf", help="convert a megads checkpoint (or run directory) to Hugging Face format")
    exp.add_argument("ckpt_dir")
    exp.add_argument("hf_dir")
    exp.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (GiB)")
    exp.add_argument("--fp8", action="store_true",
                     help="write DeepSeek-V3's FP8 format: linear weights as float8_e4m3fn with a 128x128 block "
                          "weight_scale_inv, the other tensors bfloat16")
    exp.set_defaults(func=_export_hf)

    conv = sub.add_parser("convert-checkpoint", help="a checkpoint (or run directory) for another parallel layout")
    conv.add_argument("source", help="checkpoint directory, or a run directory (its latest checkpoint)")
    conv.add_argument("target", help="new run directory: TARGET/checkpoints/step_N and TARGET/config.yaml")
    conv.add_argument("--set", nargs="+", default=[], metavar="parallel.KEY=VALUE", help="the new layout")
    conv.set_defaults(func=_convert_checkpoint)

    pre = sub.add_parser("preprocess", help="tokenize JSONL or text files into an indexed dataset (PREFIX.bin/.idx) "
                                            "for data.datasets")
    pre.add_argument("inputs", nargs="+", metavar="INPUT", help="files, or directories (all their files, recursively)")
    pre.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--tokenizer", required=True, metavar="FILE",
                     help="a tokenizer file: megads's own (a run's cached tokenizer.json) or any Hugging Face "
                          "tokenizer.json; training names the same file as data.tokenizer_file")
    pre.add_argument("--eod-token", default=None, metavar="TOKEN",
                     help="the tokenizer's end-of-document token, written after every document (default <|endoftext|>)")
    pre.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto",
                     help="auto: .jsonl/.ndjson files are JSONL, others plain text (default auto)")
    pre.add_argument("--json-key", default="text", metavar="KEY", help="the JSONL field holding the text (default text)")
    pre.add_argument("--document-per-line", action="store_true",
                     help="plain text files: every line is a document (default: every file is one)")
    pre.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizing processes (default 1)")
    pre.add_argument("--skip-malformed", action="store_true",
                     help="skip malformed lines (listed and counted either way) instead of failing with exit status 1")
    pre.add_argument("--max-reported", type=int, default=20, metavar="N",
                     help="malformed lines listed by file and line number (all are counted; default 20)")
    pre.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                     help="seconds between progress lines (default 5)")
    pre.set_defaults(func=_preprocess)

    prof = sub.add_parser("profile", help="run a few training steps of a config and print throughput, MFU, where the "
                                          "time goes, communication and peak memory per rank")
    prof.add_argument("config", nargs="?", help="YAML config, e.g. examples/configs/tiny.yaml")
    prof.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", help="override config values")
    prof.add_argument("--steps", type=int, default=5, help="measured steps (default 5)")
    prof.add_argument("--warmup", type=int, default=2, help="steps run first and not measured (default 2)")
    prof.add_argument("--top", type=int, default=10,
                      help="profile one more step with torch.profiler and list its N operators with the most self "
                           "time (0: skip; default 10)")
    prof.add_argument("--vary", metavar="SECTION.KEY=V1,V2,...",
                      help="profile once per value, one column each, e.g. train.recompute=none,selective,full")
    prof.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    prof.set_defaults(func=_profile)

    plot = sub.add_parser("plot", help="PNG figures (loss, throughput, expert load, GRPO) from runs' metrics.jsonl")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories; several are overlaid")
    plot.add_argument("--output", metavar="DIR", help="where the PNGs go (default: FIRST_RUN_DIR/plots)")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; its errors are one line on stderr. Exit status: 0 done, 1 error, 2 configuration
    error, 128 + N stopped by signal N after saving a checkpoint (143: SIGTERM, 130: Ctrl-C; rerun
    the same command to resume), 130 also for a second Ctrl-C (stopped at once, nothing saved)."""
    args = build_parser().parse_args(argv)
    from megads.train.stopping import Interrupted

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"megads {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"megads {args.command}: {stop}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"megads {args.command}: interrupted; the latest complete checkpoint is unchanged.", file=sys.stderr)
        return 130
    except (CheckpointFormatError, RunFailure, CollectiveError, OSError) as err:
        print(f"megads {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

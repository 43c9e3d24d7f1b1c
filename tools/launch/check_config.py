"""Check a megads job's config and layout once per node, before torchrun starts any rank.

    python tools/launch/check_config.py WORLD_SIZE COMMAND CONFIG [--set SECTION.KEY=VALUE ...]

Every rank checks them again (megads.config.validate, before any process group exists). But a
problem found there is printed by every rank, torchrun adds a report per rank, and with
`--max-restarts N` all of it happens N + 1 times: a configuration never fixes itself on a restart.
Found here, it is the one sentence `megads` itself prints, once per node, with megads's exit status 2.
Commands without a config (import-hf, export-hf, --help ...) are left to megads.
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.getcwd()  # find megads where the ranks will: `python -m megads.cli` looks in the working directory first

from megads.cli import build_parser  # noqa: E402
from megads.config import ConfigError, load_config, validate  # noqa: E402

JOBS = ("train", "sft", "grpo")  # the commands whose config names a layout


def main(argv: list[str]) -> int:
    world_size, megads_argv = int(argv[0]), argv[1:]
    args = build_parser().parse_args(megads_argv)  # exactly as the ranks will parse them
    if args.command not in JOBS or args.config is None or getattr(args, "help_config", False):
        return 0
    try:
        validate(load_config(args.config, args.set), world_size=world_size, job=args.command)
    except ConfigError as err:
        print(f"megads {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

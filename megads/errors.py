"""The base of errors that end a run with one sentence (the `megads` command prints it, no traceback).

Configuration mistakes are `megads.config.ConfigError` and damaged files
`megads.shards.CheckpointFormatError`; `RunFailure` is everything else a user must act on: a save
that failed (full disk, read-only directory), an output directory that cannot be written, steps that
keep being skipped, a rank that stopped answering.
"""


class RunFailure(RuntimeError):
    """A run stopped on an error its message explains in one sentence."""

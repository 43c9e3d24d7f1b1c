"""Re-export of `parallel.comm_meter` (where the collective counting lives, so that `megads profile`
and the trainer can use it; tools and tests keep importing it from here)."""

from parallel.comm_meter import KINDS, CollectiveStats, OpStats, count_collectives  # noqa: F401

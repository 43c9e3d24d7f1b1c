"""Test and measurement machinery, kept out of the runtime packages (megads/, parallel/).

- `tools.harness.distributed`: `run_distributed`, the multi-rank harness (N local gloo processes);
- `tools.harness.pipeline`: helpers for running `parallel.pipeline.executor.PipelineExecutor` in tests.

Importable with the repository root on sys.path (pytest.ini's ``pythonpath = .``; the scripts in
tools/ put it there themselves). Nothing under megads/ or parallel/ imports it.
"""

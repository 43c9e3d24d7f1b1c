"""Scripts (benchmarks, GPU checks, launchers) and the test and measurement harness (`tools.harness`)."""

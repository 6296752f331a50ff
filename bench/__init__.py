"""`task bench`: the benchmark stages, their CPU accounting and their results (bench/results)."""

"""Benchmarks of metacrm against hand-written baselines measured in the same run (BENCHMARKS.md)."""

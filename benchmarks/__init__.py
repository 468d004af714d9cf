"""Benchmark scripts of refine-tta: ``python -m benchmarks.<name> --help`` (see BENCHMARKS.md)."""

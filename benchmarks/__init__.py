"""The benchmark suite (python -m benchmarks, make bench); see benchmarks/README.md."""

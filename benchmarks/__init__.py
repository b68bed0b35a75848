"""The benchmark runner: poolkit against the pools people use. ``python -m benchmarks --help``."""

"""Benchmarks for Fleet: `python -m bench.dispatch|safety|beat [--quick]` (see bench/README.md)."""

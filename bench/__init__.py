"""Benchmarks: ours against reference runs measured in the same process (see bench/README.md)."""

"""Benchmarks; each script has --help and writes JSON (and a PNG where it plots) to bench/results/."""

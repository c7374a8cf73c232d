"""Tiny random models built locally (no hub) for the tests and the speed benchmarks."""

"""Tooling, not runtime: the embedded default model builders and the harness that serves bentos for tests and
benchmarks."""

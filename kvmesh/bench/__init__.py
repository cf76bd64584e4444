"""Benchmarks: gateway, P/D, router microbenchmark and routing (simulation, real, oracle)."""

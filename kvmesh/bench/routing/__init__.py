"""Routing benchmarks: workloads, virtual-time simulation, real workers, the oracle."""

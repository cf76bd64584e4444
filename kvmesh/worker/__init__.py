"""kvmesh worker service: a Ray actor hosting vLLM behind the VllmEngine contract."""

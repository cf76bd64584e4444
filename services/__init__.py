"""kvmesh services service."""

"""kvmesh gateway service."""

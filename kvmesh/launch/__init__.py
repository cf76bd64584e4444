"""The launcher: start, inspect and stop a mesh on one machine (`kvmesh up`, `kvmesh status`)."""

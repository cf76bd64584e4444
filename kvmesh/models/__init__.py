"""Models: where weights come from (sources) and the embedded models kvmesh prepares."""

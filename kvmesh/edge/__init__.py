"""The edge: Envoy in front of the gateway replicas, configured over ADS by a Python
xDS control plane (resources built from the set of gateways, versioned snapshots,
ACK/NACK tracking)."""

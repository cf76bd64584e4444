"""Generated protobuf and gRPC stubs for the kvmesh.v1 contracts (see protos/)."""

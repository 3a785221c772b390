"""The gRPC transport: the Open Inference Protocol's servicer and grpc.health.v1, over the data plane."""

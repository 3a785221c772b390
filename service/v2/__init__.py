"""The Open Inference Protocol's messages (KServe v2, with Triton's binary tensor data and model
repository extensions): its JSON bodies (messages) and its tensors (codec), shared by REST
(service.api.routes.v2, service.api.routes.repository_extension) and gRPC (service.grpc_api)."""

"""The Open Inference Protocol (KServe v2 REST, with Triton's binary tensor data and model
repository extensions): its JSON bodies (schemas) and its tensors (codec). The routes are in
service.api.routes.v2 and service.api.routes.repository."""

"""`stepnet serve`. Nothing heavy is imported until the command runs."""

from pathlib import Path

from stepnet.errors import UserError


def _cmd_serve(args) -> int:
    from pydantic import ValidationError

    from service.core.config import Settings, parse_device
    from service.errors import ModelLoadError
    from service.metrics import Metrics
    from service.repository import Repository

    flags = {"model_repository": args.model_repository, "host": args.host, "port": args.port}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"STEPNET_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                             for e in exc.errors())
        raise UserError(f"invalid settings: {problems}") from None
    try:   # refuse a missing or empty repository in one line, before uvicorn starts
        Repository(settings, Metrics()).discover()
    except ModelLoadError as exc:
        raise UserError(f"{exc.message} (`make model` exports the default model)") from None
    if parse_device(settings.device)[0] == "cuda":   # no usable GPU: exit here, not start and never be ready
        from service.runtime import choose_device

        try:
            choose_device(settings.device)
        except ModelLoadError as exc:
            raise UserError(f"{exc.message}; STEPNET_DEVICE=auto falls back to the CPU provider") from None

    _open_file_limit(settings.max_connections)

    from service.main import serve

    serve(settings)
    return 0


def _open_file_limit(connections: int) -> None:
    """Raise the soft limit on open files to what STEPNET_MAX_CONNECTIONS needs, or refuse."""
    import resource

    needed = connections + 256          # + model files, listening sockets, threads' pipes, logs
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise UserError(f"STEPNET_MAX_CONNECTIONS={connections} needs {needed} open files, but the "
                        f"hard limit is {hard} (ulimit -Hn); lower STEPNET_MAX_CONNECTIONS")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model repository over HTTP (FastAPI, ONNX Runtime)",
                       description="Serve every model in the repository (the newest versions of "
                                   "each): POST /predict, GET /stiffness, /models, /healthz, /readyz, "
                                   "/metrics, /docs, and the Open Inference Protocol (KServe v2) under "
                                   "/v2. Settings come from STEPNET_* environment variables; these "
                                   "flags override them.")
    p.add_argument("--model-repository", type=Path,
                   help="folder with <model>/<version>/model.onnx + model.json "
                        "(STEPNET_MODEL_REPOSITORY, default model_repository)")
    p.add_argument("--host", help="address to listen on (STEPNET_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (STEPNET_PORT, default 8000)")
    p.set_defaults(run=_cmd_serve)

"""`stepnet serve`. Nothing heavy is imported until the command runs."""

from pathlib import Path

from stepnet.errors import UserError


def _cmd_serve(args) -> int:
    from pydantic import ValidationError

    from service.config.settings import Settings, parse_device
    from service.core.errors import ModelLoadError
    from service.telemetry.metrics import Metrics
    from service.repository.model_repository import Repository

    flags = {"model_repository": args.model_repository, "host": args.host, "port": args.port,
             "grpc_port": args.grpc_port}
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
        from service.inference.placement import choose_device

        try:
            choose_device(settings.device)
        except ModelLoadError as exc:
            raise UserError(f"{exc.message}; STEPNET_DEVICE=auto falls back to the CPU provider") from None

    _check_listeners(settings)

    from service.config.budget import ConnectionBudget

    _open_file_limit(ConnectionBudget.of(settings).open_files, settings.max_connections)

    from service.main import serve

    serve(settings)
    return 0


def _check_listeners(settings) -> None:
    """Refuse a host that does not resolve, or a port that cannot be listened on (in use, taken
    by the other listener, privileged), before anything starts: each port is bound on every
    address of the host and listened on, as uvicorn and gRPC will (SO_REUSEADDR, no
    SO_REUSEPORT), both at once. A port taken after this check fails the start in one line too
    (service.main.serve)."""
    import socket

    ports = [("STEPNET_PORT", settings.port)] + ([("STEPNET_GRPC_PORT", settings.grpc_port)]
                                                 if settings.grpc_port else [])
    try:
        addresses = dict.fromkeys(socket.getaddrinfo(settings.host or None, 0, type=socket.SOCK_STREAM,
                                                     flags=socket.AI_PASSIVE))
    except socket.gaierror as exc:
        raise UserError(f"STEPNET_HOST={settings.host} does not resolve to an address to listen on "
                        f"({(exc.strerror or str(exc)).lower()})") from None
    held: list[socket.socket] = []
    try:
        for name, port in ports:
            for family, kind, proto, _, address in addresses:
                sock = socket.socket(family, kind, proto)
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((address[0], port, *address[2:]))
                    sock.listen()
                except OSError as exc:
                    raise UserError(f"cannot listen on {settings.host}:{port} ({name}): "
                                    f"{(exc.strerror or str(exc)).lower()}") from None
    finally:
        for sock in held:
            sock.close()


def _open_file_limit(needed: int, connections: int) -> None:
    """Raise the soft limit on open files to what the connection budget of both listeners
    needs (STEPNET_MAX_CONNECTIONS and the files beside them), or refuse."""
    import resource

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
    p.add_argument("--grpc-port", type=int, help="gRPC port on the same host (STEPNET_GRPC_PORT, default "
                                                 "8001; 0: no gRPC)")
    p.set_defaults(run=_cmd_serve)

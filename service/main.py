"""Assembles the app: settings, metrics, error handlers, routes, and the lifespan that loads the
model repository.

Start-up does not wait for the models: the server answers at once (/healthz 200, /readyz 503)
while a background task loads and warms every model, so an orchestrator can tell "starting" from
"dead"; with STEPNET_REPOSITORY_POLL_S the same task then polls the repository for new versions.
On SIGTERM uvicorn stops accepting connections and waits for the requests in flight
(up to STEPNET_SHUTDOWN_TIMEOUT_S); then the batchers drain and stop.
"""

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.api.error_responses import install_error_handlers
from service.api.routes import (docs, health, models, page, predict, prometheus, repository_extension,
                                stiffness, v2)
from service.config.settings import Settings
from service.inference.placement import nvml_cards
from service.inference.preprocess import return_memory_to_the_os
from service.repository.model_repository import Repository
from service.telemetry import logs, tracing
from service.telemetry.logs import RequestIdMiddleware
from service.telemetry.thread_names import name_this_thread, set_os_name
from service.telemetry.metrics import GpuCollector, Metrics, RequestMetricsMiddleware, StateCollector
from stepnet.errors import UserError

log = logging.getLogger(__name__)

DESCRIPTION = """StepNet image classifiers on ONNX Runtime. Every prediction reports, per residual
block, the step size the attention adaptor chose and the block's neural stiffness index (NSI);
/stiffness compares live traffic with the export's calibration profile. Errors are JSON
`{"error": {"code", "message"}}`. The Open Inference Protocol (KServe v2) is served under /v2,
with its own error shape `{"error": "..."}`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logs.configure(settings.log_level, settings.log_format)
        return_memory_to_the_os()
        # asyncio.to_thread's pool (file reads, v2 decoding) as asyncio makes it, with names of its own
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="asyncio", initializer=name_this_thread))
        if settings.max_queue_size < settings.max_batch_size:
            log.warning("STEPNET_MAX_QUEUE_SIZE=%d is below STEPNET_MAX_BATCH_SIZE=%d: batches never "
                        "exceed %d, and no request may carry more rows", settings.max_queue_size,
                        settings.max_batch_size, settings.max_queue_size)
        repository = Repository(settings, metrics)
        repository.discover()
        metrics.watch(StateCollector(repository.served))
        app.state.repository = repository
        loading = asyncio.create_task(_load(repository, metrics, settings.repository_poll_s),
                                      name="load-models")
        grpc_server = None
        if settings.grpc_port:
            from service.grpc_api.grpc_server import GrpcServer

            grpc_server = app.state.grpc = GrpcServer(repository, settings, metrics)
            await grpc_server.start()
        try:
            yield
        finally:
            loading.cancel()
            if grpc_server is not None:     # already stopping since SIGTERM under `stepnet serve`
                await grpc_server.stop()
            await repository.close(settings.shutdown_timeout_s)
            tracing.shutdown()

    # Request spans are FastAPI's own (service.telemetry.tracing). Its OpenTelemetry metrics and logs are
    # not used (Prometheus, service.telemetry.logs); off, its per-request check (4.3 us when no
    # provider is set) is skipped altogether.
    traced = tracing.setup(settings.tracing)
    app = FastAPI(title="StepNet inference service", description=DESCRIPTION, version="1",
                  lifespan=lifespan, docs_url=None, redoc_url=None,     # /docs: service.api.routes.docs
                  redirect_slashes=False,   # Starlette's redirect is built from the Host header: an open redirect
                  telemetry={"operation_spans": False, "tracing": traced, "metrics": False, "logs": False})
    app.state.settings, app.state.metrics = settings, metrics
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, access_log=settings.access_log)
    app.add_middleware(RequestIdMiddleware)      # outermost: the ID is set for everything inside
    for module in (predict, stiffness, models, health, prometheus, v2, repository_extension, docs, page):
        app.include_router(module.router)
    app.mount(docs.ASSETS, docs.assets, name="docs-assets")
    _document_settings(app, settings)
    return app


def _document_settings(app: FastAPI, settings: Settings) -> None:
    """Limits that come from settings, written into the OpenAPI schema the first time it is made."""
    make_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = make_schema()             # FastAPI's, which keeps it in app.openapi_schema
        for parameter in schema["paths"]["/stiffness"]["get"]["parameters"]:
            if parameter["name"] == "window":
                parameter["schema"]["maximum"] = settings.stiffness_history
        return schema

    # FastAPI's documented way to extend the schema; its types declare openapi a plain method
    app.openapi = openapi  # type: ignore[method-assign]


async def _load(repository: Repository, metrics: Metrics, poll_s: float) -> None:
    await repository.load_all()
    gpus = sorted({s.gpu for served in repository.served() for s in served.sessions if s.gpu is not None})
    if gpus:
        metrics.watch(GpuCollector(nvml_cards(gpus)))
    if repository.ready:
        log.info("ready: %s", ", ".join(f"{s.name}:{s.version} ({s.provider})" for s in repository.served()))
    else:
        log.error("no model could be loaded; /readyz stays false")
    if poll_s > 0:
        await repository.poll(poll_s)


def serve(settings: Settings) -> None:
    """Run the app with uvicorn (what `stepnet serve` does): httptools and uvloop, the faster
    parser and loop (docs/performance.md), with the connection limits of service.api.http_limits.
    A port it cannot listen on (taken since `stepnet serve` checked it) is a UserError: one line."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from service.api.http_limits import guarded_protocol
    from service.config.budget import ConnectionBudget

    logs.configure(settings.log_level, settings.log_format)   # before uvicorn's first line
    set_os_name("event-loop")    # threads started later inherit it unless they name themselves
    app = create_app(settings)
    limits = ConnectionBudget.of(settings)
    failures: list[Exception] = []
    config = uvicorn.Config(_start_up_failures(app, failures), host=settings.host, port=settings.port,
                            http=guarded_protocol(limits, app.state.metrics), loop="uvloop",
                            ws="none",          # no WebSocket routes: upgrade requests are not taken
                            log_level=settings.log_level, log_config=None,   # ours: service.telemetry.logs
                            access_log=False,   # the service's own (service.telemetry.logs), with durations
                            timeout_keep_alive=math.ceil(settings.idle_timeout_s),
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """SIGTERM and SIGINT: the gRPC server stops accepting at once, as uvicorn does."""
            grpc_server = getattr(app.state, "grpc", None)
            if grpc_server is not None:
                grpc_server.stop_soon()
            super().handle_exit(sig, frame)

    try:
        Server(config).run()
    except SystemExit as exc:   # uvicorn's exit when the lifespan's start-up fails or HTTP cannot listen
        if exc.code != STARTUP_FAILURE or (failures and not isinstance(failures[0], OSError)):
            raise
        raise UserError(str(failures[0]) if failures else f"cannot listen on {settings.host}:{settings.port} "
                                                           f"(STEPNET_PORT): the error above says why") from None


def _start_up_failures(app: FastAPI, failures: list[Exception]):
    """The ASGI app, with what fails its lifespan's start-up kept in `failures`: an OSError (gRPC
    cannot listen) becomes serve()'s one line, anything else is logged with its traceback.
    Starlette would pass the traceback to uvicorn to log, either way."""
    async def asgi(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        start_up_failed = False

        async def send_without_traceback(message) -> None:
            nonlocal start_up_failed
            if message["type"] == "lifespan.startup.failed":
                start_up_failed, message = True, {**message, "message": ""}
            await send(message)

        try:
            await app(scope, receive, send_without_traceback)
        except Exception as exc:
            if start_up_failed:
                failures.append(exc)
                if not isinstance(exc, OSError):
                    log.exception("start-up failed")
            raise

    return asgi


app = create_app()

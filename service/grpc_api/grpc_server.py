"""Open Inference Protocol (KServe v2) over gRPC, in the app's process and event loop.

`inference.GRPCInferenceService` comes from tritonclient's generated stubs
(`tritonclient.grpc.service_pb2*`, built by Triton from the protocol's .proto): they hold the
servicer base class and every RPC, the repository extension's included, without a .proto copied
here or a generation step at build time (docs/decisions.md). The standard `grpc.health.v1`
service comes from grpcio-health-checking.

Every RPC goes through what REST uses: the repository (leases, versions), the batchers (gRPC and
REST rows join the same batches), the codec's input rules, the stiffness statistics, the admin
key (`authorization: Bearer <key>` metadata) and the metrics (protocol="grpc"). A ServiceError
becomes the gRPC status of its HTTP status (STATUS_CODES), with the same message; 503s carry
`retry-after` (seconds) and `grpc-retry-pushback-ms` in the trailing metadata. The client's
deadline is honoured: the work stops when it passes, as when STEPNET_REQUEST_TIMEOUT_S does.
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.config.budget import ConnectionBudget
from service.config.settings import Settings
from service.core.dataplane import check_admin, deadline, infer, leased, reported, resolve
from service.core.errors import BadRequest, ClientDeadline, ClientDisconnected, ServiceError
from service.telemetry.metrics import PROTOCOL, Metrics
from service.telemetry import tracing
from service.telemetry.logs import HEADER, MODEL, REQUEST_ID, log_access, request_id
from service.grpc_api import grpc_connections
from service.v2 import codec
from service.v2.triton_extensions import model_config, model_statistics
from service.core.repository_control import index_entries, load_model, unload_model
from service.v2.messages import InferRequest
from service.repository.model_repository import Repository
from stepnet import __version__
from stepnet.repository import VersionState, parse_version

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH_PERIOD_S = 0.05       # how soon a Watch stream hears of a change of /readyz
WATCH_CLOSE_S = 1.0          # on shutdown, longest wait for Watch streams to send NOT_SERVING and end
# HTTP status of a ServiceError -> gRPC status; a client's mistake is never UNKNOWN or INTERNAL
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status of a ServiceError: its HTTP status's, except that a client whose own
    deadline passed (499 in the metrics) hears DEADLINE_EXCEEDED, as gRPC clients expect."""
    if isinstance(error, ClientDeadline):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


def _trailers(error: ServiceError) -> tuple[tuple[str, str], ...]:
    retry = (error.headers or {}).get("Retry-After")
    if retry is None:
        return ()
    return ("retry-after", retry), ("grpc-retry-pushback-ms", str(int(float(retry) * 1000)))


def rpc(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """One RPC: metrics (endpoint = the RPC's name, status = its HTTP equivalent, protocol grpc)
    and errors as gRPC statuses. A client that cancels or whose deadline passes is 499."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: "InferenceServicer", request, context: grpc.aio.ServicerContext):
        started, status = time.perf_counter(), 200
        self.metrics.in_flight.inc()
        token = PROTOCOL.set("grpc")
        metadata = first_values(context.invocation_metadata() or ())
        rid = request_id(metadata.get(HEADER))
        rid_token = REQUEST_ID.set(rid)
        context.set_trailing_metadata(((HEADER, rid),))
        spans = contextlib.ExitStack()
        span = spans.enter_context(tracing.server_span(name, metadata)) if tracing.enabled() else None
        try:
            if isinstance(request, Malformed):
                raise BadRequest(f"the {name} request is not a valid protobuf message: {request.reason}")
            return await method(self, request, context)
        except ServiceError as error:
            status = error.status
            remaining = context.time_remaining()
            if isinstance(error, ClientDisconnected) and remaining is not None and remaining <= 0:
                # the client's deadline passed: grpc core answers it; a status sent now would fail
                raise asyncio.CancelledError from None
            context.set_trailing_metadata(((HEADER, rid), *_trailers(error)))
            await context.abort(status_code(error), error.message)
        except asyncio.CancelledError:
            status = ClientDisconnected.status
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = 500
            log.exception("%s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server logged it")
        finally:
            seconds = time.perf_counter() - started
            PROTOCOL.reset(token)
            self.metrics.in_flight.dec()
            self.metrics.observe_request(name, status, seconds, "grpc")
            if self.settings.access_log:
                log_access(name, "RPC", status, seconds, "grpc")
            if span is not None:
                tracing.finish_request(span, status, rid, MODEL.get())
                spans.close()
            REQUEST_ID.reset(rid_token)

    return handler


def first_values(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """Text metadata as a dict that keeps a key's first value, as REST does with a repeated header
    (binary "-bin" keys, whose values are bytes, are left out: none is read)."""
    out: dict[str, str] = {}
    for key, value in metadata:
        if isinstance(value, str):
            out.setdefault(key, value)
    return out


class Malformed:
    """What a request that does not parse becomes: rpc() answers it INVALID_ARGUMENT, counted as
    a 400, where grpc's own deserializer failure is UNKNOWN and goes uncounted."""
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _lenient(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except (DecodeError, ValueError) as exc:
            return Malformed(str(exc)[:200] or type(exc).__name__)
    return deserialize


def add_servicer(add_to_server: Callable, servicer: object, server: grpc.aio.Server) -> None:
    """The generated add_*_to_server, with every request deserializer made lenient (Malformed)."""

    class Capture:
        """Takes the method handlers the generated code registers, and registers lenient ones."""

        def add_generic_rpc_handlers(self, handlers: Sequence) -> None:
            pass        # the same methods come to add_registered_method_handlers

        def add_registered_method_handlers(self, service: str, methods: dict) -> None:
            methods = {name: method._replace(request_deserializer=_lenient(method.request_deserializer))
                       for name, method in methods.items()}
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
            server.add_registered_method_handlers(service, methods)

    add_to_server(servicer, Capture())


def _value(parameter) -> object:
    """An InferParameter or ModelRepositoryParameter as the Python value REST's JSON would give."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _parameters(parameters) -> dict:
    return {key: _value(value) for key, value in parameters.items()}


def _version(text: str) -> int | None:
    if not text:
        return None
    try:
        return parse_version(text)
    except ValueError as exc:
        raise BadRequest(f"model_version: {exc}") from None


def _model_name(text: str) -> str:
    if not text:
        raise BadRequest("model_name is required")
    return text


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, settings: Settings, metrics: Metrics):
        self.repository, self.settings, self.metrics = repository, settings, metrics

    # ---------------------------------------------------------------- health and metadata

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.repository.ready)

    @rpc
    async def ModelReady(self, request, context):
        state = resolve(self.repository, _model_name(request.name), _version(request.version))
        return pb.ModelReadyResponse(ready=state.state is VersionState.READY)

    @rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="stepnet", version=__version__, extensions=codec.EXTENSIONS)

    @rpc
    async def ModelMetadata(self, request, context):
        version = _version(request.version)
        with leased(self.repository, _model_name(request.name), version) as served:
            meta = codec.model_metadata(served.meta, self.repository.versions(served.name))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs])

    # ---------------------------------------------------------------- Triton's extensions

    @rpc
    async def ModelConfig(self, request, context):
        with leased(self.repository, _model_name(request.name), _version(request.version)) as served:
            config = json_format.ParseDict(model_config(served), model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    @rpc
    async def ModelStatistics(self, request, context):
        versions = reported(self.repository, request.name or None, _version(request.version))
        return json_format.ParseDict(model_statistics(versions), pb.ModelStatisticsResponse())

    # ---------------------------------------------------------------- inference

    @rpc
    async def ModelInfer(self, request, context):
        name, version = _model_name(request.model_name), _version(request.model_version)
        remaining = context.time_remaining()
        with leased(self.repository, name, version) as served:
            async with deadline(self.settings.request_timeout_s,
                                None if remaining is None else max(0.0, remaining)) as work:
                work.received()                      # gRPC hands over whole messages
                return await infer(served, functools.partial(_decode, request, served.meta,
                                                             served.max_request_rows),
                                   lambda decoded, results: _encode(decoded, served.meta, results))

    # ---------------------------------------------------------------- repository extension

    @rpc
    async def RepositoryIndex(self, request, context):
        entries = await index_entries(self.repository)
        if request.ready:
            entries = [e for e in entries if e.state == "READY"]
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in entries])

    @rpc
    async def RepositoryModelLoad(self, request, context):
        self._admin(context)
        await load_model(self.repository, _model_name(request.model_name), _parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        self._admin(context)
        await unload_model(self.repository, _model_name(request.model_name), _parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    def _admin(self, context: grpc.aio.ServicerContext) -> None:
        metadata = first_values(context.invocation_metadata() or ())
        check_admin(self.settings, metadata.get("authorization"))


# -------------------------------------------------------------------- tensors

def _blob(tensor) -> bytes:
    """A tensor sent in `contents` as the bytes REST's binary data would carry."""
    if tensor.datatype == "BYTES":
        return b"".join(len(item).to_bytes(4, "little") + item for item in tensor.contents.bytes_contents)
    return np.asarray(tensor.contents.fp32_contents, "<f4").tobytes()


def _decode(request, meta, max_rows: int) -> codec.Decoded:
    """A ModelInferRequest -> what the REST route decodes, through the same rules: inputs from
    `raw_input_contents` (one per input) or `contents`; outputs binary (raw_output_contents)
    unless every output asks for `binary_data: false`."""
    parameters = _parameters(request.parameters)
    parameters.setdefault("binary_data_output", True)
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                         f"send every input there or every input in contents")
    inputs, blobs = [], []
    for i, tensor in enumerate(request.inputs):
        inputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                       "parameters": _parameters(tensor.parameters)})
        blobs.append(raw[i] if raw else _blob(tensor))
    outputs = [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs]
    try:
        parsed = InferRequest.model_validate({"id": request.id or None, "parameters": parameters,
                                              "inputs": inputs, "outputs": outputs})
    except ValueError as exc:
        raise BadRequest(f"invalid inference request: {codec.reason(exc)}") from None
    return codec.decode_inputs(parsed, blobs, meta, max_rows)


def _encode(decoded: codec.Decoded, meta, results) -> pb.ModelInferResponse:
    tensors = codec.output_tensors(decoded, results)
    binary = any(as_binary for _, _, as_binary in tensors)
    response = pb.ModelInferResponse(model_name=meta.name, model_version=str(meta.version),
                                     id=decoded.request.id or "")
    for name, array, _ in tensors:
        out = response.outputs.add(name=name, datatype=codec.DATATYPES[name], shape=array.shape)
        if binary:
            response.raw_output_contents.append(codec.binary_bytes(array))
        elif array.dtype == np.bool_:
            out.contents.bool_contents.extend(array.ravel().tolist())
        else:
            out.contents.fp32_contents.extend(array.ravel().tolist())
    return response


# -------------------------------------------------------------------- the server

class Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING for the server ("") and the inference service while /readyz says
    ready, NOT_SERVING otherwise; any other service is NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch).

    Check reads readiness live (a Kubernetes probe sees what /readyz says now). Watch streams
    never finish by themselves, so they are bounded (the budget's health_watches; beyond it
    RESOURCE_EXHAUSTED) and are not calls in flight: when shutdown starts each is sent
    NOT_SERVING and ends at once, rather than holding the drain for STEPNET_SHUTDOWN_TIMEOUT_S."""

    SERVICES = ("", SERVICE)

    def __init__(self, ready: Callable[[], bool], max_watches: int):
        self._ready, self._max_watches = ready, max_watches
        self._serving = False
        self._closing = False
        self._watches: set[asyncio.Event] = set()

    def status(self, service: str) -> int:
        if service not in self.SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        return (health_pb2.HealthCheckResponse.SERVING if self._serving and not self._closing
                else health_pb2.HealthCheckResponse.NOT_SERVING)

    def refresh(self) -> None:
        """Bring the status up to date with readiness; wake the Watch streams if it changed."""
        serving = self._ready()
        if serving != self._serving:
            self._serving = serving
            self._wake()

    def close(self) -> None:
        """Shutdown: NOT_SERVING from now on, and every Watch stream ends."""
        self._closing = True
        self._wake()

    async def closed(self, timeout_s: float) -> None:
        """Until every Watch stream has sent NOT_SERVING and ended (or timeout_s passed), so that
        the server's stop does not race their last message."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._watches and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)

    def _wake(self) -> None:
        for changed in self._watches:
            changed.set()

    async def Check(self, request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a HealthCheckRequest: {request.reason}")
        self.refresh()
        status = self.status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no service {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a HealthCheckRequest: {request.reason}")
        if len(self._watches) >= self._max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._max_watches} health Watch streams are open already; use Check")
        self.refresh()                  # the first answer is what /readyz says now
        changed = asyncio.Event()
        self._watches.add(changed)
        try:
            sent = None
            while True:
                changed.clear()
                status = self.status(request.service)
                if status != sent:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    sent = status
                if self._closing:
                    return
                await changed.wait()
        finally:
            self._watches.discard(changed)


class GrpcServer:
    """The grpc.aio server of one app: started in its lifespan, stopped on SIGTERM (stepnet
    serve) or at the end of the lifespan, whichever comes first; stop() is idempotent. Its
    connection limits are the connection budget's (service.config.budget), which HTTP shares."""

    def __init__(self, repository: Repository, settings: Settings, metrics: Metrics):
        limit = settings.grpc_max_message_bytes or settings.max_upload_bytes
        budget = ConnectionBudget.of(settings)
        self.settings = settings
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1),
                     ("grpc.so_reuseport", 0), *budget.grpc_options()],
            maximum_concurrent_rpcs=budget.grpc_rpcs)
        add_servicer(pb_grpc.add_GRPCInferenceServiceServicer_to_server,
                     InferenceServicer(repository, settings, metrics), self.server)
        self.health = Health(lambda: repository.ready, budget.health_watches)
        add_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health, self.server)
        metrics.watch(grpc_connections.ConnectionCollector(budget.grpc_connections))
        self._stopping: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"gRPC: cannot listen on {address} (STEPNET_GRPC_PORT): {exc}") from None
        await self.server.start()
        self._loop = asyncio.get_running_loop()
        self._watch = asyncio.create_task(self._track_readiness(), name="grpc-health")
        log.info("gRPC (Open Inference Protocol, grpc.health.v1) on %s", address)

    async def _track_readiness(self) -> None:
        """Watch streams hear of a change of readiness within HEALTH_PERIOD_S."""
        while True:
            self.health.refresh()
            await asyncio.sleep(HEALTH_PERIOD_S)

    def stop_soon(self) -> None:
        """stop(), from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.stop)

    def stop(self) -> asyncio.Task:
        """Stop accepting calls; those in flight get up to STEPNET_SHUTDOWN_TIMEOUT_S to finish,
        Watch streams none."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(), name="grpc-stop")
        return self._stopping

    async def _stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self.health.close()
        await self.health.closed(WATCH_CLOSE_S)
        await self.server.stop(self.settings.shutdown_timeout_s)

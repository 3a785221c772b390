"""The connection budget: one set of connection-level limits, configured once, that both listeners
apply (docs/design.md 2.4). The HTTP listener applies it in service.api.http_limits, the gRPC listener through
grpc core's channel arguments (service.grpc_api.grpc_server).

STEPNET_MAX_CONNECTIONS counts the client connections of the whole process. With gRPC on, a
quarter of them (at least one) are the gRPC port's and the rest HTTP's: a fixed split, so that
neither listener can take the other's descriptors (1,300 idle gRPC connections once took the
process's file limit, and with it /healthz). gRPC needs the smaller share because a gRPC client
multiplexes up to STEPNET_MAX_STREAMS_PER_CONNECTION calls on one connection, where an HTTP/1.1
connection carries one request at a time.

Requests in flight are bounded the same way on both: HTTP by its connections (one request each),
gRPC by `grpc_rpcs`, the same number; beyond it grpc core answers RESOURCE_EXHAUSTED at once.
Health Watch streams, which never finish by themselves, get at most `health_watches` of them
(one per gRPC connection), so that they cannot hold every call slot.
"""

from dataclasses import dataclass

from service.config.settings import Settings

# descriptors beyond the client connections: model files, the listening sockets, the threads'
# pipes and eventfds, the log, and what ONNX Runtime and grpc core open for themselves
RESERVED_FILES = 256
GRPC_SHARE = 4          # one connection in GRPC_SHARE is the gRPC port's


@dataclass(frozen=True)
class ConnectionBudget:
    http_connections: int
    grpc_connections: int            # 0: gRPC is off
    max_header_bytes: int
    header_timeout_s: float
    idle_timeout_s: float
    max_connection_age_s: float
    streams_per_connection: int
    grace_s: float                   # what a call in flight gets to finish when its connection goes

    @classmethod
    def of(cls, settings: Settings) -> "ConnectionBudget":
        grpc = max(1, settings.max_connections // GRPC_SHARE) if settings.grpc_port else 0
        return cls(http_connections=settings.max_connections - grpc, grpc_connections=grpc,
                   max_header_bytes=settings.max_header_bytes, header_timeout_s=settings.header_timeout_s,
                   idle_timeout_s=settings.idle_timeout_s, max_connection_age_s=settings.max_connection_age_s,
                   streams_per_connection=settings.max_streams_per_connection,
                   grace_s=settings.request_timeout_s)

    @property
    def grpc_rpcs(self) -> int:
        """Calls in flight on the gRPC port, Watch streams included: as many as HTTP may have."""
        return self.http_connections

    @property
    def health_watches(self) -> int:
        return self.grpc_connections

    @property
    def open_files(self) -> int:
        """The open-file limit the process needs to keep every connection the budget admits."""
        return self.http_connections + self.grpc_connections + RESERVED_FILES

    def grpc_options(self) -> list[tuple[str, int]]:
        """grpc core's channel arguments for these limits (gRPC's own names, grpc/impl/channel_arg_names.h)."""
        ms = lambda seconds: max(1, int(seconds * 1000))      # noqa: E731
        return [("grpc.max_allowed_incoming_connections", self.grpc_connections),
                ("grpc.max_concurrent_streams", self.streams_per_connection),
                ("grpc.max_connection_idle_ms", ms(self.idle_timeout_s)),
                ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", ms(self.grace_s)),
                # a connection must finish its HTTP/2 handshake (preface and SETTINGS) as an HTTP
                # one must send its request head: within STEPNET_HEADER_TIMEOUT_S
                ("grpc.server_handshake_timeout_ms", ms(self.header_timeout_s)),
                ("grpc.max_metadata_size", self.max_header_bytes)]

"""The HTTP connection layer's limits, which uvicorn's httptools protocol does not have.

httptools (llhttp) is the faster parser (docs/performance.md), but it buffers a request head of
any size, and uvicorn neither times the reading of a head nor bounds the connections it accepts:
a client sending an endless header, or thousands of connections that never finish one, took the
memory and the file descriptors. GuardedHttpToolsProtocol is uvicorn's protocol with three limits:

- STEPNET_MAX_HEADER_BYTES: the request line and headers of one request; beyond it 431 and close.
  Bytes are handed to the parser in slices that never take an incomplete head past the limit, so
  what is buffered stays bounded whatever the client sends. (Where a slice also ends an earlier
  request, as pipelined requests do, the new head's share of it is not known and not counted:
  a head may then reach twice the limit before it is refused, never more.)
- STEPNET_HEADER_TIMEOUT_S: from a connection's first byte (or its opening) to the end of a
  request head; past it 408 and close. uvicorn's keep-alive timeout still closes idle
  connections between requests.
- STEPNET_MAX_CONNECTIONS: open connections (HTTP's share of the budget, service.config.budget);
  one beyond it gets 503 with Retry-After at once and is closed, so the process keeps
  descriptors for the clients it serves.

Each refusal is one log line and a count in stepnet_connections_refused_total{reason}.
"""

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.config.budget import ConnectionBudget
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


def guarded_protocol(limits: ConnectionBudget, metrics: Metrics) -> type[HttpToolsProtocol]:
    """uvicorn's `http=` protocol class with these limits (uvicorn constructs it per connection)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"limits": limits, "metrics": metrics})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: ConnectionBudget
    metrics: Metrics

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._in_head = True            # reading a request head (a new connection starts with one)
        self._head_bytes = 0            # of the head being read
        self._heads = 0                 # heads completed on this connection
        self._head_timer: asyncio.TimerHandle | None = None
        self.metrics.connections.inc()
        if len(self.connections) > self.limits.http_connections:
            self._refuse(503, "connection_limit", f"more than {self.limits.http_connections} open "
                         f"HTTP connections (STEPNET_MAX_CONNECTIONS); retry later", {"retry-after": "1"})
            return
        self._start_head_timer()

    def connection_lost(self, exc) -> None:
        self.metrics.connections.dec()
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data and not self.transport.is_closing():
            if not self._in_head:
                super().data_received(data)
                return
            if self._head_timer is None:
                self._start_head_timer()
            room = self.limits.max_header_bytes - self._head_bytes
            piece, data, heads = data[:room], data[room:], self._heads
            super().data_received(piece)
            if self._in_head:           # a head is incomplete after all of this piece
                self._head_bytes = self._head_bytes + len(piece) if self._heads == heads else 0
                if self._head_bytes >= self.limits.max_header_bytes:
                    self._refuse(431, "header_too_large", f"the request line and headers exceed "
                                 f"{self.limits.max_header_bytes} bytes (STEPNET_MAX_HEADER_BYTES)")
                    return

    # parser callbacks: a head ends at on_headers_complete; the next begins after the message

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._heads = False, 0, self._heads + 1
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True            # its timer starts with the next request's first byte

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, "header_timeout", f"no complete request head within "
                         f"{self.limits.header_timeout_s:g} s (STEPNET_HEADER_TIMEOUT_S)")

    def _refuse(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        """Answer with the service's JSON error and close the connection."""
        self._stop_head_timer()
        self.metrics.connections_refused.labels(reason).inc()
        client = "%s:%d" % self.client if self.client else "client"
        log.warning("%s: %s; connection closed", client, message)
        body = json.dumps({"error": {"code": reason, "message": message}}).encode()
        head = [STATUS_LINE[status],
                *(b"%s: %s\r\n" % (name, value) for name, value in self.server_state.default_headers),
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                *(f"{name}: {value}\r\n".encode() for name, value in (headers or {}).items()),
                b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

"""The gRPC port's connections, which grpc core accepts and serves without Python seeing them:
counted through grpc core's channelz (on by default) for the connection gauge.
"""

import json

import grpc._cython.cygrpc as cygrpc
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


def _socket_refs() -> list[int]:
    """The channelz ids of every connection open on this process's gRPC servers."""
    ids = []
    for server in json.loads(cygrpc.channelz_get_servers(0)).get("server", []):
        server_id, start = int(server["ref"]["serverId"]), 0
        while True:
            page = json.loads(cygrpc.channelz_get_server_sockets(server_id, start, 0))
            refs = page.get("socketRef", [])
            ids += [int(ref["socketId"]) for ref in refs]
            if page.get("end", True) or not refs:
                break
            start = ids[-1] + 1
    return ids


def count() -> int:
    return len(_socket_refs())


class ConnectionCollector(Collector):
    """stepnet_grpc_connections (open now) and stepnet_grpc_connections_limit (the budget's
    share), read at scrape time."""

    def __init__(self, limit: int):
        self.limit = limit

    def collect(self):
        open_now = GaugeMetricFamily("stepnet_grpc_connections", "Open gRPC (HTTP/2) connections")
        open_now.add_metric([], count())
        budget = GaugeMetricFamily("stepnet_grpc_connections_limit",
                                   "gRPC connections the connection budget admits (STEPNET_MAX_CONNECTIONS)")
        budget.add_metric([], self.limit)
        return [open_now, budget]

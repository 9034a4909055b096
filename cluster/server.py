"""Assembling the gRPC server: Archive, Catalog, health checking and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.frontend import ArchiveService, CatalogService
from cluster.rpc import strata_pb2 as pb
from cluster.rpc import strata_pb2_grpc as pb_grpc

# A 4 MiB chunk plus its framing must fit one received message; larger chunks are refused
# by gRPC. Sent messages may carry one whole decoded frame (a 4k x 4k x 16-bit frame is 32 MiB).
MAX_MESSAGE = 8 * 1024 * 1024
MAX_SENT_MESSAGE = 64 * 1024 * 1024

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Archive"].full_name,
    pb.DESCRIPTOR.services_by_name["Catalog"].full_name,
)


async def start_server(
    archive: ArchiveService, catalog: CatalogService, host: str, port: int
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start serving on ``host:port`` (0 picks a free port).

    Returns the server, its port, and the health servicer, through which the node says
    NOT_SERVING while it restarts a component.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_SENT_MESSAGE),
            # Without this, a second node started on the same port would silently share
            # it with the first (gRPC sets SO_REUSEPORT by default).
            ("grpc.so_reuseport", 0),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
        ]
    )
    pb_grpc.add_ArchiveServicer_to_server(archive, server)
    pb_grpc.add_CatalogServicer_to_server(catalog, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises RuntimeError("Failed to bind ...") on a taken port
        bound = 0
    if bound == 0:
        raise PortUnavailableError(host, port)
    await server.start()
    return server, bound, health_servicer


class PortUnavailableError(OSError):
    """The gRPC door could not listen where it was configured to."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"cannot listen on {host}:{port}: the port is in use or the address is not this "
            "machine's; choose another with --port or --host"
        )

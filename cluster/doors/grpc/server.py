"""Assembling the gRPC server: Archive, Catalog, health checking and reflection."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.config import CHUNK_LIMIT
from cluster.doors.grpc.servicer import ArchiveService, CatalogService, TieringService
from cluster.rpc import strata_pb2 as pb
from cluster.rpc import strata_pb2_grpc as pb_grpc
from cluster.security.tokens import Tokens

log = logging.getLogger("strata.server")
# Callable without a token: what orchestrators' probes call (they carry no token).
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class BearerTokens(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call but a health check carries ``authorization: Bearer <token>``, or is
    answered UNAUTHENTICATED before the servicer sees it."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = str(details.method)
        metadata = dict(details.invocation_metadata or ())
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        if self._tokens.admits(str(metadata.get("authorization", ""))):
            return handler
        log.warning("gRPC call refused: no valid bearer token")
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "a bearer token is required (metadata authorization: Bearer ...)",
        )

    shape = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return shape(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


MiB = 1024 * 1024
# A chunk plus its framing must fit one received message; a larger one is refused by gRPC
# before it is read whole. Sent messages may carry one whole decoded frame (a 4k x 4k x
# 16-bit frame is 32 MiB).
MAX_MESSAGE = CHUNK_LIMIT + 64 * 1024
MAX_SENT_MESSAGE = 64 * MiB
# How far gRPC reads ahead of the servicer on one stream: enough to keep a stream moving
# at full speed over loopback or a LAN, small enough that paused streams hold little.
RECEIVE_WINDOW = 1 * MiB

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Archive"].full_name,
    pb.DESCRIPTOR.services_by_name["Catalog"].full_name,
    pb.DESCRIPTOR.services_by_name["Tiering"].full_name,
)


async def start_server(
    archive: ArchiveService,
    catalog: CatalogService,
    tiering: TieringService,
    host: str,
    port: int,
    tokens: Tokens,
    tls: tuple[str, str] = ("", ""),
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start serving on ``host:port`` (0 picks a free port), every call but health checks
    with one of ``tokens``, over TLS when ``tls`` names a certificate and key.

    Returns the server, its port, and the health servicer, through which the node says
    NOT_SERVING while it restarts a component.
    """
    give_large_blocks_back()
    server = grpc.aio.server(
        interceptors=[BearerTokens(tokens)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_SENT_MESSAGE),
            # Without this, a second node started on the same port would silently share
            # it with the first (gRPC sets SO_REUSEPORT by default).
            ("grpc.so_reuseport", 0),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW),
        ],
    )
    pb_grpc.add_ArchiveServicer_to_server(archive, server)
    pb_grpc.add_CatalogServicer_to_server(catalog, server)
    pb_grpc.add_TieringServicer_to_server(tiering, server)
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
    cert, key = tls
    try:
        if cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(key).read_bytes(), Path(cert).read_bytes())]
            )
            bound = server.add_secure_port(f"{host}:{port}", credentials)
        else:
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


# glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


def give_large_blocks_back() -> None:
    """Make every block of 1 MiB or more an mmap of its own, returned to the OS when freed.

    By default glibc raises its mmap threshold each time such a block is freed (up to 32
    MiB); from then on received chunks and growing files are carved from heaps that glibc
    seldom trims, and the front end kept about as much memory again as its byte budget
    counts (measured: +178 MiB instead of +132 MiB for a 100 MiB budget, six senders).
    Setting the threshold fixes it and turns the raising off. No library exposes mallopt;
    ctypes is the usual way to call it. Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 * MiB)
    except (OSError, AttributeError):
        log.debug("not glibc: the allocator's mmap threshold is left as it is")

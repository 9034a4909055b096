"""uvicorn serving the DICOMweb app on the node's own event loop."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import uvicorn

from cluster.archive import Archive
from cluster.doors.web.app import create_app
from cluster.security.exposure import exposure_problem
from cluster.security.tokens import Tokens

log = logging.getLogger("strata.dicomweb")


@dataclass(frozen=True)
class WebSettings:
    host: str = "127.0.0.1"
    port: int = 8042
    tls_cert: str = ""
    tls_key: str = ""
    tokens_configured: bool = False

    def check(self) -> None:
        problem = exposure_problem(
            "DICOMweb",
            self.host,
            {
                "http_tls_cert": self.tls_cert,
                "http_tls_key": self.tls_key,
                "access_tokens": self.tokens_configured,
            },
        )
        if problem:
            raise ValueError(problem)


class WebDoor:
    def __init__(self, archive: Archive, settings: WebSettings, tokens: Tokens) -> None:
        settings.check()
        self.settings = settings
        self._app = create_app(archive, tokens)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = settings.port

    async def start(self) -> None:
        # The socket is bound here, so that port 0 gives a port the caller can read.
        listener = socket.create_server((self.settings.host, self.settings.port))
        self.port = listener.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_config=None,  # the node's logging; uvicorn's access log would list URLs
            access_log=False,
            ssl_certfile=self.settings.tls_cert or None,
            ssl_keyfile=self.settings.tls_key or None,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]), name="strata-web")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.02)
        log.info(
            "DICOMweb door listening on %s:%d%s",
            self.settings.host,
            self.port,
            " (TLS)" if self.settings.tls_cert else "",
        )

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None

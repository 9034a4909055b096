"""uvicorn serving the DICOMweb app on the node's own event loop.

Tokens: those configured (``http_tokens``), or, when none are, one generated at start-up
and written to ``<data_dir>/http-token`` (mode 0600) for the operator and the demo: never
in the repository, never in the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from cluster.archive import Archive
from cluster.doors.web.app import Tokens, create_app, new_token
from cluster.security.exposure import exposure_problem

log = logging.getLogger("strata.dicomweb")
TOKEN_FILE = "http-token"


@dataclass(frozen=True)
class WebSettings:
    host: str = "127.0.0.1"
    port: int = 8042
    tokens: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""

    def check(self) -> None:
        problem = exposure_problem(
            "DICOMweb",
            self.host,
            {
                "http_tls_cert": self.tls_cert,
                "http_tls_key": self.tls_key,
                "http_tokens": self.tokens,
            },
        )
        if problem:
            raise ValueError(problem)


class WebDoor:
    def __init__(self, archive: Archive, settings: WebSettings, data_dir: Path) -> None:
        settings.check()
        self.settings = settings
        tokens = list(settings.tokens)
        self.token_file: Path | None = None
        if not tokens:
            tokens = [new_token()]
            self.token_file = write_token(data_dir, tokens[0])
        self._app = create_app(archive, Tokens(tokens))
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


def write_token(data_dir: Path, token: str) -> Path:
    """Write a generated token where only its owner can read it; its path."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    log.info("DICOMweb bearer token written to %s (generated at start-up)", path)
    return path

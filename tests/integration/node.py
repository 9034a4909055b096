"""A real Strata node in a subprocess (`strata serve --embedded`) for integration tests."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio

from cluster.security import tokens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The bearer token every test node takes, and (as STRATA_TOKEN) every client in the tests
# and the CLI they run sends; a node started with ``access_tokens=""`` generates its own.
TEST_TOKEN = secrets.token_urlsafe(24)
os.environ.setdefault(tokens.ENVIRONMENT, TEST_TOKEN)
TEST_TOKEN = os.environ[tokens.ENVIRONMENT]


class _PortTakenError(Exception):
    pass


class Node:
    """Start, stop and restart one embedded node whose data survives restarts."""

    def __init__(self, root: Path, **settings: str) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.key_file = root / "keys" / "keys.json"
        self.log_path = root / "serve.log"
        self.port = free_port()
        self.settings = {"access_tokens": TEST_TOKEN, **settings}
        self._process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dimse_port(self) -> int:
        """The DIMSE door's port (configured as ``dimse_port``)."""
        return int(self.settings["dimse_port"])

    @property
    def http_url(self) -> str:
        """The DICOMweb door's base URL (configured as ``http_port``)."""
        return f"http://127.0.0.1:{self.settings['http_port']}/dicomweb"

    @property
    def http_token(self) -> str:
        """The bearer token the node takes (``access_tokens``)."""
        return self.settings["access_tokens"]

    @property
    def pid(self) -> int:
        """The process id of the running `strata serve` (the supervisor of the node)."""
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("the node is not running")
        return self._process.pid

    @property
    def front_end_pid(self) -> int:
        """The process id of the node itself (the front end, Ray's driver): the one child
        of the supervisor (cluster/ops/supervise.py)."""
        children = psutil.Process(self.pid).children()
        if len(children) != 1:
            raise RuntimeError(f"the supervisor has {len(children)} children, not 1")
        return children[0].pid

    def start(self, timeout: float = 180.0) -> None:
        """Start and wait until healthy. The port chosen by ``free_port`` may be taken by
        another process (Ray's own, for one) before the node binds it: then, and only
        then, the node is started again on another port."""
        for _ in range(3):
            try:
                self._start_once(timeout)
                return
            except _PortTakenError:
                self.port = free_port()
        self._start_once(timeout)

    def _start_once(self, timeout: float) -> None:
        env = dict(os.environ)
        env["STRATA_KEY_FILE"] = str(self.key_file)
        env.update({f"STRATA_{k.upper()}": v for k, v in self.settings.items()})
        command = [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            "--embedded",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
        ]
        self.started_at = time.time()
        logged_before = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                taken = f"cannot listen on 127.0.0.1:{self.port}".encode()
                if taken in self.log_path.read_bytes()[logged_before:]:
                    raise _PortTakenError
                raise RuntimeError(f"strata serve exited early:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"strata serve did not become healthy:\n{self.log_tail()}")

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _channel(self) -> grpc.Channel:
        """A channel to the gRPC door: over TLS (trusting its own certificate) when the
        node was given one."""
        certificate = self.settings.get("grpc_tls_cert")
        if not certificate:
            return grpc.insecure_channel(self.address)
        credentials = grpc.ssl_channel_credentials(Path(certificate).read_bytes())
        return grpc.secure_channel(self.address, credentials)

    def healthy(self) -> bool:
        try:
            with self._channel() as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def stop(self, timeout: float = 90.0) -> int | None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(10)

    def object_store(self) -> Minio:
        """A client of the node's embedded MinIO, signed in as its root user."""
        document = json.loads((self.data_dir / "node.json").read_text())["store"]
        return Minio(
            document["endpoint"],
            access_key=document["access_key"],
            secret_key=document["secret_key"],
            secure=False,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

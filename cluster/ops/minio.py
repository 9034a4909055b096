"""Building and running a local, erasure-coded MinIO server for tests and the demo.

MinIO is built from source with ``go install`` at a pinned version, once, into
``$STRATA_CACHE_DIR/minio/<version>/minio`` (``~/.cache/strata`` by default)::

    python -m cluster.ops.minio install     # prints the binary's path

``MinioServer`` starts that binary on 127.0.0.1 over N drive directories of one data
directory, so that every object is split into data and parity shards the way a real
deployment stores it::

    with MinioServer(tmp / "minio") as server:
        settings = server.settings      # a StoreSettings for workers and the catalog
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from cluster.ops.processes import die_with_parent
from workers.records import StoreSettings

MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 15.0
_LOG_TAIL_LINES = 40


class MinioServerError(RuntimeError):
    """MinIO could not be built or started; ``reason`` is a machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def cache_dir() -> Path:
    """The directory for Strata's build caches: ``$STRATA_CACHE_DIR`` or ``~/.cache/strata``."""
    configured = os.environ.get("STRATA_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "strata"


def minio_binary() -> Path:
    """Where the pinned MinIO binary lives (whether or not it is built yet)."""
    return cache_dir() / "minio" / MINIO_VERSION / "minio"


def ensure_minio_binary() -> Path:
    """Return the pinned MinIO binary, building it with ``go install`` if it is missing."""
    binary = minio_binary()
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    go = shutil.which("go")
    if go is None:
        raise MinioServerError(
            "go_missing",
            f"MinIO {MINIO_VERSION} is not built at {binary} and the Go toolchain ('go') is "
            "not on PATH; install the Go toolchain and run `python -m cluster.ops.minio "
            "install` again.",
        )
    binary.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "GOBIN": str(binary.parent)}
    result = subprocess.run(
        [go, "install", f"{MINIO_MODULE}@{MINIO_VERSION}"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not binary.is_file():
        raise MinioServerError(
            "build_failed",
            f"`go install {MINIO_MODULE}@{MINIO_VERSION}` failed with exit code "
            f"{result.returncode}:\n{result.stderr[-4000:]}",
        )
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MinioServer:
    """One MinIO process on 127.0.0.1 serving ``drives`` directories of ``data_dir``.

    Objects are erasure coded with ``parity`` parity shards per object (storage class
    STANDARD = EC:parity; default 2, or drives // 2 when fewer than 4 drives), so with 4
    drives and parity 2 any two drives can be lost. One drive means no erasure coding.
    Root credentials are generated once and kept in ``data_dir/credentials.json``
    (mode 0600), so a restart over the same directory reads the same data.
    """

    def __init__(
        self,
        data_dir: Path,
        drives: int = 4,
        port: int | None = None,
        *,
        parity: int | None = None,
    ) -> None:
        if drives < 1:
            raise ValueError(f"drives must be at least 1, got {drives}")
        if parity is None:
            parity = min(2, drives // 2)
        if not 0 <= parity <= drives // 2:
            raise ValueError(f"parity must be between 0 and {drives // 2} for {drives} drives")
        self.data_dir = Path(data_dir)
        self.drives = drives
        self.parity = parity
        self._port = port
        self._console_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._settings: StoreSettings | None = None

    @property
    def drive_dirs(self) -> list[Path]:
        """The drive directories, ``data_dir/drive1`` .. ``data_dir/driveN``."""
        return [self.data_dir / f"drive{number}" for number in range(1, self.drives + 1)]

    @property
    def log_path(self) -> Path:
        """MinIO's combined stdout and stderr."""
        return self.data_dir / "minio.log"

    @property
    def settings(self) -> StoreSettings:
        """How to reach this server; only valid while it runs."""
        if self._settings is None:
            raise MinioServerError("not_running", "MinioServer.settings read before start()")
        return self._settings

    @property
    def pid(self) -> int | None:
        """The MinIO process's id while it runs (benchmarks read its CPU time)."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the MinIO process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> MinioServer:
        """Start MinIO and return once the cluster health check answers 200."""
        if self.running:
            return self
        binary = ensure_minio_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for drive in self.drive_dirs:
            # MinIO refuses to start on drive paths that do not exist.
            drive.mkdir(exist_ok=True)
        access_key, secret_key = self._credentials()
        port = self._port if self._port is not None else free_port()
        self._console_port = free_port()
        if self.drives == 1:
            volumes = [str(self.drive_dirs[0])]
        else:
            volumes = [f"{self.data_dir}/drive{{1...{self.drives}}}"]
        environment = {
            **os.environ,
            "MINIO_ROOT_USER": access_key,
            "MINIO_ROOT_PASSWORD": secret_key,
            # All drive directories share one filesystem; outside CI/CD mode MinIO's
            # root-drive check rejects them ("drive not found"). MinIO's own 4-drive test
            # scripts set it too, and CI=true (set by our CI) has the same effect.
            "MINIO_CI_CD": "1",
            "MINIO_UPDATE": "off",
        }
        if self.drives > 1:
            environment["MINIO_STORAGE_CLASS_STANDARD"] = f"EC:{self.parity}"
            # The second parity a tier may choose (its storage_class REDUCED_REDUNDANCY):
            # one drive's worth, for tiers that trade durability margin for space.
            environment["MINIO_STORAGE_CLASS_RRS"] = "EC:1"
        command = [
            str(binary),
            "server",
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{self._console_port}",
            *volumes,
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        try:
            self._wait_healthy(port)
        except BaseException:
            self.stop()
            raise
        self._port = port
        self._settings = StoreSettings(
            endpoint=f"127.0.0.1:{port}", access_key=access_key, secret_key=secret_key
        )
        return self

    def stop(self) -> None:
        """Stop MinIO: SIGTERM, then SIGKILL if it has not exited within 15 s."""
        process, self._process = self._process, None
        self._settings = None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> MinioServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _credentials(self) -> tuple[str, str]:
        path = self.data_dir / "credentials.json"
        if path.exists():
            stored = json.loads(path.read_text())
            return str(stored["access_key"]), str(stored["secret_key"])
        access_key = "strata-" + secrets.token_hex(6)
        secret_key = secrets.token_urlsafe(30)
        # Created with 0600 from the start: no moment where other users could read it.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({"access_key": access_key, "secret_key": secret_key}, file)
        return access_key, secret_key

    def _wait_healthy(self, port: int) -> None:
        url = f"http://127.0.0.1:{port}/minio/health/cluster"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise MinioServerError(
                    "exited",
                    f"MinIO exited with code {self._process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}",
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise MinioServerError(
                    "start_timeout",
                    f"MinIO did not report a healthy cluster at {url} within "
                    f"{_START_TIMEOUT_S:.0f} s; last lines of {self.log_path}:\n"
                    f"{self._log_tail()}",
                )
            time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m cluster.ops.minio install``."""
    parser = argparse.ArgumentParser(prog="python -m cluster.ops.minio")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="build the pinned MinIO binary if missing; print its path")
    parser.parse_args(argv)
    try:
        print(ensure_minio_binary())
    except MinioServerError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

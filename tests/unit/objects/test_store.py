"""workers.objects.store without MinIO: error mapping, retry policy, and stub servers on 127.0.0.1.

The stub servers answer the way MinIO does in the faults the integration tests provoke
(503 SlowDownRead with Retry-After: 60, a body cut short after its head, silence), so the
client's deadlines and the error types are checked in a fraction of a second each.
"""

from __future__ import annotations

import errno
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import IncompleteRead
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3 import HTTPResponse
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
)

from workers.objects import store
from workers.objects.store import ObjectUnreadableError, StoreUnavailableError
from workers.records import StoreSettings

ENDPOINT = "127.0.0.1:9"


def s3_error(code: str, status: int) -> S3Error:
    return S3Error(
        HTTPResponse(status=status),
        code=code,
        message="message",
        resource="/bucket/key",
        request_id="request",
        host_id="host",
        bucket_name="bucket",
        object_name="key",
    )


def refused() -> MaxRetryError:
    connection = HTTPConnection("127.0.0.1", 9)
    inner = NewConnectionError(connection, "Failed to establish a new connection: refused")
    inner.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    return MaxRetryError(HTTPConnectionPool("127.0.0.1", 9), "http://127.0.0.1:9/b/k", inner)


# --- mapping S3 errors and transport failures to the two types ---------------------------


@pytest.mark.parametrize(
    "code",
    ["SlowDownRead", "NoSuchKey", "XMinioObjectTampered", "InvalidRange"],
)
def test_a_read_the_store_cannot_answer_is_data_loss(code: str) -> None:
    status = 503 if code == "SlowDownRead" else 404
    assert store.classify(s3_error(code, status), reading=True) is ObjectUnreadableError


@pytest.mark.parametrize(
    "error",
    [
        s3_error("SlowDownWrite", 503),
        s3_error("XMinioServerNotInitialized", 503),
        s3_error("InternalError", 500),
        s3_error("AccessDenied", 403),
        s3_error("NoSuchBucket", 404),
        ServerError("server failed with HTTP status code 503", 503),
        InvalidResponseError(502, "text/html", "<html>bad gateway</html>"),
        refused(),
        ReadTimeoutError(HTTPConnectionPool("127.0.0.1", 9), "/b/k", "Read timed out."),
        ConnectionResetError(errno.ECONNRESET, "reset"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_everything_else_is_the_store_being_unavailable(error: Exception) -> None:
    assert store.classify(error, reading=True) is StoreUnavailableError
    assert store.classify(error, reading=False) is StoreUnavailableError


def test_unreadable_codes_mean_unavailable_outside_reads() -> None:
    # A listing or a write meeting lost quorum is the store's state, not one object's loss.
    assert store.classify(s3_error("SlowDownRead", 503), reading=False) is StoreUnavailableError
    assert store.classify(s3_error("NoSuchKey", 404), reading=False) is StoreUnavailableError


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (s3_error("SlowDownRead", 503), "S3Error SlowDownRead (HTTP 503)"),
        (ServerError("server failed with HTTP status code 503", 503), "ServerError (HTTP 503)"),
        (InvalidResponseError(502, "text/html", "<html/>"), "InvalidResponseError (HTTP 502)"),
        (refused(), "NewConnectionError (ConnectionRefusedError ECONNREFUSED)"),
        (
            MaxRetryError(None, "/b/k", ResponseError("too many 503 error responses")),  # type: ignore[arg-type]
            "ResponseError (too many 503 error responses)",
        ),
        (
            ProtocolError("Connection broken", IncompleteRead(b"x" * 10, 990)),
            "ProtocolError (IncompleteRead)",
        ),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "ConnectionResetError ECONNRESET"),
        (RuntimeError("anything"), "RuntimeError"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_causes_name_class_and_code_but_no_address(error: BaseException, cause: str) -> None:
    assert store.describe(error) == cause
    assert "127.0.0.1" not in cause and "http" not in cause


def test_a_body_cut_short_is_told_from_other_read_errors() -> None:
    assert store.is_truncated_body(ProtocolError("broken", IncompleteRead(b"", 10)))
    assert not store.is_truncated_body(ProtocolError("broken", ConnectionResetError()))
    assert not store.is_truncated_body(IncompleteRead(b"", 10))


def test_unavailable_message_keeps_the_endpoint_out() -> None:
    error = StoreUnavailableError("10.1.2.3:9000", "NewConnectionError (ConnectionRefusedError)")
    assert error.endpoint == "10.1.2.3:9000"
    assert "10.1.2.3" not in str(error)
    assert "unavailable" in str(error)


def test_errors_survive_pickling_as_ray_sends_them() -> None:
    unreadable = pickle.loads(pickle.dumps(ObjectUnreadableError("b", "k", "S3Error X")))
    assert isinstance(unreadable, ObjectUnreadableError)
    assert (unreadable.bucket, unreadable.key, unreadable.cause) == ("b", "k", "S3Error X")
    assert str(unreadable) == str(ObjectUnreadableError("b", "k", "S3Error X"))
    unavailable = pickle.loads(pickle.dumps(StoreUnavailableError("h:1", "cause")))
    assert isinstance(unavailable, StoreUnavailableError)
    assert (unavailable.endpoint, unavailable.cause) == ("h:1", "cause")
    assert isinstance(unavailable, store.StoreError)


def test_the_specified_names_are_the_same_classes() -> None:
    assert store.ObjectUnreadable is ObjectUnreadableError
    assert store.StoreUnavailable is StoreUnavailableError


# --- the client's deadlines and retries --------------------------------------------------


def test_retry_after_is_honoured_for_at_most_about_a_second() -> None:
    policy = store.retry_policy()
    assert policy.parse_retry_after("60") == store.RETRY_WAIT_MAX_S
    assert policy.parse_retry_after("0") == 0
    assert store.RETRY_WAIT_MAX_S <= 1.0
    assert policy.backoff_max <= 1.0
    # The last 5xx response is handed to minio-py, which reads MinIO's error code from it.
    assert policy.raise_on_status is False
    assert 503 in policy.status_forcelist


def test_a_read_timeout_is_not_retried_but_a_dropped_connection_is() -> None:
    policy = store.retry_policy()
    pool = HTTPConnectionPool("127.0.0.1", 9)
    with pytest.raises(MaxRetryError):
        policy.increment("GET", "/b/k", error=ReadTimeoutError(pool, "/b/k", "timed out"))
    again = policy.increment("GET", "/b/k", error=ProtocolError("aborted", ConnectionResetError()))
    with pytest.raises(MaxRetryError):
        again.increment("GET", "/b/k", error=ProtocolError("aborted", ConnectionResetError()))


def test_client_has_timeouts_and_a_pool() -> None:
    settings = StoreSettings(endpoint=ENDPOINT, access_key="access", secret_key="secret-key")
    http = store.http_pool(settings)
    timeout = http.connection_pool_kw["timeout"]
    assert (timeout.connect_timeout, timeout.read_timeout) == (
        store.CONNECT_TIMEOUT_S,
        store.READ_TIMEOUT_S,
    )
    assert http.connection_pool_kw["maxsize"] == store.POOL_MAXSIZE
    assert http.connection_pool_kw["retries"].total == store.RETRIES_TOTAL


# --- stub servers ------------------------------------------------------------------------

_SLOW_DOWN_READ = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDownRead</Code>'
    b"<Message>Resource requested is unreadable, please reduce your request rate</Message>"
    b"<Key>key</Key><BucketName>bucket</BucketName><Resource>/bucket/key</Resource>"
    b"<RequestId>1</RequestId><HostId>2</HostId></Error>"
)


class _Stub(BaseHTTPRequestHandler):
    """Answers like MinIO does in a fault, chosen by the object key."""

    protocol_version = "HTTP/1.1"
    requests: list[str]
    cluster_read_status: list[int]  # what MinIO's read health check answers

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path == "/minio/health/cluster/read":
            self.send_response(self.cluster_read_status[0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/bucket/unreadable"):
            self.send_response(503)
            self.send_header("Retry-After", "60")  # what MinIO sends with every 503
            self.send_header("Content-Type", "application/xml")
            body = b"" if self.command == "HEAD" else _SLOW_DOWN_READ
            self.send_header("Content-Length", str(len(_SLOW_DOWN_READ)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/bucket/cut-short"):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    do_GET = do_PUT = do_HEAD = do_DELETE = _answer  # noqa: N815 - http.server names


def _clear_clients() -> None:
    store.client.cache_clear()
    store.http_pool.cache_clear()


@dataclass
class Stub:
    settings: StoreSettings
    requests: list[str]
    cluster_read_status: list[int]


@pytest.fixture
def stub() -> Iterator[Stub]:
    requests: list[str] = []
    cluster_read_status = [200]
    handler = type(
        "Handler", (_Stub,), {"requests": requests, "cluster_read_status": cluster_read_status}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        settings = StoreSettings(f"127.0.0.1:{port}", "access", "secret-key")
        yield Stub(settings, requests, cluster_read_status)
    finally:
        server.shutdown()
        server.server_close()
        _clear_clients()


def _timed(call: Callable[[], object]) -> BaseException:
    started = time.monotonic()
    with pytest.raises(store.StoreError) as raised:
        call()
    print(f"{type(raised.value).__name__} after {time.monotonic() - started:.2f} s")
    return raised.value


@pytest.mark.timeout(30)
def test_slow_down_read_is_data_loss_after_two_quick_retries(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    error = _timed(lambda: store.get(stub.settings, "bucket", "unreadable"))
    assert isinstance(error, ObjectUnreadableError)
    assert (error.bucket, error.key) == ("bucket", "unreadable")
    assert error.cause == "S3Error SlowDownRead (HTTP 503)"
    assert stub.requests == [
        *["GET /bucket/unreadable"] * (1 + store.RETRIES_STATUS),
        "GET /minio/health/cluster/read",
    ]
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert "unreadable" in errors[0].getMessage() and "SlowDownRead" in errors[0].getMessage()


@pytest.mark.timeout(30)
def test_a_body_cut_short_twice_is_data_loss(stub: Stub) -> None:
    error = _timed(lambda: store.get(stub.settings, "bucket", "cut-short"))
    assert isinstance(error, ObjectUnreadableError)
    assert "IncompleteRead" in error.cause
    assert stub.requests[:2] == ["GET /bucket/cut-short"] * 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key", ["unreadable", "cut-short"])
@pytest.mark.parametrize("health", [503, 404])
def test_without_read_quorum_an_unreadable_object_is_unavailable(
    stub: Stub, key: str, health: int
) -> None:
    # Drives offline: MinIO answers the same, but its health check says it cannot read.
    stub.cluster_read_status[0] = health
    error = _timed(lambda: store.get(stub.settings, "bucket", key))
    assert isinstance(error, StoreUnavailableError)
    assert error.cause.endswith("the cluster reports no read quorum")
    assert stub.requests[-1] == "GET /minio/health/cluster/read"


@pytest.mark.timeout(30)
def test_a_5xx_on_write_or_stat_is_unavailable(stub: Stub) -> None:
    settings = stub.settings
    put_error = _timed(lambda: store.put(settings, "bucket", "unreadable", b"data"))
    assert isinstance(put_error, StoreUnavailableError)
    stat_error = _timed(lambda: store.exists(settings, "bucket", "unreadable"))
    assert isinstance(stat_error, StoreUnavailableError)
    assert stat_error.cause == "ServerError (HTTP 503)"


@pytest.fixture
def silent_server() -> Iterator[tuple[StoreSettings, list[socket.socket]]]:
    """Accepts connections and never answers, like a frozen MinIO."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    try:
        yield StoreSettings(f"127.0.0.1:{port}", "access", "secret-key"), accepted
    finally:
        listener.close()
        for connection in accepted:
            connection.close()
        _clear_clients()


@pytest.mark.timeout(30)
def test_a_silent_server_is_unavailable_after_one_read_timeout(
    silent_server: tuple[StoreSettings, list[socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, accepted = silent_server
    monkeypatch.setattr(store, "READ_TIMEOUT_S", 0.3)
    _clear_clients()
    error = _timed(lambda: store.get(settings, "bucket", "key"))
    assert isinstance(error, StoreUnavailableError)
    assert error.cause.startswith("ReadTimeoutError")
    assert len(accepted) == 1  # not retried
    assert "127.0.0.1" not in str(error)

"""Reading and writing objects in the S3-compatible store (MinIO), one bucket per tier.

Every call has a deadline: the client's connections time out (``CONNECT_TIMEOUT_S``,
``READ_TIMEOUT_S``) and it retries only a few times, waiting at most about a second
between attempts whatever a server's ``Retry-After`` asks for. A failure leaves this
module as one of two typed errors, so that callers can map it to a protocol status
without reading messages:

* ``ObjectUnreadableError`` (DATA_LOSS): the store answered, but cannot give the object
  back: MinIO, with enough drives online, could not reconstruct it from the shards left
  (``SlowDownRead``, or a body cut short at a block lost to bit rot), or it is not there
  although the catalog says it is (``NoSuchKey``).
* ``StoreUnavailableError`` (UNAVAILABLE): the store could not be reached, timed out, or
  refused for now (``SlowDownWrite``: write quorum lost; any read failure while MinIO's
  health check reports no read quorum, i.e. drives offline; a bucket missing).

Each failure is logged once at ERROR with the bucket, the key and the cause. Object keys
are content hashes, never patient data, so they may be logged.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import secrets
import time
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from http.client import IncompleteRead
from types import TracebackType
from typing import NamedTuple, Self

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
)
from urllib3.response import BaseHTTPResponse

from workers.records import StoreSettings

log = logging.getLogger("strata.workers.store")

# How long to wait for a TCP connection to MinIO. The store is on the local network, where
# a connection takes milliseconds; 5 s still allows for a lost SYN (Linux resends it after
# 1 s and 3 s). urllib3 also uses this value as the deadline for sending a request body
# (one `sendall` of at most one 5 MiB part), so it must not be cut much lower.
CONNECT_TIMEOUT_S = 5.0
# How long to wait for each read from the socket: for the response head, and then between
# any two chunks of the body, not for the whole body, so it needs no scaling with object
# size. A healthy MinIO answers a GET after decoding its first 1 MiB erasure block and a
# PUT after writing one part (at most 5 MiB) to its drives: milliseconds, or a few seconds
# on busy disks. 15 s only fires on a stuck server or drive.
READ_TIMEOUT_S = 15.0
# The longest wait before a retry, whether backoff or a server's Retry-After. MinIO sends
# "Retry-After: 60" with every 503, including SlowDownRead for an object it can no longer
# reconstruct; honouring that on each of urllib3's retries made one read hang 5 minutes.
RETRY_WAIT_MAX_S = 1.0
# Backoff before the second and later retries: 0.2 * 2**(n-1) s, capped above.
RETRY_BACKOFF_S = 0.2
# Retries after the first attempt, by kind. With these values one request gives up within
# about 1 s on a refused connection, 2 * CONNECT_TIMEOUT_S on an unreachable host,
# READ_TIMEOUT_S on a server that accepts but never answers (read timeouts are not
# retried), and 2 * RETRY_WAIT_MAX_S on one that keeps answering 5xx (SlowDownRead).
# Only idempotent methods are retried: POST (multipart create/complete) is not.
RETRIES_TOTAL = 2
RETRIES_CONNECT = 1
RETRIES_READ = 1
RETRIES_STATUS = 2
RETRY_STATUSES = frozenset({500, 502, 503, 504})
# Idle connections kept per client (per worker process and store). Ray tasks use the
# client from one thread, but actors and minio-py's parallel multipart uploads (3 threads)
# share it; a request beyond this opens an extra connection that is closed afterwards, so
# this bounds idle sockets, not concurrency. The minio client's default is 10.
POOL_MAXSIZE = 16

# S3 error codes that, answering a read of an object the catalog says is stored, mean
# the store cannot give it back. SlowDownRead (503, with "Retry-After: 60") is MinIO's
# code for errErasureReadQuorum / InsufficientReadQuorum: fewer intact shards than data
# shards, missing or bit-rotten. MinIO removes an object whose metadata survives on too
# few drives (a "dangling" object), so that loss shows up as NoSuchKey. InvalidRange
# means the object is shorter than the catalog's index says. MinIO answers the same while
# drives are offline, so get() first asks MinIO's health check (see cluster_can_read).
# NoSuchBucket is not here: a tier bucket gone (or, for a second after drives vanish,
# MinIO not finding it on them) is the store's state, not one object's loss.
UNREADABLE_CODES = frozenset(
    {
        "NoSuchKey",
        "NoSuchObject",
        "NoSuchVersion",
        "SlowDownRead",
        "XMinioObjectTampered",
        "InvalidRange",
    }
)
_ABSENT_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchVersion"})
# A GET body cut short after a 2xx head is retried this many times before it counts as
# unreadable: MinIO sends the head, then closes the connection when it meets a block it
# cannot decode; a crash or network fault mid-body fails the retry differently.
_BODY_RETRIES = 1
# MinIO's unauthenticated health check: 200 while enough drives are online to read (the
# erasure read quorum), 503 otherwise. MinIO answers SlowDownRead both when one object's
# shards are lost and when drives are offline, which may pass; this tells them apart.
# Asked only after a read failed that way, so it costs nothing on the healthy path.
_CLUSTER_READ_PATH = "/minio/health/cluster/read"

# What a store call can raise besides programming errors (ValueError for a bad name).
_STORE_ERRORS = (MinioException, HTTPError, OSError)


class StoreError(Exception):
    """A store operation failed; ``cause`` names the error class and code, no URLs."""

    cause: str


class ObjectUnreadableError(StoreError):
    """The store answered but cannot give the object back (maps to DATA_LOSS)."""

    def __init__(self, bucket: str, key: str, cause: str) -> None:
        super().__init__(bucket, key, cause)
        self.bucket = bucket
        self.key = key
        self.cause = cause

    def __str__(self) -> str:
        return f"object {self.key} in bucket {self.bucket} cannot be read back: {self.cause}"


class StoreUnavailableError(StoreError):
    """The store could not be reached, timed out or refused for now (maps to UNAVAILABLE).

    ``endpoint`` is for the server's log; ``str()`` leaves it out, so the message can be
    shown to clients.
    """

    def __init__(self, endpoint: str, cause: str) -> None:
        super().__init__(endpoint, cause)
        self.endpoint = endpoint
        self.cause = cause

    def __str__(self) -> str:
        return f"the object store is unavailable: {self.cause}"


# The shorter names these errors were specified under; the same classes.
ObjectUnreadable = ObjectUnreadableError
StoreUnavailable = StoreUnavailableError


def describe(error: BaseException) -> str:
    """A short cause for logs and messages: error class and code, never a URL or host."""
    if isinstance(error, S3Error):
        status = getattr(error.response, "status", None)
        return f"S3Error {error.code} (HTTP {status})"
    if isinstance(error, ServerError):
        return f"ServerError (HTTP {error.status_code})"
    if isinstance(error, InvalidResponseError):
        # minio-py keeps the status only in a private attribute; its message has the body.
        return f"InvalidResponseError (HTTP {getattr(error, '_code', '?')})"
    if isinstance(error, MaxRetryError) and error.reason is not None:
        return describe(error.reason)
    if isinstance(error, ResponseError):
        # urllib3's own messages here ("too many 503 error responses") carry no URL.
        return f"ResponseError ({error.args[0] if error.args else ''})"
    if isinstance(error, ProtocolError):
        inner = next((arg for arg in error.args if isinstance(arg, BaseException)), None)
        return f"ProtocolError ({_name_with_errno(inner)})" if inner else "ProtocolError"
    if isinstance(error, HTTPError) and isinstance(error.__cause__, OSError):
        # NewConnectionError, NameResolutionError, ConnectTimeoutError wrap the OSError.
        return f"{type(error).__name__} ({_name_with_errno(error.__cause__)})"
    return _name_with_errno(error)


def _name_with_errno(error: BaseException) -> str:
    name = type(error).__name__
    code = errno.errorcode.get(error.errno) if isinstance(error, OSError) and error.errno else None
    return f"{name} {code}" if code else name


def classify(error: BaseException, *, reading: bool) -> type[StoreError]:
    """Which typed error a store failure becomes.

    ``reading`` is true for reads of an object the catalog says is stored; only there do
    the codes in ``UNREADABLE_CODES`` mean the object is lost. Everything else (network,
    timeouts, 5xx such as SlowDownWrite or XMinioServerNotInitialized, refused
    credentials) is the store being unavailable.
    """
    if reading and isinstance(error, S3Error) and error.code in UNREADABLE_CODES:
        return ObjectUnreadableError
    return StoreUnavailableError


def is_truncated_body(error: BaseException) -> bool:
    """Whether reading a response body failed because the server closed it early."""
    return isinstance(error, ProtocolError) and any(
        isinstance(arg, IncompleteRead) for arg in error.args
    )


def _failure(
    operation: str,
    settings: StoreSettings,
    bucket: str,
    key: str,
    error: BaseException,
    started: float,
    *,
    reading: bool = False,
    cause: str | None = None,
    kind: type[StoreError] | None = None,
) -> StoreError:
    """Build the typed error for ``error`` (``kind`` if given) and log it once at ERROR."""
    cause = cause if cause is not None else describe(error)
    kind = kind if kind is not None else classify(error, reading=reading)
    failure: StoreError
    if kind is ObjectUnreadableError:
        failure = ObjectUnreadableError(bucket, key, cause)
    else:
        failure = StoreUnavailableError(settings.endpoint, cause)
    log.error(
        "store %s failed after %.1f s: bucket=%s key=%s endpoint=%s: %s: %s",
        operation,
        time.monotonic() - started,
        bucket,
        key or "-",
        settings.endpoint,
        type(failure).__name__,
        cause,
    )
    return failure


def tier_bucket(tier: str) -> str:
    """The bucket that holds a tier's objects."""
    return f"strata-{tier}"


def study_prefix(study_instance_uid: str) -> str:
    """Where a study's packs are named: from a hash of its UID only."""
    study = hashlib.sha256(study_instance_uid.encode()).hexdigest()[:24]
    return f"v2/{study[:2]}/{study}/"


def pack_key_for(study_instance_uid: str) -> str:
    """A new pack's key: the study's prefix and 128 random bits (UIDs never appear in
    object names or listings).

    Never reused: a pack is written once and never overwritten, so that a pack and its
    keys object, two PUTs, can never be seen half replaced by another write.
    """
    return study_prefix(study_instance_uid) + secrets.token_hex(16)


def pack_id_in(key: str, prefix: str) -> bytes | None:
    """The 16 random bytes of a pack key named by ``pack_key_for`` for the study whose
    ``study_prefix`` is ``prefix``, else None (the catalog index keeps only those bytes)."""
    rest = key[len(prefix) :]
    if not key.startswith(prefix) or len(rest) != 32:
        return None
    try:
        return bytes.fromhex(rest)
    except ValueError:
        return None


def pack_key_from(pack_id: bytes, study_instance_uid: str) -> str:
    """The inverse of ``pack_id_in``."""
    return study_prefix(study_instance_uid) + pack_id.hex()


class _BoundedRetry(urllib3.Retry):
    """urllib3's Retry, bounded in time.

    A server's Retry-After is honoured for at most RETRY_WAIT_MAX_S. A read timeout is not
    retried: a server that said nothing for READ_TIMEOUT_S is stuck, and waiting for it a
    second time would double the deadline. Other read errors (a pooled connection the
    server had closed) are still retried once.
    """

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), RETRY_WAIT_MAX_S)

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        if isinstance(error, ReadTimeoutError):
            raise MaxRetryError(_pool, url, error) from error  # type: ignore[arg-type]
        return super().increment(method, url, response, error, _pool, _stacktrace)


def retry_policy() -> urllib3.Retry:
    """The client's retries: few, quick, idempotent methods only."""
    return _BoundedRetry(
        total=RETRIES_TOTAL,
        connect=RETRIES_CONNECT,
        read=RETRIES_READ,
        status=RETRIES_STATUS,
        other=0,
        status_forcelist=RETRY_STATUSES,
        backoff_factor=RETRY_BACKOFF_S,
        backoff_max=RETRY_WAIT_MAX_S,
        # After the last retry hand back the 5xx response itself, so that minio-py reads
        # MinIO's error code (SlowDownRead, ...) instead of urllib3 raising MaxRetryError.
        raise_on_status=False,
    )


@lru_cache(maxsize=8)
def http_pool(settings: StoreSettings) -> urllib3.PoolManager:
    """The connections to one store, with the module's timeouts and retries."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
        maxsize=POOL_MAXSIZE,
        retries=retry_policy(),
        # The same certificate checks minio-py's own default client makes.
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )


@lru_cache(maxsize=8)
def client(settings: StoreSettings) -> Minio:
    """One client per worker process and store; the client pools its connections."""
    return Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=settings.secure,
        region=settings.region,
        http_client=http_pool(settings),
    )


def cluster_can_read(settings: StoreSettings) -> bool:
    """Whether MinIO reports enough drives online to read (its read quorum)."""
    scheme = "https" if settings.secure else "http"
    url = f"{scheme}://{settings.endpoint}{_CLUSTER_READ_PATH}"
    try:
        response = http_pool(settings).request("GET", url, retries=False)
    except _STORE_ERRORS:
        return False
    return response.status == 200


def ensure_bucket(settings: StoreSettings, bucket: str) -> None:
    """Create ``bucket`` if it does not exist yet."""
    started = time.monotonic()
    try:
        client(settings).make_bucket(bucket)
    except S3Error as error:
        if error.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return
        raise _failure("ensure_bucket", settings, bucket, "", error, started) from error
    except _STORE_ERRORS as error:
        raise _failure("ensure_bucket", settings, bucket, "", error, started) from error


def bucket_exists(settings: StoreSettings, bucket: str) -> bool:
    """Whether ``bucket`` exists."""
    started = time.monotonic()
    try:
        return bool(client(settings).bucket_exists(bucket))
    except _STORE_ERRORS as error:
        raise _failure("bucket_exists", settings, bucket, "", error, started) from error


def put(
    settings: StoreSettings, bucket: str, key: str, data: bytes, storage_class: str = ""
) -> None:
    """Write one object (with ``storage_class``, MinIO's parity for it, if given); returns
    only once MinIO has acknowledged it (quorum written)."""
    started = time.monotonic()
    headers: dict[str, str | list[str] | tuple[str]] | None = (
        {"x-amz-storage-class": storage_class} if storage_class else None
    )
    try:
        client(settings).put_object(
            bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type="application/octet-stream",
            metadata=headers,
        )
    except _STORE_ERRORS as error:
        raise _failure("put", settings, bucket, key, error, started) from error


def get(settings: StoreSettings, bucket: str, key: str, offset: int = 0, length: int = 0) -> bytes:
    """Read a whole object, or ``length`` bytes from ``offset``.

    Raises ObjectUnreadableError if the store answers but cannot give the object back,
    StoreUnavailableError if it cannot be reached or has lost its read quorum.
    """
    started = time.monotonic()
    minio = client(settings)
    for attempt in range(_BODY_RETRIES + 1):
        try:
            response = minio.get_object(bucket, key, offset=offset, length=length)
        except _STORE_ERRORS as error:
            raise _read_failure(settings, bucket, key, error, started) from error
        try:
            return response.read()
        except _STORE_ERRORS as error:
            if not is_truncated_body(error):
                raise _failure("get", settings, bucket, key, error, started) from error
            cause = f"body cut short after HTTP {response.status} ({describe(error)})"
            if attempt == _BODY_RETRIES:
                raise _read_failure(
                    settings, bucket, key, error, started, cause=cause, truncated=True
                ) from error
            log.warning("store get: bucket=%s key=%s: %s; reading again", bucket, key, cause)
        finally:
            response.close()
            response.release_conn()
    raise AssertionError("unreachable")


def _read_failure(
    settings: StoreSettings,
    bucket: str,
    key: str,
    error: BaseException,
    started: float,
    *,
    cause: str | None = None,
    truncated: bool = False,
) -> StoreError:
    """The typed error for a failed read of an object the catalog says is stored.

    An unreadable object (UNREADABLE_CODES, or a body cut short twice) is lost only while
    MinIO reports read quorum; without it (drives offline) the store is unavailable and
    may recover.
    """
    kind = ObjectUnreadableError if truncated else classify(error, reading=True)
    if kind is ObjectUnreadableError and not cluster_can_read(settings):
        kind = StoreUnavailableError
        cause = f"{cause or describe(error)}; the cluster reports no read quorum"
    return _failure("get", settings, bucket, key, error, started, cause=cause, kind=kind)


def exists(settings: StoreSettings, bucket: str, key: str) -> bool:
    """Whether ``key`` is in ``bucket``.

    This reads the object's metadata only: an object whose shards are lost but whose
    metadata survives still exists; ``get`` then raises ObjectUnreadableError.
    """
    started = time.monotonic()
    try:
        client(settings).stat_object(bucket, key)
    except S3Error as error:
        if error.code in _ABSENT_CODES:
            return False
        raise _failure("exists", settings, bucket, key, error, started) from error
    except _STORE_ERRORS as error:
        raise _failure("exists", settings, bucket, key, error, started) from error
    return True


def delete(settings: StoreSettings, bucket: str, key: str) -> None:
    """Remove ``key`` from ``bucket``; removing a key that is not there is not an error.

    A bucket that is not there is (StoreUnavailableError), as for every other call.
    """
    started = time.monotonic()
    try:
        client(settings).remove_object(bucket, key)
    except S3Error as error:
        if error.code in _ABSENT_CODES:
            return
        raise _failure("delete", settings, bucket, key, error, started) from error
    except _STORE_ERRORS as error:
        raise _failure("delete", settings, bucket, key, error, started) from error


def delete_many(settings: StoreSettings, bucket: str, keys: list[str]) -> None:
    """Remove ``keys`` from ``bucket``, a thousand per request (S3 DeleteObjects); keys that
    are not there are not an error."""
    started = time.monotonic()
    for start in range(0, len(keys), 1000):
        chunk = [DeleteObject(key) for key in keys[start : start + 1000]]
        try:
            # The answers come lazily, one per key that failed: read them all.
            failed = [
                error
                for error in client(settings).remove_objects(bucket, chunk)
                if error.code not in _ABSENT_CODES
            ]
        except _STORE_ERRORS as error:
            raise _failure("delete", settings, bucket, chunk[0].name, error, started) from error
        if failed:
            first = failed[0]
            cause = f"{len(failed)} keys not deleted, first: {first.code}"
            raise _failure(
                "delete", settings, bucket, first.name or "", OSError(cause), started, cause=cause
            )


class ListedObject(NamedTuple):
    """One object as listed: its key, when it was written, and its size in bytes."""

    key: str
    last_modified: datetime | None
    size: int | None


def list_objects(settings: StoreSettings, bucket: str, prefix: str = "") -> Iterator[ListedObject]:
    """Every object in ``bucket`` whose key starts with ``prefix``, in key order.

    Objects are fetched a page (1000 keys) at a time while iterating, so errors surface
    during iteration: StoreUnavailableError, also when the bucket does not exist.
    """
    started = time.monotonic()
    try:
        for item in client(settings).list_objects(bucket, prefix=prefix or None, recursive=True):
            if item.object_name is not None and not item.is_dir:
                yield ListedObject(item.object_name, item.last_modified, item.size)
    except _STORE_ERRORS as error:
        raise _failure("list", settings, bucket, prefix, error, started) from error


def list_keys(settings: StoreSettings, bucket: str, prefix: str = "") -> Iterator[str]:
    """The keys of ``list_objects``: every key in ``bucket`` that starts with ``prefix``."""
    for item in list_objects(settings, bucket, prefix):
        yield item.key

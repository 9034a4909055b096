"""The Python client for a Strata node's gRPC API."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from cluster.rpc import strata_pb2 as pb
from cluster.rpc import strata_pb2_grpc as pb_grpc
from cluster.security import tokens

CHUNK_BYTES = 1024 * 1024  # the server refuses larger chunks (cluster.config.CHUNK_LIMIT)
# How long a broken Ingest stream is opened again without any file being answered.
RECONNECT_S = 180.0
RECONNECT_PAUSE_S = 1.0
STATUS_NAMES = {
    pb.INGEST_STATUS_STORED: "stored",
    pb.INGEST_STATUS_DUPLICATE: "duplicate",
    pb.INGEST_STATUS_REJECTED: "rejected",
}


@dataclass(frozen=True)
class IngestOutcome:
    """The server's answer for one file, with the path it was read from."""

    source: str
    status: str  # "stored" | "duplicate" | "rejected"
    reason: str
    message: str
    sop_instance_uid: str
    version: int
    bytes_in: int
    bytes_stored: int
    transfer_syntax_stored: str
    sha256: str = ""  # of the file as the server received it
    study_instance_uid: str = ""
    file_id: str = field(default="", repr=False, compare=False)  # of the stream


@dataclass(frozen=True)
class Retrieved:
    """A whole file given back by the server, checked against the SHA-256 it announced."""

    data: bytes
    transfer_syntax: str
    sha256: str


class IntegrityError(Exception):
    """What arrived is not what the server said it sent."""


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """``authorization: Bearer <token>`` on every call. (gRPC's own call credentials
    need a TLS channel; the loopback door is plain TCP.)"""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class StrataClient:
    """Ingest, retrieve and find against one Strata node."""

    def __init__(
        self, address: str = "127.0.0.1:50051", token: str | None = None, tls_ca: str = ""
    ) -> None:
        """``token``: the bearer token to send (default: ``STRATA_TOKEN``); ``tls_ca``: the
        CA certificate to check a TLS door's certificate against (empty: plain TCP)."""
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 8 * 1024 * 1024),
        ]
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        token = token or tokens.for_client()
        self._channel = grpc.intercept_channel(channel, BearerToken(token)) if token else channel
        self._raw_channel = channel
        # Whether the node was ever reached: only then is a broken stream opened again
        # (a node that is not there is reported at once, not waited for).
        self._reached = False
        channel.subscribe(self._on_connectivity, try_to_connect=False)
        self.archive = pb_grpc.ArchiveStub(self._channel)
        self.catalog = pb_grpc.CatalogStub(self._channel)
        self.tiering = pb_grpc.TieringStub(self._channel)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            self._reached = True

    def close(self) -> None:
        self._raw_channel.unsubscribe(self._on_connectivity)
        self._raw_channel.close()

    def __enter__(self) -> StrataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections."""
        grpc.channel_ready_future(self._raw_channel).result(timeout=timeout)

    def ingest_files(
        self,
        paths: Iterable[Path],
        *,
        on_sent: Callable[[int], None] | None = None,
    ) -> Iterator[IngestOutcome]:
        """Send files over one Ingest stream; yield one outcome per file as they arrive.

        Files are read lazily chunk by chunk, so memory stays flat however many are sent.
        If the stream breaks (the node restarts), the files not yet answered are read and
        sent again (see ``_ingest``).
        """
        names: dict[str, str] = {}

        def sources() -> Iterator[tuple[str, Iterator[bytes]]]:
            for index, path in enumerate(paths):
                file_id = str(index)
                names[file_id] = str(path)
                yield file_id, _read_chunks(path, on_sent)

        def again(file_id: str) -> Iterator[bytes]:
            return _read_chunks(Path(names[file_id]), None)

        yield from self._ingest(sources(), names, again)

    def ingest_bytes(self, files: Iterable[tuple[str, bytes]]) -> Iterator[IngestOutcome]:
        """Send in-memory files (name, bytes); yield one outcome per file."""
        names: dict[str, str] = {}
        held: dict[str, bytes] = {}  # until answered, to be sent again after a break

        def chunks(data: bytes) -> Iterator[bytes]:
            return (data[i : i + CHUNK_BYTES] for i in range(0, max(len(data), 1), CHUNK_BYTES))

        def sources() -> Iterator[tuple[str, Iterator[bytes]]]:
            for index, (name, data) in enumerate(files):
                file_id = str(index)
                names[file_id] = name
                held[file_id] = data
                yield file_id, chunks(data)

        def again(file_id: str) -> Iterator[bytes]:
            return chunks(held[file_id])

        for outcome in self._ingest(sources(), names, again):
            held.pop(outcome.file_id, None)
            yield outcome

    def _ingest(
        self,
        sources: Iterator[tuple[str, Iterator[bytes]]],
        names: dict[str, str],
        again: Callable[[str], Iterator[bytes]],
    ) -> Iterator[IngestOutcome]:
        """Stream ``sources``; yield one outcome per file.

        A stream that breaks after the node was reached (UNAVAILABLE: the node restarted,
        the connection dropped) is opened again as soon as the node answers, for up to
        ``RECONNECT_S`` without an answer; the files sent but not answered are sent again
        first (``again`` reads one anew), then the rest. Sending a file twice is safe: a
        file stored before the break is answered DUPLICATE the second time.
        """
        lock = threading.Lock()
        unanswered: dict[str, None] = {}  # taken from sources, not answered; in order
        stream = 0  # which stream may take more sources (an old one's sender stops)
        deadline: float | None = None

        def requests(mine: int, resend: list[str]) -> Iterator[pb.IngestChunk]:
            for file_id in resend:
                yield from _requests(file_id, again(file_id))
            while True:
                with lock:
                    if mine != stream:
                        return
                    source = next(sources, None)
                    if source is None:
                        return
                    unanswered[source[0]] = None
                yield from _requests(*source)

        resend: list[str] = []
        while True:
            try:
                for result in self.archive.Ingest(requests(stream, resend)):
                    with lock:
                        unanswered.pop(result.file_id, None)
                    deadline = None
                    yield _outcome(result, names)
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or not self._reached:
                    raise
                now = time.monotonic()
                deadline = deadline or now + RECONNECT_S
                if now >= deadline:
                    raise
                with lock:
                    stream += 1
                    resend = list(unanswered)
                try:
                    grpc.channel_ready_future(self._raw_channel).result(timeout=deadline - now)
                except grpc.FutureTimeoutError:
                    raise error from None
                time.sleep(RECONNECT_PAUSE_S)  # let a node that is starting finish

    def retrieve(
        self,
        sop_instance_uid: str,
        *,
        stored: bool = False,
        version: int = 0,
        transfer_syntax: str = "",
    ) -> Retrieved:
        """One instance: the original bytes, its stored compressed form (``stored``), or
        the instance transcoded losslessly to ``transfer_syntax`` (a UID)."""
        parts: list[bytes] = []
        head = self._retrieve_into(
            parts.append, sop_instance_uid, stored, version, transfer_syntax, timeout=None
        )
        return Retrieved(b"".join(parts), head.transfer_syntax, head.sha256)

    def retrieve_to(
        self,
        path: Path,
        sop_instance_uid: str,
        *,
        stored: bool = False,
        version: int = 0,
        transfer_syntax: str = "",
        timeout: float | None = None,
    ) -> Retrieved:
        """Like ``retrieve``, but written to ``path`` chunk by chunk (memory stays flat);
        ``path`` appears only once the whole file arrived and matched its SHA-256.
        The ``Retrieved`` returned has empty ``data``."""
        partial = path.with_name(path.name + ".partial")
        try:
            with partial.open("wb") as handle:
                head = self._retrieve_into(
                    handle.write, sop_instance_uid, stored, version, transfer_syntax, timeout
                )
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return Retrieved(b"", head.transfer_syntax, head.sha256)

    def _retrieve_into(
        self,
        write: Callable[[bytes], object],
        sop_instance_uid: str,
        stored: bool,
        version: int,
        transfer_syntax: str,
        timeout: float | None,
    ) -> pb.RetrieveChunk:
        request = pb.RetrieveRequest(
            sop_instance_uid=sop_instance_uid,
            syntax=pb.RETRIEVE_SYNTAX_STORED if stored else pb.RETRIEVE_SYNTAX_ORIGINAL,
            version=version,
            transfer_syntax=transfer_syntax,
        )
        first: pb.RetrieveChunk | None = None
        digest = hashlib.sha256()
        size = 0
        for chunk in self.archive.Retrieve(request, timeout=timeout):
            first = first or chunk
            digest.update(chunk.data)
            size += len(chunk.data)
            write(chunk.data)
        if first is None:
            raise IntegrityError("the server sent no data")
        if size != first.total_size or digest.hexdigest() != first.sha256:
            raise IntegrityError(
                "the file received does not match the size and SHA-256 the server announced"
            )
        return first

    def retrieve_frames(
        self, sop_instance_uid: str, frames: list[int], *, decoded: bool = False, version: int = 0
    ) -> list[pb.Frame]:
        """Frames (1-based) of one instance, read without fetching the whole object."""
        request = pb.RetrieveFramesRequest(
            sop_instance_uid=sop_instance_uid, version=version, frames=frames, decoded=decoded
        )
        return list(self.archive.RetrieveFrames(request))

    def find_studies(self, **filters: object) -> list[pb.Study]:
        return list(self.catalog.FindStudies(pb.FindRequest(**filters)).studies)  # type: ignore[arg-type]

    def find_instances(self, **filters: object) -> list[pb.Instance]:
        return list(self.catalog.FindInstances(pb.FindRequest(**filters)).instances)  # type: ignore[arg-type]

    def plan_tiering(self, policy_toml: str, at: str = "") -> pb.TierPlan:
        """What a tier policy would do on the node (changing nothing)."""
        plan: pb.TierPlan = self.tiering.Plan(pb.TierApplyRequest(policy_toml=policy_toml, at=at))
        return plan

    def apply_tiering(self, policy_toml: str, at: str = "") -> Iterator[pb.TierApplyProgress]:
        """Have the node carry out a tier policy's plan; its progress, step by step."""
        return iter(self.tiering.Apply(pb.TierApplyRequest(policy_toml=policy_toml, at=at)))


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named, and every file below folders named, in a stable order."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                out.extend(Path(root) / name for name in sorted(files))
        else:
            out.append(path)
    return out


def _requests(file_id: str, chunks: Iterator[bytes]) -> Iterator[pb.IngestChunk]:
    """One file as stream messages, the last one marked."""
    previous: bytes | None = None
    for chunk in chunks:
        if previous is not None:
            yield pb.IngestChunk(file_id=file_id, data=previous)
        previous = chunk
    yield pb.IngestChunk(file_id=file_id, data=previous or b"", last=True)


def _outcome(result: pb.IngestResult, names: dict[str, str]) -> IngestOutcome:
    return IngestOutcome(
        source=names.get(result.file_id, result.file_id),
        status=STATUS_NAMES.get(result.status, "unknown"),
        reason=result.reason,
        message=result.message,
        sop_instance_uid=result.sop_instance_uid,
        version=result.version,
        bytes_in=result.bytes_in,
        bytes_stored=result.bytes_stored,
        transfer_syntax_stored=result.transfer_syntax_stored,
        sha256=result.sha256,
        study_instance_uid=result.study_instance_uid,
        file_id=result.file_id,
    )


def _read_chunks(path: Path, on_sent: Callable[[int], None] | None) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            if on_sent:
                on_sent(len(chunk))
            yield chunk

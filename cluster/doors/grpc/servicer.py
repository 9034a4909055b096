"""The gRPC door: the wire API translated into calls on the archive core and back.

What is gRPC's own stays here: a file arrives as a stream of chunks with a ``file_id``,
each answered with an ``IngestResult``; retrievals stream ``RetrieveChunk`` messages; a
refusal is a status code. Everything else (limits, budget, duplicates, what a failure
means) is decided by ``cluster.archive``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cluster.archive import Archive, ArchiveError, FileResult, Incoming
from cluster.catalog.queries import InstanceFilters, StudyFilters
from cluster.config import CHUNK_LIMIT
from cluster.rpc import strata_pb2 as pb
from cluster.rpc import strata_pb2_grpc as pb_grpc
from cluster.tiering.policy import Policy, PolicyError, parse_policy
from workers.errors import Reason
from workers.records import InstanceRecord

_STATUS = {
    "stored": pb.INGEST_STATUS_STORED,
    "duplicate": pb.INGEST_STATUS_DUPLICATE,
    "rejected": pb.INGEST_STATUS_REJECTED,
}
# Each reason the archive gives, as a gRPC status.
CODES = {
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.DELETED: grpc.StatusCode.NOT_FOUND,
    Reason.NO_SUCH_FRAME: grpc.StatusCode.OUT_OF_RANGE,
    Reason.TRANSCODE_REFUSED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    Reason.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.STORAGE_FAILED: grpc.StatusCode.UNAVAILABLE,
    Reason.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
}


async def _abort(context: grpc.aio.ServicerContext, error: ArchiveError) -> NoReturn:
    await context.abort(CODES.get(error.reason, grpc.StatusCode.INTERNAL), error.message)
    raise AssertionError("unreachable: abort() raises")


@contextlib.asynccontextmanager
async def _answering(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Turn the archive's refusals into this call's status."""
    try:
        yield
    except ArchiveError as error:
        await _abort(context, error)


class ArchiveService(pb_grpc.ArchiveServicer):
    """Ingest and Retrieve."""

    def __init__(self, archive: Archive) -> None:
        self._archive = archive

    async def Ingest(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.IngestChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestResult]:
        async with _answering(context), self._archive.slot():
            results: asyncio.Queue[pb.IngestResult | None] = asyncio.Queue()
            reader = asyncio.create_task(self._read(request_iterator, results))
            try:
                while (result := await results.get()) is not None:
                    yield result
                await reader
            finally:
                # A client that cancels (or whose call ends) frees what it started: its
                # partial file's budget, and its files' waits (work already handed to a
                # worker batch shared with other clients still finishes; a resend is
                # answered DUPLICATE).
                if not reader.done():
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader

    async def _read(
        self,
        requests: AsyncIterator[pb.IngestChunk],
        results: asyncio.Queue[pb.IngestResult | None],
    ) -> None:
        archive = self._archive
        owner = object()  # this stream's identity in the budget's fair shares
        tasks: set[asyncio.Task[None]] = set()
        unanswered: set[str] = set()
        current: Incoming | None = None
        chunks = aiter(requests)
        try:
            while True:
                # Only a sender in the middle of a file holds budget; only it is timed out.
                idle = archive.deadlines.idle_s if current is not None else None
                try:
                    chunk = await asyncio.wait_for(anext(chunks), idle)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    assert current is not None
                    if not current.rejected:  # a file is answered once
                        await self._reject(
                            current, results, owner, Reason.IDLE_TIMEOUT, _idle(idle)
                        )
                    current = None
                    break
                if current is not None and chunk.file_id != current.file_id:
                    if not current.rejected:
                        await self._reject(
                            current, results, owner, Reason.INCOMPLETE_STREAM, _INCOMPLETE
                        )
                    current = None
                if current is None:
                    current = archive.incoming(chunk.file_id, "grpc")
                    if chunk.file_id in unanswered:
                        await self._reject(current, results, owner, Reason.BAD_REQUEST, _REUSED_ID)
                if not current.rejected:
                    await self._accept_chunk(current, chunk.data, results, owner)
                if chunk.last:
                    if not current.rejected:
                        await archive.complete(current)
                        unanswered.add(current.file_id)
                        task = asyncio.create_task(self._store(current, results, owner, unanswered))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    current = None
            if current is not None and not current.rejected:
                await self._reject(current, results, owner, Reason.INCOMPLETE_STREAM, _INCOMPLETE)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        finally:
            if current is not None and not current.rejected:
                await archive.reject(current, owner)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            results.put_nowait(None)

    async def _accept_chunk(
        self,
        current: Incoming,
        data: bytes,
        results: asyncio.Queue[pb.IngestResult | None],
        owner: object,
    ) -> None:
        if len(data) > CHUNK_LIMIT:
            await self._reject(
                current,
                results,
                owner,
                Reason.CHUNK_TOO_LARGE,
                f"a chunk of {len(data)} bytes exceeds the limit of {CHUNK_LIMIT} bytes; send "
                "smaller chunks",
            )
            return
        try:
            await self._archive.receive(current, data, owner)
        except ArchiveError as error:  # the archive has let the file go
            results.put_nowait(_rejected(current, error.reason, error.message))

    async def _reject(
        self,
        current: Incoming,
        results: asyncio.Queue[pb.IngestResult | None],
        owner: object,
        reason: Reason,
        message: str,
    ) -> None:
        await self._archive.reject(current, owner)
        results.put_nowait(_rejected(current, reason, message))

    async def _store(
        self,
        current: Incoming,
        results: asyncio.Queue[pb.IngestResult | None],
        owner: object,
        unanswered: set[str],
    ) -> None:
        sha256 = current.hasher.hexdigest()
        try:
            result = await self._archive.store(current, owner)
        finally:
            unanswered.discard(current.file_id)
        results.put_nowait(_to_proto(result, current.size, sha256))

    async def Retrieve(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Written with context.write rather than yielded, so that a client that stops
        # reading is given up on after the read deadline instead of holding a worker.
        form = request.transfer_syntax or (
            "stored" if request.syntax == pb.RETRIEVE_SYNTAX_STORED else "original"
        )
        async with _answering(context), self._archive.slot():
            record = await self._archive.instance(request.sop_instance_uid, request.version)
            async with self._archive.retrieve(record, form) as retrieval:
                # The first chunk (there is one even for an empty file) says what it is.
                chunk = pb.RetrieveChunk(
                    transfer_syntax=retrieval.transfer_syntax,
                    total_size=retrieval.total_size,
                    sha256=retrieval.sha256,
                )
                async for data in retrieval.chunks:
                    chunk.data = data
                    await self._send(context, chunk)
                    chunk = pb.RetrieveChunk()

    async def _send(self, context: grpc.aio.ServicerContext, message: Any) -> None:
        read_s = self._archive.deadlines.read_s
        try:
            await asyncio.wait_for(context.write(message), read_s)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the client read nothing for {read_s:g} s"
            )

    async def RetrieveFrames(  # noqa: N802 - gRPC method name
        self, request: pb.RetrieveFramesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        async with _answering(context), self._archive.slot():
            if not request.frames:
                raise ArchiveError(Reason.BAD_REQUEST, "no frame numbers given")
            record = await self._archive.instance(request.sop_instance_uid, request.version)
            frames = await self._archive.frames(record, list(request.frames), request.decoded)
        for frame in frames:
            yield pb.Frame(
                number=frame.number,
                data=frame.data,
                transfer_syntax=frame.transfer_syntax,
                bytes_read=frame.bytes_read,
            )


class CatalogService(pb_grpc.CatalogServicer):
    """Find studies and instances (the catalog writer's keyed index: current rows)."""

    def __init__(self, archive: Callable[[], Archive]) -> None:
        self._archive = archive

    async def FindStudies(  # noqa: N802 - gRPC method name
        self, request: pb.FindRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindStudiesResponse:
        async with _answering(context):
            filters, limit = _filters(request)
            search = StudyFilters(
                study_uid=filters.study_uid,
                modality=filters.modality,
                date_from=filters.date_from,
                date_to=filters.date_to,
            )
            rows = await self._archive().find_studies(search, limit)
        response = pb.FindStudiesResponse()
        for row in rows:
            study = response.studies.add(
                study_instance_uid=row.study_instance_uid,
                patient_pseudonym=row.patient_pseudonym,
                study_date=_dicom_date(row.study_date),
                modalities=list(row.modalities),
                instance_count=row.instance_count,
                series_count=row.series_count,
                bytes_in=row.bytes_in,
                bytes_stored=row.bytes_stored,
                tier=row.tier,
            )
            if row.last_access_time is not None:
                stamp = Timestamp()
                stamp.FromDatetime(row.last_access_time)
                study.last_access_time.CopyFrom(stamp)
        return response

    async def FindInstances(  # noqa: N802 - gRPC method name
        self, request: pb.FindRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindInstancesResponse:
        async with _answering(context):
            filters, limit = _filters(request)
            search = InstanceFilters(
                study_uid=filters.study_uid,
                series_uid=request.series_instance_uid or None,
                sop_uid=request.sop_instance_uid or None,
                modality=filters.modality,
                date_from=filters.date_from,
                date_to=filters.date_to,
            )
            rows = await self._archive().find_instances(search, limit)
        return pb.FindInstancesResponse(instances=[_instance(row) for row in rows])


class TieringService(pb_grpc.TieringServicer):
    """Carry out a tier policy's plan on this node (see cluster/tiering/apply.py)."""

    def __init__(
        self,
        apply: Callable[[Policy, datetime | None], AsyncIterator[Any]],
        plan: Callable[[Policy, datetime | None], Awaitable[Any]],
    ) -> None:
        self._apply = apply
        self._plan = plan

    async def Plan(  # noqa: N802 - gRPC method name
        self, request: pb.TierApplyRequest, context: grpc.aio.ServicerContext
    ) -> pb.TierPlan:
        policy, at = await _policy_and_moment(request, context)
        started = time.perf_counter()
        planned = await self._plan(policy, at)
        return pb.TierPlan(
            considered=planned.considered,
            flows=[
                pb.TierFlow(
                    source=flow.source,
                    to=flow.to,
                    studies=flow.studies,
                    instances=flow.instances,
                    bytes_stored=flow.bytes_stored,
                )
                for flow in planned.flows
            ],
            stored_before=dict(planned.stored_before),
            stored_after=dict(planned.stored_after),
            seconds=time.perf_counter() - started,
        )

    async def Apply(  # noqa: N802 - gRPC method name
        self, request: pb.TierApplyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TierApplyProgress]:
        policy, at = await _policy_and_moment(request, context)
        async for progress in self._apply(policy, at):
            yield pb.TierApplyProgress(
                studies_total=progress.studies_total,
                studies_done=progress.studies_done,
                studies_failed=progress.studies_failed,
                bytes_total=progress.bytes_total,
                bytes_done=progress.bytes_done,
                resumed=progress.resumed,
                not_carried_out=progress.not_carried_out,
                studies_deleted=progress.studies_deleted,
                recoded_bytes_before=progress.recoded_bytes_before,
                recoded_bytes_after=progress.recoded_bytes_after,
                message=progress.message,
            )


async def _policy_and_moment(
    request: pb.TierApplyRequest, context: grpc.aio.ServicerContext
) -> tuple[Policy, datetime | None]:
    """The request's policy and moment; a policy that cannot be used is refused
    INVALID_ARGUMENT, naming the rule and the field."""
    try:
        policy = parse_policy(tomllib.loads(request.policy_toml), "policy")
        at = datetime.fromisoformat(request.at) if request.at else None
    except (PolicyError, tomllib.TOMLDecodeError, ValueError) as error:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if at is not None and at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return policy, at


def _filters(request: pb.FindRequest) -> tuple[InstanceFilters, int]:
    filters = InstanceFilters(
        study_uid=request.study_instance_uid or None,
        modality=request.modality or None,
        date_from=_parse_date(request.study_date_from, "study_date_from"),
        date_to=_parse_date(request.study_date_to, "study_date_to"),
    )
    return filters, request.limit or 1000


def _parse_date(text: str, name: str) -> date | None:
    if not text:
        return None
    if len(text) != 8 or not text.isdigit():
        raise ArchiveError(Reason.BAD_REQUEST, f"{name} must be YYYYMMDD, not {text!r}")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise ArchiveError(Reason.BAD_REQUEST, f"{name} is not a date: {text!r}") from None


def _dicom_date(value: date | None) -> str:
    return value.strftime("%Y%m%d") if value else ""


def _instance(row: InstanceRecord) -> pb.Instance:
    return pb.Instance(
        sop_instance_uid=row.sop_instance_uid,
        series_instance_uid=row.series_instance_uid,
        study_instance_uid=row.study_instance_uid,
        sop_class_uid=row.sop_class_uid,
        modality=row.modality,
        study_date=_dicom_date(row.study_date),
        transfer_syntax_in=row.transfer_syntax_in,
        transfer_syntax_stored=row.transfer_syntax_stored,
        storage_action=row.storage_action,
        storage_note=row.storage_note,
        frames=row.frames,
        rows=row.rows,
        columns=row.columns,
        bytes_in=row.bytes_in,
        bytes_stored=row.bytes_stored,
        sha256=row.sha256,
        version=row.version,
        tier=row.tier,
    )


def _rejected(current: Incoming, reason: Reason, message: str) -> pb.IngestResult:
    return pb.IngestResult(
        file_id=current.file_id,
        status=pb.INGEST_STATUS_REJECTED,
        reason=reason.value,
        message=message,
        bytes_in=current.size,
    )


def _to_proto(result: FileResult, bytes_in: int, sha256: str) -> pb.IngestResult:
    out = pb.IngestResult(
        file_id=result.file_id,
        status=_STATUS[result.status],
        reason=result.reason,
        message=result.message,
        bytes_in=bytes_in,
        sha256=sha256,
    )
    record = result.record
    if record is not None:
        out.sop_instance_uid = record.sop_instance_uid
        out.study_instance_uid = record.study_instance_uid
        out.version = record.version
        out.bytes_stored = record.bytes_stored if result.status == "stored" else 0
        out.transfer_syntax_stored = record.transfer_syntax_stored
        if result.status == "stored" and record.version > 1:
            out.message = f"stored as version {record.version} of a known SOP Instance UID"
    return out


_INCOMPLETE = (
    "the stream ended, or the next file began, before this file's last chunk; nothing was "
    "stored for it"
)


def _idle(seconds: float | None) -> str:
    return (
        f"nothing arrived for {seconds or 0:g} s in the middle of this file, so the archive "
        "stopped waiting and closed the stream; nothing was stored for it, send it again"
    )


_REUSED_ID = (
    "this file_id is already used on this stream by a file not answered yet; give each file "
    "of a stream its own file_id"
)

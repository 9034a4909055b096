"""The gRPC door: a thin adapter from the wire API to the dispatcher and the catalog.

No pipeline logic lives here: a file is assembled from its chunks, checked against the
admission limits, and handed to the dispatcher as an ``IngestItem``; the result that comes
back is translated to an ``IngestResult``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import grpc
import ray
from google.protobuf.timestamp_pb2 import Timestamp

from cluster import catalog
from cluster.admission import ByteBudget
from cluster.config import CHUNK_LIMIT
from cluster.dispatch import Dispatcher, FileResult
from cluster.rpc import strata_pb2 as pb
from cluster.rpc import strata_pb2_grpc as pb_grpc
from workers.errors import Reason
from workers.frames import NoSuchFrameError, read_frames
from workers.ingest import PipelineSettings
from workers.records import IngestItem, InstanceRecord
from workers.restore import ObjectRef, RestoreError, TranscodeRefusedError, restore

log = logging.getLogger("strata.frontend")

RETRIEVE_CHUNK = 1024 * 1024
_restore_task = ray.remote(num_cpus=1, max_retries=2)(restore)
_frames_task = ray.remote(num_cpus=1, max_retries=2)(read_frames)

_STATUS = {
    "stored": pb.INGEST_STATUS_STORED,
    "duplicate": pb.INGEST_STATUS_DUPLICATE,
    "rejected": pb.INGEST_STATUS_REJECTED,
}


@dataclass
class _Assembly:
    """One file being received."""

    file_id: str
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    reserved: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    rejected: bool = False


class ArchiveService(pb_grpc.ArchiveServicer):
    """Ingest and Retrieve."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        catalog_actor: Any,
        settings: PipelineSettings,
        budget: ByteBudget,
        max_file_bytes: int,
        catalog_bucket: str,
    ) -> None:
        self._dispatcher = dispatcher
        self._catalog = catalog_actor
        self._settings = settings
        self._settings_ref = ray.put(settings)
        self._budget = budget
        self._max_file_bytes = max_file_bytes
        self._catalog_bucket = catalog_bucket
        # Identical files in flight at once (even on different streams) are stored once.
        self._inflight: dict[str, asyncio.Future[FileResult]] = {}

    async def Ingest(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.IngestChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestResult]:
        results: asyncio.Queue[pb.IngestResult | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, results))
        try:
            while (result := await results.get()) is not None:
                yield result
            await reader
        finally:
            if not reader.done():
                reader.cancel()

    async def _read(
        self,
        requests: AsyncIterator[pb.IngestChunk],
        results: asyncio.Queue[pb.IngestResult | None],
    ) -> None:
        tasks: set[asyncio.Task[None]] = set()
        current: _Assembly | None = None
        try:
            async for chunk in requests:
                if current is not None and chunk.file_id != current.file_id:
                    await self._reject(current, results, Reason.INCOMPLETE_STREAM, _INCOMPLETE)
                    current = None
                if current is None:
                    current = _Assembly(chunk.file_id)
                if not current.rejected:
                    await self._accept_chunk(current, chunk.data, results)
                if chunk.last:
                    if not current.rejected:
                        task = asyncio.create_task(self._store(current, results))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    current = None
            if current is not None and not current.rejected:
                await self._reject(current, results, Reason.INCOMPLETE_STREAM, _INCOMPLETE)
        finally:
            if current is not None:
                await self._release(current)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            results.put_nowait(None)

    async def _accept_chunk(
        self, current: _Assembly, data: bytes, results: asyncio.Queue[pb.IngestResult | None]
    ) -> None:
        if len(data) > CHUNK_LIMIT:
            await self._reject(
                current,
                results,
                Reason.CHUNK_TOO_LARGE,
                f"a chunk of {len(data)} bytes exceeds the 4 MiB limit; send smaller chunks",
            )
        elif current.size + len(data) > self._max_file_bytes:
            await self._reject(
                current,
                results,
                Reason.TOO_LARGE,
                f"the file exceeds the configured limit of {self._max_file_bytes} bytes "
                "(max_file_bytes)",
            )
        else:
            # Waiting here is the backpressure: the stream is not read until room frees.
            await self._budget.acquire(len(data))
            current.reserved += len(data)
            current.size += len(data)
            current.chunks.append(data)
            current.hasher.update(data)

    async def _reject(
        self,
        current: _Assembly,
        results: asyncio.Queue[pb.IngestResult | None],
        reason: Reason,
        message: str,
    ) -> None:
        current.rejected = True
        current.chunks.clear()
        await self._release(current)
        results.put_nowait(
            pb.IngestResult(
                file_id=current.file_id,
                status=pb.INGEST_STATUS_REJECTED,
                reason=reason.value,
                message=message,
                bytes_in=current.size,
            )
        )

    async def _release(self, current: _Assembly) -> None:
        if current.reserved:
            await self._budget.release(current.reserved)
            current.reserved = 0

    async def _store(
        self, current: _Assembly, results: asyncio.Queue[pb.IngestResult | None]
    ) -> None:
        sha256 = current.hasher.hexdigest()
        data = b"".join(current.chunks)
        current.chunks.clear()
        try:
            result = await self._store_once(current.file_id, data, sha256)
        except Exception as error:
            log.exception("file %s could not be stored", sha256[:12])
            result = FileResult(
                current.file_id,
                "rejected",
                reason=Reason.INTERNAL.value,
                message=f"the front end failed with {type(error).__name__}; send it again",
            )
        finally:
            del data
            await self._release(current)
        results.put_nowait(_to_proto(result, current.size, sha256))

    async def _store_once(self, file_id: str, data: bytes, sha256: str) -> FileResult:
        earlier = self._inflight.get(sha256)
        if earlier is not None:
            first = await asyncio.shield(earlier)
            status = "duplicate" if first.status != "rejected" else "rejected"
            return FileResult(file_id, status, first.record, first.reason, first.message)
        # Registered before the first await, so an identical file arriving meanwhile waits.
        future: asyncio.Future[FileResult] = asyncio.get_running_loop().create_future()
        self._inflight[sha256] = future
        try:
            known = await self._catalog.lookup_sha256.remote(sha256)
            if known is not None:
                result = FileResult(file_id, "duplicate", record=known)
            else:
                result = await self._dispatcher.submit(IngestItem(file_id, data, sha256))
            future.set_result(result)
            return result
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[sha256]

    async def Retrieve(  # noqa: N802 - gRPC method name
        self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RetrieveChunk]:
        form = request.transfer_syntax or (
            "stored" if request.syntax == pb.RETRIEVE_SYNTAX_STORED else "original"
        )
        record = await self._find(request.sop_instance_uid, request.version, context)
        ref = ObjectRef(record.object_key, record.sop_instance_uid, record.tier)
        restored = await self._reading(
            _restore_task.remote(ref, form, self._settings_ref), record, context
        )
        data = restored.data
        for offset in range(0, max(len(data), 1), RETRIEVE_CHUNK):
            chunk = pb.RetrieveChunk(data=data[offset : offset + RETRIEVE_CHUNK])
            if offset == 0:
                chunk.transfer_syntax = restored.transfer_syntax
                chunk.total_size = len(data)
                chunk.sha256 = restored.sha256
            yield chunk

    async def RetrieveFrames(  # noqa: N802 - gRPC method name
        self, request: pb.RetrieveFramesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        if not request.frames:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no frame numbers given")
        record = await self._find(request.sop_instance_uid, request.version, context)
        ref = ObjectRef(record.object_key, record.sop_instance_uid, record.tier)
        frames = await self._reading(
            _frames_task.remote(ref, list(request.frames), self._settings_ref, request.decoded),
            record,
            context,
        )
        for frame in frames:
            yield pb.Frame(
                number=frame.number,
                data=frame.data,
                transfer_syntax=frame.transfer_syntax,
                bytes_read=frame.bytes_read,
            )

    async def _find(
        self, sop_instance_uid: str, version: int, context: grpc.aio.ServicerContext
    ) -> InstanceRecord:
        record = await asyncio.to_thread(
            catalog.latest_instance,
            self._settings.store,
            sop_instance_uid,
            version or None,
            bucket=self._catalog_bucket,
        )
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "no stored instance has that SOP Instance UID"
            )
        assert record is not None  # abort() raises
        return record

    async def _reading(
        self, reader: Any, record: InstanceRecord, context: grpc.aio.ServicerContext
    ) -> Any:
        """Await a reading task; map its failure to a status, record the access."""
        try:
            result = await reader
        except ray.exceptions.RayTaskError as error:
            cause = error.cause
            if isinstance(cause, TranscodeRefusedError):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(cause))
            if isinstance(cause, NoSuchFrameError):
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(cause))
            log.error("reading object %s failed: %s", record.object_key, type(cause).__name__)
            if isinstance(cause, RestoreError):
                await context.abort(grpc.StatusCode.DATA_LOSS, str(cause))
            await context.abort(
                grpc.StatusCode.INTERNAL, "the object could not be read; the error was logged"
            )
        await self._catalog.record_access.remote([record.study_instance_uid])
        return result


class CatalogService(pb_grpc.CatalogServicer):
    """Find studies and instances (reads the Delta tables)."""

    def __init__(self, settings: PipelineSettings, catalog_bucket: str) -> None:
        self._settings = settings
        self._bucket = catalog_bucket

    async def FindStudies(  # noqa: N802 - gRPC method name
        self, request: pb.FindRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindStudiesResponse:
        filters = await _filters(request, context)
        rows = await asyncio.to_thread(
            catalog.find_studies, self._settings.store, bucket=self._bucket, **filters
        )
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
        filters = await _filters(request, context)
        rows = await asyncio.to_thread(
            catalog.find_instances,
            self._settings.store,
            bucket=self._bucket,
            series_uid=request.series_instance_uid or None,
            sop_uid=request.sop_instance_uid or None,
            **filters,
        )
        return pb.FindInstancesResponse(instances=[_instance(row) for row in rows])


async def _filters(request: pb.FindRequest, context: grpc.aio.ServicerContext) -> dict[str, Any]:
    try:
        date_from = _parse_date(request.study_date_from, "study_date_from")
        date_to = _parse_date(request.study_date_to, "study_date_to")
    except ValueError as error:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        raise
    return {
        "study_uid": request.study_instance_uid or None,
        "modality": request.modality or None,
        "date_from": date_from,
        "date_to": date_to,
        "limit": request.limit or 1000,
    }


def _parse_date(text: str, name: str) -> date | None:
    if not text:
        return None
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"{name} must be YYYYMMDD, not {text!r}")
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


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

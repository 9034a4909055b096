"""The gRPC door: a thin adapter from the wire API to the dispatcher and the catalog.

No pipeline logic lives here: a file is assembled from its chunks, checked against the
admission limits, and handed to the dispatcher as an ``IngestItem``; the result that comes
back is translated to an ``IngestResult``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, cast

import grpc
import numpy as np
import ray
from google.protobuf.timestamp_pb2 import Timestamp

from cluster.admission import ByteBudget
from cluster.catalog.queries import InstanceFilters, StudyFilters
from cluster.config import CHUNK_LIMIT
from cluster.dispatch import (
    DeadlineExceededError,
    Dispatcher,
    FileResult,
    cancel,
    cause_of,
    within,
)
from cluster.rpc import strata_pb2 as pb
from cluster.rpc import strata_pb2_grpc as pb_grpc
from workers import store
from workers.errors import Reason
from workers.frames import NoSuchFrameError, read_frames
from workers.ingest import PipelineSettings
from workers.records import IngestItem, InstanceRecord
from workers.restore import (
    ObjectRef,
    RestoredHead,
    RestoreError,
    TranscodeRefusedError,
    restore_chunks,
)

log = logging.getLogger("strata.frontend")

RETRIEVE_CHUNK = 1024 * 1024
# A file is handed to Ray's object store in parts of this size while it still arrives, so
# that it is never held twice (once received, once copied into the store) for longer than
# one part takes to copy. Smaller files go whole with their batch.
PART_BYTES = 4 * 1024 * 1024
# A few chunks ahead of the client at most: a large file crosses the front end in pieces.
_restore_stream = ray.remote(  # type: ignore[call-overload]
    num_cpus=1, max_retries=2, num_returns="streaming", _generator_backpressure_num_objects=4
)(restore_chunks)
_frames_task = ray.remote(num_cpus=1, max_retries=2)(read_frames)

_STATUS = {
    "stored": pb.INGEST_STATUS_STORED,
    "duplicate": pb.INGEST_STATUS_DUPLICATE,
    "rejected": pb.INGEST_STATUS_REJECTED,
}


@dataclass(eq=False)  # hashed by identity: the budget tracks each file arriving
class _Assembly:
    """One file being received.

    The bytes grow in one ``bytearray`` (glibc grows large blocks in place, by mremap);
    every ``PART_BYTES`` of it are moved into Ray's object store as a part. The budget
    counts the file, wherever its bytes are, until it is answered.
    """

    file_id: str
    generation: int = 0  # of the Ray runtime its parts are in (Dispatcher.generation)
    data: bytearray = field(default_factory=bytearray)
    parts: list[Any] = field(default_factory=list)  # Ray object refs
    parts_bytes: int = 0
    size: int = 0
    reserved: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    rejected: bool = False
    # Handed to the dispatcher, which then says when its budget may be released.
    submitted: bool = False

    def add(self, data: bytes, generation: int) -> None:
        self.size += len(data)
        self.data += data
        self.hasher.update(data)
        if len(self.data) >= PART_BYTES:
            if not self.parts:
                self.generation = generation
            # Copied once, out of band (numpy), straight into the object store.
            self.parts.append(ray.put(np.frombuffer(self.data, dtype=np.uint8)))
            self.parts_bytes += len(self.data)
            self.data = bytearray()

    def take(self, file_id: str, sha256: str) -> IngestItem:
        """The received file as an item to ingest; the assembly no longer holds it."""
        item = IngestItem(file_id, self.data, sha256, tuple(self.parts), self.parts_bytes)
        self.drop()
        return item

    def drop(self) -> None:
        """Let go of the received bytes (the object store frees the parts)."""
        self.data, self.parts, self.parts_bytes = bytearray(), [], 0


@dataclass(frozen=True)
class Deadlines:
    """How long the front end waits for each kind of remote call, and for a sender."""

    idle_s: float = 30.0  # a sender silent mid-file for this long is cut off
    read_s: float = 60.0  # one retrieval step (a chunk, or a batch of frames)
    lookup_s: float = 10.0  # one catalog lookup


class ArchiveService(pb_grpc.ArchiveServicer):
    """Ingest and Retrieve."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        catalog_actor: Any,
        settings: PipelineSettings,
        budget: ByteBudget,
        max_file_bytes: int,
        deadlines: Deadlines | None = None,
        max_calls: int = 100,
    ) -> None:
        self._dispatcher = dispatcher
        self._max_calls = max_calls
        self._calls = 0
        self._catalog = catalog_actor
        self._settings = settings
        self._settings_ref = ray.put(settings)
        self._budget = budget
        self._max_file_bytes = max_file_bytes
        self._deadlines = deadlines or Deadlines()
        # Identical files in flight at once (even on different streams) are stored once.
        self._inflight: dict[str, asyncio.Future[FileResult]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        # Set while a component is down and being restarted: new work is refused at once
        # with this sentence instead of waiting on a component that cannot answer.
        self.unavailable: str | None = None

    def rebind(self, catalog_actor: Any) -> None:
        """Carry on over a restarted Ray runtime with its new catalog writer."""
        self._catalog = catalog_actor
        self._settings_ref = ray.put(self._settings)

    @contextlib.asynccontextmanager
    async def _slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """One of the ``max_calls`` calls served at once, or RESOURCE_EXHAUSTED now.

        Each call holds gRPC buffers outside the byte budget (an ingest stream about one
        chunk and one receive window); counting them here bounds that memory too. gRPC's
        own limit (maximum_concurrent_rpcs) only queues the calls past it, buffers and all.
        """
        if self._calls >= self._max_calls:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the archive is serving as many calls as it may at once ({self._max_calls}, "
                "max_concurrent_calls); try again shortly",
            )
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1

    async def Ingest(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.IngestChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestResult]:
        async with self._slot(context):
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
        owner = object()  # this stream's identity in the budget's fair shares
        tasks: set[asyncio.Task[None]] = set()
        unanswered: set[str] = set()
        current: _Assembly | None = None
        chunks = aiter(requests)
        try:
            while True:
                # Only a sender in the middle of a file holds budget; only it is timed out.
                idle = self._deadlines.idle_s if current is not None else None
                try:
                    chunk = await asyncio.wait_for(anext(chunks), idle)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    assert current is not None
                    if not current.rejected:  # a file is answered once
                        await self._reject(
                            current, results, owner, Reason.IDLE_TIMEOUT, _idle(self._deadlines)
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
                    current = _Assembly(chunk.file_id)
                    if chunk.file_id in unanswered:
                        await self._reject(current, results, owner, Reason.BAD_REQUEST, _REUSED_ID)
                if not current.rejected:
                    await self._accept_chunk(current, chunk.data, results, owner)
                if chunk.last:
                    if not current.rejected:
                        await self._budget.close_file(current)  # complete: needs no more
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
            if current is not None:
                current.drop()
                await self._release(current, owner)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            results.put_nowait(None)

    async def _accept_chunk(
        self,
        current: _Assembly,
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
        elif current.size + len(data) > self._max_file_bytes:
            await self._reject(
                current,
                results,
                owner,
                Reason.TOO_LARGE,
                f"the file exceeds the configured limit of {self._max_file_bytes} bytes "
                "(max_file_bytes)",
            )
        elif current.parts and current.generation != self._dispatcher.generation:
            # Ray was restarted while this file arrived: its first parts are gone.
            await self._reject(current, results, owner, Reason.STORAGE_FAILED, _PARTS_LOST)
        else:
            # Waiting here is the backpressure: the stream is not read until room frees.
            await self._budget.acquire(len(data), owner, current)
            current.reserved += len(data)
            try:
                current.add(data, self._dispatcher.generation)
            except Exception as error:  # noqa: BLE001 - Ray is down or its store is full
                log.error("a part of a file could not be handed to Ray: %s", cause_of(error))
                await self._reject(
                    current, results, owner, Reason.UNAVAILABLE, self.unavailable or _PART_FAILED
                )

    async def _reject(
        self,
        current: _Assembly,
        results: asyncio.Queue[pb.IngestResult | None],
        owner: object,
        reason: Reason,
        message: str,
    ) -> None:
        current.rejected = True
        current.drop()
        await self._release(current, owner)
        results.put_nowait(
            pb.IngestResult(
                file_id=current.file_id,
                status=pb.INGEST_STATUS_REJECTED,
                reason=reason.value,
                message=message,
                bytes_in=current.size,
            )
        )

    def _release_soon(self, current: _Assembly, owner: object) -> None:
        release = asyncio.ensure_future(self._release(current, owner))
        self._background.add(release)
        release.add_done_callback(self._background.discard)

    async def _release(self, current: _Assembly, owner: object) -> None:
        await self._budget.close_file(current)
        if current.reserved:
            await self._budget.release(current.reserved, owner)
            current.reserved = 0

    async def _store(
        self,
        current: _Assembly,
        results: asyncio.Queue[pb.IngestResult | None],
        owner: object,
        unanswered: set[str],
    ) -> None:
        sha256 = current.hasher.hexdigest()
        try:
            result = await self._store_once(current, sha256, owner)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("file %s could not be stored", sha256[:12])
            result = FileResult(
                current.file_id,
                "rejected",
                reason=Reason.INTERNAL.value,
                message="the archive failed on this file and the error was logged; nothing "
                "was stored for it, send it again",
            )
        finally:
            current.drop()
            if not current.submitted:  # else the dispatcher says when (see _store_once)
                await self._release(current, owner)
            unanswered.discard(current.file_id)
        results.put_nowait(_to_proto(result, current.size, sha256))

    async def _store_once(self, current: _Assembly, sha256: str, owner: object) -> FileResult:
        file_id = current.file_id
        if self.unavailable is not None:
            return FileResult(
                file_id, "rejected", reason=Reason.UNAVAILABLE.value, message=self.unavailable
            )
        while (earlier := self._inflight.get(sha256)) is not None:
            try:
                first = await asyncio.shield(earlier)
            except (Exception, asyncio.CancelledError):
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
                continue  # the first copy's sender went away: store this one
            status = "duplicate" if first.status != "rejected" else "rejected"
            return FileResult(file_id, status, first.record, first.reason, first.message)
        # Registered before the first await, so an identical file arriving meanwhile waits.
        future: asyncio.Future[FileResult] = asyncio.get_running_loop().create_future()
        self._inflight[sha256] = future
        try:
            known = await self._lookup(sha256)
            if known is not None:
                result = FileResult(file_id, "duplicate", record=known)
            else:
                # The budget stays held until Ray has let go of the bytes too, even if
                # this client goes away before its answer.
                current.submitted = True
                result = await self._dispatcher.submit(
                    current.take(file_id, sha256),
                    current.generation,
                    on_released=lambda: self._release_soon(current, owner),
                )
            future.set_result(result)
            return result
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[sha256]

    async def _lookup(self, sha256: str) -> InstanceRecord | None:
        """The catalogued file with this SHA-256; None when new or when the catalog writer
        cannot say in time (then the commit decides: it checks duplicates itself)."""
        try:
            known: InstanceRecord | None = await within(
                self._catalog.lookup_sha256.remote(sha256),
                self._deadlines.lookup_s,
                "the catalog writer",
            )
        except Exception as error:  # noqa: BLE001 - the lookup is only a shortcut
            log.warning("duplicate lookup skipped: %s", type(error).__name__)
            return None
        return known

    async def Retrieve(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async with self._slot(context):
            await self._retrieve(request, context)

    async def _retrieve(
        self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Written with context.write rather than yielded, so that a client that stops
        # reading is given up on after the read deadline instead of holding a worker.
        form = request.transfer_syntax or (
            "stored" if request.syntax == pb.RETRIEVE_SYNTAX_STORED else "original"
        )
        await self._check_available(context)
        record = await self._find(request.sop_instance_uid, request.version, context)
        ref = ObjectRef(record.object_key, record.sop_instance_uid, record.tier)
        stream = _restore_stream.remote(ref, form, self._settings_ref, RETRIEVE_CHUNK)
        try:
            head: RestoredHead = await self._reading(_next(stream), record, context)
            self._record_access(record)
            # The first chunk (there is one even for an empty file) says what the file is.
            chunk = pb.RetrieveChunk(
                transfer_syntax=head.transfer_syntax, total_size=head.total_size, sha256=head.sha256
            )
            while True:
                try:
                    chunk.data = await self._reading(_next(stream), record, context)
                except StopAsyncIteration:
                    break
                await self._send(context, chunk)
                chunk = pb.RetrieveChunk()
        finally:
            # The client went away or a step failed: stop the worker, free its core.
            cancel(stream)

    async def _send(self, context: grpc.aio.ServicerContext, message: Any) -> None:
        try:
            await asyncio.wait_for(context.write(message), self._deadlines.read_s)
        except TimeoutError:
            log.warning("a client stopped reading a retrieval; it was given up on")
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the client read nothing for {self._deadlines.read_s:g} s",
            )

    async def RetrieveFrames(  # noqa: N802 - gRPC method name
        self, request: pb.RetrieveFramesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        async with self._slot(context):
            for frame in await self._frames(request, context):
                yield frame

    async def _frames(
        self, request: pb.RetrieveFramesRequest, context: grpc.aio.ServicerContext
    ) -> list[pb.Frame]:
        if not request.frames:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no frame numbers given")
        await self._check_available(context)
        record = await self._find(request.sop_instance_uid, request.version, context)
        ref = ObjectRef(record.object_key, record.sop_instance_uid, record.tier)
        task = _frames_task.remote(ref, list(request.frames), self._settings_ref, request.decoded)
        frames = await self._reading(task, record, context)  # cancelled there if late
        self._record_access(record)
        return [
            pb.Frame(
                number=frame.number,
                data=frame.data,
                transfer_syntax=frame.transfer_syntax,
                bytes_read=frame.bytes_read,
            )
            for frame in frames
        ]

    async def _check_available(self, context: grpc.aio.ServicerContext) -> None:
        if self.unavailable is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.unavailable)

    async def _find(
        self, sop_instance_uid: str, version: int, context: grpc.aio.ServicerContext
    ) -> InstanceRecord:
        # A keyed lookup in the catalog writer's index: never a scan of the archive.
        try:
            record: InstanceRecord | None = await within(
                self._catalog.latest.remote(sop_instance_uid, version or None),
                self._deadlines.lookup_s,
                "the catalog writer",
            )
        except Exception as error:
            log.error("catalog lookup for a retrieval failed: %s", cause_of(error))
            await context.abort(grpc.StatusCode.UNAVAILABLE, _CATALOG_DOWN)
            raise
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "no stored instance has that SOP Instance UID"
            )
        assert record is not None  # abort() raises
        return record

    async def _reading(
        self, step: Awaitable[Any], record: InstanceRecord, context: grpc.aio.ServicerContext
    ) -> Any:
        """Await one step of a read within the read deadline; map a failure to a status."""
        try:
            return await within(step, self._deadlines.read_s, "a retrieval")
        except StopAsyncIteration:
            raise
        except ray.exceptions.RayTaskError as error:
            cause = error.cause
            if isinstance(cause, TranscodeRefusedError):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(cause))
            if isinstance(cause, NoSuchFrameError):
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(cause))
            if isinstance(cause, store.ObjectUnreadableError):
                log.error("object %s cannot be read back: %s", record.object_key, cause)
                await context.abort(grpc.StatusCode.DATA_LOSS, _unreadable(record))
            if isinstance(cause, RestoreError):
                log.error("object %s failed its checks: %s", record.object_key, cause)
                await context.abort(grpc.StatusCode.DATA_LOSS, _unreadable(record))
            if isinstance(cause, store.StoreUnavailableError):
                log.error("object %s: the store is unavailable: %s", record.object_key, cause)
                await context.abort(grpc.StatusCode.UNAVAILABLE, _STORE_DOWN)
            log.error(
                "reading object %s failed: %s: %s", record.object_key, type(cause).__name__, cause
            )
            await context.abort(grpc.StatusCode.INTERNAL, _READ_FAILED)
        except DeadlineExceededError:
            log.error(
                "reading object %s: no answer within %g s",
                record.object_key,
                self._deadlines.read_s,
            )
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, _READ_TIMEOUT)
        except ray.exceptions.RayError as error:
            log.error(
                "reading object %s failed in Ray: %s", record.object_key, type(error).__name__
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, _WORKERS_DOWN)
        raise AssertionError("unreachable: abort() raises")

    def _record_access(self, record: InstanceRecord) -> None:
        """Note the read with the next catalog commit, without waiting for it."""
        try:
            call = self._catalog.record_access.remote([record.study_instance_uid])
        except Exception as error:  # noqa: BLE001 - an access record never fails a read
            log.warning("access not recorded: %s", type(error).__name__)
            return
        waiting = asyncio.ensure_future(_quietly(call))
        self._background.add(waiting)
        waiting.add_done_callback(self._background.discard)


async def _quietly(call: Any) -> None:
    try:
        await within(call, 30, "the catalog writer")
    except Exception as error:  # noqa: BLE001 - an access record never fails a read
        log.warning("access not recorded: %s", type(error).__name__)


async def _next(stream: Any) -> Any:
    """The next value of a Ray streaming generator (its failure, if the task failed)."""
    ref = await stream.__anext__()
    return await ref


class CatalogService(pb_grpc.CatalogServicer):
    """Find studies and instances (the catalog writer's keyed index: current rows)."""

    def __init__(self, catalog_actor: Callable[[], Any]) -> None:
        self._catalog = catalog_actor  # the current writer (it changes when Ray restarts)

    async def FindStudies(  # noqa: N802 - gRPC method name
        self, request: pb.FindRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindStudiesResponse:
        filters, limit = await _filters(request, context)
        search = StudyFilters(
            study_uid=filters.study_uid,
            modality=filters.modality,
            date_from=filters.date_from,
            date_to=filters.date_to,
        )
        rows = await _searching(context, self._catalog().find_studies.remote(search, limit))
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
        filters, limit = await _filters(request, context)
        search = dataclasses.replace(
            filters,
            series_uid=request.series_instance_uid or None,
            sop_uid=request.sop_instance_uid or None,
        )
        rows = await _searching(context, self._catalog().find_instances.remote(search, limit))
        return pb.FindInstancesResponse(instances=[_instance(row) for row in rows])


FIND_DEADLINE_S = 60.0


async def _searching(context: grpc.aio.ServicerContext, call: Any) -> list[Any]:
    """Await a catalog search within its deadline; map a failure to a status."""
    try:
        return cast(list[Any], await asyncio.wait_for(call, FIND_DEADLINE_S))
    except TimeoutError:
        log.error("a catalog search did not finish within %g s", FIND_DEADLINE_S)
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, _SEARCH_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - mapped to a status; detail in the log
        log.error("a catalog search failed: %s", type(error).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, _CATALOG_DOWN)
    raise AssertionError("unreachable: abort() raises")


async def _filters(
    request: pb.FindRequest, context: grpc.aio.ServicerContext
) -> tuple[InstanceFilters, int]:
    try:
        date_from = _parse_date(request.study_date_from, "study_date_from")
        date_to = _parse_date(request.study_date_to, "study_date_to")
    except ValueError as error:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        raise
    filters = InstanceFilters(
        study_uid=request.study_instance_uid or None,
        modality=request.modality or None,
        date_from=date_from,
        date_to=date_to,
    )
    return filters, request.limit or 1000


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


def _idle(deadlines: Deadlines) -> str:
    return (
        f"nothing arrived for {deadlines.idle_s:g} s in the middle of this file, so the archive "
        "stopped waiting and closed the stream; nothing was stored for it, send it again"
    )


def _unreadable(record: InstanceRecord) -> str:
    return (
        f"the stored object of version {record.version} of this instance cannot be read back "
        "(too few of its erasure-coded parts are readable, or it failed its integrity check); "
        "the incident was logged for the operators"
    )


_REUSED_ID = (
    "this file_id is already used on this stream by a file not answered yet; give each file "
    "of a stream its own file_id"
)
_PART_FAILED = (
    "the archive could not take this file in (its workers' object store refused it); "
    "nothing was stored for it, send it again shortly"
)
_PARTS_LOST = (
    "the archive restarted a component while this file arrived; nothing was stored for it, "
    "send it again"
)
_CATALOG_DOWN = "the catalog is not answering; try again shortly"
_SEARCH_TIMEOUT = "the catalog search did not finish in time; narrow it or try again"
_STORE_DOWN = "the object store is not answering; try again shortly"
_WORKERS_DOWN = "the archive's workers are restarting; try again shortly"
_READ_FAILED = "the instance could not be read; the error was logged for the operators"
_READ_TIMEOUT = "the instance could not be read in time; the error was logged, try again"

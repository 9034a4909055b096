"""The archive core every door calls: store, retrieve (whole or frames), find.

A door (gRPC, DIMSE, DICOMweb) translates its protocol into calls on ``Archive`` and the
answers back; it never touches the catalog, Ray or the store itself. Everything a door
needs to know about an outcome travels in one of two shapes:

- ``FileResult`` (status ``stored``/``duplicate``/``rejected``, a ``Reason`` and a
  sentence) for each file given to ``store``;
- ``ArchiveError`` (a ``Reason`` and a sentence) for any other call that cannot be
  answered; each door maps the reason to its own status, once, at its edge.

Here are decided, once for every door: the byte budget and the limits (admission), that
identical files in flight at once are stored once, the duplicate check, the concurrency
limit, what a failed read means (not found, data loss, unavailable, too slow), and that a
read is recorded as an access without delaying the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from cryptography.exceptions import InvalidTag

from cluster.archive.admission import ByteBudget
from cluster.archive.dispatch import (
    DeadlineExceededError,
    Dispatcher,
    FileResult,
    cancel,
    cause_of,
    within,
)
from cluster.archive.find import UNIQUE, FindError, Found, Query, latest
from cluster.archive.find import find as find_matches
from cluster.catalog.placements import DELETED
from cluster.catalog.placements import DELETED_MESSAGE as _DELETED
from cluster.catalog.queries import InstanceFilters, StudyFilters
from cluster.catalog.schema import StudyRow
from workers.dicom.identity import IdentityKeys, identity_keys
from workers.errors import Reason
from workers.objects import store
from workers.objects.keys import cached_key_file
from workers.pipeline.frames import FrameData, NoSuchFrameError, read_frames
from workers.pipeline.ingest import PipelineSettings
from workers.pipeline.restore import (
    ObjectRef,
    RestoredHead,
    RestoreError,
    TranscodeRefusedError,
    restore_chunks,
)
from workers.records import IngestItem, InstanceRecord

log = logging.getLogger("strata.archive")

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
FIND_DEADLINE_S = 60.0


class ArchiveError(Exception):
    """A call the archive cannot answer: a reason code and a sentence for the caller
    (never patient data, tracebacks or internal addresses)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Deadlines:
    """How long the archive waits for each kind of remote call, and for a sender."""

    idle_s: float = 30.0  # a sender silent mid-file for this long is cut off
    read_s: float = 60.0  # one retrieval step (a chunk, or a batch of frames)
    lookup_s: float = 10.0  # one catalog lookup


@dataclass(eq=False)  # hashed by identity: the budget tracks each file arriving
class Incoming:
    """One file being received by a door.

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
    source: str = ""  # the door (and DIMSE's calling AE): InstanceRecord.source

    def _add(self, data: bytes | memoryview, generation: int) -> None:
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

    def _take(self, file_id: str, sha256: str) -> IngestItem:
        item = IngestItem(
            file_id, self.data, sha256, tuple(self.parts), self.parts_bytes, self.source
        )
        self.drop()
        return item

    def drop(self) -> None:
        """Let go of the received bytes (the object store frees the parts)."""
        self.data, self.parts, self.parts_bytes = bytearray(), [], 0


@dataclass
class Retrieval:
    """An instance being given back: what it is, then its bytes in chunks."""

    record: InstanceRecord
    transfer_syntax: str
    total_size: int
    sha256: str
    chunks: AsyncIterator[bytes]


class Archive:
    """Store, retrieve and find, for every door."""

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
        self.max_file_bytes = max_file_bytes
        self.deadlines = deadlines or Deadlines()
        # Identical files in flight at once (even through different doors) are stored once.
        self._inflight: dict[str, asyncio.Future[FileResult]] = {}
        # Duplicate checks waiting for the next call to the catalog writer, and that call.
        self._lookups: dict[str, list[asyncio.Future[InstanceRecord | None]]] = {}
        # Told of every study read (after its access is recorded): the node's tiering.
        self.on_read: Callable[[str], None] | None = None
        self._looking_up: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        # Set while a component is down and being restarted: new work is refused at once
        # with this sentence instead of waiting on a component that cannot answer.
        self.unavailable: str | None = None

    def rebind(self, catalog_actor: Any) -> None:
        """Carry on over a restarted Ray runtime with its new catalog writer."""
        self._catalog = catalog_actor
        self._settings_ref = ray.put(self._settings)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of the ``max_calls`` calls served at once, or ArchiveError(BUSY) now.

        Each call holds a door's buffers outside the byte budget (a gRPC stream about one
        chunk and one receive window); counting them here bounds that memory too.
        """
        if self._calls >= self._max_calls:
            raise ArchiveError(
                Reason.BUSY,
                f"the archive is serving as many calls as it may at once ({self._max_calls}, "
                "max_concurrent_calls); try again shortly",
            )
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1

    def check_available(self) -> None:
        if self.unavailable is not None:
            raise ArchiveError(Reason.UNAVAILABLE, self.unavailable)

    # -- storing ----------------------------------------------------------------------

    def incoming(self, file_id: str, source: str = "") -> Incoming:
        """A file about to be received, through ``source`` (``"grpc"``, ``"dicomweb"``,
        ``"dimse:<calling AE title>"``), which its catalog row keeps."""
        return Incoming(file_id, source=source)

    async def receive(self, incoming: Incoming, data: bytes | memoryview, owner: object) -> None:
        """Take the next bytes of ``incoming`` (from the sender ``owner``, whose fair share
        of the budget they count against). Waits while the budget is spent: that is the
        backpressure. Raises ArchiveError, with the file rejected and its bytes let go,
        when it cannot be taken."""
        if incoming.size + len(data) > self.max_file_bytes:
            await self._refuse(
                incoming,
                owner,
                Reason.TOO_LARGE,
                f"the file exceeds the configured limit of {self.max_file_bytes} bytes "
                "(max_file_bytes)",
            )
        if incoming.parts and incoming.generation != self._dispatcher.generation:
            # Ray was restarted while this file arrived: its first parts are gone.
            await self._refuse(incoming, owner, Reason.STORAGE_FAILED, _PARTS_LOST)
        await self._budget.acquire(len(data), owner, incoming)
        incoming.reserved += len(data)
        try:
            incoming._add(data, self._dispatcher.generation)
        except Exception as error:  # noqa: BLE001 - Ray is down or its store is full
            log.error("a part of a file could not be handed to Ray: %s", cause_of(error))
            await self._refuse(
                incoming, owner, Reason.UNAVAILABLE, self.unavailable or _PART_FAILED
            )

    async def complete(self, incoming: Incoming) -> None:
        """``incoming`` has all its bytes: it needs no more of the budget."""
        await self._budget.close_file(incoming)

    async def reject(self, incoming: Incoming, owner: object) -> None:
        """The door refuses ``incoming`` (for a reason of its protocol): let it go."""
        incoming.rejected = True
        incoming.drop()
        await self._release(incoming, owner)

    async def _refuse(
        self, incoming: Incoming, owner: object, reason: Reason, message: str
    ) -> None:
        await self.reject(incoming, owner)
        raise ArchiveError(reason, message)

    async def store(
        self, incoming: Incoming, owner: object, sender: object | None = None
    ) -> FileResult:
        """Store a complete file; the answer comes only once it is durable (or refused).

        ``sender`` names a sender that waits for this answer before it sends again (see
        ``store_bytes``). Never raises but for cancellation: every failure is a
        ``rejected`` result."""
        sha256 = incoming.hasher.hexdigest()
        try:
            return await self._store_once(incoming, sha256, owner, sender)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("file %s could not be stored", sha256[:12])
            return FileResult(
                incoming.file_id,
                "rejected",
                reason=Reason.INTERNAL.value,
                message="the archive failed on this file and the error was logged; nothing "
                "was stored for it, send it again",
            )
        finally:
            incoming.drop()
            if not incoming.submitted:  # else the dispatcher says when (see _store_once)
                await self._release(incoming, owner)

    async def store_bytes(
        self,
        file_id: str,
        data: bytes | memoryview,
        owner: object,
        *,
        one_at_a_time: bool = False,
        source: str = "",
    ) -> FileResult:
        """Store a file the door already holds whole (DIMSE, DICOMweb): ``receive``, then
        ``store``. A refusal comes back as a ``rejected`` result.

        ``one_at_a_time``: ``owner`` sends its next file only once this one is answered
        (a DIMSE association), so the dispatcher may hold a batch briefly for it (see
        ``Dispatcher.sender_answered``); ``sender_gone`` says when it has gone."""
        sender = owner if one_at_a_time else None
        incoming = self.incoming(file_id, source)
        try:
            try:
                await self.receive(incoming, data, owner)
            except ArchiveError as error:
                if sender is not None:
                    self._dispatcher.sender_quiet(sender)
                return FileResult(
                    file_id, "rejected", reason=error.reason.value, message=error.message
                )
            await self.complete(incoming)
            return await self.store(incoming, owner, sender)
        finally:
            if sender is not None:
                self._dispatcher.sender_answered(sender)

    def sender_gone(self, owner: object) -> None:
        """A sender that sent one file at a time went away: nothing is held for it."""
        self._dispatcher.sender_quiet(owner)

    async def _store_once(
        self, incoming: Incoming, sha256: str, owner: object, sender: object | None
    ) -> FileResult:
        file_id = incoming.file_id
        if self.unavailable is not None:
            return FileResult(
                file_id, "rejected", reason=Reason.UNAVAILABLE.value, message=self.unavailable
            )
        if sender is not None and sha256 in self._inflight:
            self._dispatcher.sender_quiet(sender)  # it waits for the first copy's answer
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
            if known is not None and known.tier == DELETED:
                result = FileResult(
                    file_id, "rejected", reason=Reason.DELETED.value, message=_DELETED
                )
            elif known is not None:
                result = FileResult(file_id, "duplicate", record=known)
            else:
                # The budget stays held until Ray has let go of the bytes too, even if
                # the sender goes away before its answer.
                incoming.submitted = True
                result = await self._dispatcher.submit(
                    incoming._take(file_id, sha256),
                    incoming.generation,
                    on_released=lambda: self._release_soon(incoming, owner),
                    sender=sender,
                )
            future.set_result(result)
            return result
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[sha256]
            if sender is not None and not incoming.submitted:
                self._dispatcher.sender_quiet(sender)  # its file needs no batch

    async def _lookup(self, sha256: str) -> InstanceRecord | None:
        """The catalogued file with this SHA-256; None when new or when the catalog writer
        cannot say in time (then the commit decides: it checks duplicates itself).

        Lookups asked while one call to the writer is out wait and go together in the
        next call: one Ray round trip (about a millisecond of CPU on each side) serves
        every file that arrived meanwhile, as a group commit serves their rows."""
        answer: asyncio.Future[InstanceRecord | None] = asyncio.get_running_loop().create_future()
        self._lookups.setdefault(sha256, []).append(answer)
        if self._looking_up is None or self._looking_up.done():
            self._looking_up = asyncio.create_task(self._look_up_all())
        return await answer

    async def _look_up_all(self) -> None:
        while self._lookups:
            asked, self._lookups = self._lookups, {}
            try:
                known: dict[str, InstanceRecord] = await within(
                    self._catalog.lookup_sha256s.remote(list(asked)),
                    self.deadlines.lookup_s,
                    "the catalog writer",
                )
            except Exception as error:  # noqa: BLE001 - the lookup is only a shortcut
                log.warning("duplicate lookup skipped: %s", type(error).__name__)
                known = {}
            for sha256, answers in asked.items():
                for answer in answers:
                    if not answer.done():
                        answer.set_result(known.get(sha256))

    def _release_soon(self, incoming: Incoming, owner: object) -> None:
        self._in_background(self._release(incoming, owner))

    async def _release(self, incoming: Incoming, owner: object) -> None:
        await self._budget.close_file(incoming)
        if incoming.reserved:
            await self._budget.release(incoming.reserved, owner)
            incoming.reserved = 0

    # -- reading ----------------------------------------------------------------------

    async def instance(self, sop_instance_uid: str, version: int | None = None) -> InstanceRecord:
        """The newest version of a SOP Instance (or ``version``), where it lives now.

        A keyed lookup in the catalog writer's index: never a scan of the archive."""
        self.check_available()
        try:
            record: InstanceRecord | None = await within(
                self._catalog.latest.remote(sop_instance_uid, version or None),
                self.deadlines.lookup_s,
                "the catalog writer",
            )
        except Exception as error:  # noqa: BLE001 - a reason for the door; detail in the log
            log.error("catalog lookup for a retrieval failed: %s", cause_of(error))
            raise ArchiveError(Reason.UNAVAILABLE, _CATALOG_DOWN) from None
        if record is None:
            raise ArchiveError(Reason.NOT_FOUND, "no stored instance has that SOP Instance UID")
        if record.tier == DELETED:
            raise ArchiveError(Reason.DELETED, _DELETED)
        return record

    @contextlib.asynccontextmanager
    async def retrieve(
        self, record: InstanceRecord, form: str = "original"
    ) -> AsyncIterator[Retrieval]:
        """Give ``record``'s instance back in ``form`` (``original`` byte for byte,
        ``stored``, or a transfer syntax UID to transcode to losslessly); the worker stops
        as soon as the block is left, whether the caller read everything or not."""
        self.check_available()
        if record.tier == DELETED:
            raise ArchiveError(Reason.DELETED, _DELETED)
        ref = ObjectRef.of(record)
        stream = _restore_stream.remote(ref, form, self._settings_ref, RETRIEVE_CHUNK)
        try:
            head: RestoredHead = await self._reading(_next(stream), record)
            self.record_access(record.study_instance_uid)

            async def chunks() -> AsyncIterator[bytes]:
                while True:
                    try:
                        data: bytes = await self._reading(_next(stream), record)
                    except StopAsyncIteration:
                        return
                    yield data

            yield Retrieval(record, head.transfer_syntax, head.total_size, head.sha256, chunks())
        finally:
            cancel(stream)

    async def read_all(self, record: InstanceRecord, form: str = "original") -> tuple[str, bytes]:
        """The whole instance in ``form`` (its transfer syntax and bytes), for doors that
        send whole files (DIMSE, DICOMweb)."""
        async with self.retrieve(record, form) as retrieval:
            parts = [chunk async for chunk in retrieval.chunks]
        return retrieval.transfer_syntax, b"".join(parts)

    async def frames(
        self, record: InstanceRecord, numbers: list[int], decoded: bool = False
    ) -> list[FrameData]:
        """Frames ``numbers`` (1-based) of ``record``'s instance: their codestreams as
        stored, or native pixels with ``decoded``."""
        if not numbers:
            raise ArchiveError(Reason.BAD_REQUEST, "no frame numbers given")
        self.check_available()
        if record.tier == DELETED:
            raise ArchiveError(Reason.DELETED, _DELETED)
        ref = ObjectRef.of(record)
        task = _frames_task.remote(ref, list(numbers), self._settings_ref, decoded)
        frames: list[FrameData] = await self._reading(task, record)  # cancelled there if late
        self.record_access(record.study_instance_uid)
        return frames

    async def _reading(self, step: Awaitable[Any], record: InstanceRecord) -> Any:
        """Await one step of a read within the read deadline; a failure as ArchiveError."""
        try:
            return await within(step, self.deadlines.read_s, "a retrieval")
        except StopAsyncIteration:
            raise
        except ray.exceptions.RayTaskError as error:
            cause = error.cause
            if isinstance(cause, TranscodeRefusedError):
                raise ArchiveError(Reason.TRANSCODE_REFUSED, str(cause)) from None
            if isinstance(cause, NoSuchFrameError):
                raise ArchiveError(Reason.NO_SUCH_FRAME, str(cause)) from None
            if isinstance(cause, store.ObjectUnreadableError):
                log.error("object %s cannot be read back: %s", record.object_key, cause)
                raise ArchiveError(Reason.DATA_LOSS, _unreadable(record)) from None
            if isinstance(cause, RestoreError):
                log.error("object %s failed its checks: %s", record.object_key, cause)
                raise ArchiveError(Reason.DATA_LOSS, _unreadable(record)) from None
            if isinstance(cause, store.StoreUnavailableError):
                log.error("object %s: the store is unavailable: %s", record.object_key, cause)
                raise ArchiveError(Reason.UNAVAILABLE, _STORE_DOWN) from None
            log.error("reading object %s failed: %s", record.object_key, cause_of(cause))
            raise ArchiveError(Reason.INTERNAL, _READ_FAILED) from None
        except DeadlineExceededError:
            log.error(
                "reading object %s: no answer within %g s", record.object_key, self.deadlines.read_s
            )
            raise ArchiveError(Reason.TIMEOUT, _READ_TIMEOUT) from None
        except ray.exceptions.RayError as error:
            log.error(
                "reading object %s failed in Ray: %s", record.object_key, type(error).__name__
            )
            raise ArchiveError(Reason.UNAVAILABLE, _WORKERS_DOWN) from None

    def record_access(self, study_instance_uid: str) -> None:
        """Note a read with the next catalog commit, without waiting for it: an access
        record never delays a response, nor fails one."""
        try:
            call = self._catalog.record_access.remote([study_instance_uid])
        except Exception as error:  # noqa: BLE001 - an access record never fails a read
            log.warning("access not recorded: %s", type(error).__name__)
            return
        self._in_background(_quietly(call))
        if self.on_read is not None:
            self.on_read(study_instance_uid)  # the tiering policy may promote it

    def _in_background(self, work: Awaitable[Any]) -> None:
        future = asyncio.ensure_future(work)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    # -- finding ----------------------------------------------------------------------

    async def find_studies(
        self, filters: StudyFilters, limit: int = 1000, offset: int = 0
    ) -> list[StudyRow]:
        """Study rows matching ``filters`` (the catalog writer's index: current rows)."""
        rows: list[StudyRow] = await self._searching(
            self._catalog.find_studies.remote(filters, limit, offset)
        )
        return rows

    async def find_instances(
        self, filters: InstanceFilters, limit: int = 1000, offset: int = 0
    ) -> list[InstanceRecord]:
        """Instance records matching ``filters``, where each lives now."""
        rows: list[InstanceRecord] = await self._searching(
            self._catalog.find_instances.remote(filters, limit, offset)
        )
        return rows

    async def study_boxes(self, study_uids: list[str]) -> dict[str, tuple[str, bytes]]:
        """Each study's latest SOP Instance UID and sealed identity box."""
        if not study_uids:
            return {}
        boxes: dict[str, tuple[str, bytes]] = await self._searching(
            self._catalog.study_boxes.remote(study_uids)
        )
        return boxes

    async def identities(self, sha256s: list[str]) -> dict[str, bytes]:
        """The sealed identity boxes of these files, by SHA-256."""
        if not sha256s:
            return {}
        boxes: dict[str, bytes] = await self._searching(self._catalog.identities.remote(sha256s))
        return boxes

    async def find(self, query: Query, limit: int = 1000) -> Found:
        """C-FIND and QIDO: what matches ``query`` (``cluster.archive.find``), identity
        included: a door calls it only for a caller it has admitted."""
        self.check_available()
        try:
            return await find_matches(self, query, limit, self._identity_keys())
        except FindError as error:
            raise ArchiveError(error.reason, error.message) from None
        except InvalidTag:
            log.error("an identity box failed authentication: the index or its key changed")
            raise ArchiveError(Reason.DATA_LOSS, _IDENTITY_UNREADABLE) from None

    async def retrievable(self, query: Query) -> list[InstanceRecord]:
        """C-MOVE and C-GET: the current version of every instance the unique keys of
        ``query`` name (Study, Series, SOP Instance UIDs down to its level)."""
        self.check_available()
        studies = [uid for uid in query.value("StudyInstanceUID").split("\\") if uid]
        series: list[str | None] = [
            uid for uid in query.value("SeriesInstanceUID").split("\\") if uid
        ]
        sops = {uid for uid in query.value("SOPInstanceUID").split("\\") if uid}
        needed = {"STUDY": studies, "SERIES": series, "IMAGE": sops}
        if query.level == "PATIENT":
            if not query.value("PatientID"):
                raise ArchiveError(
                    Reason.BAD_REQUEST, "a PATIENT-level retrieve needs a Patient ID"
                )
            found = await self.find(Query("STUDY", {"PatientID": query.value("PatientID")}, True))
            studies = [match["StudyInstanceUID"] for match in found.matches]
        elif not needed[query.level]:
            raise ArchiveError(
                Reason.BAD_REQUEST,
                f"a {query.level}-level retrieve needs the {UNIQUE[query.level]} of what to send",
            )
        records: list[InstanceRecord] = []
        if query.level == "IMAGE" and not studies:
            for sop in sops:
                records.append(await self.instance(sop))
            return records
        if not studies:
            raise ArchiveError(
                Reason.BAD_REQUEST, "a retrieve below the STUDY level needs its Study Instance UID"
            )
        for study in studies:
            for one_series in series or [None]:
                records += await self.find_instances(
                    InstanceFilters(study_uid=study, series_uid=one_series), limit=1_000_000
                )
        return [r for r in latest(records) if not sops or r.sop_instance_uid in sops]

    def _identity_keys(self) -> IdentityKeys:
        return identity_keys(cached_key_file(self._settings.key_file).pseudonymizer())

    async def _searching(self, call: Any) -> Any:
        """Await a catalog search within its deadline; a failure as ArchiveError."""
        try:
            return await asyncio.wait_for(call, FIND_DEADLINE_S)
        except TimeoutError:
            log.error("a catalog search did not finish within %g s", FIND_DEADLINE_S)
            raise ArchiveError(Reason.TIMEOUT, _SEARCH_TIMEOUT) from None
        except Exception as error:  # noqa: BLE001 - a reason for the door; detail in the log
            log.error("a catalog search failed: %s", cause_of(error))
            raise ArchiveError(Reason.UNAVAILABLE, _CATALOG_DOWN) from None


async def _quietly(call: Any) -> None:
    try:
        await within(call, 30, "the catalog writer")
    except Exception as error:  # noqa: BLE001 - an access record never fails a read
        log.warning("access not recorded: %s", type(error).__name__)


async def _next(stream: Any) -> Any:
    """The next value of a Ray streaming generator (its failure, if the task failed)."""
    ref = await stream.__anext__()
    return await ref


def _unreadable(record: InstanceRecord) -> str:
    return (
        f"the stored object of version {record.version} of this instance cannot be read back "
        "(too few of its erasure-coded parts are readable, or it failed its integrity check); "
        "the incident was logged for the operators"
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
_IDENTITY_UNREADABLE = (
    "the identity index could not be read (a box failed its check); the search was not "
    "answered, and an operator has been told"
)
_STORE_DOWN = "the object store is not answering; try again shortly"
_WORKERS_DOWN = "the archive's workers are restarting; try again shortly"
_READ_FAILED = "the instance could not be read; the error was logged for the operators"
_READ_TIMEOUT = "the instance could not be read in time; the error was logged, try again"

"""Where scheduling is decided: batching files into Ray tasks and committing their rows.

Per-file Ray overhead (a task is ~1 ms of scheduling) and per-object store costs (one pack
per study and batch) are small against the codec's work only when files travel in
batches, but a file that waits for others waits for nothing when a worker is free. So at
most two batches per worker core are with Ray at once, and a file arriving while one of
those places is free leaves at once, in a batch with whatever waited; while every place is
taken, files gather into the next batch, which leaves when a place frees or it holds
``batch_max_files`` files or ``batch_max_bytes`` bytes. Batches grow with the load and a
stream of many files fills them.

Senders that wait for each answer before they send the next file (a DIMSE association)
never fill a batch by load alone: four of them have at most four files in the archive,
and each went alone, paying a task, a pack PUT and a group commit for one file (measured:
160 batches and 140 commits for 160 files from 4 ``storescu``). So such a sender, once
answered, is *awaited*: a batch that could leave at once waits (at most ``batch_hold_s``)
while an awaited sender has not sent its next file, and leaves as soon as the last one
has. A batch is one task, which prepares its small files on two cores at once
(``workers.pipeline.ingest``), so held files do not queue behind each other on one core
and make one pack per study; their rows are committed together. A lone sender is never
held back (it is never awaited while its own file is here), and a sender silent for
``sender_quiet_s`` is not awaited.

Every file gets a ticket, unique in this process, when it is submitted; the pipeline and the
catalog writer know it only by that ticket, so files that different streams or connections
named alike can never be answered with each other's result.

Every remote call has a deadline. A batch whose task fails or runs past its deadline is
cancelled (the worker is killed, freeing its core) and its files are answered
``storage_failed``: nothing of them was committed. A commit whose outcome is unknown (the
catalog writer died, or the store failed mid-commit) is retried until ``commit_deadline``:
the writer decides duplicates by SHA-256 from the committed table, so a retry never stores a
row twice, and a file is answered ``storage_failed`` only when the writer said plainly that
its rows were not written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import ray

from cluster.catalog import CatalogCommitFailedError, Committed
from cluster.catalog.placements import DELETED, DELETED_MESSAGE
from workers import errors
from workers.errors import Reason
from workers.pipeline.ingest import BatchResult, PipelineSettings, ingest_batch
from workers.records import IngestItem, InstanceRecord, Rejected, Stored

log = logging.getLogger("strata.dispatch")

# Ray's retries cover a worker process that died mid-batch: the pipeline is idempotent
# (content-addressed object keys), so running a batch twice stores nothing twice.
_ingest_task = ray.remote(num_cpus=1, max_retries=3)(ingest_batch)

T = TypeVar("T")

# The longest one commit attempt is waited for (a group commit takes well under a second).
COMMIT_ATTEMPT_S = 20.0


@dataclass(frozen=True)
class FileResult:
    """The final answer for one file, after its catalog row is committed."""

    file_id: str
    status: str  # "stored" | "duplicate" | "rejected"
    record: InstanceRecord | None = None
    reason: str = ""
    message: str = ""


class DeadlineExceededError(Exception):
    """A remote call did not answer within its deadline (and was cancelled)."""


async def within(call: Awaitable[T], seconds: float, what: str) -> T:
    """Await ``call`` for at most ``seconds``; cancel the Ray task behind it when late.

    ``call`` may be a Ray ObjectRef (of a task or an actor call) or any awaitable.
    Cancelling a task with ``force=True`` kills the worker process that runs it, so a read
    stuck in a store that does not answer gives its core back.
    """
    try:
        return await asyncio.wait_for(call, seconds)
    except (TimeoutError, asyncio.CancelledError) as error:
        if isinstance(call, ray.ObjectRef):
            cancel(call)
        if isinstance(error, TimeoutError):
            raise DeadlineExceededError(f"{what} did not answer within {seconds:g} s") from None
        raise


def cancel(ref: ray.ObjectRef) -> None:  # type: ignore[type-arg]
    """Stop the task behind ``ref`` if it is still running; never raises."""
    try:
        ray.cancel(ref, force=True)
    except Exception:  # an actor call or a finished task cannot be cancelled
        log.debug("could not cancel a Ray task", exc_info=True)


@dataclass
class _Pending:
    file_id: str  # the door's name for the file, echoed in its result
    ticket: str  # unique in this process; the pipeline and catalog know the file by it
    sha256: str
    item: IngestItem | None  # dropped once handed to Ray, so its bytes are held once
    future: asyncio.Future[FileResult]
    on_released: Callable[[], object] | None  # called once Ray holds none of its bytes

    def release(self) -> None:
        """The file's bytes are no longer held here or in Ray: say so, once."""
        self.item = None
        callback, self.on_released = self.on_released, None
        if callback is not None:
            callback()


class Dispatcher:
    """Batches files onto Ray workers and commits stored rows through the catalog writer."""

    def __init__(
        self,
        settings: PipelineSettings,
        catalog: Any,  # a CatalogWriter actor handle
        *,
        worker_cpus: int,
        batch_max_files: int,
        batch_max_bytes: int,
        ingest_deadline_s: float = 600.0,
        commit_deadline_s: float = 60.0,
        batch_hold_s: float = 0.05,
        sender_quiet_s: float = 0.5,
    ) -> None:
        self._settings = settings
        self._settings_ref = ray.put(settings)
        self._catalog = catalog
        self._batch_max_files = batch_max_files
        self._batch_max_bytes = batch_max_bytes
        self._ingest_deadline = ingest_deadline_s
        self._commit_deadline = commit_deadline_s
        self._places = max(1, 2 * worker_cpus)
        self._hold_s = batch_hold_s
        self._quiet_s = sender_quiet_s
        # Senders that wait for each answer, answered and not yet heard from again: when
        # each was answered (see sender_answered).
        self._awaited: dict[object, float] = {}
        self._hold: asyncio.TimerHandle | None = None
        self._slots = asyncio.Semaphore(self._places)
        self._with_ray = 0  # batches closed and not yet back from their worker task
        self._tickets = itertools.count(1)
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Batches waiting on their worker task, and those that reset() cut off.
        self._ingesting: set[asyncio.Task[Any]] = set()
        self._cut_off: set[asyncio.Task[Any]] = set()
        # SHA-256 of every file submitted and not yet answered (its object may be in the
        # store without a catalog row yet), and those whose orphan object is being removed.
        self._in_flight: Counter[str] = Counter()
        self._removing: dict[str, asyncio.Event] = {}
        # Counts Ray runtimes: parts put into the object store of an earlier one are gone.
        self.generation = 0
        # Batches and files back from their worker task, and the CPU milliseconds the
        # workers spent inside the tasks (for operators and the ingest benchmark).
        self.stats: Counter[str] = Counter()

    def runtime_lost(self) -> None:
        """Ray is going down: files not yet in a batch whose parts are in its object store
        are answered ``storage_failed`` now, and parts of an older generation are refused
        from now on (see ``submit``)."""
        self.generation += 1
        kept: list[_Pending] = []
        lost: list[_Pending] = []
        for pending in self._pending:
            (lost if pending.item is not None and pending.item.parts else kept).append(pending)
        self._answer_all(lost, Reason.STORAGE_FAILED, _NOT_STORED)
        for pending in lost:
            self._finished(pending)
        self._pending = kept
        self._pending_bytes = sum(p.item.size for p in kept if p.item is not None)

    def reset(self, catalog: Any) -> None:
        """Carry on over a restarted Ray: a new catalog writer handle, settings put again.

        Batches still waiting on a worker of the old runtime are answered ``storage_failed``
        now (their commit had not begun); batches already committing retry with the new
        writer, which decides from the table whether their rows landed.
        """
        self._catalog = catalog
        self._settings_ref = ray.put(self._settings)
        for task in self._ingesting:
            self._cut_off.add(task)
            task.cancel()

    @contextlib.asynccontextmanager
    async def removing(self, sha256: str) -> AsyncIterator[bool]:
        """Hold back new files with this SHA-256 while its orphan object is deleted.

        Yields False (delete nothing) when such a file is in flight: its object is about to
        be committed, not an orphan.
        """
        if self._in_flight[sha256] or sha256 in self._removing:
            yield False
            return
        done = self._removing[sha256] = asyncio.Event()
        try:
            yield True
        finally:
            del self._removing[sha256]
            done.set()

    async def submit(
        self,
        item: IngestItem,
        generation: int | None = None,
        on_released: Callable[[], object] | None = None,
        sender: object | None = None,
    ) -> FileResult:
        """Store one file; returns once it is committed (or rejected).

        ``generation`` is the Ray generation its parts were put in (if it has parts).
        ``on_released`` is called once neither this dispatcher nor Ray holds the file's
        bytes any more: after its batch ends, even when the caller stopped waiting.
        ``sender`` names a sender that waits for each answer (see ``sender_answered``).
        """
        if sender is not None:
            self._awaited.pop(sender, None)  # heard from: what it sent is here
        try:
            while (removal := self._removing.get(item.sha256)) is not None:
                await removal.wait()  # an orphan with these bytes is being deleted: not after
        except asyncio.CancelledError:
            if on_released is not None:
                on_released()
            raise
        if item.parts and generation != self.generation:
            if on_released is not None:
                on_released()
            return FileResult(
                item.file_id, "rejected", reason=Reason.STORAGE_FAILED.value, message=_NOT_STORED
            )
        self._in_flight[item.sha256] += 1
        future: asyncio.Future[FileResult] = asyncio.get_running_loop().create_future()
        ticket = f"t{next(self._tickets)}"
        pending = _Pending(
            item.file_id, ticket, item.sha256, replace(item, file_id=ticket), future, on_released
        )
        self._pending.append(pending)
        # A caller that gives up (its client went away) lets go of the bytes at once, if
        # they have not been handed to Ray yet.
        future.add_done_callback(lambda done: _drop_if_cancelled(pending, done))
        self._pending_bytes += item.size
        del item  # the caller has let go of it too: while waiting, only _Pending holds it
        if (
            len(self._pending) >= self._batch_max_files
            or self._pending_bytes >= self._batch_max_bytes
        ):
            self._close_batch()
        elif self._with_ray < self._places:
            self._leave_or_hold()
        return await future

    def sender_answered(self, sender: object) -> None:
        """``sender``, which waits for each answer before it sends again, was answered: it
        is awaited for a while (a batch that could leave may wait for its next file)."""
        self._awaited[sender] = asyncio.get_running_loop().time()

    def sender_quiet(self, sender: object) -> None:
        """``sender`` will send nothing soon (it went away, or its file ended without
        reaching a batch): a batch held for it leaves now."""
        if self._awaited.pop(sender, None) is not None and self._with_ray < self._places:
            self._leave_or_hold()

    def _waiting_for_senders(self) -> bool:
        now = asyncio.get_running_loop().time()
        for sender, answered in list(self._awaited.items()):
            if now - answered >= self._quiet_s:
                del self._awaited[sender]
        return bool(self._awaited)

    def _leave_or_hold(self) -> None:
        """A place is free: the pending files leave now, or once the awaited senders have
        sent (at most ``batch_hold_s`` after the hold began)."""
        if not self._pending:
            return
        if not self._waiting_for_senders():
            self._close_batch()
        elif self._hold is None:
            self._hold = asyncio.get_running_loop().call_later(self._hold_s, self._hold_over)

    def _hold_over(self) -> None:
        self._hold = None
        if self._pending and self._with_ray < self._places:
            self._close_batch()

    def _close_batch(self) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if not batch:
            return
        # One task: the worker prepares its small files on two cores at once and writes one
        # pack per study. Spread over two tasks, four DIMSE files held for each other
        # were two packs (four PUTs) and cost 12 % more CPU per file in all (bench/
        # vs_orthanc.py, five runs each way), for no more files a second.
        parts = [batch]
        self._with_ray += len(parts)
        task = asyncio.create_task(self._run(batch, parts))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _place_freed(self) -> None:
        """A task is back from its worker: the files that gathered meanwhile go."""
        self._with_ray -= 1
        if self._pending:
            self._close_batch()

    async def _run(self, batch: list[_Pending], parts: list[list[_Pending]]) -> None:
        freed = [False] * len(parts)  # each part's place is given back once

        def free(number: int) -> None:
            if not freed[number]:
                freed[number] = True
                self._place_freed()

        try:
            await self._run_batch(batch, parts, free)
        except Exception:
            log.exception("a batch of %d files failed unexpectedly", len(batch))
        finally:
            for number in range(len(parts)):
                free(number)
            # Whatever happened, nobody waits for ever: unanswered files were not committed
            # as far as this dispatcher knows.
            self._answer_all(batch, Reason.UNCONFIRMED, _UNCONFIRMED)
            for pending in batch:
                self._finished(pending)

    def _finished(self, pending: _Pending) -> None:
        """``pending`` is answered and its batch over: Ray holds nothing of it any more."""
        self._in_flight[pending.sha256] -= 1
        if not self._in_flight[pending.sha256]:
            del self._in_flight[pending.sha256]
        pending.release()

    async def _run_batch(
        self, batch: list[_Pending], parts: list[list[_Pending]], free: Callable[[int], None]
    ) -> None:
        task = asyncio.current_task()
        assert task is not None

        async def ingest(number: int) -> list[Any]:
            try:
                return await self._ingest(parts[number])
            finally:
                free(number)  # before the commit: the next batch need not wait for it

        self._ingesting.add(task)
        try:
            back = await asyncio.gather(
                *(ingest(number) for number in range(len(parts))), return_exceptions=True
            )
        except asyncio.CancelledError:
            if task not in self._cut_off:
                raise
            self._cut_off.discard(task)
            task.uncancel()
            log.error("a batch of %d files was cut off by a Ray restart", len(batch))
            self._answer_all(batch, Reason.STORAGE_FAILED, _NOT_STORED)
            return
        finally:
            self._ingesting.discard(task)
        outcomes: list[Any] = []
        for part, part_outcomes in zip(parts, back, strict=True):
            if isinstance(part_outcomes, BaseException):
                # Every file of that task learns of it; the other tasks' files go on.
                log.error(
                    "a batch of %d files failed in the workers: %s",
                    len(part),
                    cause_of(part_outcomes),
                )
                self._answer_all(part, Reason.STORAGE_FAILED, _NOT_STORED)
            else:
                outcomes.extend(part_outcomes)
        by_ticket = {o.file_id: o for o in outcomes}
        stored = [o for o in outcomes if isinstance(o, Stored)]
        committed: dict[str, FileResult] = {}
        if stored:
            committed = await self.commit(stored)
        for pending in batch:
            if pending.future.done():
                continue  # its caller gave up, or its task failed
            outcome = by_ticket.get(pending.ticket)
            if isinstance(outcome, Rejected):
                result = FileResult(
                    pending.file_id, "rejected", reason=outcome.reason, message=outcome.message
                )
            elif outcome is None:
                log.error("the pipeline returned no outcome for ticket %s", pending.ticket)
                result = FileResult(
                    pending.file_id,
                    "rejected",
                    reason=Reason.INTERNAL.value,
                    message="the pipeline gave no answer for this file; nothing was stored",
                )
            else:
                result = replace(committed[outcome.file_id], file_id=pending.file_id)
            pending.future.set_result(result)

    async def _ingest(self, batch: list[_Pending]) -> list[Any]:
        async with self._slots:
            items = [p.item for p in batch if p.item is not None]
            tickets = [item.file_id for item in items]
            if not items:
                return []  # every caller gave up while the batch waited
            ref = _ingest_task.remote(items, self._settings_ref)
            del items
            for pending in batch:
                pending.item = None  # Ray holds the bytes now (in its object store)
            result: BatchResult = await within(ref, self._ingest_deadline, "a worker batch")
        outcomes = result.outcomes
        self.stats["batches"] += 1
        self.stats["files"] += len(outcomes)
        self.stats["task_cpu_ms"] += round(1000 * result.cpu_seconds)
        self.stats["task_wall_ms"] += round(1000 * result.wall_seconds)
        self.stats["task_store_ms"] += round(1000 * result.store_seconds)
        if sorted(o.file_id for o in outcomes) != sorted(tickets):
            raise RuntimeError("the pipeline answered for other files than it was given")
        return outcomes

    async def commit(self, stored: Sequence[Stored]) -> dict[str, FileResult]:
        """Commit ``stored`` rows; a result per ticket, retried until the commit deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._commit_deadline
        delay = 0.25
        uncertain = False
        while True:
            remaining = deadline - loop.time()
            try:
                # One attempt never takes the whole deadline: a call to a writer whose
                # runtime died may never answer, and the retry must reach its successor.
                rows: list[Committed] = await within(
                    self._catalog.commit.remote(list(stored)),
                    max(min(remaining, COMMIT_ATTEMPT_S), 1.0),
                    "the catalog writer",
                )
            except CatalogCommitFailedError as error:
                # The writer checked: none of these rows is in the table.
                failure: Exception = error
                uncertain = False
            except Exception as error:  # noqa: BLE001 - writer died, store down, deadline
                failure = error
                uncertain = True
            else:
                return {row.file_id: _committed_result(row, uncertain) for row in rows}
            if loop.time() + delay >= deadline:
                break
            log.warning(
                "commit of %d rows failed (%s); retrying in %.2f s",
                len(stored),
                cause_of(failure),
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        log.error("commit of %d rows gave up: %s", len(stored), cause_of(failure))
        if uncertain:
            reason, message = Reason.UNCONFIRMED, _UNCONFIRMED
        else:
            reason, message = Reason.STORAGE_FAILED, _NOT_STORED
        return {
            item.file_id: FileResult(item.file_id, "rejected", reason=reason.value, message=message)
            for item in stored
        }

    def _answer_all(self, batch: list[_Pending], reason: Reason, message: str) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(
                    FileResult(pending.file_id, "rejected", reason=reason.value, message=message)
                )


def _drop_if_cancelled(pending: _Pending, future: asyncio.Future[FileResult]) -> None:
    if future.cancelled() and pending.item is not None:
        # Not handed to Ray yet (once it is, the batch's end releases it).
        pending.release()


def _committed_result(row: Committed, retried: bool) -> FileResult:
    # A retry after an unknown outcome may find the first attempt's rows already there:
    # the file is stored, and it was this send that stored it.
    if row.status == "duplicate" and row.record.tier == DELETED:  # the lookup was skipped
        return FileResult(
            row.file_id, "rejected", reason=Reason.DELETED.value, message=DELETED_MESSAGE
        )
    status = "stored" if retried and row.status == "duplicate" else row.status
    return FileResult(row.file_id, status, record=row.record)


def cause_of(error: BaseException) -> str:
    """A short, internal description of a failure for the server log (no PHI, no data)."""
    if isinstance(error, ray.exceptions.RayTaskError):
        return errors.cause_of(error.cause)
    if isinstance(error, ray.exceptions.RayActorError):
        return "the catalog writer's process died"
    return errors.cause_of(error)


_NOT_STORED = (
    "the archive could not store this file (a component failed and is being restarted); "
    "nothing was committed for it, send it again"
)
_UNCONFIRMED = (
    "the catalog did not confirm this file before the commit deadline; send it again: if "
    "it was in fact stored, the archive answers DUPLICATE"
)

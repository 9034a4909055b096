"""Where scheduling is decided: batching files into Ray tasks and committing their rows.

Per-file Ray overhead (a task is ~1 ms of scheduling) is small against the codec's work
only when files travel in batches; a batch closes when it holds ``batch_max_files`` files
or ``batch_max_bytes`` bytes, or ``batch_wait_ms`` after its first file arrived. At most
two batches per worker core are in flight, so the cluster is never idle and never flooded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import ray

from workers.errors import Reason
from workers.ingest import PipelineSettings, ingest_batch
from workers.records import IngestItem, InstanceRecord, Rejected, Stored

log = logging.getLogger("strata.dispatch")

# Ray's retries cover a worker process that died mid-batch: the pipeline is idempotent
# (content-addressed object keys), so running a batch twice stores nothing twice.
_ingest_task = ray.remote(num_cpus=1, max_retries=3)(ingest_batch)


@dataclass(frozen=True)
class FileResult:
    """The final answer for one file, after its catalog row is committed."""

    file_id: str
    status: str  # "stored" | "duplicate" | "rejected"
    record: InstanceRecord | None = None
    reason: str = ""
    message: str = ""


@dataclass
class _Pending:
    item: IngestItem
    future: asyncio.Future[FileResult]


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
        batch_wait_ms: int,
    ) -> None:
        self._settings = settings
        self._settings_ref = ray.put(settings)
        self._catalog = catalog
        self._batch_max_files = batch_max_files
        self._batch_max_bytes = batch_max_bytes
        self._batch_wait = batch_wait_ms / 1000
        self._slots = asyncio.Semaphore(max(1, 2 * worker_cpus))
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: IngestItem) -> FileResult:
        """Store one file; returns once it is committed (or rejected)."""
        future: asyncio.Future[FileResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, future))
        self._pending_bytes += len(item.data)
        if (
            len(self._pending) >= self._batch_max_files
            or self._pending_bytes >= self._batch_max_bytes
        ):
            self._close_batch()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._batch_wait, self._close_batch)
        return await future

    def _close_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if batch:
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            async with self._slots:
                outcomes = await _ingest_task.remote([p.item for p in batch], self._settings_ref)
            stored = [o for o in outcomes if isinstance(o, Stored)]
            committed = {c.file_id: c for c in await self._catalog.commit.remote(stored)}
            for pending, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, Rejected):
                    result = FileResult(
                        outcome.file_id, "rejected", reason=outcome.reason, message=outcome.message
                    )
                else:
                    row = committed[outcome.file_id]
                    result = FileResult(outcome.file_id, row.status, record=row.record)
                if not pending.future.done():
                    pending.future.set_result(result)
        except Exception as error:
            log.exception("a batch of %d files failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_result(
                        FileResult(
                            pending.item.file_id,
                            "rejected",
                            reason=Reason.STORAGE_FAILED.value,
                            message=f"the batch could not be stored ({type(error).__name__}); "
                            "nothing from it was acknowledged, send it again",
                        )
                    )

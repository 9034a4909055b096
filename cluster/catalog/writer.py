"""The one writer of the catalog: group commit, versions and duplicates, study rows."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pa_dataset
from deltalake import DeltaTable, write_deltalake

from cluster.catalog.index import CatalogIndex
from cluster.catalog.maintenance import MaintenancePolicy, maintain
from cluster.catalog.schema import (
    DEFAULT_BUCKET,
    INSTANCES,
    STUDIES,
    CatalogCommitFailedError,
    Committed,
    Decision,
    IndexEntry,
    StudyRow,
    create_tables,
    instances_table,
    open_table,
    record_from_row,
    sql_string_literal,
    storage_options,
    studies_table,
    study_from_row,
    table_uri,
    utc,
)
from workers.records import InstanceRecord, Stored, StoreSettings

log = logging.getLogger("strata.catalog")

# The most study rows written to Delta with one group (the rest with the next ones).
STUDIES_PER_COMMIT = 1000


def plan_group(
    stored: Sequence[Stored],
    index: Mapping[str, IndexEntry],
    max_versions: Mapping[str, int],
) -> tuple[list[Decision], list[InstanceRecord]]:
    """Decide, in order, which files are duplicates and which version each new file gets.

    A SHA-256 already in ``index`` or earlier in ``stored`` is a duplicate and is not
    written; a new SHA-256 for a known SOP Instance UID gets the previous maximum
    version + 1; anything else gets version 1. Returns the decisions (one per item of
    ``stored``) and the records to append, with ``version`` and a UTC ``ingest_time``.
    """
    decisions: list[Decision] = []
    new_records: list[InstanceRecord] = []
    seen: dict[str, int] = {}
    group_versions: dict[str, int] = {}
    for item in stored:
        record = item.record
        known = index.get(record.sha256)
        if known is not None:
            decisions.append(Decision(item.file_id, "duplicate", record.sha256, known.version))
            continue
        if record.sha256 in seen:
            version = seen[record.sha256]
            decisions.append(Decision(item.file_id, "duplicate", record.sha256, version))
            continue
        sop_uid = record.sop_instance_uid
        version = max(group_versions.get(sop_uid, 0), max_versions.get(sop_uid, 0)) + 1
        group_versions[sop_uid] = version
        seen[record.sha256] = version
        new_records.append(
            dataclasses.replace(record, version=version, ingest_time=utc(record.ingest_time))
        )
        decisions.append(Decision(item.file_id, "stored", record.sha256, version))
    return decisions, new_records


@dataclass
class _Waiter:
    stored: list[Stored]
    accessed: list[str]
    future: asyncio.Future[list[Committed]]


class CatalogWriter:
    """The one writer of the catalog; wrap it with ``ray.remote`` as an async actor.

    Concurrent ``commit`` calls are queued and written together: one append to
    ``instances`` and one upsert of the touched rows of ``studies`` per group, flushed
    when ``max_batch`` rows are pending or the oldest has waited ``max_wait_s``. Each
    call returns only after the group holding its rows is committed, and raises if that
    commit failed. If the ``studies`` upsert fails after the ``instances`` append
    succeeded, the callers are answered all the same (their rows are durable): the study
    rows stay dirty in the index and are written with the next group, or by the next
    writer when it starts.

    Duplicates, versions, lookups and study rows come from the keyed index
    (``cluster.catalog.index``) in the SQLite file ``index_path`` on the writer's disk
    (a new temporary file, built from the table, when not given); nothing held in memory
    grows with the archive. Every ``maintenance.every_commits`` commits the tables are
    compacted, checkpointed and vacuumed in the background (``cluster.catalog.maintenance``).
    """

    def __init__(
        self,
        settings: StoreSettings,
        bucket: str = DEFAULT_BUCKET,
        max_batch: int = 64,
        max_wait_s: float = 0.05,
        index_path: str | None = None,
        maintenance: MaintenancePolicy | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self._settings = settings
        self._bucket = bucket
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._index_path = Path(index_path or Path(tempfile.mkdtemp()) / "index.sqlite")
        self._maintenance = maintenance or MaintenancePolicy()
        self._commits_since_maintenance = 0
        self._maintaining: asyncio.Task[None] | None = None
        # The tables are opened on first use, not here: an actor whose constructor raises
        # (the store briefly down when Ray restarts it) would stay dead for good.
        self._instances: DeltaTable | None = None
        self._studies_table: DeltaTable | None = None
        self._opening = asyncio.Lock()
        self._committing: Counter[str] = Counter()

        self._index: CatalogIndex | None = None

        self._pending: list[_Waiter] = []
        self._pending_rows = 0
        self._oldest_pending = 0.0
        self._has_pending: asyncio.Event | None = None
        self._batch_full: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._stats = {
            "commits": 0,
            "studies_commits": 0,
            "rows_written": 0,
            "duplicates": 0,
            "max_group_size": 0,
            "flush_ms_total": 0,
            "flush_ms_max": 0,
            "studies_failures": 0,
            "maintenance_passes": 0,
        }

    # -- public, async ------------------------------------------------------------------

    async def ready(self) -> None:
        """Open the tables and load the index, once; raises (and is retried by the next
        call) while the store cannot be read."""
        async with self._opening:
            if self._instances is None:
                fresh = await asyncio.to_thread(self._open_and_load)
                # Swapped in on the event loop, all at once: nothing ever reads a half-built
                # index (the load runs in a thread).
                self._studies_table = fresh._studies_table
                if self._index is not None:
                    self._index.close()
                self._index = fresh._index
                self._instances = fresh._instances

    def _open_and_load(self) -> CatalogWriter:
        """A writer's state loaded from the tables, built apart from this one's."""
        create_tables(self._settings, self._bucket)
        fresh = CatalogWriter.__new__(CatalogWriter)
        fresh._settings, fresh._bucket = self._settings, self._bucket
        fresh._studies_table = open_table(self._settings, self._bucket, STUDIES)
        instances = open_table(self._settings, self._bucket, INSTANCES)
        studies = fresh._studies_table

        def written_studies() -> list[StudyRow]:  # read only when the index is rebuilt
            return [study_from_row(row) for row in studies.to_pyarrow_table().to_pylist()]

        fresh._index = CatalogIndex.open(
            self._index_path, instances, storage_options(self._settings), written_studies
        )
        # Study rows a crash left unwritten (or a rebuild found different) are written now.
        while dirty := fresh._index.dirty_studies(STUDIES_PER_COMMIT):
            fresh._upsert_studies([row for row, _ in dirty])
            fresh._index.mark_written((row.study_instance_uid, gen) for row, gen in dirty)
        fresh._instances = instances
        return fresh

    async def commit(self, stored: list[Stored]) -> list[Committed]:
        """Catalog ``stored`` files; returns one ``Committed`` per file, in order."""
        await self.ready()
        if not stored:
            return []
        # A record that does not fit the schema fails its own caller, not the whole group,
        # and for certain: nothing of it was written.
        try:
            instances_table([item.record for item in stored])
        except (pa.ArrowException, ValueError, TypeError) as error:
            raise CatalogCommitFailedError(f"a row does not fit the schema: {error}") from None
        shas = [item.record.sha256 for item in stored]
        # Until their group is resolved, these rows may land: the reconciler must not take
        # their objects for orphans, even if the caller has stopped waiting.
        self._committing.update(shas)
        try:
            return await self._enqueue(list(stored), [])
        finally:
            self._committing.subtract(shas)
            self._committing += Counter()  # drop the zeros

    async def lookup_sha256(self, sha256: str) -> InstanceRecord | None:
        """The catalogued record of the file with this SHA-256, or None if it is new."""
        await self.ready()
        assert self._index is not None
        return self._index.by_sha256(sha256)

    async def latest(
        self, sop_instance_uid: str, version: int | None = None
    ) -> InstanceRecord | None:
        """The newest version of a SOP Instance (or the given ``version``), None if absent."""
        await self.ready()
        assert self._index is not None
        return self._index.by_sop(sop_instance_uid, version)

    async def record_access(self, study_uids: list[str]) -> None:
        """Set ``last_access_time`` of these studies to now, with the next group commit.

        Unknown study UIDs are ignored. Returns once the update is committed; a caller
        that does not need to know may fire and forget.
        """
        if study_uids:
            await self.ready()
            await self._enqueue([], list(study_uids))

    async def close(self) -> None:
        """Commit everything queued so far, then stop the background flush task."""
        if self._flusher is None or self._flusher.done():
            return
        await self._enqueue([], [], flush_now=True)
        self._flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._flusher
        self._flusher = None

    async def stats(self) -> dict[str, int]:
        """Counters: Delta commits to each table, rows written, largest group, timings."""
        await self.ready()
        return dict(self._stats)

    # -- group commit -------------------------------------------------------------------

    async def _enqueue(
        self, stored: list[Stored], accessed: list[str], *, flush_now: bool = False
    ) -> list[Committed]:
        loop = asyncio.get_running_loop()
        if self._flusher is None or self._flusher.done():
            self._has_pending = asyncio.Event()
            self._batch_full = asyncio.Event()
            self._flusher = loop.create_task(self._flush_forever())
        assert self._has_pending is not None and self._batch_full is not None
        waiter = _Waiter(stored, accessed, loop.create_future())
        if not self._pending:
            self._oldest_pending = loop.time()
        self._pending.append(waiter)
        self._pending_rows += max(len(stored), len(accessed))
        self._has_pending.set()
        if flush_now or self._pending_rows >= self._max_batch:
            self._batch_full.set()
        return await waiter.future

    async def _flush_forever(self) -> None:
        assert self._has_pending is not None and self._batch_full is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._has_pending.wait()
            deadline = self._oldest_pending + self._max_wait_s
            while not self._batch_full.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), remaining)
            group, self._pending, self._pending_rows = self._pending, [], 0
            self._has_pending.clear()
            self._batch_full.clear()
            try:
                await self.ready()  # rebuilds the index after a failed commit
                results = await self._flush(group)
            except Exception as error:  # noqa: BLE001 - every waiter of the group learns of it
                # The index may be behind the table (a commit whose answer was lost can
                # still have landed), so it catches up with the table before any further
                # decision: a retry must never append a row twice.
                self._instances = None
                for waiter in group:
                    if not waiter.future.done():
                        waiter.future.set_exception(error)
                continue
            for waiter, result in zip(group, results, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(result)

    async def _flush(self, group: list[_Waiter]) -> list[list[Committed]]:
        started = time.perf_counter()
        stored = [item for waiter in group for item in waiter.stored]
        assert self._index is not None
        known = self._index.by_sha256s([item.record.sha256 for item in stored])
        entries = {
            sha: IndexEntry(r.sop_instance_uid, r.version, utc(r.ingest_time).date())
            for sha, r in known.items()
        }
        versions = self._index.max_versions(item.record.sop_instance_uid for item in stored)
        decisions, new_records = plan_group(stored, entries, versions)
        # Every record a caller gets back is resolved before anything is written.
        by_sha = {record.sha256: record for record in new_records} | known

        if new_records:
            try:
                await asyncio.to_thread(self._append_instances, new_records)
            except Exception as error:
                if not await self._landed_after_failure(new_records, error):
                    raise CatalogCommitFailedError(
                        f"{len(new_records)} rows were not written to "
                        f"{table_uri(self._bucket, INSTANCES)}"
                    ) from error
            self._stats["commits"] += 1
            self._stats["rows_written"] += len(new_records)
            self._commits_since_maintenance += 1
            version, table_id = await asyncio.to_thread(self._committed_version)
            assert self._index is not None
            if version == self._index.version() + 1:
                self._index.add(new_records, version, table_id)
            else:
                # Another writer committed too: ready() reopens the index, which reads
                # every file added since the version it reflects, before the next group.
                log.warning("the instances table moved by more than this commit")
                self._instances = None

        accessed = [uid for waiter in group for uid in waiter.accessed]
        if accessed:
            self._index.record_access(accessed, datetime.now(UTC))
        dirty = self._index.dirty_studies(STUDIES_PER_COMMIT)
        if dirty:
            # Rows stay dirty in the index until written: a failed upsert is retried with
            # the next group (or by the next writer). The callers' rows are durable in
            # `instances`, so they are not told that their files failed.
            try:
                await asyncio.to_thread(self._upsert_studies, [row for row, _ in dirty])
            except Exception as error:  # noqa: BLE001 - retried with the next group
                self._stats["studies_failures"] += 1
                log.error(
                    "updating %d rows of %s failed (%s: %s); retried with the next commit",
                    len(dirty),
                    table_uri(self._bucket, STUDIES),
                    type(error).__name__,
                    error,
                )
            else:
                self._index.mark_written((row.study_instance_uid, gen) for row, gen in dirty)
                self._stats["studies_commits"] += 1

        self._maintain_when_due()
        elapsed_ms = round((time.perf_counter() - started) * 1000)
        self._stats["flush_ms_total"] += elapsed_ms
        self._stats["flush_ms_max"] = max(self._stats["flush_ms_max"], elapsed_ms)
        self._stats["max_group_size"] = max(self._stats["max_group_size"], len(stored))
        self._stats["duplicates"] += sum(1 for d in decisions if d.status == "duplicate")

        committed = [Committed(d.file_id, d.status, d.version, by_sha[d.sha256]) for d in decisions]
        results: list[list[Committed]] = []
        start = 0
        for waiter in group:
            results.append(committed[start : start + len(waiter.stored)])
            start += len(waiter.stored)
        return results

    def _maintain_when_due(self) -> None:
        """Start a maintenance pass in the background every ``every_commits`` commits; group
        commits go on meanwhile (delta-rs resolves a compaction against appends)."""
        if self._commits_since_maintenance < self._maintenance.every_commits:
            return
        if self._maintaining is not None and not self._maintaining.done():
            return
        self._commits_since_maintenance = 0
        self._maintaining = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        try:
            await asyncio.to_thread(maintain, self._settings, self._bucket, self._maintenance)
            self._stats["maintenance_passes"] += 1
        except Exception as error:  # noqa: BLE001 - tried again after the next commits
            log.error(
                "catalog maintenance failed (%s: %s); it runs again later",
                type(error).__name__,
                error,
            )

    async def maintain_now(self) -> None:
        """Run a maintenance pass now and wait for it (for operators and tests)."""
        await self.ready()
        if self._maintaining is not None and not self._maintaining.done():
            await self._maintaining
        self._commits_since_maintenance = 0
        self._maintaining = asyncio.get_running_loop().create_task(self._maintain())
        await self._maintaining

    async def _landed_after_failure(
        self, records: Sequence[InstanceRecord], error: Exception
    ) -> bool:
        """After a failed append, whether its rows are in the table after all.

        A commit can fail after its log entry was written (the answer to the conditional
        PUT was lost). The table is the truth: re-read it. Raises when the table cannot be
        read either, so the caller knows the outcome is unknown.
        """
        log.error(
            "appending %d rows to %s failed (%s: %s); re-reading the table",
            len(records),
            table_uri(self._bucket, INSTANCES),
            type(error).__name__,
            error,
        )
        found = await asyncio.to_thread(
            self._fetch_records,
            {
                r.sha256: IndexEntry(r.sop_instance_uid, r.version, utc(r.ingest_time).date())
                for r in records
            },
        )
        if not found:
            return False
        if len(found) != len(records):  # a Delta commit is atomic: all or none
            raise RuntimeError("a commit's rows are partly in the table; the log is damaged")
        return True

    async def known_sha256(self, sha256s: list[str]) -> list[str]:
        """Those of ``sha256s`` that have a row in ``instances`` (for orphan reconciling)."""
        await self.ready()
        assert self._index is not None
        known = self._index.by_sha256s(sha256s)
        return [sha for sha in sha256s if sha in known or self._committing[sha]]

    # -- blocking I/O, run in a worker thread -------------------------------------------

    # Each write starts from the table's latest version: delta-rs rebases an append over
    # other writers' appends by itself, but a snapshot that missed a metadata change made
    # by someone else (a constraint added or dropped, a property) would fail every later
    # commit, or enforce a dropped constraint. The refresh costs one LIST of _delta_log.

    def _committed_version(self) -> tuple[int, str]:
        """The table's version and id just after our append."""
        assert self._instances is not None
        self._instances.update_incremental()
        return self._instances.version(), str(self._instances.metadata().id)

    def _append_instances(self, records: Sequence[InstanceRecord]) -> None:
        assert self._instances is not None  # ready() ran
        self._instances.update_incremental()
        write_deltalake(self._instances, instances_table(records), mode="append")

    def _upsert_studies(self, rows: Sequence[StudyRow]) -> None:
        uids = ", ".join(sql_string_literal(row.study_instance_uid) for row in rows)
        assert self._studies_table is not None  # ready() ran
        self._studies_table.update_incremental()
        write_deltalake(
            self._studies_table,
            studies_table(rows),
            mode="overwrite",
            predicate=f"study_instance_uid IN ({uids})",
        )

    def _fetch_records(self, entries: Mapping[str, IndexEntry]) -> dict[str, InstanceRecord]:
        # A fresh table object: the writer's own may be mid-commit in another thread.
        table = open_table(self._settings, self._bucket, INSTANCES)
        days = sorted({entry.ingest_date.isoformat() for entry in entries.values()})
        dataset = table.to_pyarrow_dataset(file_pruning_predicate=[("ingest_date", "in", days)])
        wanted = pa_dataset.field("sha256").isin(list(entries))
        found = {}
        for row in dataset.to_table(filter=wanted).to_pylist():
            record = record_from_row(row)
            if entries[record.sha256].version == record.version:
                found[record.sha256] = record
        return found

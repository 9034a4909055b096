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
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pa_dataset
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from cluster.catalog.index import CatalogIndex, file_rows, unseen_files
from cluster.catalog.maintenance import MaintenancePolicy, MaintenanceReport, maintain
from cluster.catalog.placements import Placement, placements_table
from cluster.catalog.queries import InstanceFilters, StudyFilters
from cluster.catalog.schema import (
    ACCESS,
    DEFAULT_BUCKET,
    INSTANCES,
    PLACEMENTS,
    STUDIES,
    CatalogCommitFailedError,
    Committed,
    Decision,
    IndexEntry,
    StudyRow,
    access_table,
    create_tables,
    instances_table,
    open_table,
    record_from_row,
    sql_string_literal,
    storage_options,
    studies_table,
    study_date_partition,
    study_from_row,
    table_uri,
    utc,
)
from workers.records import InstanceRecord, Stored, StoreSettings

log = logging.getLogger("strata.catalog")

# The most changed study rows rewritten by one Delta commit of a fold (new rows are
# appended, any number at once).
STUDIES_PER_UPSERT = 1000
# The Delta transaction id of the writer's folds into `studies` (idempotent appends).
FOLD_APP = "strata-catalog-fold"
# The most study rows one fold commit writes.
FOLD_ROWS = 50_000


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
    placed: list[Placement]
    future: asyncio.Future[list[Committed]]


class CatalogWriter:
    """The one writer of the catalog; wrap it with ``ray.remote`` as an async actor.

    Concurrent ``commit`` calls are queued and written together: one append to
    ``instances`` per group, flushed when ``max_batch`` rows are pending or the oldest has
    waited ``max_wait_s``; accesses and placements queued meanwhile are appended to
    ``access`` and ``placements`` with the same group. Each call returns only after the
    group holding its rows is committed, and raises if that commit failed.

    Duplicates, versions, lookups, searches and study rows come from the keyed index
    (``cluster.catalog.index``) in the SQLite file ``index_path`` on the writer's disk
    (a new temporary file, built from the tables, when not given); nothing held in memory
    grows with the archive. Study rows changed by commits are folded into the Delta
    ``studies`` table in the background every ``fold_interval_s`` (new studies appended,
    changed ones rewritten in their hash partition), never on the commit path; every
    ``maintenance.every_commits`` commits the tables are compacted, checkpointed and
    vacuumed, also in the background (``cluster.catalog.maintenance``).
    """

    def __init__(
        self,
        settings: StoreSettings,
        bucket: str = DEFAULT_BUCKET,
        max_batch: int = 64,
        max_wait_s: float = 0.05,
        index_path: str | None = None,
        maintenance: MaintenancePolicy | None = None,
        fold_interval_s: float = 10.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        if fold_interval_s <= 0:
            raise ValueError(f"fold_interval_s must be positive, got {fold_interval_s}")
        self._settings = settings
        self._bucket = bucket
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._fold_interval_s = fold_interval_s
        self._index_path = Path(index_path or Path(tempfile.mkdtemp()) / "index.sqlite")
        self._maintenance = maintenance or MaintenancePolicy()
        self._commits_since_maintenance = 0
        self._maintaining: asyncio.Task[None] | None = None
        self._folder: asyncio.Task[None] | None = None
        # A fold and a maintenance pass both rewrite `studies`: one at a time.
        self._studies_lock = asyncio.Lock()
        # The tables are opened on first use, not here: an actor whose constructor raises
        # (the store briefly down when Ray restarts it) would stay dead for good.
        self._tables: dict[str, DeltaTable] = {}
        self._reopen = False  # the index must catch up with the tables after this group
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
            "folds": 0,
            "maintenance_passes": 0,
            "maintenance_ms_max": 0,
        }

    # -- public, async ------------------------------------------------------------------

    async def ready(self) -> None:
        """Open the tables and load the index, once; raises (and is retried by the next
        call) while the store cannot be read."""
        async with self._opening:
            if not self._tables:
                # No fold or maintenance pass meanwhile: the index being caught up or
                # rebuilt in the thread must be the only one written to.
                async with self._studies_lock:
                    tables, index = await asyncio.to_thread(self._open_and_load)
                    # Swapped in on the event loop, all at once: nothing ever reads a
                    # half-built index (the load runs in a thread).
                    if self._index is not None:
                        self._index.close()
                    self._index = index
                    self._tables = tables
            if self._folder is None or self._folder.done():
                self._folder = asyncio.get_running_loop().create_task(self._fold_forever())

    def _open_and_load(self) -> tuple[dict[str, DeltaTable], CatalogIndex]:
        """The tables, and the index brought up to date with them (or rebuilt)."""
        create_tables(self._settings, self._bucket)
        tables = {
            name: open_table(self._settings, self._bucket, name)
            for name in (INSTANCES, STUDIES, ACCESS, PLACEMENTS)
        }
        studies = tables[STUDIES]

        def written_studies() -> list[StudyRow]:  # read only when the index is rebuilt
            return [study_from_row(row) for row in studies.to_pyarrow_table().to_pylist()]

        index = CatalogIndex.open(
            self._index_path, tables, storage_options(self._settings), written_studies
        )
        return tables, index

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
            return await self._enqueue(list(stored), [], [])
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
        """The newest version of a SOP Instance (or the given ``version``), None if absent;
        its ``tier``, ``object_key`` and ``key_id`` are where it lives now."""
        await self.ready()
        assert self._index is not None
        return self._index.by_sop(sop_instance_uid, version)

    async def study(self, study_instance_uid: str) -> StudyRow | None:
        """A study's current row (with its last access), None if unknown."""
        await self.ready()
        assert self._index is not None
        return self._index.study(study_instance_uid)

    async def find_studies(
        self, filters: StudyFilters, limit: int = 1000, offset: int = 0
    ) -> list[StudyRow]:
        """Current study rows matching ``filters``, from the index (what the doors search)."""
        await self.ready()
        assert self._index is not None
        return self._index.find_studies(filters.conditions(), limit, offset)

    async def find_instances(
        self, filters: InstanceFilters, limit: int = 1000, offset: int = 0
    ) -> list[InstanceRecord]:
        """Instance records matching ``filters``, from the index (what the doors search)."""
        await self.ready()
        assert self._index is not None
        return self._index.find_instances(filters.conditions(), limit, offset)

    async def record_access(self, study_uids: list[str]) -> None:
        """Record that these studies were read now, with the next group commit (appended
        to ``access``; the index's last access follows). Unknown study UIDs are recorded
        but change no study. Returns once committed; a caller may fire and forget."""
        if study_uids:
            await self.ready()
            await self._enqueue([], list(study_uids), [])

    async def place(self, placements: list[Placement]) -> None:
        """Record where objects live now (a tier move, a key rotation), with the next group
        commit; retrieval follows the new placement as soon as this returns. Raises
        ``ValueError`` naming the first SHA-256 the catalog does not hold."""
        if not placements:
            return
        await self.ready()
        assert self._index is not None
        known = self._index.by_sha256s([p.sha256 for p in placements])
        for placement in placements:
            record = known.get(placement.sha256)
            if record is None:
                raise ValueError(f"no catalogued object has SHA-256 {placement.sha256}")
            claimed = (placement.sop_instance_uid, placement.version, placement.study_instance_uid)
            if claimed != (record.sop_instance_uid, record.version, record.study_instance_uid):
                raise ValueError(
                    f"the placement of {placement.sha256} names another instance than the "
                    "catalogued object"
                )
        await self._enqueue([], [], list(placements))

    async def close(self) -> None:
        """Commit everything queued so far, fold the study rows, stop the background tasks."""
        if self._flusher is not None and not self._flusher.done():
            await self._enqueue([], [], [], flush_now=True)
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._folder is not None:
            self._folder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._folder
            self._folder = None
        if self._index is not None:
            await self.fold_now()

    async def stats(self) -> dict[str, int]:
        """Counters: Delta commits to each table, rows written, largest group, timings."""
        await self.ready()
        return dict(self._stats)

    # -- group commit -------------------------------------------------------------------

    async def _enqueue(
        self,
        stored: list[Stored],
        accessed: list[str],
        placed: list[Placement],
        *,
        flush_now: bool = False,
    ) -> list[Committed]:
        loop = asyncio.get_running_loop()
        if self._flusher is None or self._flusher.done():
            self._has_pending = asyncio.Event()
            self._batch_full = asyncio.Event()
            self._flusher = loop.create_task(self._flush_forever())
        assert self._has_pending is not None and self._batch_full is not None
        waiter = _Waiter(stored, accessed, placed, loop.create_future())
        if not self._pending:
            self._oldest_pending = loop.time()
        self._pending.append(waiter)
        self._pending_rows += max(len(stored), len(accessed), len(placed))
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
                # The index may be behind the tables (a commit whose answer was lost can
                # still have landed), so it catches up with them before any further
                # decision: a retry must never append a row twice.
                self._tables = {}
                for waiter in group:
                    if not waiter.future.done():
                        waiter.future.set_exception(error)
                continue
            for waiter, result in zip(group, results, strict=True):
                if isinstance(result, Exception):
                    waiter.future.set_exception(result)
                elif not waiter.future.done():
                    waiter.future.set_result(result)

    async def _flush(self, group: list[_Waiter]) -> list[list[Committed] | Exception]:
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
                await asyncio.to_thread(self._append, INSTANCES, instances_table(new_records))
            except Exception as error:
                if not await self._landed_after_failure(new_records, error):
                    raise CatalogCommitFailedError(
                        f"{len(new_records)} rows were not written to "
                        f"{table_uri(self._bucket, INSTANCES)}"
                    ) from error
            self._stats["commits"] += 1
            self._stats["rows_written"] += len(new_records)
            self._commits_since_maintenance += 1
            if await self._follows(INSTANCES, len(new_records)):
                self._index.add(new_records, self._tables[INSTANCES])

        # Accesses and placements: their own callers learn of a failure, not the group's.
        side: dict[str, Exception | None] = {ACCESS: None, PLACEMENTS: None}
        accessed = [uid for waiter in group for uid in waiter.accessed]
        placed = [p for waiter in group for p in waiter.placed]
        for name, rows in ((ACCESS, accessed), (PLACEMENTS, placed)):
            if not rows:
                continue
            batch = (
                access_table(accessed, datetime.now(UTC))
                if name == ACCESS
                else placements_table(placed)
            )
            try:
                await asyncio.to_thread(self._append, name, batch)
            except Exception as error:  # noqa: BLE001 - reported to these callers
                log.error(
                    "appending %d rows to %s failed (%s: %s)",
                    batch.num_rows,
                    table_uri(self._bucket, name),
                    type(error).__name__,
                    error,
                )
                side[name] = error
                self._reopen = True  # caught up before the next group
                continue
            if await self._follows(name, batch.num_rows):
                if name == ACCESS:
                    self._index.add_access(batch, self._tables[ACCESS])
                else:
                    self._index.add_placements(placed, self._tables[PLACEMENTS])

        if self._reopen:
            self._tables, self._reopen = {}, False
        self._maintain_when_due()
        elapsed_ms = round((time.perf_counter() - started) * 1000)
        self._stats["flush_ms_total"] += elapsed_ms
        self._stats["flush_ms_max"] = max(self._stats["flush_ms_max"], elapsed_ms)
        self._stats["max_group_size"] = max(self._stats["max_group_size"], len(stored))
        self._stats["duplicates"] += sum(1 for d in decisions if d.status == "duplicate")

        committed = [Committed(d.file_id, d.status, d.version, by_sha[d.sha256]) for d in decisions]
        results: list[list[Committed] | Exception] = []
        start = 0
        for waiter in group:
            failed = (side[ACCESS] if waiter.accessed else None) or (
                side[PLACEMENTS] if waiter.placed else None
            )
            results.append(failed or committed[start : start + len(waiter.stored)])
            start += len(waiter.stored)
        return results

    async def _follows(self, name: str, rows: int) -> bool:
        """After our append of ``rows`` rows to table ``name``: whether the index can take
        them as they are, the table holding nothing else it has not seen. Else (another
        writer committed too) the index catches up from the table: ``ready()`` reopens it
        before the next group."""
        assert self._index is not None
        table = self._tables[name]
        version = await asyncio.to_thread(self._refreshed_version, name)
        seen = self._index.version(name)
        if version == seen + 1:
            return True
        # The commits between are usually this writer's own maintenance (a compaction,
        # a vacuum, a property), which adds no row: then the one file the index does not
        # know is the one just appended.
        known = self._index.files(name)
        options = storage_options(self._settings)
        unseen = await asyncio.to_thread(unseen_files, table, options, seen, known)
        if len(unseen) == 1 and file_rows(table, unseen.pop()) == rows:
            return True
        log.warning("the %s table moved by more than this commit", name)
        self._reopen = True
        return False

    # -- studies: folded into Delta in the background ----------------------------------

    async def _fold_forever(self) -> None:
        while True:
            await asyncio.sleep(self._fold_interval_s)
            assert self._index is not None
            if self._index.dirty_count():
                await self.fold_now()

    async def fold_now(self, *, raise_errors: bool = False) -> None:
        """Write the study rows changed since the last fold to the Delta ``studies``
        table, and wait for it. Rows that fail stay dirty and are tried again later (an
        error is logged, or raised with ``raise_errors``)."""
        try:
            await self.ready()
            async with self._studies_lock:
                assert self._index is not None
                # Each fold's append carries a Delta transaction id (the fold's number):
                # after a crash between the append and the index's mark, the table says
                # whether it landed, so new rows are never appended twice.
                committed = await asyncio.to_thread(self._fold_version)
                if self._index.pending_folds():
                    self._index.settle_folds(committed)
                # Only the rows dirty now: under steady ingest more keep coming, and a
                # fold that waited for none would never end (nor let maintenance run).
                for _ in range(-(-self._index.dirty_count() // FOLD_ROWS)):
                    dirty = self._index.dirty_studies(FOLD_ROWS)
                    if not dirty:
                        break
                    new = [row for row, _, where in dirty if where is None]
                    committed += 1
                    self._index.begin_fold(new, committed)
                    await asyncio.to_thread(
                        self._write_studies,
                        new,
                        [(row, where) for row, _, where in dirty if where is not None],
                        committed,
                    )
                    self._index.mark_written((row, gen) for row, gen, _ in dirty)
                    self._stats["folds"] += 1
        except Exception as error:
            self._stats["studies_failures"] += 1
            log.error(
                "folding study rows into %s failed (%s: %s); tried again later",
                table_uri(self._bucket, STUDIES),
                type(error).__name__,
                error,
            )
            if raise_errors:
                raise

    def _fold_version(self) -> int:
        """The number of the last fold whose append reached ``studies``."""
        table = self._tables[STUDIES]
        table.update_incremental()
        return table.transaction_version(FOLD_APP) or 0

    def _write_studies(
        self, new: Sequence[StudyRow], changed: Sequence[tuple[StudyRow, date]], fold: int
    ) -> None:
        """New rows appended in one commit (fold number ``fold``); changed rows rewritten,
        a thousand per commit, each touching only the partitions (days of first ingest)
        of its rows."""
        table = self._tables[STUDIES]
        table.update_incremental()
        if new:
            write_deltalake(
                table,
                studies_table(new),
                mode="append",
                commit_properties=CommitProperties(app_transactions=[Transaction(FOLD_APP, fold)]),
            )
            self._stats["studies_commits"] += 1
        for start in range(0, len(changed), STUDIES_PER_UPSERT):
            chunk = changed[start : start + STUDIES_PER_UPSERT]
            rows = [row for row, _ in chunk]
            # Where Delta holds each row, and where it goes (the same day unless an
            # earlier instance of the study arrived late).
            days = {where for _, where in chunk} | {study_date_partition(r) for r in rows}
            listed = ", ".join(f"DATE '{day.isoformat()}'" for day in sorted(days))
            uids = ", ".join(sql_string_literal(r.study_instance_uid) for r in rows)
            table.update_incremental()
            write_deltalake(
                table,
                studies_table(rows),
                mode="overwrite",
                predicate=f"ingest_date IN ({listed}) AND study_instance_uid IN ({uids})",
            )
            self._stats["studies_commits"] += 1

    # -- maintenance --------------------------------------------------------------------

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
        async with self._studies_lock:
            try:
                report = await asyncio.to_thread(
                    maintain, self._settings, self._bucket, self._maintenance
                )
                self._count_pass(report)
            except Exception as error:  # noqa: BLE001 - tried again after the next commits
                log.error(
                    "catalog maintenance failed (%s: %s); it runs again later",
                    type(error).__name__,
                    error,
                )

    async def maintain_now(self) -> MaintenanceReport:
        """Fold the study rows, then run a maintenance pass now and wait for it (for
        operators and tests); unlike the background passes, a failure is raised."""
        await self.ready()
        if self._maintaining is not None and not self._maintaining.done():
            await self._maintaining
        await self.fold_now()
        self._commits_since_maintenance = 0
        async with self._studies_lock:
            report = await asyncio.to_thread(
                maintain, self._settings, self._bucket, self._maintenance
            )
        self._count_pass(report)
        return report

    def _count_pass(self, report: MaintenanceReport) -> None:
        self._stats["maintenance_passes"] += 1
        milliseconds = round(report.seconds * 1000)
        self._stats["maintenance_ms_max"] = max(self._stats["maintenance_ms_max"], milliseconds)

    async def wait_idle(self) -> None:
        """Wait for a background maintenance pass in progress (for benchmarks and tests)."""
        if self._maintaining is not None and not self._maintaining.done():
            await self._maintaining

    # -- failures -----------------------------------------------------------------------

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

    def _refreshed_version(self, name: str) -> int:
        """Table ``name``'s version just after our append."""
        table = self._tables[name]
        table.update_incremental()
        return table.version()

    def _append(self, name: str, rows: pa.Table) -> None:
        table = self._tables[name]  # ready() ran
        table.update_incremental()
        write_deltalake(table, rows, mode="append")

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

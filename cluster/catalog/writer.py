"""The one writer of the catalog: group commit to the journal, versions and duplicates,
flushes into Delta, study rows."""

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
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from cluster.catalog import journal
from cluster.catalog.index import SOURCES, CatalogIndex, data_files
from cluster.catalog.maintenance import MaintenancePolicy, MaintenanceReport, maintain
from cluster.catalog.placements import Placement, placements_table
from cluster.catalog.queries import InstanceFilters, StudyFilters
from cluster.catalog.schema import (
    ACCESS,
    DEFAULT_BUCKET,
    IDENTITY,
    INSTANCES,
    JOURNALED,
    PLACEMENTS,
    STUDIES,
    CatalogCommitFailedError,
    Committed,
    Decision,
    IndexEntry,
    StudyRow,
    access_table,
    create_tables,
    identity_table,
    instances_table,
    open_table,
    sql_string_literal,
    storage_options,
    studies_table,
    study_date_partition,
    study_from_row,
    table_uri,
    utc,
)
from workers.errors import cause_of
from workers.records import InstanceRecord, Stored, StoreSettings

log = logging.getLogger("strata.catalog")

# The most changed study rows rewritten by one Delta commit of a fold (new rows are
# appended, any number at once).
STUDIES_PER_UPSERT = 1000
# The Delta transaction id of the writer's folds into `studies` (idempotent appends).
FOLD_APP = "strata-catalog-fold"
# The most study rows one fold commit writes.
FOLD_ROWS = 50_000
# Journal group numbers are reserved in the index this many at a time.
SEQ_BLOCK = 1000


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


def flush_chunks(groups: Sequence[tuple[int, int]], max_rows: int) -> list[tuple[int, int]]:
    """Journal groups ``(seq, rows)``, in order, cut into runs of at most ``max_rows`` rows
    (a larger group alone): each run's ``(after, upto)``, the seqs it spans."""
    chunks: list[tuple[int, int]] = []
    after = start = groups[0][0] - 1 if groups else 0
    rows = 0
    for seq, count in groups:
        if rows and rows + count > max_rows:
            chunks.append((start, after))
            start, rows = after, 0
        rows += count
        after = seq
    if rows or (groups and not chunks):
        chunks.append((start, after))
    return chunks


class CatalogFlushError(Exception):
    """The journal could not be appended to a Delta table; it stays in the journal."""


@dataclass
class _Waiter:
    stored: list[Stored]
    accessed: list[str]
    placed: list[Placement]
    future: asyncio.Future[list[Committed]]


class CatalogWriter:
    """The one writer of the catalog; wrap it with ``ray.remote`` as an async actor.

    Concurrent ``commit`` calls are queued and committed together, as one group (flushed
    when ``max_batch`` rows are pending or the oldest has waited ``max_wait_s``): the
    group's rows of ``instances``, and the accesses and placements queued meanwhile, are
    written to the journal (``cluster.catalog.journal``: one small object per table in
    MinIO) and applied to the index. Each call returns only after its group is durable in
    the journal, and raises if that failed.

    In the background, the journal is flushed into the Delta tables once ``flush_rows``
    rows wait or the oldest has waited ``flush_interval_s`` (large appends, each row once),
    the study rows changed since are folded into ``studies`` (new rows appended, changed
    ones rewritten in their partition), and every ``maintenance.every_flushes`` flushes
    the tables are compacted, checkpointed and vacuumed (``cluster.catalog.maintenance``).

    Duplicates, versions, lookups, searches and study rows come from the keyed index
    (``cluster.catalog.index``) in the SQLite file ``index_path`` on the writer's disk
    (a new temporary file, built from the tables, when not given); nothing held in memory
    grows with the archive.
    """

    def __init__(
        self,
        settings: StoreSettings,
        bucket: str = DEFAULT_BUCKET,
        max_batch: int = 64,
        max_wait_s: float = 0.05,
        index_path: str | None = None,
        maintenance: MaintenancePolicy | None = None,
        flush_rows: int = 100_000,
        flush_interval_s: float = 300.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be at least 1, got {flush_rows}")
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be positive, got {flush_interval_s}")
        self._settings = settings
        self._bucket = bucket
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._flush_rows = flush_rows
        self._flush_interval_s = flush_interval_s
        self._index_path = Path(index_path or Path(tempfile.mkdtemp()) / "index.sqlite")
        self._maintenance = maintenance or MaintenancePolicy()
        self._flushes_since_maintenance = 0
        self._maintaining: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._flush_wanted = asyncio.Event()
        self._unflushed_since: float | None = None  # monotonic time of the oldest group
        # Flushes, folds and maintenance passes all commit to Delta: one at a time.
        self._delta_lock = asyncio.Lock()
        # The tables are opened on first use, not here: an actor whose constructor raises
        # (the store briefly down when Ray restarts it) would stay dead for good.
        self._tables: dict[str, DeltaTable] = {}
        self._opening = asyncio.Lock()
        self._committing: Counter[str] = Counter()
        self._seq = 0  # the next journal group's number, set by ready()
        self._reserved = 0  # numbers below this one are reserved in the index

        self._index: CatalogIndex | None = None

        self._pending: list[_Waiter] = []
        self._pending_rows = 0
        self._oldest_pending = 0.0
        self._has_pending: asyncio.Event | None = None
        self._batch_full: asyncio.Event | None = None
        self._committer: asyncio.Task[None] | None = None
        self._stats = {
            "commits": 0,
            "rows_written": 0,
            "duplicates": 0,
            "max_group_size": 0,
            "commit_ms_total": 0,
            "commit_ms_max": 0,
            "flushes": 0,
            "flushed_rows": 0,
            "flush_failures": 0,
            "studies_commits": 0,
            "studies_failures": 0,
            "folds": 0,
            "maintenance_passes": 0,
            "maintenance_ms_max": 0,
        }

    # -- public, async ------------------------------------------------------------------

    async def ready(self) -> None:
        """Open the tables, load the index and replay the journal, once; raises (and is
        retried by the next call) while the store cannot be read."""
        async with self._opening:
            if not self._tables:
                # No flush, fold or maintenance pass meanwhile: the index being caught up
                # or rebuilt in the thread must be the only one written to.
                async with self._delta_lock:
                    tables, index, seq = await asyncio.to_thread(self._open_and_load)
                    # Swapped in on the event loop, all at once: nothing ever reads a
                    # half-built index (the load runs in a thread).
                    if self._index is not None:
                        self._index.close()
                    self._index, self._tables = index, tables
                    self._seq = self._reserved = seq
                    if index.unflushed_rows():
                        self._unflushed_since = self._unflushed_since or time.monotonic()
                        self._flush_wanted.set()
            if self._background is None or self._background.done():
                self._background = asyncio.get_running_loop().create_task(self._flush_forever())

    def _open_and_load(self) -> tuple[dict[str, DeltaTable], CatalogIndex, int]:
        """The tables, the index brought up to date with them (or rebuilt) and with the
        journal, and the number of the next journal group."""
        create_tables(self._settings, self._bucket)
        tables = {
            name: open_table(self._settings, self._bucket, name) for name in (*SOURCES, STUDIES)
        }
        studies = tables[STUDIES]

        def written_studies() -> list[StudyRow]:  # read only when the index is rebuilt
            return [study_from_row(row) for row in studies.to_pyarrow_table().to_pylist()]

        index = CatalogIndex.open(
            self._index_path, tables, storage_options(self._settings), written_studies
        )
        last = index.last_seq()
        flushed = {
            name: tables[name].transaction_version(journal.JOURNAL_APP) or 0 for name in SOURCES
        }
        held: dict[str, set[int]] = {}
        for name in SOURCES:
            index.forget_flushed(name, flushed[name])
            held[name] = {seq for seq, _ in index.unflushed(name)}
        replayed = 0
        # Per-table objects first (an older writer's), then group objects, in order.
        for name in SOURCES:
            for entry in journal.entries(self._settings, self._bucket, name):
                last = max(last, entry.seq)
                if entry.seq <= flushed[name] or entry.seq in held[name]:
                    continue
                data = journal.read_bytes(self._settings, self._bucket, entry)
                index.apply(name, entry.seq, journal.decode(data, JOURNALED[name]), data)
                replayed += 1
            # A flush cut off before it deleted what it had appended.
            journal.delete_through(self._settings, self._bucket, name, flushed[name])
        done: list[int] = []
        for entry in journal.groups(self._settings, self._bucket):
            last = max(last, entry.seq)
            parts = journal.decode_group(journal.read_bytes(self._settings, self._bucket, entry))
            missing = {
                name: (journal.decode(data, JOURNALED[name]), data)
                for name, data in parts.items()
                if name in JOURNALED and entry.seq > flushed[name] and entry.seq not in held[name]
            }
            if missing:
                index.apply_group(entry.seq, missing)
                replayed += 1
            elif not any(entry.seq in held[name] for name in parts if name in held):
                done.append(entry.seq)  # every table holds its rows: a flush was cut off
        journal.delete_groups(self._settings, self._bucket, done)
        if replayed:
            log.info("catalog journal: %d groups replayed into the index", replayed)
        return tables, index, max(last, *flushed.values()) + 1

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

    async def lookup_sha256s(self, sha256s: list[str]) -> dict[str, InstanceRecord]:
        """The catalogued records of those of these files that are known, by SHA-256 (the
        front end's duplicate checks, many in one call)."""
        await self.ready()
        assert self._index is not None
        return self._index.by_sha256s(sha256s)

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
        return self._index.find_studies(filters, limit, offset)

    async def find_instances(
        self, filters: InstanceFilters, limit: int = 1000, offset: int = 0
    ) -> list[InstanceRecord]:
        """Instance records matching ``filters``, from the index (what the doors search)."""
        await self.ready()
        assert self._index is not None
        return self._index.find_instances(filters, limit, offset)

    async def identities(self, sha256s: list[str]) -> dict[str, bytes]:
        """The sealed identity boxes of these files (those it has), by SHA-256."""
        await self.ready()
        assert self._index is not None
        return self._index.identities(sha256s)

    async def study_boxes(self, study_uids: list[str]) -> dict[str, tuple[str, bytes]]:
        """Each study's latest file's SOP Instance UID and sealed identity box."""
        await self.ready()
        assert self._index is not None
        return self._index.study_boxes(study_uids)

    async def record_access(self, study_uids: list[str]) -> None:
        """Record that these studies were read now, with the next group commit (journaled
        for ``access``; the index's last access follows). Unknown study UIDs are recorded
        but change no study. Returns once committed; a caller may fire and forget."""
        if study_uids:
            await self.ready()
            await self._enqueue([], list(study_uids), [])

    async def place(self, placements: list[Placement], from_tiers: list[str] | None = None) -> None:
        """Record where objects live now (a tier move, a key rotation), with the next group
        commit; retrieval follows the new placement as soon as this returns. Raises
        ``ValueError`` naming the first SHA-256 the catalog does not hold, or (with
        ``from_tiers``) the first that is no longer in one of those tiers: a move decided
        on what the catalog said then never overrides what it says now."""
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
            if from_tiers is not None and record.tier not in from_tiers:
                raise ValueError(
                    f"the object {placement.sha256} is in the {record.tier} tier now, not in "
                    f"{' or '.join(from_tiers)} as when its move began"
                )
        await self._enqueue([], [], list(placements))

    async def plan_tiering(
        self,
        policy: Any,
        at: datetime | None = None,
        studies: list[str] | None = None,
        totals: bool = False,
        record: bool = True,
    ) -> Any:
        """The tier plan of ``policy`` (``cluster.tiering.due``): the studies due, or only
        ``studies``; as of ``at`` or now. ``record``: the plan the node carries out, which
        sets each study's next due moment (only as of now); a plan only shown changes
        nothing. Other calls are served between its batches; each batch runs under the
        lock an index reopen takes, and a plan whose index was reopened starts again."""
        from cluster.tiering.due import plan_steps  # the tiering engine uses the catalog

        for _ in range(3):
            await self.ready()
            index = self._index
            assert index is not None
            steps = plan_steps(index, policy, at, studies, totals=totals, record=record)
            while True:
                async with self._delta_lock:
                    if self._index is not index:
                        break  # reopened between two batches: the plan starts again
                    step = next(steps)
                if step is not None:
                    return step
                await asyncio.sleep(0)
        raise CatalogFlushError("the catalog index was reopened during three tier plans")

    async def close(self) -> None:
        """Commit everything queued so far, flush the journal into Delta and fold the study
        rows, and stop the background tasks (a later call starts them again)."""
        if self._committer is not None and not self._committer.done():
            await self._enqueue([], [], [], flush_now=True)
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
            self._background = None
        await self.wait_idle()
        if self._index is not None:
            await self.flush_now(maintain=False)

    async def stats(self) -> dict[str, int]:
        """Counters: group commits, rows, flushes, folds, maintenance, timings."""
        await self.ready()
        assert self._index is not None
        return {
            **self._stats,
            "unflushed_rows": self._index.unflushed_rows(),
            "next_seq": self._seq,
        }

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
        if self._committer is None or self._committer.done():
            self._has_pending = asyncio.Event()
            self._batch_full = asyncio.Event()
            self._committer = loop.create_task(self._commit_forever())
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

    async def _commit_forever(self) -> None:
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
                await self.ready()  # reloads the index after a failed commit
                results = await self._commit_group(group)
            except Exception as error:  # noqa: BLE001 - every waiter of the group learns of it
                # The index may be behind the journal (a group whose answer was lost can
                # still have landed), so it catches up with it before any further
                # decision: a retry must never store a row twice.
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

    async def _commit_group(self, group: list[_Waiter]) -> list[list[Committed] | Exception]:
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
        # A group's number is never given again, even when its write fails: a PUT that
        # seemed to fail can still land later, and must not be taken for another group.
        seq, self._seq = self._seq, self._seq + 1
        if seq >= self._reserved:
            self._reserved = seq + SEQ_BLOCK
            self._index.reserve(self._reserved)

        # Every table's rows of the group in one journal object: it lands or fails whole.
        parts: dict[str, pa.Table] = {}
        if new_records:
            boxes = {item.record.sha256: item.identity for item in stored if item.identity}
            identity = [
                (boxes[record.sha256], utc(record.ingest_time).date())
                for record in new_records
                if record.sha256 in boxes
            ]
            if identity:
                parts[IDENTITY] = identity_table(identity)
            parts[INSTANCES] = instances_table(new_records)
        accessed = [uid for waiter in group for uid in waiter.accessed]
        if accessed:
            parts[ACCESS] = access_table(accessed, datetime.now(UTC))
        placed = [p for waiter in group for p in waiter.placed]
        if placed:
            parts[PLACEMENTS] = placements_table(placed)
        if parts:
            await self._journal(seq, parts)
        if new_records:
            self._stats["commits"] += 1
            self._stats["rows_written"] += len(new_records)

        self._flush_when_due()
        elapsed_ms = round((time.perf_counter() - started) * 1000)
        self._stats["commit_ms_total"] += elapsed_ms
        self._stats["commit_ms_max"] = max(self._stats["commit_ms_max"], elapsed_ms)
        self._stats["max_group_size"] = max(self._stats["max_group_size"], len(stored))
        self._stats["duplicates"] += sum(1 for d in decisions if d.status == "duplicate")

        committed = [Committed(d.file_id, d.status, d.version, by_sha[d.sha256]) for d in decisions]
        results: list[list[Committed] | Exception] = []
        start = 0
        for waiter in group:
            results.append(committed[start : start + len(waiter.stored)])
            start += len(waiter.stored)
        return results

    async def _journal(self, seq: int, parts: dict[str, pa.Table]) -> None:
        """Write every table's rows of group ``seq`` as its journal object and apply them
        to the index. Raises CatalogCommitFailedError only when the store says the object
        is not there: then nothing of the group was committed."""
        encoded = {name: journal.encode(rows) for name, rows in parts.items()}
        data = journal.encode_group(encoded)
        try:
            await asyncio.to_thread(journal.write_group, self._settings, self._bucket, seq, data)
        except Exception as error:
            log.error(
                "writing journal group %d (%s) to %s failed (%s); asking the store "
                "whether it landed",
                seq,
                ", ".join(f"{rows.num_rows} rows of {name}" for name, rows in parts.items()),
                table_uri(self._bucket, journal.PREFIX),
                cause_of(error),
            )
            # Raises when the store cannot tell either: the outcome is unknown.
            landed = await asyncio.to_thread(
                journal.group_landed, self._settings, self._bucket, seq
            )
            if not landed:
                raise CatalogCommitFailedError(
                    f"journal group {seq} was not written to {table_uri(self._bucket, '')}"
                ) from error
        assert self._index is not None
        self._index.apply_group(seq, {name: (rows, encoded[name]) for name, rows in parts.items()})
        if self._unflushed_since is None:
            self._unflushed_since = time.monotonic()

    # -- flushing the journal into Delta, and folding study rows -----------------------

    def _flush_when_due(self) -> None:
        assert self._index is not None
        waited = time.monotonic() - (self._unflushed_since or time.monotonic())
        if waited >= self._flush_interval_s or self._index.unflushed_rows() >= self._flush_rows:
            self._flush_wanted.set()

    async def _flush_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wanted.wait(), self._flush_interval_s / 4)
            self._flush_wanted.clear()
            waited = time.monotonic() - (self._unflushed_since or time.monotonic())
            assert self._index is not None
            due = waited >= self._flush_interval_s
            if due or self._index.unflushed_rows() >= self._flush_rows:
                await self.flush_now()

    async def flush_now(self, *, raise_errors: bool = False, maintain: bool = True) -> None:
        """Append the journal to the Delta tables, fold the study rows changed since, and
        start a maintenance pass when one is due (and ``maintain``); wait for the flush
        and the fold. What
        fails stays in the journal (or dirty) and is tried again later (an error is logged,
        or raised with ``raise_errors``)."""
        try:
            await self.ready()
            async with self._delta_lock:
                tables = self._tables  # as they are now, whatever a failure sets meanwhile
                flushed_through = 0
                for name in SOURCES:
                    flushed_through = max(flushed_through, await self._flush_table(tables, name))
                assert self._index is not None
                # Group objects every table of which is flushed now. Groups above the
                # last flushed are left alone: one may be being written right now.
                held = self._index.unflushed_groups()
                done = [
                    entry.seq
                    for entry in await asyncio.to_thread(
                        lambda: list(journal.groups(self._settings, self._bucket))
                    )
                    if entry.seq <= flushed_through and entry.seq not in held
                ]
                await asyncio.to_thread(journal.delete_groups, self._settings, self._bucket, done)
                if not self._index.unflushed_rows():
                    self._unflushed_since = None
            self._stats["flushes"] += 1
            self._flushes_since_maintenance += 1
        except Exception as error:
            self._stats["flush_failures"] += 1
            log.error(
                "flushing the catalog journal into %s failed (%s); tried again later",
                table_uri(self._bucket, ""),
                cause_of(error),
            )
            if raise_errors:
                raise CatalogFlushError(cause_of(error)) from error
            return
        await self.fold_now(raise_errors=raise_errors)
        if maintain:
            self._maintain_when_due()

    async def _flush_table(self, tables: Mapping[str, DeltaTable], name: str) -> int:
        """Append table ``name``'s unflushed journal groups to it; returns the number of
        the last group appended (0 for none)."""
        assert self._index is not None
        groups = self._index.unflushed(name)
        through = 0
        for after, upto in flush_chunks(groups, self._flush_rows):
            blobs = self._index.journal_blobs(name, after, upto)
            seen = self._index.version(name)
            version = await asyncio.to_thread(_append_journal, tables[name], blobs, upto, name)
            # Anything but our own append since the version the index reflects (another
            # writer's rows, or our flush that had landed before its answer was lost) is
            # read by a reopened index before the next group.
            foreign = (
                await asyncio.to_thread(self._foreign_files, tables[name], seen, version)
                if version is not None
                else None
            )
            if version is None or foreign:
                log.warning("the %s table holds commits the index has not read", name)
                self._tables = {}
                return through
            self._index.flushed(name, upto, tables[name])
            through = upto
            self._stats["flushed_rows"] += sum(rows for seq, rows in groups if after < seq <= upto)
            await asyncio.to_thread(
                journal.delete_through, self._settings, self._bucket, name, upto
            )
        return through

    def _foreign_files(self, table: DeltaTable, seen: int, own: int | None) -> set[str]:
        """Files that commits to ``table`` after version ``seen``, other than ``own``, added
        (raises StaleIndexError when that cannot be told)."""
        table.update_incremental()
        skip = {own} if own is not None else set()
        return data_files(table, storage_options(self._settings), seen, skip)

    async def fold_now(self, *, raise_errors: bool = False) -> None:
        """Write the study rows changed since the last fold to the Delta ``studies``
        table, and wait for it. Rows that fail stay dirty and are tried again later (an
        error is logged, or raised with ``raise_errors``)."""
        try:
            await self.ready()
            async with self._delta_lock:
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
                "folding study rows into %s failed (%s); tried again later",
                table_uri(self._bucket, STUDIES),
                cause_of(error),
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
        """Start a maintenance pass in the background every ``every_flushes`` flushes;
        group commits go on meanwhile (they touch no Delta table)."""
        if self._flushes_since_maintenance < self._maintenance.every_flushes:
            return
        if self._maintaining is not None and not self._maintaining.done():
            return
        self._flushes_since_maintenance = 0
        self._maintaining = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        async with self._delta_lock:
            try:
                await self._pass()
            except Exception as error:  # noqa: BLE001 - tried again after the next flushes
                log.error("catalog maintenance failed (%s); it runs again later", cause_of(error))

    async def maintain_now(self) -> MaintenanceReport:
        """Flush the journal and fold the study rows, then run a maintenance pass now and
        wait for it (for operators and tests); unlike the background passes, a failure is
        raised."""
        await self.ready()
        await self.wait_idle()
        await self.flush_now(raise_errors=True, maintain=False)
        self._flushes_since_maintenance = 0
        async with self._delta_lock:
            return await self._pass()

    async def _pass(self) -> MaintenanceReport:
        """One maintenance pass (the Delta lock held); then the index reflects the tables'
        versions after it, unless someone else's rows came in (then it is reopened)."""
        assert self._index is not None
        seen = {name: self._index.version(name) for name in SOURCES}
        tables = self._tables
        report, foreign = await asyncio.to_thread(self._maintain_tables, tables, seen)
        self._stats["maintenance_passes"] += 1
        milliseconds = round(report.seconds * 1000)
        self._stats["maintenance_ms_max"] = max(self._stats["maintenance_ms_max"], milliseconds)
        if foreign:
            self._tables = {}  # read by a reopened index before the next group
        else:
            for name in SOURCES:
                self._index.advance(name, tables[name])
        return report

    def _maintain_tables(
        self, tables: Mapping[str, DeltaTable], seen: Mapping[str, int]
    ) -> tuple[MaintenanceReport, bool]:
        """The pass, and whether the tables held rows from others the index has not read.

        Checked first: a pass's cleanup removes log entries older than the retention
        window, after which the commits before it could not be told apart."""
        foreign = any(self._foreign_files(tables[name], seen[name], None) for name in SOURCES)
        report = maintain(self._settings, self._bucket, self._maintenance)
        for name in SOURCES:
            tables[name].update_incremental()
        return report, foreign

    async def wait_idle(self) -> None:
        """Wait for a background maintenance pass in progress (for benchmarks and tests)."""
        if self._maintaining is not None and not self._maintaining.done():
            await self._maintaining

    # -- the reconciler -----------------------------------------------------------------

    async def referenced_packs(self, tier: str, packs: list[tuple[str, list[str]]]) -> list[str]:
        """Those of ``packs`` (key, the SHA-256 of each member) in tier ``tier`` that a
        row names where it lives now, or that hold a file being committed (for orphan
        reconciling)."""
        await self.ready()
        assert self._index is not None
        found = self._index.by_sha256s([sha for _, shas in packs for sha in shas])
        live = []
        for key, shas in packs:
            named = any(
                (record := found.get(sha)) is not None
                and record.tier == tier
                and record.object_key == key
                for sha in shas
            )
            if named or any(self._committing[sha] for sha in shas):
                live.append(key)
        return live


def _append_journal(
    table: DeltaTable, blobs: list[tuple[int, bytes]], upto: int, name: str
) -> int | None:
    """Append journal groups (``(seq, bytes)``) through ``upto`` to ``table`` (table
    ``name``) in one commit, with ``upto`` as its transaction version, unless they landed
    already (a flush whose answer was lost); returns the version made, None if none was."""
    table.update_incremental()
    flushed = table.transaction_version(journal.JOURNAL_APP) or 0
    rows = [journal.decode(data, JOURNALED[name]) for seq, data in blobs if seq > flushed]
    if flushed >= upto or not rows:
        return None
    write_deltalake(
        table,
        pa.concat_tables(rows),
        mode="append",
        schema_mode="merge",  # a table written before later columns gains them
        commit_properties=CommitProperties(
            app_transactions=[Transaction(journal.JOURNAL_APP, upto)]
        ),
    )
    return table.version()

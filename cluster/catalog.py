"""The catalog: two Delta Lake tables on MinIO, written by one actor, read with SQL.

Tables live at ``s3://<bucket>/instances`` and ``s3://<bucket>/studies`` (bucket
``strata-catalog`` by default). No column holds a patient name, birth date or raw
identifier: patients and accessions appear only as keyed HMAC pseudonyms.

``instances`` — one row per stored object; append-only (``delta.appendOnly``),
partitioned by ``ingest_date``. The columns are the fields of
``workers.records.InstanceRecord``:

| column | type | meaning |
| --- | --- | --- |
| sop_instance_uid | string | SOP Instance UID (0008,0018) |
| series_instance_uid | string | Series Instance UID (0020,000E) |
| study_instance_uid | string | Study Instance UID (0020,000D) |
| sop_class_uid | string | SOP Class UID (0008,0016) |
| modality | string | Modality (0008,0060) |
| body_part | string | Body Part Examined (0018,0015), "" when absent |
| study_date | date, nullable | Study Date (0008,0020) |
| patient_pseudonym | string | keyed HMAC of the Patient ID |
| accession_pseudonym | string | keyed HMAC of the Accession Number |
| transfer_syntax_in | string | transfer syntax UID as received |
| transfer_syntax_stored | string | transfer syntax UID of the stored pixel data |
| storage_action | string | "transcoded" or "as_received" |
| storage_note | string | why, in a sentence |
| frames, rows, columns | int32 | image geometry |
| bits_allocated, bits_stored, samples_per_pixel | int32 | pixel layout |
| photometric_interpretation | string | e.g. "MONOCHROME2" |
| bytes_in | int64 | size of the file as received |
| bytes_stored | int64 | size of the encrypted object |
| sha256 | string | hex SHA-256 of the file as received |
| object_key | string | key of the object in its tier's bucket |
| tier | string | tier the object was written to |
| key_id | string | key-encryption key that wraps the object's data key |
| ingest_time | timestamp[us, UTC] | when the pipeline stored the object (naive = UTC) |
| version | int32 | 1 for a SOP Instance UID's first file, n + 1 for each later different one |
| ingest_date | date | UTC date of ingest_time; the partition column |

``studies`` — one row per study, rewritten in place on every commit that touches it:

| column | type | meaning |
| --- | --- | --- |
| study_instance_uid | string | Study Instance UID |
| patient_pseudonym | string | from the study's first stored instance |
| accession_pseudonym | string | from the study's first stored instance |
| study_date | date, nullable | earliest non-null Study Date of its instances |
| modalities | list<string> | distinct non-empty modalities, sorted (see below) |
| instance_count | int64 | distinct SOP Instance UIDs (versions of one instance count once) |
| series_count | int64 | distinct Series Instance UIDs |
| bytes_in | int64 | sum over every stored object, all versions |
| bytes_stored | int64 | sum over every stored object, all versions |
| tier | string | tier of the most recently stored instance |
| first_ingest_time | timestamp[us, UTC] | earliest ingest_time |
| last_ingest_time | timestamp[us, UTC] | latest ingest_time |
| last_access_time | timestamp[us, UTC], nullable | last retrieval, null if never read |

``modalities`` is a list rather than a comma-joined string so that every engine filters it
natively (``list_contains`` in DuckDB, ``list.contains`` in Polars, ``array_contains`` in
Spark and Trino) without string matching that "MR" would also find in "XMR".

An analyst reads the catalog with plain DuckDB or Polars (``opts`` as returned by
``storage_options(settings)``: endpoint, credentials, ``AWS_ALLOW_HTTP``)::

    import duckdb, polars as pl
    from deltalake import DeltaTable
    uri = "s3://strata-catalog"
    studies = pl.read_delta(f"{uri}/studies", storage_options=opts)
    instances = DeltaTable(f"{uri}/instances", storage_options=opts).to_pyarrow_dataset()
    duckdb.sql("SELECT modality, count(*), sum(bytes_stored) FROM instances GROUP BY 1").show()

Writes go through one ``CatalogWriter`` actor per cluster, which groups concurrent
commits into one Delta commit per table. ``studies`` is upserted with
``write_deltalake(mode="overwrite", predicate=...)`` rather than ``merge``: delta-rs
1.6's merge (and delete) write string columns as Arrow ``string_view``, and PyArrow
(so DuckDB over a PyArrow dataset, and ``to_pyarrow_table(filters=...)``) cannot
compare ``string_view`` with ``string`` (delta-rs issue #4579).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal, NamedTuple

import duckdb
import pyarrow as pa
import pyarrow.dataset as pa_dataset
from deltalake import DeltaTable, write_deltalake

from workers.records import InstanceRecord, Stored, StoreSettings
from workers.store import ensure_bucket

log = logging.getLogger("strata.catalog")

DEFAULT_BUCKET = "strata-catalog"
INSTANCES = "instances"
STUDIES = "studies"

INSTANCES_SCHEMA = pa.schema(
    [
        pa.field("sop_instance_uid", pa.string(), nullable=False),
        pa.field("series_instance_uid", pa.string(), nullable=False),
        pa.field("study_instance_uid", pa.string(), nullable=False),
        pa.field("sop_class_uid", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("body_part", pa.string(), nullable=False),
        pa.field("study_date", pa.date32(), nullable=True),
        pa.field("patient_pseudonym", pa.string(), nullable=False),
        pa.field("accession_pseudonym", pa.string(), nullable=False),
        pa.field("transfer_syntax_in", pa.string(), nullable=False),
        pa.field("transfer_syntax_stored", pa.string(), nullable=False),
        pa.field("storage_action", pa.string(), nullable=False),
        pa.field("storage_note", pa.string(), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("rows", pa.int32(), nullable=False),
        pa.field("columns", pa.int32(), nullable=False),
        pa.field("bits_allocated", pa.int32(), nullable=False),
        pa.field("bits_stored", pa.int32(), nullable=False),
        pa.field("samples_per_pixel", pa.int32(), nullable=False),
        pa.field("photometric_interpretation", pa.string(), nullable=False),
        pa.field("bytes_in", pa.int64(), nullable=False),
        pa.field("bytes_stored", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("object_key", pa.string(), nullable=False),
        pa.field("tier", pa.string(), nullable=False),
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("ingest_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("ingest_date", pa.date32(), nullable=False),
    ]
)

STUDIES_SCHEMA = pa.schema(
    [
        pa.field("study_instance_uid", pa.string(), nullable=False),
        pa.field("patient_pseudonym", pa.string(), nullable=False),
        pa.field("accession_pseudonym", pa.string(), nullable=False),
        pa.field("study_date", pa.date32(), nullable=True),
        pa.field("modalities", pa.list_(pa.string()), nullable=False),
        pa.field("instance_count", pa.int64(), nullable=False),
        pa.field("series_count", pa.int64(), nullable=False),
        pa.field("bytes_in", pa.int64(), nullable=False),
        pa.field("bytes_stored", pa.int64(), nullable=False),
        pa.field("tier", pa.string(), nullable=False),
        pa.field("first_ingest_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("last_ingest_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("last_access_time", pa.timestamp("us", tz="UTC"), nullable=True),
    ]
)

_RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(InstanceRecord))
_RECENT_RECORDS = 4096


class CatalogCommitFailedError(Exception):
    """A group's rows were not written to ``instances``; checked against the table itself.

    Raised only when the writer re-read the table after the failure and found none of the
    group's rows in it, so a caller may answer "not stored" with certainty.
    """


@dataclass(frozen=True)
class Committed:
    """What the catalog did with one stored file; returned only once it is durable.

    ``record`` carries the assigned ``version``; for a duplicate it is the record that
    was already in the catalog for the same SHA-256.
    """

    file_id: str
    status: Literal["stored", "duplicate"]
    version: int
    record: InstanceRecord


@dataclass(frozen=True)
class StudyRow:
    """One row of the ``studies`` table (columns documented in the module docstring)."""

    study_instance_uid: str
    patient_pseudonym: str
    accession_pseudonym: str
    study_date: date | None
    modalities: tuple[str, ...]
    instance_count: int
    series_count: int
    bytes_in: int
    bytes_stored: int
    tier: str
    first_ingest_time: datetime
    last_ingest_time: datetime
    last_access_time: datetime | None


class IndexEntry(NamedTuple):
    """Where the writer finds an already catalogued file (by its SHA-256)."""

    sop_instance_uid: str
    version: int
    ingest_date: date


class Decision(NamedTuple):
    """The versioning outcome for one stored file within a commit group."""

    file_id: str
    status: Literal["stored", "duplicate"]
    sha256: str
    version: int


# --- storage -------------------------------------------------------------------------


def storage_options(settings: StoreSettings) -> dict[str, str]:
    """deltalake/object_store options for the MinIO described by ``settings``."""
    scheme = "https" if settings.secure else "http"
    return {
        "AWS_ENDPOINT_URL": f"{scheme}://{settings.endpoint}",
        "AWS_ACCESS_KEY_ID": settings.access_key,
        "AWS_SECRET_ACCESS_KEY": settings.secret_key,
        "AWS_REGION": settings.region,
        "AWS_ALLOW_HTTP": "false" if settings.secure else "true",
        # Commits are made safe by S3 conditional put (PUT If-None-Match: * on the
        # next _delta_log/NNN.json), which MinIO implements atomically: a second writer
        # that races us gets "already exists" and rebases or fails, never overwrites.
        # AWS_S3_ALLOW_UNSAFE_RENAME would instead check-then-copy with no lock, so two
        # writers could both "win" and one commit would be silently lost. We run one
        # writer, but a restarted actor overlapping its predecessor or an analyst's
        # manual write must not corrupt the log. (Conditional put is delta-rs 1.x's
        # default for S3; it is set here so that the choice is explicit.)
        "aws_conditional_put": "etag",
    }


def table_uri(bucket: str, table: str) -> str:
    """The ``s3://`` URI of one catalog table."""
    return f"s3://{bucket}/{table}"


def _open_table(settings: StoreSettings, bucket: str, table: str) -> DeltaTable:
    return DeltaTable(table_uri(bucket, table), storage_options=storage_options(settings))


def create_tables(settings: StoreSettings, bucket: str = DEFAULT_BUCKET) -> None:
    """Create the bucket and both tables if they do not exist yet."""
    ensure_bucket(settings, bucket)
    options = storage_options(settings)
    DeltaTable.create(
        table_uri(bucket, INSTANCES),
        INSTANCES_SCHEMA,
        mode="ignore",
        partition_by=["ingest_date"],
        name=INSTANCES,
        description="One row per stored object; append-only.",
        configuration={"delta.appendOnly": "true"},
        storage_options=options,
    )
    DeltaTable.create(
        table_uri(bucket, STUDIES),
        STUDIES_SCHEMA,
        mode="ignore",
        name=STUDIES,
        description="One row per study: counts, sizes, tier, last access.",
        storage_options=options,
    )


# --- pure logic (tested without servers) ---------------------------------------------


def utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


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


def fold_studies(
    studies: Mapping[str, StudyRow],
    series: Mapping[str, set[str]],
    records: Iterable[InstanceRecord],
) -> tuple[dict[str, StudyRow], dict[str, set[str]]]:
    """Fold newly stored records into their studies' rows.

    Returns the updated rows of the studies that ``records`` touch and, per study, the
    Series Instance UIDs that are new to it. Inputs are not modified.
    """
    updated: dict[str, StudyRow] = {}
    new_series: dict[str, set[str]] = {}
    for record in records:
        uid = record.study_instance_uid
        current = updated.get(uid) or studies.get(uid)
        known_series = series.get(uid, set())
        added = new_series.setdefault(uid, set())
        is_new_series = (
            record.series_instance_uid not in known_series
            and record.series_instance_uid not in added
        )
        if is_new_series:
            added.add(record.series_instance_uid)
        modalities = {record.modality} if record.modality else set()
        ingest_time = utc(record.ingest_time)
        if current is None:
            updated[uid] = StudyRow(
                study_instance_uid=uid,
                patient_pseudonym=record.patient_pseudonym,
                accession_pseudonym=record.accession_pseudonym,
                study_date=record.study_date,
                modalities=tuple(sorted(modalities)),
                instance_count=1 if record.version == 1 else 0,
                series_count=1,
                bytes_in=record.bytes_in,
                bytes_stored=record.bytes_stored,
                tier=record.tier,
                first_ingest_time=ingest_time,
                last_ingest_time=ingest_time,
                last_access_time=None,
            )
            continue
        study_dates = [day for day in (current.study_date, record.study_date) if day is not None]
        updated[uid] = dataclasses.replace(
            current,
            study_date=min(study_dates) if study_dates else None,
            modalities=tuple(sorted(set(current.modalities) | modalities)),
            instance_count=current.instance_count + (1 if record.version == 1 else 0),
            series_count=current.series_count + (1 if is_new_series else 0),
            bytes_in=current.bytes_in + record.bytes_in,
            bytes_stored=current.bytes_stored + record.bytes_stored,
            tier=record.tier,
            first_ingest_time=min(current.first_ingest_time, ingest_time),
            last_ingest_time=max(current.last_ingest_time, ingest_time),
        )
    return updated, {uid: added for uid, added in new_series.items() if added}


def sql_string_literal(value: str) -> str:
    """``value`` as a SQL string literal for a delta-rs predicate.

    delta-rs takes predicates as SQL text with no bind parameters. Its parser (DataFusion,
    generic dialect) treats backslash literally, so doubling single quotes is a complete
    escape; a test writes and matches quote- and backslash-laden values.
    """
    return "'" + value.replace("'", "''") + "'"


def _instances_table(records: Sequence[InstanceRecord]) -> pa.Table:
    rows = []
    for record in records:
        row: dict[str, Any] = {name: getattr(record, name) for name in _RECORD_FIELDS}
        row["ingest_date"] = utc(record.ingest_time).date()
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA)


def _studies_table(rows: Iterable[StudyRow]) -> pa.Table:
    return pa.Table.from_pylist(
        [dataclasses.asdict(row) | {"modalities": list(row.modalities)} for row in rows],
        schema=STUDIES_SCHEMA,
    )


def _record_from_row(row: Mapping[str, Any]) -> InstanceRecord:
    values = {name: row[name] for name in _RECORD_FIELDS}
    values["ingest_time"] = utc(values["ingest_time"])
    return InstanceRecord(**values)


def _study_from_row(row: Mapping[str, Any]) -> StudyRow:
    last_access = row["last_access_time"]
    return StudyRow(
        study_instance_uid=row["study_instance_uid"],
        patient_pseudonym=row["patient_pseudonym"],
        accession_pseudonym=row["accession_pseudonym"],
        study_date=row["study_date"],
        modalities=tuple(row["modalities"] or ()),
        instance_count=int(row["instance_count"]),
        series_count=int(row["series_count"]),
        bytes_in=int(row["bytes_in"]),
        bytes_stored=int(row["bytes_stored"]),
        tier=row["tier"],
        first_ingest_time=utc(row["first_ingest_time"]),
        last_ingest_time=utc(row["last_ingest_time"]),
        last_access_time=utc(last_access) if last_access is not None else None,
    )


# Derived columns of `studies`, recomputed from `instances` when the writer starts so that
# a crash between the two tables' commits is repaired. Same rules as fold_studies.
_DERIVE_STUDIES_SQL = """
SELECT study_instance_uid,
       arg_min(patient_pseudonym, ingest_time) AS patient_pseudonym,
       arg_min(accession_pseudonym, ingest_time) AS accession_pseudonym,
       min(study_date) AS study_date,
       coalesce(list_sort(list(DISTINCT modality) FILTER (WHERE modality <> '')), []::VARCHAR[])
           AS modalities,
       count(*) FILTER (WHERE version = 1) AS instance_count,
       count(DISTINCT series_instance_uid) AS series_count,
       sum(bytes_in) AS bytes_in,
       sum(bytes_stored) AS bytes_stored,
       arg_max(tier, ingest_time) AS tier,
       min(ingest_time) AS first_ingest_time,
       max(ingest_time) AS last_ingest_time,
       NULL AS last_access_time
FROM instances
GROUP BY study_instance_uid
"""

_DERIVED_COLUMNS = (
    "modalities",
    "instance_count",
    "series_count",
    "bytes_in",
    "bytes_stored",
    "first_ingest_time",
    "last_ingest_time",
)


def _rows(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description or ()]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


# --- the writer ----------------------------------------------------------------------


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
    succeeded, the callers still get the error: their rows are durable, a retry is
    answered "duplicate", and the study rows are rewritten with the next group (or
    repaired from ``instances`` when a writer starts).

    The writer keeps every SHA-256 in memory (SHA-256 → SOP Instance UID, version,
    ingest date) plus each study's row and series UIDs, loaded from the tables at start.
    """

    def __init__(
        self,
        settings: StoreSettings,
        bucket: str = DEFAULT_BUCKET,
        max_batch: int = 64,
        max_wait_s: float = 0.05,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self._settings = settings
        self._bucket = bucket
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        # The tables are opened on first use, not here: an actor whose constructor raises
        # (the store briefly down when Ray restarts it) would stay dead for good.
        self._instances: DeltaTable | None = None
        self._studies_table: DeltaTable | None = None
        self._opening = asyncio.Lock()
        self._committing: Counter[str] = Counter()

        self._index: dict[str, IndexEntry] = {}
        self._max_versions: dict[str, int] = {}
        self._studies: dict[str, StudyRow] = {}
        self._series: dict[str, set[str]] = {}
        self._recent: OrderedDict[str, InstanceRecord] = OrderedDict()
        self._dirty_studies: set[str] = set()

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
                self._index = fresh._index
                self._max_versions = fresh._max_versions
                self._studies = fresh._studies
                self._series = fresh._series
                self._dirty_studies = fresh._dirty_studies
                self._recent.clear()
                self._instances = fresh._instances

    def _open_and_load(self) -> CatalogWriter:
        """A writer's state loaded from the tables, built apart from this one's."""
        create_tables(self._settings, self._bucket)
        fresh = CatalogWriter.__new__(CatalogWriter)
        fresh._settings, fresh._bucket = self._settings, self._bucket
        fresh._studies_table = _open_table(self._settings, self._bucket, STUDIES)
        fresh._index, fresh._max_versions, fresh._studies = {}, {}, {}
        fresh._series, fresh._dirty_studies = {}, set()
        instances = _open_table(self._settings, self._bucket, INSTANCES)
        fresh._load(instances)
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
            _instances_table([item.record for item in stored])
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
        entry = self._index.get(sha256)
        if entry is None:
            return None
        recent = self._recent.get(sha256)
        if recent is not None:
            return recent
        found = await asyncio.to_thread(self._fetch_records, {sha256: entry})
        return found.get(sha256)

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
                # The in-memory index may be behind the table (a commit whose answer was
                # lost can still have landed), so it is rebuilt from the table before any
                # further decision: a retry must never append a row twice.
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
        decisions, new_records = plan_group(stored, self._index, self._max_versions)
        # Every record a caller gets back is resolved before anything is written.
        by_sha = {record.sha256: record for record in new_records}
        missing: dict[str, IndexEntry] = {}
        for decision in decisions:
            if decision.sha256 in by_sha:
                continue
            recent = self._recent.get(decision.sha256)
            if recent is not None:
                by_sha[decision.sha256] = recent
            else:
                missing[decision.sha256] = self._index[decision.sha256]
        if missing:
            fetched = await asyncio.to_thread(self._fetch_records, missing)
            absent = missing.keys() - fetched.keys()
            if absent:
                raise LookupError(
                    f"{len(absent)} SHA-256 in the catalog index have no row in "
                    f"{table_uri(self._bucket, INSTANCES)}; the index is stale"
                )
            by_sha.update(fetched)

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
            self._apply(new_records)

        now = datetime.now(UTC)
        for waiter in group:
            for study_uid in waiter.accessed:
                current = self._studies.get(study_uid)
                if current is not None:
                    self._studies[study_uid] = dataclasses.replace(current, last_access_time=now)
                    self._dirty_studies.add(study_uid)
        if self._dirty_studies:
            # Rows stay dirty until written: a failed upsert is retried with the next group
            # (and repaired from `instances` when a writer starts). The callers' rows are
            # durable in `instances`, so they are not told that their files failed.
            dirty = sorted(self._dirty_studies)
            try:
                await asyncio.to_thread(self._upsert_studies, [self._studies[uid] for uid in dirty])
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
                self._dirty_studies.difference_update(dirty)
                self._stats["studies_commits"] += 1

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
        return [sha for sha in sha256s if sha in self._index or self._committing[sha]]

    def _apply(self, records: Sequence[InstanceRecord]) -> None:
        """Record committed rows in the in-memory index and study rows."""
        for record in records:
            entry = IndexEntry(
                record.sop_instance_uid, record.version, utc(record.ingest_time).date()
            )
            self._index[record.sha256] = entry
            previous = self._max_versions.get(record.sop_instance_uid, 0)
            self._max_versions[record.sop_instance_uid] = max(previous, record.version)
            self._recent[record.sha256] = record
            self._recent.move_to_end(record.sha256)
        while len(self._recent) > _RECENT_RECORDS:
            self._recent.popitem(last=False)
        updated, new_series = fold_studies(self._studies, self._series, records)
        self._studies.update(updated)
        for uid, added in new_series.items():
            self._series.setdefault(uid, set()).update(added)
        self._dirty_studies.update(updated)

    # -- blocking I/O, run in a worker thread -------------------------------------------

    # Each write starts from the table's latest version: delta-rs rebases an append over
    # other writers' appends by itself, but a snapshot that missed a metadata change made
    # by someone else (a constraint added or dropped, a property) would fail every later
    # commit, or enforce a dropped constraint. The refresh costs one LIST of _delta_log.

    def _append_instances(self, records: Sequence[InstanceRecord]) -> None:
        assert self._instances is not None  # ready() ran
        self._instances.update_incremental()
        write_deltalake(self._instances, _instances_table(records), mode="append")

    def _upsert_studies(self, rows: Sequence[StudyRow]) -> None:
        uids = ", ".join(sql_string_literal(row.study_instance_uid) for row in rows)
        assert self._studies_table is not None  # ready() ran
        self._studies_table.update_incremental()
        write_deltalake(
            self._studies_table,
            _studies_table(rows),
            mode="overwrite",
            predicate=f"study_instance_uid IN ({uids})",
        )

    def _fetch_records(self, entries: Mapping[str, IndexEntry]) -> dict[str, InstanceRecord]:
        # A fresh table object: the writer's own may be mid-commit in another thread.
        table = _open_table(self._settings, self._bucket, INSTANCES)
        days = sorted({entry.ingest_date.isoformat() for entry in entries.values()})
        dataset = table.to_pyarrow_dataset(file_pruning_predicate=[("ingest_date", "in", days)])
        wanted = pa_dataset.field("sha256").isin(list(entries))
        found = {}
        for row in dataset.to_table(filter=wanted).to_pylist():
            record = _record_from_row(row)
            if entries[record.sha256].version == record.version:
                found[record.sha256] = record
        return found

    def _load(self, instances: DeltaTable) -> None:
        """Build the in-memory index and study rows from the tables; repair ``studies``."""
        assert self._studies_table is not None
        connection = duckdb.connect()
        connection.register(INSTANCES, instances.to_pyarrow_dataset())
        connection.register(STUDIES, self._studies_table.to_pyarrow_dataset())
        cursor = connection.execute(
            "SELECT sha256, sop_instance_uid, version, ingest_date FROM instances"
        )
        while batch := cursor.fetchmany(100_000):
            for sha256, sop_uid, version, ingest_date in batch:
                self._index[sha256] = IndexEntry(sop_uid, version, ingest_date)
                if version > self._max_versions.get(sop_uid, 0):
                    self._max_versions[sop_uid] = version
        cursor = connection.execute(
            "SELECT DISTINCT study_instance_uid, series_instance_uid FROM instances"
        )
        while batch := cursor.fetchmany(100_000):
            for study_uid, series_uid in batch:
                self._series.setdefault(study_uid, set()).add(series_uid)
        stored = {
            row["study_instance_uid"]: _study_from_row(row)
            for row in _rows(connection.execute("SELECT * FROM studies"))
        }
        for row in _rows(connection.execute(_DERIVE_STUDIES_SQL)):
            derived = _study_from_row(row)
            current = stored.get(derived.study_instance_uid)
            if current is None:
                self._studies[derived.study_instance_uid] = derived
                self._dirty_studies.add(derived.study_instance_uid)
            elif any(getattr(current, c) != getattr(derived, c) for c in _DERIVED_COLUMNS):
                repaired = dataclasses.replace(
                    current, **{c: getattr(derived, c) for c in _DERIVED_COLUMNS}
                )
                self._studies[derived.study_instance_uid] = repaired
                self._dirty_studies.add(derived.study_instance_uid)
            else:
                self._studies[derived.study_instance_uid] = current
        connection.close()
        if self._dirty_studies:
            dirty = sorted(self._dirty_studies)
            self._upsert_studies([self._studies[uid] for uid in dirty])
            self._dirty_studies.clear()


# --- readers -------------------------------------------------------------------------


def connect(
    settings: StoreSettings,
    bucket: str = DEFAULT_BUCKET,
    tables: Sequence[str] = (INSTANCES, STUDIES),
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the catalog tables registered as ``instances``/``studies``.

    Each table is the snapshot current when this is called (a PyArrow dataset over the
    Delta table's files: DuckDB filters and projections are pushed down into it).
    """
    connection = duckdb.connect()
    for table in tables:
        dataset = _open_table(settings, bucket, table).to_pyarrow_dataset()
        connection.register(table, dataset)
    return connection


def _query(
    settings: StoreSettings,
    bucket: str,
    table: str,
    conditions: Sequence[tuple[str, object]],
    order_by: str,
    limit: int,
) -> list[dict[str, Any]]:
    """Rows of ``table`` matching every ``(sql with one ?, value)`` whose value is not None."""
    clauses = [sql for sql, value in conditions if value is not None]
    parameters = [value for _, value in conditions if value is not None]
    where = " AND ".join(clauses) if clauses else "TRUE"
    sql = f"SELECT * FROM {table} WHERE {where} ORDER BY {order_by} LIMIT ?"
    connection = connect(settings, bucket, tables=(table,))
    try:
        return _rows(connection.execute(sql, [*parameters, limit]))
    finally:
        connection.close()


def find_instances(
    settings: StoreSettings,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str | None = None,
    date_from: date | None = None,
    date_to: date | None = None,
    limit: int = 1000,
    bucket: str = DEFAULT_BUCKET,
) -> list[InstanceRecord]:
    """Instance rows matching every given filter (dates bound ``study_date``, inclusive)."""
    rows = _query(
        settings,
        bucket,
        INSTANCES,
        [
            ("study_instance_uid = ?", study_uid),
            ("series_instance_uid = ?", series_uid),
            ("sop_instance_uid = ?", sop_uid),
            ("modality = ?", modality),
            ("study_date >= ?", date_from),
            ("study_date <= ?", date_to),
        ],
        "study_instance_uid, series_instance_uid, sop_instance_uid, version",
        limit,
    )
    return [_record_from_row(row) for row in rows]


def find_studies(
    settings: StoreSettings,
    *,
    study_uid: str | None = None,
    patient_pseudonym: str | None = None,
    accession_pseudonym: str | None = None,
    modality: str | None = None,
    tier: str | None = None,
    date_from: date | None = None,
    date_to: date | None = None,
    limit: int = 1000,
    bucket: str = DEFAULT_BUCKET,
) -> list[StudyRow]:
    """Study rows matching every given filter (``modality``: one of the study's modalities)."""
    rows = _query(
        settings,
        bucket,
        STUDIES,
        [
            ("study_instance_uid = ?", study_uid),
            ("patient_pseudonym = ?", patient_pseudonym),
            ("accession_pseudonym = ?", accession_pseudonym),
            ("list_contains(modalities, ?)", modality),
            ("tier = ?", tier),
            ("study_date >= ?", date_from),
            ("study_date <= ?", date_to),
        ],
        "study_instance_uid",
        limit,
    )
    return [_study_from_row(row) for row in rows]


def latest_instance(
    settings: StoreSettings,
    sop_uid: str,
    version: int | None = None,
    *,
    bucket: str = DEFAULT_BUCKET,
) -> InstanceRecord | None:
    """The newest version of a SOP Instance (or the given ``version``), None if absent."""
    rows = _query(
        settings,
        bucket,
        INSTANCES,
        [("sop_instance_uid = ?", sop_uid), ("version = ?", version)],
        "version DESC",
        1,
    )
    return _record_from_row(rows[0]) if rows else None

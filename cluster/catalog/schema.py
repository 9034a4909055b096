"""The catalog's tables: their schemas, where they live, and rows to and from Arrow.

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

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal, NamedTuple

import duckdb
import pyarrow as pa
from deltalake import DeltaTable

from workers.records import InstanceRecord, StoreSettings
from workers.store import ensure_bucket

DEFAULT_BUCKET = "strata-catalog"
INSTANCES = "instances"
STUDIES = "studies"


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

RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(InstanceRecord))


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


def open_table(settings: StoreSettings, bucket: str, table: str) -> DeltaTable:
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


def utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def sql_string_literal(value: str) -> str:
    """``value`` as a SQL string literal for a delta-rs predicate.

    delta-rs takes predicates as SQL text with no bind parameters. Its parser (DataFusion,
    generic dialect) treats backslash literally, so doubling single quotes is a complete
    escape; a test writes and matches quote- and backslash-laden values.
    """
    return "'" + value.replace("'", "''") + "'"


def instances_table(records: Sequence[InstanceRecord]) -> pa.Table:
    rows = []
    for record in records:
        row: dict[str, Any] = {name: getattr(record, name) for name in RECORD_FIELDS}
        row["ingest_date"] = utc(record.ingest_time).date()
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA)


def studies_table(rows: Iterable[StudyRow]) -> pa.Table:
    return pa.Table.from_pylist(
        [dataclasses.asdict(row) | {"modalities": list(row.modalities)} for row in rows],
        schema=STUDIES_SCHEMA,
    )


def record_from_row(row: Mapping[str, Any]) -> InstanceRecord:
    values = {name: row[name] for name in RECORD_FIELDS}
    values["ingest_time"] = utc(values["ingest_time"])
    return InstanceRecord(**values)


def study_from_row(row: Mapping[str, Any]) -> StudyRow:
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


def derive_study(records: Sequence[InstanceRecord], last_access_time: datetime | None) -> StudyRow:
    """A study's row from every stored object of it (all versions): counts, sizes, dates.

    Pseudonyms come from its first stored instance and the tier from its latest;
    ``instance_count`` counts SOP Instance UIDs once (their first versions), and the byte
    sums count every stored object.
    """
    if not records:
        raise ValueError("a study row needs at least one stored instance")
    first = min(records, key=lambda r: utc(r.ingest_time))
    last = max(records, key=lambda r: utc(r.ingest_time))
    dates = [r.study_date for r in records if r.study_date is not None]
    return StudyRow(
        study_instance_uid=first.study_instance_uid,
        patient_pseudonym=first.patient_pseudonym,
        accession_pseudonym=first.accession_pseudonym,
        study_date=min(dates) if dates else None,
        modalities=tuple(sorted({r.modality for r in records if r.modality})),
        instance_count=sum(1 for r in records if r.version == 1),
        series_count=len({r.series_instance_uid for r in records}),
        bytes_in=sum(r.bytes_in for r in records),
        bytes_stored=sum(r.bytes_stored for r in records),
        tier=last.tier,
        first_ingest_time=utc(first.ingest_time),
        last_ingest_time=utc(last.ingest_time),
        last_access_time=last_access_time,
    )


def rows_of(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description or ()]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]

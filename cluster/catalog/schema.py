"""The catalog's tables: their schemas, where they live, and rows to and from Arrow.

Four Delta tables at ``s3://<bucket>/<table>`` (bucket ``strata-catalog`` by default):
``instances`` (append-only history), ``placements`` (append-only: where objects live
now), ``access`` (append-only: study reads) and ``studies`` (one row per study, folded
in periodically, partitioned by the date of its first ingest). Every column, its type,
partitioning and meaning, and how analysts read the tables, are in docs/catalog.md.
No column holds a patient name, birth date or raw identifier: patients and accessions appear only as
keyed HMAC pseudonyms.

Rows of ``studies`` are replaced with ``write_deltalake(mode="overwrite",
predicate=...)`` rather than ``merge``: delta-rs 1.6's merge (and delete) write string
columns as Arrow ``string_view``, and PyArrow (so DuckDB over a PyArrow dataset, and
``to_pyarrow_table(filters=...)``) cannot compare ``string_view`` with ``string``
(delta-rs issue #4579).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal, NamedTuple

import duckdb
import pyarrow as pa
import pyarrow.dataset as pa_dataset
import pyarrow.fs as pa_fs
from deltalake import DeltaTable
from deltalake.schema import Field as DeltaField
from deltalake.schema import PrimitiveType

from cluster.catalog.placements import DELETED, LATER_PLACEMENT_COLUMNS, PLACEMENTS_SCHEMA
from workers.dicom.identity import IdentityRow
from workers.objects.store import ensure_bucket
from workers.records import InstanceRecord, StoreSettings

DEFAULT_BUCKET = "strata-catalog"
INSTANCES = "instances"
STUDIES = "studies"
ACCESS = "access"
PLACEMENTS = "placements"
IDENTITY = "identity"
TABLES = (INSTANCES, STUDIES, ACCESS, PLACEMENTS, IDENTITY)
# What analysts read (``strata query``): not ``identity``, whose rows are sealed anyway.
ANALYST_TABLES = (INSTANCES, STUDIES, ACCESS, PLACEMENTS)

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
        pa.field("byte_offset", pa.int64(), nullable=False),
        pa.field("byte_length", pa.int64(), nullable=False),
        pa.field("ingest_date", pa.date32(), nullable=False),
        # Added later: rows written before them read as null.
        pa.field("source", pa.string(), nullable=True),
        pa.field("manufacturer", pa.string(), nullable=True),
        pa.field("model", pa.string(), nullable=True),
    ]
)
# Columns of ``instances`` added after tables were first written: a journal group or a
# table file without them reads them as null, and a flush adds them to an older table.
LATER_INSTANCE_COLUMNS = ("source", "manufacturer", "model")

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
        pa.field("ingest_date", pa.date32(), nullable=False),
    ]
)

ACCESS_SCHEMA = pa.schema(
    [
        pa.field("study_instance_uid", pa.string(), nullable=False),
        pa.field("access_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("access_date", pa.date32(), nullable=False),
    ]
)


# The identity index (workers.dicom.identity): per stored file, the blind tokens of the
# values searches match exactly and the sealed box of what they return. No identity in
# the clear; opened only by a door answering an authorised search.
IDENTITY_SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("study_instance_uid", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.string()), nullable=False),
        pa.field("sealed", pa.binary(), nullable=False),
        pa.field("ingest_date", pa.date32(), nullable=False),
    ]
)

RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(InstanceRecord))
# The tables whose rows go through the journal, and their schemas.
JOURNALED = {
    INSTANCES: INSTANCES_SCHEMA,
    PLACEMENTS: PLACEMENTS_SCHEMA,
    ACCESS: ACCESS_SCHEMA,
    IDENTITY: IDENTITY_SCHEMA,
}


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


def table_dataset(
    table: DeltaTable, options: Mapping[str, str], paths: Collection[str] | None = None
) -> pa_dataset.Dataset:
    """The files of ``table``'s current version (only those in ``paths``, relative to the
    table, when given) as a PyArrow dataset, for DuckDB or PyArrow to scan.

    Built from the log's add actions (path, size, partition values), over PyArrow's own S3
    client. ``DeltaTable.to_pyarrow_dataset`` costs ~27 ms per file in delta-rs 1.6
    (measured: 2.7 s for 100 files; this, 34 ms), and its file system answers through
    Python callbacks; a reader of a table between two compactions would pay that for
    every small file. File sizes come from the log, so no file is HEADed.
    """
    schema = pa.schema(table.schema().to_arrow())
    partitions = table.metadata().partition_columns
    actions = table.get_add_actions(flatten=True)
    root = table_root(table)
    scan = pa_dataset.ParquetFragmentScanOptions(pre_buffer=True)
    parquet = pa_dataset.ParquetFileFormat(default_fragment_scan_options=scan)
    filesystem = s3_filesystem(options)
    values = {name: actions.column(f"partition.{name}").to_pylist() for name in partitions}
    fragments = []
    for row, (path, size) in enumerate(
        zip(
            actions.column("path").to_pylist(),
            actions.column("size_bytes").to_pylist(),
            strict=True,
        )
    ):
        if paths is not None and urllib.parse.unquote(path) not in paths:
            continue
        where = pa_dataset.scalar(True)
        for name in partitions:
            value = values[name][row]
            column = pa_dataset.field(name)
            where &= (
                column.is_null()
                if value is None
                else column == pa.scalar(value).cast(schema.field(name).type)
            )
        fragments.append(
            parquet.make_fragment(
                f"{root}/{urllib.parse.unquote(path)}",
                filesystem=filesystem,
                file_size=size,
                partition_expression=where,
            )
        )
    return pa_dataset.FileSystemDataset(fragments, schema, parquet, filesystem)


def table_root(table: DeltaTable) -> str:
    """``bucket/path`` of a table on S3 (as PyArrow's S3 file system names it)."""
    uri = urllib.parse.urlparse(table.table_uri)
    return f"{uri.netloc}/{uri.path.strip('/')}"


def s3_filesystem(options: Mapping[str, str]) -> pa_fs.S3FileSystem:
    """PyArrow's S3 client for the MinIO that ``options`` (``storage_options``) describe."""
    endpoint = urllib.parse.urlparse(options["AWS_ENDPOINT_URL"])
    return pa_fs.S3FileSystem(
        access_key=options["AWS_ACCESS_KEY_ID"],
        secret_key=options["AWS_SECRET_ACCESS_KEY"],
        region=options["AWS_REGION"],
        scheme=endpoint.scheme,
        endpoint_override=endpoint.netloc,
    )


def table_uri(bucket: str, table: str) -> str:
    """The ``s3://`` URI of one catalog table."""
    return f"s3://{bucket}/{table}"


def open_table(settings: StoreSettings, bucket: str, table: str) -> DeltaTable:
    return DeltaTable(table_uri(bucket, table), storage_options=storage_options(settings))


# Each table: its schema, partition column, description, and whether it is append-only.
_TABLE_SPECS = {
    INSTANCES: (INSTANCES_SCHEMA, "ingest_date", "One row per stored object; append-only.", True),
    STUDIES: (
        STUDIES_SCHEMA,
        "ingest_date",
        "One row per study: counts, sizes, tier; folded in periodically.",
        False,
    ),
    ACCESS: (ACCESS_SCHEMA, "access_date", "One row per study read; append-only.", True),
    PLACEMENTS: (
        PLACEMENTS_SCHEMA,
        "placed_date",
        "Where objects moved to and which key wraps them; latest wins; append-only.",
        True,
    ),
    IDENTITY: (
        IDENTITY_SCHEMA,
        "ingest_date",
        "Per stored file: blind tokens and sealed search attributes; append-only.",
        True,
    ),
}


def create_tables(settings: StoreSettings, bucket: str = DEFAULT_BUCKET) -> None:
    """Create the bucket and the catalog's tables if they do not exist yet."""
    ensure_bucket(settings, bucket)
    options = storage_options(settings)
    for name, (schema, partition, description, append_only) in _TABLE_SPECS.items():
        DeltaTable.create(
            table_uri(bucket, name),
            schema,
            mode="ignore",
            partition_by=[partition],
            name=name,
            description=description,
            configuration={"delta.appendOnly": "true"} if append_only else None,
            storage_options=options,
        )
    # A table created before a later column: the column is added (null in older rows), so
    # readers that name it (the analytics view) work before the next flush merges it in.
    for name, later in ((INSTANCES, LATER_INSTANCE_COLUMNS), (PLACEMENTS, LATER_PLACEMENT_COLUMNS)):
        table = DeltaTable(table_uri(bucket, name), storage_options=options)
        present = pa.schema(table.schema().to_arrow()).names
        missing = [column for column in later if column not in present]
        if missing:
            table.alter.add_columns(
                [DeltaField(column, PrimitiveType("string"), nullable=True) for column in missing]
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
    return checked(pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA))


def identity_table(rows: Sequence[tuple[IdentityRow, date]]) -> pa.Table:
    """Identity index rows, each with the ingest date of its instance (its partition)."""
    return checked(
        pa.Table.from_pylist(
            [
                {
                    "sha256": row.sha256,
                    "study_instance_uid": row.study_instance_uid,
                    "tokens": list(row.tokens),
                    "sealed": row.sealed,
                    "ingest_date": day,
                }
                for row, day in rows
            ],
            schema=IDENTITY_SCHEMA,
        )
    )


def checked(rows: pa.Table) -> pa.Table:
    """``rows`` as they are, or ValueError naming the first column its schema declares not
    nullable that holds a null (Arrow does not check that when it builds a table)."""
    for field in rows.schema:
        if not field.nullable and rows.column(field.name).null_count:
            raise ValueError(f"column {field.name!r} must have a value in every row")
    return rows


def study_date_partition(row: StudyRow) -> date:
    """The ``studies`` partition of a study row: the UTC date of its first ingest."""
    return utc(row.first_ingest_time).date()


def studies_table(rows: Iterable[StudyRow]) -> pa.Table:
    """Study rows for the Delta table (which holds no last access: see ``access``)."""
    # A shallow dict per row: dataclasses.asdict deep-copies every value, which was most of
    # the time of folding 10⁷ study rows after a rebuild at 10⁸ instances.
    names = [field.name for field in dataclasses.fields(StudyRow)]
    return pa.Table.from_pylist(
        [
            {name: getattr(row, name) for name in names}
            | {
                "modalities": list(row.modalities),
                "ingest_date": study_date_partition(row),
            }
            for row in rows
        ],
        schema=STUDIES_SCHEMA,
    )


def access_table(study_uids: Sequence[str], when: datetime) -> pa.Table:
    moment = utc(when)
    return pa.Table.from_pylist(
        [
            {"study_instance_uid": uid, "access_time": moment, "access_date": moment.date()}
            for uid in study_uids
        ],
        schema=ACCESS_SCHEMA,
    )


def record_from_row(row: Mapping[str, Any]) -> InstanceRecord:
    values: dict[str, Any] = {name: row.get(name) for name in RECORD_FIELDS}
    values["ingest_time"] = utc(values["ingest_time"])
    for name in LATER_INSTANCE_COLUMNS:
        values[name] = values[name] or ""  # a row from before the column
    return InstanceRecord(**values)


def study_from_row(row: Mapping[str, Any]) -> StudyRow:
    last_access = row.get("last_access_time")
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
    # Ties in ingest time are broken by SHA-256, the same way in the index's SQL.
    first = min(records, key=lambda r: (utc(r.ingest_time), r.sha256))
    dates = [r.study_date for r in records if r.study_date is not None]
    # Counts, sizes, modalities and the tier are of the instances not deleted at the
    # study's retention end (an instance may arrive after it); none left: "deleted".
    live = [r for r in records if r.tier != DELETED]
    last = max(live or records, key=lambda r: (utc(r.ingest_time), r.sha256))
    return StudyRow(
        study_instance_uid=first.study_instance_uid,
        patient_pseudonym=first.patient_pseudonym,
        accession_pseudonym=first.accession_pseudonym,
        study_date=min(dates) if dates else None,
        modalities=tuple(sorted({r.modality for r in live if r.modality})),
        instance_count=sum(1 for r in live if r.version == 1),
        series_count=len({r.series_instance_uid for r in live}),
        bytes_in=sum(r.bytes_in for r in live),
        bytes_stored=sum(r.bytes_stored for r in records),
        tier=last.tier,
        first_ingest_time=utc(first.ingest_time),
        last_ingest_time=max(utc(r.ingest_time) for r in records),
        last_access_time=last_access_time,
    )


def rows_of(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description or ()]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]

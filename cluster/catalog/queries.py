"""Reading the catalog: the searches the doors make, and SQL over the Delta tables.

The doors search the writer's keyed index (``CatalogWriter.find_studies`` and
``find_instances`` with the filters below): current to the last commit, and a search
costs what it returns. Analysts and ``strata query`` read the Delta tables themselves
with DuckDB (``connect``): ``instances``, ``placements`` and ``access`` with the journal
groups not flushed yet, ``studies`` as of the last fold (which follows each flush).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pa_dataset
from duckdb import sqltypes

from cluster.catalog import journal
from cluster.catalog.schema import (
    ACCESS,
    DEFAULT_BUCKET,
    INSTANCES,
    JOURNALED,
    PLACEMENTS,
    STUDIES,
    StudyRow,
    open_table,
    record_from_row,
    rows_of,
    storage_options,
    study_from_row,
    table_dataset,
)
from workers.objects import store
from workers.records import InstanceRecord, StoreSettings


@dataclass(frozen=True)
class StudyFilters:
    """A study search; None matches anything (dates bound ``study_date``, inclusive)."""

    study_uid: str | None = None
    patient_pseudonym: str | None = None
    accession_pseudonym: str | None = None
    modality: str | None = None
    tier: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    # Blind tokens of the identity index (workers.dicom.identity) a study must hold.
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class InstanceFilters:
    """An instance search; None matches anything (dates bound ``study_date``, inclusive)."""

    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    modality: str | None = None
    date_from: date | None = None
    date_to: date | None = None

    def conditions(self) -> list[tuple[str, object]]:
        """``(SQL with one ?, value)`` pairs over the Delta ``instances`` table."""
        return [
            ("study_instance_uid = ?", self.study_uid),
            ("series_instance_uid = ?", self.series_uid),
            ("sop_instance_uid = ?", self.sop_uid),
            ("modality = ?", self.modality),
            ("study_date >= ?", self.date_from),
            ("study_date <= ?", self.date_to),
        ]


def connect(
    settings: StoreSettings,
    bucket: str = DEFAULT_BUCKET,
    tables: Sequence[str] = (INSTANCES, STUDIES, ACCESS, PLACEMENTS),
    *,
    study_key: Callable[[str], str] | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the catalog tables registered under their names.

    Each table is the snapshot current when this is called (``dataset``), so DuckDB
    pushes filters and projections into it and reads only the columns and row groups a
    query needs. With ``study_key`` (a keyed HMAC of a Study Instance UID; its key is in
    the key file, never in the catalog) the ``analytics`` view is there too (see
    ``ANALYTICS``).
    """
    connection = duckdb.connect()
    for table in tables:
        connection.register(table, dataset(settings, bucket, table))
    if study_key is not None and {INSTANCES, ACCESS, PLACEMENTS} <= set(tables):
        connection.create_function(
            "strata_study_key", study_key, [sqltypes.VARCHAR], sqltypes.VARCHAR
        )
        connection.execute(ANALYTICS)
    return connection


# One row per stored instance (latest version), without a direct identifier: the study
# appears by a keyed HMAC of its UID and the patient by the catalog's pseudonym (also a
# keyed HMAC), the date by its year; no SOP, series or study UID, no accession.
ANALYTICS = f"""
CREATE VIEW analytics AS
WITH latest AS (
    SELECT * FROM {INSTANCES}
    QUALIFY row_number() OVER (PARTITION BY sop_instance_uid ORDER BY version DESC) = 1
), placed AS (
    SELECT sha256, arg_max(tier, placed_time) AS tier,
           arg_max(byte_length, placed_time) AS byte_length,
           arg_max(transfer_syntax_stored, placed_time) AS transfer_syntax_stored
    FROM {PLACEMENTS} GROUP BY 1
), reads AS (
    SELECT study_instance_uid, count(*) AS reads, max(access_time) AS last_read
    FROM {ACCESS} GROUP BY 1
)
SELECT
    l.patient_pseudonym AS patient_key,
    strata_study_key(l.study_instance_uid) AS study_key,
    year(l.study_date) AS study_year,
    year(l.ingest_time) AS ingest_year,
    l.modality,
    l.body_part,
    l.manufacturer,
    l.model,
    l.source,
    l.sop_class_uid,
    l.transfer_syntax_in,
    coalesce(p.transfer_syntax_stored, l.transfer_syntax_stored) AS transfer_syntax_stored,
    l.frames,
    l.rows,
    l.columns,
    l.bits_stored,
    l.bytes_in,
    coalesce(p.byte_length, l.bytes_stored) AS bytes_stored,  -- where it is now
    l.bytes_in / nullif(coalesce(p.byte_length, l.bytes_stored), 0) AS compression_ratio,
    coalesce(p.tier, l.tier) AS tier,
    coalesce(r.reads, 0) AS study_reads,
    year(r.last_read) AS last_read_year
FROM latest l
LEFT JOIN placed p USING (sha256)
LEFT JOIN reads r USING (study_instance_uid)
"""


def dataset(settings: StoreSettings, bucket: str, table: str) -> pa_dataset.Dataset:
    """The rows of one catalog table as a PyArrow dataset: the files of its current
    version and, for the tables written through the journal, the journal groups not yet
    flushed into it (read now), so that a query sees every committed row once."""
    for attempt in range(_ATTEMPTS):
        delta = open_table(settings, bucket, table)
        files = table_dataset(delta, storage_options(settings))
        if table not in JOURNALED:
            return files
        # The groups this version holds are those up to its transaction version; later
        # ones are read from the journal, unless a flush deletes them meanwhile.
        flushed = delta.transaction_version(journal.JOURNAL_APP) or 0
        try:
            pending = [
                journal.decode(data, JOURNALED[table])
                for _, data in journal.pending(settings, bucket, table, after=flushed)
            ]
        except store.ObjectUnreadableError:
            if attempt == _ATTEMPTS - 1:
                raise
            continue  # flushed and deleted while being read: the table holds them now
        if not pending:
            return files
        rows = pa.concat_tables(pending).select(files.schema.names).cast(files.schema)
        return pa_dataset.dataset([files, pa_dataset.dataset(rows)])
    raise AssertionError("unreachable")


_ATTEMPTS = 3


def _query(
    settings: StoreSettings,
    bucket: str,
    sql: str,
    tables: Sequence[str],
    conditions: Sequence[tuple[str, object]],
    order_by: str,
    limit: int,
) -> list[dict[str, Any]]:
    """Rows of ``sql`` matching every ``(sql with one ?, value)`` whose value is not None."""
    clauses = [clause for clause, value in conditions if value is not None]
    parameters = [value for _, value in conditions if value is not None]
    where = " AND ".join(clauses) if clauses else "TRUE"
    connection = connect(settings, bucket, tables=tables)
    try:
        statement = f"SELECT * FROM ({sql}) WHERE {where} ORDER BY {order_by} LIMIT ?"
        return rows_of(connection.execute(statement, [*parameters, limit]))
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
    """Rows of the Delta ``instances`` table matching every given filter (the history:
    where each object was first written; see ``placements`` for where it is now)."""
    filters = InstanceFilters(study_uid, series_uid, sop_uid, modality, date_from, date_to)
    rows = _query(
        settings,
        bucket,
        f"SELECT * FROM {INSTANCES}",
        (INSTANCES,),
        filters.conditions(),
        "study_instance_uid, series_instance_uid, sop_instance_uid, version",
        limit,
    )
    return [record_from_row(row) for row in rows]


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
    """Rows of the Delta ``studies`` table (as of the last fold) matching every given
    filter, each with its last access from ``access``."""
    conditions = [
        ("study_instance_uid = ?", study_uid),
        ("patient_pseudonym = ?", patient_pseudonym),
        ("accession_pseudonym = ?", accession_pseudonym),
        ("list_contains(modalities, ?)", modality),
        ("tier = ?", tier),
        ("study_date >= ?", date_from),
        ("study_date <= ?", date_to),
    ]
    sql = (
        f"SELECT s.*, a.last_access_time FROM {STUDIES} s LEFT JOIN ("
        f"SELECT study_instance_uid, max(access_time) AS last_access_time FROM {ACCESS} "
        "GROUP BY 1) a USING (study_instance_uid)"
    )
    rows = _query(settings, bucket, sql, (STUDIES, ACCESS), conditions, "study_instance_uid", limit)
    return [study_from_row(row) for row in rows]

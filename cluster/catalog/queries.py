"""Reading the catalog: DuckDB over the Delta tables, and the searches the doors make."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

import duckdb

from cluster.catalog.schema import (
    DEFAULT_BUCKET,
    INSTANCES,
    STUDIES,
    StudyRow,
    open_table,
    record_from_row,
    rows_of,
    study_from_row,
)
from workers.records import InstanceRecord, StoreSettings


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
        dataset = open_table(settings, bucket, table).to_pyarrow_dataset()
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
        return rows_of(connection.execute(sql, [*parameters, limit]))
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
    return [study_from_row(row) for row in rows]

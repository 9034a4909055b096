"""The catalog's keyed index over a real Delta table on a real MinIO: lookups, catching up
with commits it missed, and rebuilding itself when its file is lost, damaged or stale."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from deltalake import DeltaTable, write_deltalake

from cluster import catalog
from cluster.catalog.index import SOURCES, CatalogIndex
from cluster.catalog.schema import instances_table
from cluster.ops.minio import MinioServer
from tests.integration.conftest import STUDY_A, STUDY_B, make_record
from workers.records import InstanceRecord


def _table(minio: MinioServer, bucket: str) -> DeltaTable:
    catalog.create_tables(minio.settings, bucket)
    return DeltaTable(
        catalog.table_uri(bucket, catalog.INSTANCES),
        storage_options=catalog.storage_options(minio.settings),
    )


def _append(table: DeltaTable, records: list[InstanceRecord]) -> None:
    table.update_incremental()
    write_deltalake(table, instances_table(records), mode="append")
    table.update_incremental()


def _open(path: Path, table: DeltaTable, minio: MinioServer) -> CatalogIndex:
    """The index over ``table`` (``instances``) and its sibling tables."""
    options = catalog.storage_options(minio.settings)
    root = table.table_uri.rstrip("/").rsplit("/", 1)[0]
    tables = {
        name: DeltaTable(f"{root}/{name}", storage_options=options)
        for name in SOURCES
        if name != catalog.INSTANCES
    }
    return CatalogIndex.open(path, {catalog.INSTANCES: table, **tables}, options)


def test_lookups_by_sha256_and_by_sop_instance_uid(
    minio: MinioServer, bucket_name: str, tmp_path: Path
) -> None:
    table = _table(minio, bucket_name)
    first = dataclasses.replace(make_record("1.2.3.1"), version=1)
    second = dataclasses.replace(make_record("1.2.3.1", content="b"), version=2)
    other = dataclasses.replace(make_record("1.2.3.2", study_uid=STUDY_B), version=1)
    _append(table, [first, other])
    _append(table, [second])
    index = _open(tmp_path / "index.sqlite", table, minio)
    try:
        assert index.by_sha256(first.sha256) == first
        assert index.by_sha256("0" * 64) is None
        assert index.by_sop("1.2.3.1") == second  # the newest version
        assert index.by_sop("1.2.3.1", 1) == first
        assert index.by_sop("1.2.3.9") is None
        assert index.max_versions(["1.2.3.1", "1.2.3.2", "1.2.3.9"]) == {
            "1.2.3.1": 2,
            "1.2.3.2": 1,
        }
        assert index.by_sha256s([first.sha256, other.sha256, "f" * 64]) == {
            first.sha256: first,
            other.sha256: other,
        }
        assert index.version() == table.version()
    finally:
        index.close()


def test_commits_missed_while_closed_are_caught_up(
    minio: MinioServer, bucket_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = _table(minio, bucket_name)
    path = tmp_path / "index.sqlite"
    early = make_record("1.2.4.1")
    _append(table, [early])
    _open(path, table, minio).close()
    # Written while the index was closed: a writer that crashed between its Delta commit
    # and its index update, or another writer.
    late = [make_record(f"1.2.4.{n}") for n in range(2, 6)]
    _append(table, late[:2])
    _append(table, late[2:])
    caplog.set_level(logging.INFO, "strata.catalog")
    index = _open(path, table, minio)
    try:
        assert "instances 1→3: 2 files, 4 rows" in caplog.text
        assert index.count() == 5
        assert all(index.by_sha256(r.sha256) == r for r in [early, *late])
        assert index.version() == table.version()
    finally:
        index.close()


def test_a_lost_damaged_or_foreign_index_is_rebuilt(
    minio: MinioServer, bucket_name: str, tmp_path: Path
) -> None:
    table = _table(minio, bucket_name)
    records = [make_record(f"1.2.5.{n}") for n in range(3)]
    _append(table, records)
    path = tmp_path / "index.sqlite"
    _open(path, table, minio).close()

    path.write_bytes(b"not a database at all" * 100)  # damaged
    index = _open(path, table, minio)
    assert index.count() == 3 and index.by_sha256(records[0].sha256) == records[0]
    index.close()

    other = _table(minio, bucket_name + "-other")  # the index of another table
    _append(other, [make_record("1.2.6.1")])
    index = _open(path, other, minio)
    assert index.count() == 1 and index.by_sha256(records[0].sha256) is None
    index.close()

    path.unlink()  # lost
    index = _open(path, table, minio)
    assert index.count() == 3
    index.close()


def test_study_rows_in_sql_match_their_definition(
    minio: MinioServer, bucket_name: str, tmp_path: Path
) -> None:
    """The index derives study rows in SQL; ``derive_study`` is their definition."""
    table = _table(minio, bucket_name)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    records = [
        dataclasses.replace(
            make_record(
                f"1.2.7.{n % 4}",
                content=str(n),
                series_uid=f"1.2.7.s{n % 3}",
                modality=("MR", "CT", "", "SR")[n % 4],
                study_date=None if n % 2 else date(2024, 1, 1 + n),
                bytes_in=1000 + n,
                ingest_time=start + timedelta(seconds=7 - n),  # the last written is the first
            ),
            version=n // 4 + 1,
        )
        for n in range(8)
    ]
    # Two objects written in the same microsecond: ties break the same way in both.
    latest = max(records, key=lambda r: r.ingest_time)
    records.append(
        dataclasses.replace(
            make_record("1.2.7.9", ingest_time=latest.ingest_time), tier="cold", version=1
        )
    )
    # An instance deleted at the study's retention end (and one stored after it, above):
    # not counted, not the study's tier.
    records.append(
        dataclasses.replace(
            make_record("1.2.7.8", ingest_time=start + timedelta(seconds=30), modality="XA"),
            tier="deleted",
            version=1,
        )
    )
    _append(table, records[:5])
    path = tmp_path / "index.sqlite"
    _open(path, table, minio).close()
    _append(table, records[5:])  # caught up on the next open, by the other path
    index = _open(path, table, minio)
    try:
        expected = catalog.derive_study(records, None)
        assert index.study(STUDY_A) == expected
        assert expected.modalities == ("CT", "MR", "SR")  # not the deleted XA
        assert expected.instance_count == 5 and expected.tier != "deleted"
        assert expected.patient_pseudonym == records[-1].patient_pseudonym
    finally:
        index.close()
    path.unlink()
    rebuilt = _open(path, table, minio)
    try:
        assert rebuilt.study(STUDY_A) == catalog.derive_study(records, None)
    finally:
        rebuilt.close()


def test_a_compaction_of_rows_seen_is_not_read_again(
    minio: MinioServer, bucket_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = _table(minio, bucket_name)
    path = tmp_path / "index.sqlite"
    for n in range(3):
        _append(table, [make_record(f"1.2.8.{n}")])
    _open(path, table, minio).close()
    table.optimize.compact()  # rewrites the three rows the index has seen
    late = make_record("1.2.8.9")
    _append(table, [late])
    table.update_incremental()
    caplog.set_level(logging.INFO, "strata.catalog")
    index = _open(path, table, minio)
    try:
        assert "instances 3→5: 1 files, 1 rows" in caplog.text
        assert index.count() == 4 and index.by_sha256(late.sha256) == late
    finally:
        index.close()

    # A compaction that took in a file the index had not seen is read whole.
    unseen = make_record("1.2.8.10")
    _append(table, [unseen])
    table.optimize.compact()
    table.update_incremental()
    caplog.clear()
    index = _open(path, table, minio)
    try:
        assert "instances 5→7: 1 files, 5 rows" in caplog.text
        assert index.count() == 5 and index.by_sha256(unseen.sha256) == unseen
    finally:
        index.close()

"""The catalog's keyed index over a real Delta table on a real MinIO: lookups, catching up
with commits it missed, and rebuilding itself when its file is lost, damaged or stale."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from deltalake import DeltaTable, write_deltalake

from cluster import catalog
from cluster.catalog.index import CatalogIndex
from cluster.catalog.schema import instances_table
from cluster.minio_server import MinioServer
from tests.integration.conftest import STUDY_B, make_record
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
    return CatalogIndex.open(path, table, catalog.storage_options(minio.settings))


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
        assert "caught up from version 1 to 3: 2 files, 4 rows" in caplog.text
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

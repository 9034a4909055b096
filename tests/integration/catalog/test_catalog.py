"""The catalog writer as a real Ray actor over a real MinIO, and the readers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import ray
from deltalake import DeltaTable, write_deltalake

from cluster import catalog
from cluster.catalog import CatalogWriter, Committed, journal
from cluster.catalog import schema as catalog_schema
from cluster.catalog.maintenance import MaintenancePolicy
from cluster.ops.minio import MinioServer
from tests.integration.conftest import STUDY_A, STUDY_B, make_record, stored
from workers.objects import store
from workers.records import StoreSettings


def start_writer(settings: StoreSettings, bucket: str, **options: Any) -> Any:
    return ray.remote(CatalogWriter).options(num_cpus=0).remote(settings, bucket, **options)


def test_concurrent_commits_are_grouped(
    ray_local: None, minio: MinioServer, bucket_name: str
) -> None:
    writer = start_writer(minio.settings, bucket_name)
    ray.get(writer.stats.remote())  # tables created, index loaded
    records = [make_record(f"1.2.3.{n}", series_uid=f"1.2.3.s{n % 4}") for n in range(200)]

    started = time.perf_counter()
    results: list[list[Committed]] = ray.get(
        [writer.commit.remote([stored(r, f"f{n}")]) for n, r in enumerate(records)]
    )
    elapsed = time.perf_counter() - started

    assert [[c.file_id for c in result] for result in results] == [[f"f{n}"] for n in range(200)]
    assert all(result[0].status == "stored" and result[0].version == 1 for result in results)
    assert results[7][0].record.sop_instance_uid == "1.2.3.7"
    stats = ray.get(writer.stats.remote())
    print(f"\n200 commits in {elapsed:.2f} s; writer stats {stats}")
    assert stats["rows_written"] == 200
    assert stats["commits"] <= 20, stats
    assert stats["max_group_size"] >= 10, stats
    assert len(catalog.find_instances(minio.settings, bucket=bucket_name, limit=500)) == 200
    current = ray.get(writer.study.remote(STUDY_A))  # the index: current at once
    assert (current.instance_count, current.series_count) == (200, 4)
    assert catalog.find_studies(minio.settings, bucket=bucket_name) == []  # not folded yet
    ray.get(writer.close.remote())  # folds
    [study] = catalog.find_studies(minio.settings, bucket=bucket_name)
    assert study == current
    assert ray.get(writer.stats.remote())["folds"] == 1
    ray.kill(writer)


def test_duplicates_versions_and_restart(
    ray_local: None, minio: MinioServer, bucket_name: str
) -> None:
    settings = minio.settings
    writer = start_writer(settings, bucket_name, max_wait_s=0.01)
    first = make_record("1.2.9.1")
    [a] = ray.get(writer.commit.remote([stored(first, "a")]))
    assert (a.status, a.version, a.record.version) == ("stored", 1, 1)

    [again] = ray.get(writer.commit.remote([stored(first, "a-again")]))
    assert (again.file_id, again.status, again.version) == ("a-again", "duplicate", 1)
    assert again.record == a.record

    changed = make_record("1.2.9.1", content="re-sent with other bytes")
    [b] = ray.get(writer.commit.remote([stored(changed, "b")]))
    assert (b.status, b.version) == ("stored", 2)

    # In one call: a new file, a copy of it, and a third version of the first SOP.
    other = make_record("1.2.9.2")
    third = make_record("1.2.9.1", content="third")
    group = ray.get(
        writer.commit.remote([stored(other, "c"), stored(other, "c-copy"), stored(third, "d")])
    )
    assert [(c.file_id, c.status, c.version) for c in group] == [
        ("c", "stored", 1),
        ("c-copy", "duplicate", 1),
        ("d", "stored", 3),
    ]
    assert ray.get(writer.lookup_sha256.remote(changed.sha256)) == b.record
    assert ray.get(writer.lookup_sha256.remote("0" * 64)) is None
    ray.get(writer.close.remote())
    ray.kill(writer)

    # A new writer (as after a crash or redeploy) reloads the index from the table.
    restarted = start_writer(settings, bucket_name, max_wait_s=0.01)
    assert ray.get(restarted.lookup_sha256.remote(first.sha256)) == a.record
    [dup, fourth] = ray.get(
        restarted.commit.remote(
            [stored(changed, "b-late"), stored(make_record("1.2.9.1", content="4"), "e")]
        )
    )
    assert (dup.status, dup.version, dup.record) == ("duplicate", 2, b.record)
    assert (fourth.status, fourth.version) == ("stored", 4)
    assert ray.get(restarted.latest.remote("1.2.9.1")) == fourth.record
    assert ray.get(restarted.latest.remote("1.2.9.1", 2)) == b.record
    assert ray.get(restarted.latest.remote("9.9.9")) is None
    study = ray.get(restarted.study.remote(STUDY_A))
    # Four versions of one SOP Instance count once; every stored object's bytes count.
    assert (study.instance_count, study.bytes_in) == (2, 5 * 1000)
    ray.get(restarted.close.remote())
    assert catalog.find_studies(settings, bucket=bucket_name) == [study]
    ray.kill(restarted)


@pytest.fixture(scope="module")
def populated(
    ray_local: None, minio: MinioServer
) -> Iterator[tuple[StoreSettings, str, list[Committed]]]:
    """A catalog with two studies (CT+MR and US) written through the actor."""
    bucket = "test-readers"
    writer = start_writer(minio.settings, bucket)
    early = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    records = [
        make_record("2.1.1", series_uid="2.1.s1", modality="CT", ingest_time=early),
        make_record("2.1.2", series_uid="2.1.s1", modality="CT"),
        make_record("2.1.3", series_uid="2.1.s2", modality="MR", bytes_in=3000),
        make_record(
            "2.2.1", study_uid=STUDY_B, modality="US", study_date=date(2023, 1, 9), bytes_in=10
        ),
    ]
    committed = ray.get(writer.commit.remote([stored(r) for r in records]))
    ray.get(writer.close.remote())
    ray.kill(writer)
    yield minio.settings, bucket, committed


def test_find_instances_filters(populated: tuple[StoreSettings, str, list[Committed]]) -> None:
    settings, bucket, committed = populated

    def sops(**filters: Any) -> list[str]:
        found = catalog.find_instances(settings, bucket=bucket, **filters)
        return [r.sop_instance_uid for r in found]

    assert sops() == ["2.1.1", "2.1.2", "2.1.3", "2.2.1"]
    assert sops(study_uid=STUDY_B) == ["2.2.1"]
    assert sops(series_uid="2.1.s1") == ["2.1.1", "2.1.2"]
    assert sops(sop_uid="2.1.3") == ["2.1.3"]
    assert sops(modality="MR") == ["2.1.3"]
    assert sops(date_from=date(2024, 1, 1)) == ["2.1.1", "2.1.2", "2.1.3"]
    assert sops(date_to=date(2023, 12, 31)) == ["2.2.1"]
    assert sops(study_uid=STUDY_A, modality="US") == []
    assert sops(limit=2) == ["2.1.1", "2.1.2"]
    assert catalog.find_instances(settings, bucket=bucket, sop_uid="2.1.1") == [committed[0].record]
    # A filter value is a bound parameter, never SQL.
    assert sops(study_uid="x' OR '1'='1") == []


def test_find_studies_aggregates(populated: tuple[StoreSettings, str, list[Committed]]) -> None:
    settings, bucket, committed = populated
    studies = {s.study_instance_uid: s for s in catalog.find_studies(settings, bucket=bucket)}
    a = studies[STUDY_A]
    assert a.modalities == ("CT", "MR")
    assert (a.instance_count, a.series_count, a.bytes_in, a.bytes_stored) == (3, 2, 5000, 2500)
    assert a.first_ingest_time == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert a.last_ingest_time == max(c.record.ingest_time for c in committed[:3])
    assert a.patient_pseudonym == committed[0].record.patient_pseudonym
    assert a.tier == "hot" and a.last_access_time is None

    def uids(**filters: Any) -> list[str]:
        return [
            s.study_instance_uid for s in catalog.find_studies(settings, bucket=bucket, **filters)
        ]

    assert uids(modality="MR") == [STUDY_A]
    assert uids(modality="US") == [STUDY_B]
    assert uids(date_to=date(2023, 6, 1)) == [STUDY_B]
    assert uids(patient_pseudonym=a.patient_pseudonym) == [STUDY_A]
    assert uids(tier="cold") == []


def test_sql_and_polars_read_the_tables(
    populated: tuple[StoreSettings, str, list[Committed]],
) -> None:
    settings, bucket, _ = populated
    connection = catalog.connect(settings, bucket=bucket)
    by_modality = connection.execute(
        "SELECT modality, count(*), sum(bytes_in) FROM instances GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert by_modality == [("CT", 2, 2000), ("MR", 1, 3000), ("US", 1, 10)]
    joined = connection.execute(
        "SELECT s.series_count, count(*) FROM instances i JOIN studies s USING "
        "(study_instance_uid) WHERE i.study_instance_uid = ? GROUP BY 1",
        [STUDY_A],
    ).fetchall()
    assert joined == [(2, 3)]
    connection.close()

    options = catalog.storage_options(settings)
    instances = pl.read_delta(catalog.table_uri(bucket, "instances"), storage_options=options)
    studies = pl.read_delta(catalog.table_uri(bucket, "studies"), storage_options=options)
    assert instances.height == 4
    assert sorted(studies["instance_count"].to_list()) == [1, 3]
    assert studies.filter(pl.col("modalities").list.contains("MR")).height == 1


def test_no_identity_columns(populated: tuple[StoreSettings, str, list[Committed]]) -> None:
    settings, bucket, _ = populated
    options = catalog.storage_options(settings)
    for table in ("instances", "studies"):
        schema = DeltaTable(catalog.table_uri(bucket, table), storage_options=options).schema()
        names = {field.name for field in schema.fields}
        assert "patient_pseudonym" in names
        identity = {
            n
            for n in names
            if any(word in n for word in ("patient", "accession", "name", "birth", "sex"))
        }
        assert identity == {"patient_pseudonym", "accession_pseudonym"}, table


def test_record_access_and_repair_on_start(
    ray_local: None, minio: MinioServer, bucket_name: str
) -> None:
    settings = minio.settings
    writer = start_writer(settings, bucket_name, max_wait_s=0.01)
    ray.get(writer.commit.remote([stored(make_record("3.1.1"))]))
    ray.get(writer.close.remote())
    before = datetime.now(UTC)
    ray.get(writer.record_access.remote([STUDY_A, "unknown.study"]))
    study = ray.get(writer.study.remote(STUDY_A))
    assert study.last_access_time is not None and study.last_access_time >= before
    # A read is one appended row of `access`; it does not make the study row dirty.
    ray.get(writer.close.remote())
    assert ray.get(writer.stats.remote())["folds"] == 1
    access = DeltaTable(
        catalog.table_uri(bucket_name, catalog.ACCESS),
        storage_options=catalog.storage_options(settings),
    ).to_pyarrow_table()
    assert sorted(access.column("study_instance_uid").to_pylist()) == [STUDY_A, "unknown.study"]
    [folded] = catalog.find_studies(settings, bucket=bucket_name)
    assert folded.last_access_time == study.last_access_time  # joined from `access`
    ray.kill(writer)

    # As if a writer died between its `instances` commit and its index update.
    orphan = make_record("3.1.2", series_uid="3.1.s9", ingest_time=before + timedelta(seconds=1))
    table = pa.Table.from_pylist(
        [{**orphan.__dict__, "version": 1, "ingest_date": orphan.ingest_time.date()}],
        schema=catalog.INSTANCES_SCHEMA,
    )
    write_deltalake(
        catalog.table_uri(bucket_name, "instances"),
        table,
        mode="append",
        storage_options=catalog.storage_options(settings),
    )
    restarted = start_writer(settings, bucket_name)
    repaired = ray.get(restarted.study.remote(STUDY_A))
    assert (repaired.instance_count, repaired.series_count) == (2, 2)
    assert repaired.last_access_time == study.last_access_time
    ray.get(restarted.close.remote())
    assert catalog.find_studies(settings, bucket=bucket_name) == [repaired]
    ray.kill(restarted)


def test_door_searches_come_from_the_index(
    populated: tuple[StoreSettings, str, list[Committed]], ray_local: None
) -> None:
    settings, bucket, committed = populated
    writer = start_writer(settings, bucket)
    patient = committed[0].record.patient_pseudonym
    found = ray.get(writer.find_studies.remote(catalog.StudyFilters(patient_pseudonym=patient)))
    assert [s.study_instance_uid for s in found] == [STUDY_A]
    dated = catalog.StudyFilters(date_from=date(2023, 1, 1), date_to=date(2023, 12, 31))
    assert [s.study_instance_uid for s in ray.get(writer.find_studies.remote(dated))] == [STUDY_B]
    # A modality matches a whole code among the study's, never a part of one.
    mr = ray.get(writer.find_studies.remote(catalog.StudyFilters(modality="MR")))
    assert [s.modalities for s in mr] == [("CT", "MR")]
    assert ray.get(writer.find_studies.remote(catalog.StudyFilters(modality="M"))) == []
    series = catalog.InstanceFilters(series_uid="2.1.s1")
    assert [r.sop_instance_uid for r in ray.get(writer.find_instances.remote(series))] == [
        "2.1.1",
        "2.1.2",
    ]
    # Pages follow one order: studies by their keys, then series, SOP Instance, version.
    every = ray.get(writer.find_instances.remote(catalog.InstanceFilters()))
    assert sorted(r.sop_instance_uid for r in every) == ["2.1.1", "2.1.2", "2.1.3", "2.2.1"]
    paged = ray.get(writer.find_instances.remote(catalog.InstanceFilters(), 2, 1))
    assert paged == every[1:3]
    ray.kill(writer)


def test_a_placement_moves_an_object_without_rewriting_history(
    ray_local: None, minio: MinioServer, bucket_name: str, tmp_path: Any
) -> None:
    settings = minio.settings
    index_path = str(tmp_path / "index.sqlite")
    writer = start_writer(settings, bucket_name, max_wait_s=0.01, index_path=index_path)
    [done] = ray.get(writer.commit.remote([stored(make_record("6.1.1"))]))
    moved = catalog.Placement(
        sha256=done.record.sha256,
        sop_instance_uid="6.1.1",
        version=1,
        study_instance_uid=STUDY_A,
        tier="cold",
        bucket="strata-cold",
        object_key="v1/elsewhere",
        byte_offset=4096,
        byte_length=done.record.bytes_stored,
        key_id="kek-2",
        reason="tier move",
        placed_time=datetime.now(UTC),
    )
    with pytest.raises(ray.exceptions.RayTaskError, match="no catalogued object"):
        ray.get(writer.place.remote([dataclasses.replace(moved, sha256="0" * 64)]))
    ray.get(writer.place.remote([moved]))
    now = ray.get(writer.latest.remote("6.1.1"))
    assert (now.tier, now.object_key, now.key_id) == ("cold", "v1/elsewhere", "kek-2")
    assert ray.get(writer.study.remote(STUDY_A)).tier == "cold"
    # The history is unchanged: `instances` still says where the object was written.
    [first] = catalog.find_instances(settings, bucket=bucket_name)
    assert first == done.record
    ray.get(writer.close.remote())
    ray.kill(writer)

    # Caught up from the table when the index missed it, and kept by a rebuild.
    for lose_index in (False, True):
        if lose_index:
            Path(index_path).unlink()
        again = start_writer(settings, bucket_name, index_path=index_path)
        assert ray.get(again.latest.remote("6.1.1")).object_key == "v1/elsewhere"
        ray.kill(again)


def test_a_deletion_places_an_instance_nowhere_and_no_search_finds_it(
    ray_local: None, minio: MinioServer, bucket_name: str, tmp_path: Any
) -> None:
    settings = minio.settings
    index_path = str(tmp_path / "index.sqlite")
    writer = start_writer(settings, bucket_name, max_wait_s=0.01, index_path=index_path)
    done = ray.get(writer.commit.remote([stored(make_record(uid)) for uid in ("7.1.1", "7.1.2")]))
    gone = done[0].record
    ray.get(
        writer.place.remote(
            [
                catalog.placements.deletion(
                    gone.sha256,
                    gone.sop_instance_uid,
                    1,
                    STUDY_A,
                    "retention end: r",
                    datetime.now(UTC),
                )
            ]
        )
    )

    def seen(w: Any) -> tuple[str, list[str]]:
        found = ray.get(w.find_instances.remote(catalog.InstanceFilters(study_uid=STUDY_A), 100))
        return ray.get(w.latest.remote("7.1.1")).tier, [r.sop_instance_uid for r in found]

    assert seen(writer) == ("deleted", ["7.1.2"])  # the other instance is untouched
    assert ray.get(writer.lookup_sha256.remote(gone.sha256)).tier == "deleted"
    ray.get(writer.close.remote())
    ray.kill(writer)
    # Kept by a restart and by a rebuild of a lost index.
    for lose_index in (False, True):
        if lose_index:
            Path(index_path).unlink()
        again = start_writer(settings, bucket_name, index_path=index_path)
        assert seen(again) == ("deleted", ["7.1.2"])
        ray.kill(again)


def test_a_commit_the_store_cannot_take_fails_every_caller_and_stores_nothing(
    tmp_path: Path,
) -> None:
    server = MinioServer(tmp_path / "minio", drives=4).start()
    bucket = "stopped-catalog"

    async def run() -> None:
        writer = CatalogWriter(
            server.settings, bucket, max_wait_s=0.3, index_path=str(tmp_path / "i")
        )
        await writer.commit([stored(make_record("4.1.1"))])
        server.stop()
        late = [make_record("4.1.2"), make_record("4.1.3")]
        results = await asyncio.gather(
            *(writer.commit([stored(r)]) for r in late), return_exceptions=True
        )
        # One group, one failure for each of its callers: the store could not say
        # whether the journal object landed, so nobody is told it is stored.
        assert all(isinstance(result, store.StoreUnavailableError) for result in results)
        server.start()
        assert await writer.lookup_sha256(late[0].sha256) is None
        [retried] = await writer.commit([stored(late[0])])
        assert (retried.status, retried.version) == ("stored", 1)
        # A record that does not fit the schema fails only its own call.
        broken = dataclasses.replace(make_record("4.1.4"), frames=None)  # type: ignore[arg-type]
        with pytest.raises(catalog.CatalogCommitFailedError, match="does not fit the schema"):
            await writer.commit([stored(broken)])
        await writer.close()
        found = catalog.find_instances(server.settings, bucket=bucket)
        assert [r.sop_instance_uid for r in found] == ["4.1.1", "4.1.2"]

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_a_flush_delta_refuses_keeps_the_rows_in_the_journal(
    minio: MinioServer, bucket_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = minio.settings
    options = catalog.storage_options(settings)

    async def run() -> None:
        writer = CatalogWriter(
            settings, bucket_name, max_wait_s=0.0, index_path=str(tmp_path / "i")
        )
        await writer.commit([stored(make_record("4.2.1"))])
        await writer.flush_now(raise_errors=True)
        instances = DeltaTable(catalog.table_uri(bucket_name, "instances"), storage_options=options)
        # Another writer changes the table under the catalog writer: every flush fails.
        instances.alter.add_constraint({"frozen": "sop_instance_uid = '4.2.1'"})
        late = [make_record("4.2.2"), make_record("4.2.3")]
        for record in late:
            [done] = await writer.commit([stored(record)])  # the journal takes them
            assert done.status == "stored"
        with (
            caplog.at_level(logging.ERROR, "strata.catalog"),
            pytest.raises(Exception, match="failed validation"),
        ):
            await writer.flush_now(raise_errors=True)
        # The log says why, without the rows delta-rs shows with its error.
        assert "failed validation" in caplog.text and late[0].sha256 not in caplog.text
        assert (await writer.stats())["flush_failures"] == 1
        # Nothing committed is missing meanwhile: the index answers, queries read the
        # journal, and the table has not changed.
        assert await writer.lookup_sha256(late[1].sha256) is not None
        sops = [r.sop_instance_uid for r in catalog.find_instances(settings, bucket=bucket_name)]
        assert sops == ["4.2.1", "4.2.2", "4.2.3"]
        instances.update_incremental()
        assert instances.to_pyarrow_table().num_rows == 1
        instances.alter.drop_constraint("frozen")
        await writer.flush_now(raise_errors=True)
        instances.update_incremental()
        assert sorted(instances.to_pyarrow_table().column("sop_instance_uid").to_pylist()) == sops
        assert (await writer.stats())["unflushed_rows"] == 0
        assert list(store.list_keys(settings, bucket_name, "journal/")) == []
        await writer.close()

    asyncio.run(run())


def test_a_group_is_one_journal_object_and_an_older_writers_journal_is_still_read(
    minio: MinioServer, bucket_name: str, tmp_path: Path
) -> None:
    settings = minio.settings

    async def run() -> None:
        writer = CatalogWriter(
            settings, bucket_name, max_wait_s=0.0, index_path=str(tmp_path / "i")
        )
        [first] = await writer.commit([stored(make_record("4.5.1"))])
        assert first.status == "stored"
        [key] = store.list_keys(settings, bucket_name, "journal/")
        assert key.startswith(f"{journal.PREFIX}/{journal.GROUPS}/")
        assert set(journal.decode_group(store.get(settings, bucket_name, key))) == {"instances"}
        await writer.close()
        # An older writer wrote one object per table: such a group, not yet flushed, is
        # replayed by a writer whose index is lost, read by queries, and flushed.
        older = make_record("4.5.2")
        store.put(
            settings,
            bucket_name,
            journal.key("instances", 1_000),
            journal.encode(catalog_schema.instances_table([older])),
        )
        again = CatalogWriter(
            settings, bucket_name, max_wait_s=0.0, index_path=str(tmp_path / "other")
        )
        assert await again.lookup_sha256(older.sha256) is not None
        sops = [r.sop_instance_uid for r in catalog.find_instances(settings, bucket=bucket_name)]
        assert sops == ["4.5.1", "4.5.2"]
        [later] = await again.commit([stored(make_record("4.5.3"))])
        assert later.status == "stored"
        await again.flush_now(raise_errors=True)
        assert list(store.list_keys(settings, bucket_name, "journal/")) == []
        sops = [r.sop_instance_uid for r in catalog.find_instances(settings, bucket=bucket_name)]
        assert sops == ["4.5.1", "4.5.2", "4.5.3"]
        await again.close()

    asyncio.run(run())


def test_maintenance_compacts_and_vacuums_without_losing_a_row(
    ray_local: None, minio: MinioServer, bucket_name: str
) -> None:
    settings = minio.settings
    policy = MaintenancePolicy(every_flushes=10_000, retention_hours=0, compact_min_files=4)
    writer = start_writer(settings, bucket_name, max_wait_s=0.0, maintenance=policy)
    records = [make_record(f"5.1.{n}") for n in range(12)]
    for record in records:  # one group commit, one flush, one small file, per record
        ray.get(writer.commit.remote([stored(record)]))
        ray.get(writer.flush_now.remote(raise_errors=True))
    ray.get(writer.record_access.remote([STUDY_A]))
    options = catalog.storage_options(settings)
    instances = DeltaTable(catalog.table_uri(bucket_name, "instances"), storage_options=options)
    assert len(instances.file_uris()) == 12
    ray.get(writer.maintain_now.remote())
    instances.update_incremental()
    assert len(instances.file_uris()) == 1  # one day's partition, compacted
    rows = {r.sop_instance_uid for r in catalog.find_instances(settings, bucket=bucket_name)}
    assert rows == {r.sop_instance_uid for r in records}
    [study] = catalog.find_studies(settings, bucket=bucket_name)
    assert study.instance_count == 12 and study.last_access_time is not None
    # With no retention window, no file of an older version is left in the bucket.
    listed = store.client(settings).list_objects(bucket_name, prefix="instances/", recursive=True)
    data = [o.object_name for o in listed if "_delta_log" not in o.object_name]
    assert len(data) == 1
    assert ray.get(writer.stats.remote())["maintenance_passes"] == 1
    # The writer goes on committing after it, and its index still answers.
    later = make_record("5.1.99")
    [done] = ray.get(writer.commit.remote([stored(later)]))
    assert done.status == "stored"
    assert ray.get(writer.lookup_sha256.remote(records[0].sha256)) == dataclasses.replace(
        records[0], version=1
    )
    ray.kill(writer)


def test_a_fold_cut_off_after_its_append_is_not_appended_again(
    minio: MinioServer, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = minio.settings
    index_path = str(tmp_path / "index.sqlite")

    async def cut_off() -> None:
        writer = CatalogWriter(settings, bucket_name, max_wait_s=0.0, index_path=index_path)
        await writer.commit([stored(make_record("7.1.1")), stored(make_record("7.1.2"))])
        assert writer._index is not None
        # As if the writer died after the append to `studies` and before marking it.
        monkeypatch.setattr(writer._index, "mark_written", _dies)
        await writer.fold_now()
        assert (await writer.stats())["studies_failures"] == 1

    async def restarted() -> None:
        writer = CatalogWriter(settings, bucket_name, max_wait_s=0.0, index_path=index_path)
        await writer.commit([stored(make_record("7.1.3"))])
        await writer.close()

    asyncio.run(cut_off())
    monkeypatch.undo()
    asyncio.run(restarted())
    [study] = catalog.find_studies(settings, bucket=bucket_name)
    assert study.instance_count == 3
    rows = DeltaTable(
        catalog.table_uri(bucket_name, catalog.STUDIES),
        storage_options=catalog.storage_options(settings),
    ).to_pyarrow_table()
    assert rows.num_rows == 1


def _dies(*_: object) -> None:
    raise RuntimeError("killed")

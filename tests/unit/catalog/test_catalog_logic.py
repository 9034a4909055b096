"""The catalog's pure parts: versioning, study folding, schemas, predicate quoting."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from hypothesis import given
from hypothesis import strategies as st

from cluster.catalog import (
    INSTANCES_SCHEMA,
    LATER_INSTANCE_COLUMNS,
    STUDIES_SCHEMA,
    IndexEntry,
    derive_study,
    plan_group,
    sql_string_literal,
    storage_options,
    utc,
)
from workers.records import InstanceRecord, Stored, StoreSettings

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def record(
    sop_uid: str,
    sha256: str,
    *,
    series_uid: str = "1.9.1",
    modality: str = "CT",
    version: int = 0,
    ingest_time: datetime = T0,
    study_date: date | None = date(2024, 1, 1),
) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
        study_instance_uid="1.9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality=modality,
        body_part="",
        study_date=study_date,
        patient_pseudonym="pp",
        accession_pseudonym="ap",
        transfer_syntax_in="1.2.840.10008.1.2.1",
        transfer_syntax_stored="1.2.840.10008.1.2.1",
        storage_action="as_received",
        storage_note="",
        frames=1,
        rows=2,
        columns=2,
        bits_allocated=8,
        bits_stored=8,
        samples_per_pixel=1,
        photometric_interpretation="MONOCHROME2",
        bytes_in=100,
        bytes_stored=60,
        sha256=sha256,
        object_key=f"k/{sha256}",
        tier="hot",
        key_id="kek",
        ingest_time=ingest_time,
        version=version,
    )


def test_instances_schema_is_the_record_plus_the_partition_column() -> None:
    fields = [field.name for field in dataclasses.fields(InstanceRecord)]
    first = [name for name in fields if name not in LATER_INSTANCE_COLUMNS]
    # Columns added later come after the partition column, as a table written before
    # them gains them (schema merge).
    assert INSTANCES_SCHEMA.names == [*first, "ingest_date", *LATER_INSTANCE_COLUMNS]
    assert fields == [*first, *LATER_INSTANCE_COLUMNS]
    assert "modalities" in STUDIES_SCHEMA.names


def test_plan_versions_and_duplicates_in_order() -> None:
    index = {"known": IndexEntry("1.1", 2, date(2025, 1, 1))}
    items = [
        Stored("a", record("1.1", "known")),  # already catalogued
        Stored("b", record("1.1", "new-1")),  # new bytes for a known SOP
        Stored("c", record("1.1", "new-2")),  # and again, in the same group
        Stored("d", record("1.2", "x")),  # a new SOP
        Stored("e", record("1.2", "x")),  # the same file twice in a group
    ]
    decisions, new = plan_group(items, index, {"1.1": 2})
    assert [(d.file_id, d.status, d.version) for d in decisions] == [
        ("a", "duplicate", 2),
        ("b", "stored", 3),
        ("c", "stored", 4),
        ("d", "stored", 1),
        ("e", "duplicate", 1),
    ]
    assert [(r.sha256, r.version) for r in new] == [("new-1", 3), ("new-2", 4), ("x", 1)]


def test_plan_makes_ingest_time_utc() -> None:
    naive = record("1.1", "n", ingest_time=datetime(2025, 1, 2, 3, 4, 5))
    offset = record(
        "1.2", "o", ingest_time=datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    )
    _, new = plan_group([Stored("n", naive), Stored("o", offset)], {}, {})
    assert [r.ingest_time for r in new] == [T0, T0]
    assert all(r.ingest_time.tzinfo is UTC for r in new)


@given(st.lists(st.tuples(st.sampled_from("ABC"), st.sampled_from("uvwxyz")), max_size=30))
def test_plan_never_reuses_a_version(files: list[tuple[str, str]]) -> None:
    items = [Stored(str(n), record(sop, sop + content)) for n, (sop, content) in enumerate(files)]
    decisions, new = plan_group(items, {}, {})
    assert len(decisions) == len(items)
    versions = [(r.sop_instance_uid, r.version) for r in new]
    assert len(set(versions)) == len(versions)
    assert len({r.sha256 for r in new}) == len(new)
    for sop in "ABC":
        assert sorted(v for s, v in versions if s == sop) == list(
            range(1, sum(1 for s, _ in versions if s == sop) + 1)
        )


def test_a_study_row_counts_instances_series_and_bytes() -> None:
    first = record("1.1", "a", version=1, series_uid="s1", ingest_time=T0)
    study = derive_study([first], None)
    assert (study.instance_count, study.series_count, study.modalities) == (1, 1, ("CT",))

    later = [
        record("1.1", "b", version=2, series_uid="s1", ingest_time=T0 + timedelta(hours=1)),
        record("1.2", "c", version=1, series_uid="s2", modality="MR", study_date=None),
        record("1.3", "d", version=1, series_uid="s2", modality="", ingest_time=T0 - timedelta(1)),
    ]
    seen = T0 + timedelta(days=3)
    study = derive_study([first, *later], seen)
    assert study.instance_count == 3  # the second version of 1.1 counts once
    assert study.series_count == 2
    assert study.modalities == ("CT", "MR")
    assert (study.bytes_in, study.bytes_stored) == (400, 240)
    assert study.first_ingest_time == T0 - timedelta(1)
    assert study.last_ingest_time == T0 + timedelta(hours=1)
    assert study.study_date == date(2024, 1, 1)
    assert study.last_access_time == seen


def test_a_study_row_needs_an_instance() -> None:
    with pytest.raises(ValueError, match="at least one"):
        derive_study([], None)


def test_storage_options_for_minio() -> None:
    options = storage_options(StoreSettings("127.0.0.1:9000", "user", "secret"))
    assert options["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert options["AWS_ALLOW_HTTP"] == "true"
    assert options["aws_conditional_put"] == "etag"
    assert "AWS_S3_ALLOW_UNSAFE_RENAME" not in options


def test_utc() -> None:
    assert utc(datetime(2025, 1, 2, 3, 4, 5)) == T0
    assert utc(T0.astimezone(timezone(timedelta(hours=-5)))).tzinfo is UTC


def test_quoted_predicates_match_exactly_the_given_values(tmp_path: Path) -> None:
    nasty = ["plain", "it's", "x\\", "x\\' OR 1=1 --", "x\\'", "é☃"]
    schema = pa.schema([pa.field("uid", pa.string(), nullable=False), pa.field("n", pa.int64())])
    uri = str(tmp_path / "table")
    write_deltalake(uri, pa.table({"uid": [*nasty, "other"], "n": [0] * 7}, schema=schema))
    for value in nasty:
        write_deltalake(
            uri,
            pa.table({"uid": [value], "n": [1]}, schema=schema),
            mode="overwrite",
            predicate=f"uid IN ({sql_string_literal(value)})",
        )
    rows = DeltaTable(uri).to_pyarrow_table().to_pylist()
    assert sorted((r["uid"], r["n"]) for r in rows) == sorted(
        [(v, 1) for v in nasty] + [("other", 0)]
    )


def test_only_partitions_with_small_files_to_merge_are_compacted(tmp_path: Path) -> None:
    from datetime import date as day

    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from cluster.catalog.maintenance import crowded_partitions

    for n, when in enumerate([day(2026, 1, 1), day(2026, 1, 1), day(2026, 1, 2)]):
        rows = pa.table({"n": [n], "day": pa.array([when])})
        write_deltalake(tmp_path, rows, mode="append", partition_by=["day"])
    table = DeltaTable(tmp_path)
    assert crowded_partitions(table, 128 * 2**20) == ["2026-01-01"]
    # Files of a quarter of the target or more are not small: nothing to merge.
    assert crowded_partitions(table, 1024) == []


_TEXT = st.text(alphabet=st.sampled_from(".0123456789abcdefXYZ-' "), max_size=70)


@given(st.lists(_TEXT, min_size=2, max_size=6))
def test_uids_and_hex_packed_in_the_index_come_back_and_sort_alike(values: list[str]) -> None:
    from cluster.catalog.columns import pack_hex as _packed
    from cluster.catalog.columns import pack_uid as _uid
    from cluster.catalog.index import _unpacked, _unuid

    for value in values:
        assert _unuid(_uid(value)) == value
        assert _unpacked(_packed(value)) == value
    uids = [v for v in values if isinstance(_uid(v), bytes)]
    # Packed UIDs compare (as SQLite compares blobs: bytewise) as the UIDs do.
    assert sorted(uids, key=_uid) == sorted(uids)  # type: ignore[arg-type,return-value]


def test_a_uid_takes_half_its_length_and_other_text_is_kept() -> None:
    from cluster.catalog.columns import pack_hex as _packed
    from cluster.catalog.columns import pack_uid as _uid

    uid = "1.2.826.0.1.3680043.10.543.20261202.7.123"
    assert isinstance(_uid(uid), bytes) and len(_uid(uid)) == (len(uid) + 1) // 2
    assert _uid("unknown.study") == "unknown.study" and _uid("") == ""
    assert _packed("0f" * 16) == bytes.fromhex("0f" * 16)
    assert _packed("0F" * 16) == "0F" * 16  # upper case would not come back as it was
    assert _packed("abc") == "abc"  # not whole bytes

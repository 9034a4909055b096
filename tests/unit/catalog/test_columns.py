"""The index's values a column at a time equal them a value at a time; its codes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.catalog import columns
from cluster.catalog.columns import pack_hex, pack_uid
from cluster.catalog.index import _Codes, _unuid, uid_key

# Values like those the catalog holds (hex digests, UIDs) and values unlike them (empty,
# odd lengths, capitals, other characters, non-ASCII), null among them.
HEXLIKE = st.text(alphabet="0123456789abcdefABx", max_size=70)
UIDLIKE = st.text(alphabet="0123456789.x/é", max_size=70)
VALUES = st.lists(st.one_of(st.none(), HEXLIKE, UIDLIKE), max_size=40)
# Both ways each column function has: value by value (short columns) and in bulk.
BOTH_WAYS = st.sampled_from([0, 10**9])


@given(VALUES, st.sampled_from([pa.string(), pa.large_string()]), st.integers(0, 3), BOTH_WAYS)
def test_packed_equals_the_per_value_function(
    values: list[str | None], kind: pa.DataType, skip: int, bulk_from: int
) -> None:
    column = pa.array(values, kind)[skip:]  # an offset into the buffers, as batches have
    with mock.patch.object(columns, "_BULK_ROWS", bulk_from):
        packed = columns.pack_hex_column(column)
    assert packed == [None if v is None else pack_hex(v) for v in values[skip:]]


@given(VALUES, st.sampled_from([pa.string(), pa.large_string()]), st.integers(0, 3), BOTH_WAYS)
def test_packed_uids_equal_the_per_value_function(
    values: list[str | None], kind: pa.DataType, skip: int, bulk_from: int
) -> None:
    column = pa.array(values, kind)[skip:]
    with mock.patch.object(columns, "_BULK_ROWS", bulk_from):
        packed = columns.pack_uid_column(column)
    assert packed == [None if v is None else pack_uid(v) for v in values[skip:]]
    assert [None if p is None else _unuid(p) for p in packed] == values[skip:]


def test_a_real_uid_is_packed_four_bits_a_character() -> None:
    uid = "1.2.840.10008.5.1.4.1.1.2"
    (packed,) = columns.pack_uid_column(pa.array([uid]))  # value by value
    with mock.patch.object(columns, "_BULK_ROWS", 0):
        assert columns.pack_uid_column(pa.array([uid])) == [packed]
    assert isinstance(packed, bytes) and len(packed) == (len(uid) + 1) // 2
    assert _unuid(packed) == uid


@given(
    st.lists(st.one_of(st.none(), st.sampled_from(["1.2", "1.3", "1.2.3", ""])), max_size=30),
    BOTH_WAYS,
)
def test_by_distinct_converts_each_value_once_at_most(
    values: list[str | None], bulk_from: int
) -> None:
    seen: list[list[str]] = []

    def keys(distinct: list[str]) -> list[int]:
        seen.append(distinct)
        return [uid_key(value) for value in distinct]

    with mock.patch.object(columns, "_BULK_ROWS", bulk_from):
        got = columns.by_distinct(pa.array(values, pa.string()), keys)
    assert got == [None if v is None else uid_key(v) for v in values]
    assert len(seen) == 1
    present = [v for v in values if v is not None]
    assert sorted(seen[0]) == sorted(set(present) if bulk_from == 0 else present)


@pytest.mark.parametrize("bulk_from", [0, 10**9])
def test_by_distinct_keeps_tuples_whole(bulk_from: int) -> None:
    with mock.patch.object(columns, "_BULK_ROWS", bulk_from):
        got = columns.by_distinct(pa.array(["a", "b", "a"]), lambda d: [(v, v) for v in d])
    assert got == [("a", "a"), ("b", "b"), ("a", "a")]


def test_codes_past_the_remembered_limit_are_all_found_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Storage notes carry sizes, so a large archive has many distinct ones: a batch that
    # crosses the limit holds codes known a moment ago and new ones alike.
    monkeypatch.setattr(_Codes, "_REMEMBERED", 4)
    connection = sqlite3.connect(tmp_path / "codes.sqlite")
    connection.execute("CREATE TABLE codes (id INTEGER PRIMARY KEY, value TEXT NOT NULL UNIQUE)")
    codes = _Codes(connection)
    first = codes.ids(["a", "b", "c"])
    crossing = codes.ids(["a", "b", "d", "e"])  # 3 known + 2 new > 4: forgotten meanwhile
    assert crossing[:2] == first[:2]
    assert len(set(crossing)) == 4
    assert codes.ids(["c"]) == [first[2]]

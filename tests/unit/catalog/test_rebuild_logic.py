"""The rebuild's pure decisions: versions numbered from ingest times."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from cluster.catalog.rebuild import assign_versions

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def test_each_sop_instance_is_numbered_in_ingest_order_whatever_the_read_order() -> None:
    files = [
        ("1.2.1", T0 + timedelta(seconds=30), "c" * 64),
        ("1.2.1", T0, "b" * 64),
        ("1.2.1", T0 + timedelta(microseconds=1), "a" * 64),
        ("1.2.2", T0 + timedelta(days=1), "d" * 64),
        ("1.2.3", T0 - timedelta(days=400), "e" * 64),
        ("1.2.3", T0, "f" * 64),
    ]
    expected = {"b" * 64: 1, "a" * 64: 2, "c" * 64: 3, "d" * 64: 1, "e" * 64: 1, "f" * 64: 2}
    for seed in range(5):
        shuffled = random.Random(seed).sample(files, len(files))
        assert assign_versions(shuffled) == expected


def test_files_stored_in_the_same_microsecond_are_ordered_by_sha256() -> None:
    files = [("1.2.1", T0, "9" * 64), ("1.2.1", T0, "1" * 64)]
    assert assign_versions(files) == {"1" * 64: 1, "9" * 64: 2}


def test_naive_times_are_utc() -> None:
    naive = T0.replace(tzinfo=None) + timedelta(hours=1)
    files = [("1.2.1", naive, "a" * 64), ("1.2.1", T0 + timedelta(minutes=59), "b" * 64)]
    assert assign_versions(files) == {"b" * 64: 1, "a" * 64: 2}


def test_nothing_to_number() -> None:
    assert assign_versions([]) == {}

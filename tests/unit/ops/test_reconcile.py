"""Which objects the orphan reconciler may judge (pure logic; the I/O is tested for real in
tests/integration/test_self_healing.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cluster.ops.reconcile import candidates, sha256_of
from workers.objects.store import ListedObject

SHA = "ab" * 32
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_the_sha256_is_the_last_part_of_an_object_key() -> None:
    assert sha256_of(f"v1/12/{'1' * 24}/{'2' * 24}/{SHA}") == SHA
    assert sha256_of("v1/12/abc/def/not-a-hash") is None
    assert sha256_of(f"v1/12/abc/def/{SHA.upper()}") is None
    assert sha256_of(SHA[:-1]) is None


def test_objects_younger_than_the_grace_are_left_alone() -> None:
    old = ListedObject(f"v1/a/b/c/{SHA}", NOW - timedelta(seconds=300), 12)
    young = ListedObject(f"v1/a/b/d/{'cd' * 32}", NOW - timedelta(seconds=30), 12)
    foreign = ListedObject("somebody-elses-file.txt", NOW - timedelta(days=3), 12)
    chosen = candidates([old, young, foreign], NOW, timedelta(seconds=120))
    assert chosen == [(old.key, SHA)]
    assert candidates([old, young], NOW, timedelta(0)) == [
        (old.key, SHA),
        (young.key, "cd" * 32),
    ]


def test_a_mass_of_orphans_is_taken_for_a_lost_catalog() -> None:
    from cluster.ops.reconcile import too_many

    assert not too_many(3, 10)  # crash leftovers in a small archive
    assert not too_many(60, 1000)  # many, but a small part of the archive
    assert too_many(60, 100)
    assert too_many(10_000, 10_000)  # the catalog knows none of them

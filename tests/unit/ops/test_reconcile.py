"""Which objects the orphan reconciler may judge (pure logic; the I/O is tested for real in
tests/integration/test_self_healing.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cluster.ops.reconcile import candidates
from workers.objects.store import ListedObject, pack_key_for

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_packs_older_than_the_grace_are_judged_and_lone_keys_objects_found() -> None:
    old_pack = pack_key_for("1.2.3")
    young_pack = pack_key_for("1.2.3")
    lone = pack_key_for("1.2.4") + ".keys"  # its pack is gone
    listed = [
        ListedObject(old_pack, NOW - timedelta(seconds=300), 1200),
        ListedObject(old_pack + ".keys", NOW - timedelta(seconds=300), 120),
        ListedObject(young_pack, NOW - timedelta(seconds=30), 1200),
        ListedObject(young_pack + ".keys", NOW - timedelta(seconds=30), 120),
        ListedObject(lone, NOW - timedelta(seconds=300), 120),
        ListedObject("somebody-elses-file.txt", NOW - timedelta(days=3), 12),
    ]
    packs, lone_keys = candidates(listed, NOW, timedelta(seconds=120))
    assert [item.key for item in packs] == [old_pack]
    assert lone_keys == [lone]
    packs, _ = candidates(listed, NOW, timedelta(0))
    assert [item.key for item in packs] == [old_pack, young_pack]


def test_a_pack_key_names_its_study_by_hash_and_is_never_reused() -> None:
    first, second = pack_key_for("1.2.3"), pack_key_for("1.2.3")
    assert first != second
    assert first.rsplit("/", 1)[0] == second.rsplit("/", 1)[0]
    assert "1.2.3" not in first and first.startswith("v2/")


def test_a_mass_of_orphans_is_taken_for_a_lost_catalog() -> None:
    from cluster.ops.reconcile import too_many

    assert not too_many(3, 10)  # crash leftovers in a small archive
    assert not too_many(60, 1000)  # many, but a small part of the archive
    assert too_many(60, 100)
    assert too_many(10_000, 10_000)  # the catalog knows none of them

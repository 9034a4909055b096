"""Deletion at the end of retention on a real node (real MinIO, Ray, the node's catalog
writer): the study's keys objects and packs are gone from every tier, the catalog records
the deletion (placements in the tier ``deleted``, with the rule), no door finds or reads
the study, a copy sent again is refused, a held study past the same end is kept byte for
byte, and a deletion cut off by a kill is finished by the next apply."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from cluster import catalog
from cluster.client import StrataClient
from cluster.ops.node import NODE_FILE
from cluster.tiering.apply import DELETING, MARKERS
from tests.integration.node import TEST_TOKEN, Node
from tests.integration.tiering.test_tier_apply import (
    apply,
    apply_killed_when_listed,
    assert_byte_exact,
    ingest,
    study_files,
    study_of,
    summary,
)
from workers.objects.store import study_prefix
from workers.records import StoreSettings

POLICY = """
[[rules]]
name = "CT to cold after a year"
from = ["hot", "warm"]
to = "cold"
min_age_days = 365
modality = "CT"

[[retention]]
name = "CT kept ten years"
keep_days = 3650
modality = "CT"

[holds]
studies = [{held}]
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with Node(tmp_path_factory.mktemp("retention")) as running:
        yield running


def objects_of(node: Node, study: str) -> list[tuple[str, str]]:
    """Every object under ``study``'s prefix in every bucket: (bucket, key)."""
    store = node.object_store()
    return [
        (bucket.name, item.object_name)
        for bucket in store.list_buckets()
        for item in store.list_objects(bucket.name, prefix=study_prefix(study), recursive=True)
    ]


def deletions(node: Node) -> dict[str, set[str]]:
    """The reasons the catalog's placements give for each study placed in ``deleted``."""
    rows = (
        catalog.connect(node_settings(node), "strata-catalog", ("placements",))
        .execute("SELECT study_instance_uid, reason FROM placements WHERE tier = 'deleted'")
        .fetchall()
    )
    found: dict[str, set[str]] = {}
    for study, reason in rows:
        found.setdefault(study, set()).add(reason)
    return found


def node_settings(node: Node) -> StoreSettings:
    return StoreSettings(**json.loads((node.data_dir / NODE_FILE).read_text())["store"])


def test_a_study_past_its_retention_is_shredded_and_recorded(node: Node, tmp_path: Path) -> None:
    today = datetime.now(UTC).strftime("%Y%m%d")
    expired = study_files(3, "expired", "20100301")
    held = study_files(2, "held", "20090101")
    recent = study_files(2, "recent", today)
    sent: dict[str, dict[str, bytes]] = {}
    for name, files in (("expired", expired), ("held", held), ("recent", recent)):
        sent[name] = ingest(node, tmp_path / name, files)
    gone = study_of(expired)
    assert objects_of(node, gone)  # its pack and keys object, before
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(held=f'"{study_of(held)}"'))

    done = apply(node, policy)
    assert done.returncode == 0, done.stdout + done.stderr
    planned, moved, deleted, failed = summary(done)[:4]
    assert (planned, moved, deleted, failed) == ("1", "0", "1", "0"), done.stdout
    assert "crypto-shredded" in done.stdout

    # Nothing of it is left in any tier's bucket: no keys object, no pack.
    assert objects_of(node, gone) == []
    # The catalog records it, with the rule, for every instance.
    recorded = deletions(node)
    assert set(recorded) == {gone}
    assert all("CT kept ten years" in reason for reason in recorded[gone])
    with StrataClient(node.address, TEST_TOKEN) as client:
        assert client.find_instances(study_instance_uid=gone) == []
        assert gone not in {study.study_instance_uid for study in client.find_studies()}
        for uid in sent["expired"]:
            with pytest.raises(grpc.RpcError) as refused:
                client.retrieve(uid)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert "retention" in (refused.value.details() or "")
        # A copy sent again is refused with the reason, not stored again.
        name, data = expired[0]
        (answer,) = client.ingest_bytes([(name, data)])
        assert (answer.status, answer.reason) == ("rejected", "deleted"), answer
    assert objects_of(node, gone) == []
    # The held study is past the same retention end and is kept; the recent one too.
    assert_byte_exact(node, sent["held"] | sent["recent"])
    assert objects_of(node, study_of(held))

    again = apply(node, policy)
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary(again)[:3] == ["0", "0", "0"]
    assert "Traceback" not in node.log_text()


def test_a_deletion_killed_mid_way_is_finished_by_the_next_apply(
    node: Node, tmp_path: Path
) -> None:
    studies = [study_files(2, f"x{number}", "20080101") for number in range(6)]
    kept = study_files(2, "kept", datetime.now(UTC).strftime("%Y%m%d"))
    sent = ingest(node, tmp_path / "kept", kept)
    for number, files in enumerate(studies):
        ingest(node, tmp_path / f"x{number}", files)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(held=""))
    apply_killed_when_listed(node, policy, DELETING)
    second = apply(node, policy)
    assert second.returncode == 0, second.stdout + second.stderr
    store = node.object_store()  # the restarted node's MinIO listens elsewhere
    for prefix in (DELETING, MARKERS):
        assert not list(store.list_objects("strata-catalog", prefix=prefix, recursive=True))
    recorded = deletions(node)
    with StrataClient(node.address, TEST_TOKEN) as client:
        for files in studies:
            study = study_of(files)
            assert objects_of(node, study) == []
            assert study in recorded
            assert client.find_instances(study_instance_uid=study) == []
    assert_byte_exact(node, sent)

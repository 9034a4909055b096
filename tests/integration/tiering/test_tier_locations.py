"""Tiers in places of their own, on a real node: cold in a second MinIO deployment (its
own drives, endpoint and credentials), warm in another bucket of the node's MinIO. A
move across deployments copies, verifies and commits as within one; every instance
comes back byte for byte from where its tier lives, and nothing is left behind."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from minio import Minio

from cluster.ops.minio import MinioServer
from tests.integration.node import Node
from tests.integration.tiering.test_tier_apply import (
    apply,
    assert_byte_exact,
    ingest,
    study_files,
    study_of,
    summary,
    tiers_by_study,
)
from workers.objects import store
from workers.objects.store import study_prefix

POLICY = """
[tiers.cold]
storage_class = "REDUCED_REDUNDANCY"

[[rules]]
name = "cold after a year"
from = ["hot", "warm"]
to = "cold"
min_age_days = 365

[[rules]]
name = "warm after 90 days"
from = "hot"
to = "warm"
min_age_days = 90
"""


@pytest.fixture(scope="module")
def cold_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    server = MinioServer(tmp_path_factory.mktemp("cold-minio"), drives=4).start()
    try:
        yield server
    finally:
        server.stop()


def keys_under(client: Minio, bucket: str, study: str) -> set[str]:
    if not client.bucket_exists(bucket):
        return set()
    listed = client.list_objects(bucket, prefix=study_prefix(study), recursive=True)
    return {item.object_name for item in listed if item.object_name}


def test_a_tier_in_a_second_deployment_and_a_bucket_of_its_own(
    cold_deployment: MinioServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = cold_deployment.settings
    monkeypatch.setenv("STRATA_TEST_COLD_AK", settings.access_key)
    monkeypatch.setenv("STRATA_TEST_COLD_SK", settings.secret_key)
    locations = tmp_path / "tiers.toml"
    locations.write_text(
        f'[cold]\nendpoint = "{settings.endpoint}"\nbucket = "archive-cold"\n'
        'access_key_env = "STRATA_TEST_COLD_AK"\nsecret_key_env = "STRATA_TEST_COLD_SK"\n'
        '[warm]\nbucket = "strata-warm-ia"\n'
    )
    (tmp_path / "node").mkdir()
    with Node(tmp_path / "node", tier_locations=str(locations)) as node:
        old = study_files(3, "old", "20160301")
        middle_day = (datetime.now(UTC) - timedelta(days=200)).strftime("%Y%m%d")
        middle = study_files(2, "middle", middle_day)
        sent = ingest(node, tmp_path / "old", old) | ingest(node, tmp_path / "middle", middle)
        policy = tmp_path / "policy.toml"
        policy.write_text(POLICY)

        done = apply(node, policy)
        assert done.returncode == 0, done.stdout + done.stderr
        assert summary(done)[:4] == ["2", "2", "0", "0"]
        assert tiers_by_study(node, study_of(old)) == {"cold"}
        assert tiers_by_study(node, study_of(middle)) == {"warm"}
        # Cold's objects are in the second deployment only; warm's in its own bucket.
        remote = store.client(settings)
        local = node.object_store()
        cold_keys = keys_under(remote, "archive-cold", study_of(old))
        assert cold_keys and any(key.endswith(".keys") for key in cold_keys)
        for bucket in ("strata-hot", "strata-cold", "strata-warm-ia"):
            assert not keys_under(local, bucket, study_of(old))
        assert keys_under(local, "strata-warm-ia", study_of(middle))
        assert not keys_under(local, "strata-hot", study_of(middle))
        for key in cold_keys:
            stat = remote.stat_object("archive-cold", key)
            assert (stat.metadata or {}).get("x-amz-storage-class") == "REDUCED_REDUNDANCY"
        assert_byte_exact(node, sent)
        assert "Traceback" not in node.log_text()

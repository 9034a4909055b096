"""A cold tier with its own codec, on a real node: a study moved there is re-encoded
(JPEG-LS instead of the hot tier's HTJ2K), verified, smaller, and still returns its
original bytes; an interrupted re-encoding move leaves no new pack behind."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from cluster.client import StrataClient
from cluster.tiering.apply import MARKERS
from tests.integration.node import TEST_TOKEN, Node
from tests.integration.tiering.test_tier_apply import (
    apply,
    apply_killed_when_listed,
    assert_byte_exact,
    ingest,
    packs,
    placed_in_cold,
    study_files,
    study_of,
    summary,
    tiers_by_study,
)
from tests.integration.tiering.test_tier_retention import objects_of

JPEG_LS = "1.2.840.10008.1.2.4.80"
HTJ2K = "1.2.840.10008.1.2.4.201"

POLICY = """
[tiers.cold]
price_per_gb_month = 0.004
storage_class = "REDUCED_REDUNDANCY"
codec = "jpegls"

[[rules]]
name = "CT to cold after a year"
from = ["hot", "warm"]
to = "cold"
min_age_days = 365
modality = "CT"
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with Node(tmp_path_factory.mktemp("codec")) as running:
        yield running


def stored_bytes(node: Node, study: str) -> int:
    store = node.object_store()
    return sum(store.stat_object(bucket, key).size or 0 for bucket, key in objects_of(node, study))


def test_a_cold_study_is_re_encoded_and_returns_its_original_bytes(
    node: Node, tmp_path: Path
) -> None:
    files = study_files(4, "recode", "20150301")
    sent = ingest(node, tmp_path / "in", files)
    study = study_of(files)
    with StrataClient(node.address, TEST_TOKEN) as client:
        assert {client.retrieve(uid, stored=True).transfer_syntax for uid in sent} == {HTJ2K}
    hot_packs = packs(node, "strata-hot")
    before = stored_bytes(node, study)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)

    done = apply(node, policy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary(done)[:4] == ["1", "1", "0", "0"]
    assert "Re-encoded with the target tier's codec" in done.stdout
    assert tiers_by_study(node, study) == {"cold"}
    # New packs, in cold only, smaller than the hot ones were; the hot ones are gone.
    cold = packs(node, "strata-cold")
    assert cold and not cold & hot_packs and not packs(node, "strata-hot") & hot_packs
    assert set(placed_in_cold(node)) == cold
    after = stored_bytes(node, study)
    assert after < before, (before, after)
    store = node.object_store()
    for key in cold:
        stat = store.stat_object("strata-cold", key)
        assert (stat.metadata or {}).get("x-amz-storage-class") == "REDUCED_REDUNDANCY"
    # Each instance is stored as JPEG-LS now, and its original comes back byte for byte.
    assert_byte_exact(node, sent)
    with StrataClient(node.address, TEST_TOKEN) as client:
        for uid, data in sent.items():
            again = client.retrieve(uid, stored=True)
            assert again.transfer_syntax == JPEG_LS
            decoded = pydicom.dcmread(io.BytesIO(again.data)).pixel_array
            assert (decoded == pydicom.dcmread(io.BytesIO(data)).pixel_array).all()
        found = client.find_instances(study_instance_uid=study)
        assert sum(instance.bytes_stored for instance in found) < before
        # The catalog says what each object holds now (its placement's syntax).
        assert {instance.transfer_syntax_stored for instance in found} == {JPEG_LS}
    assert "Traceback" not in node.log_text()


def test_an_interrupted_re_encoding_move_leaves_nothing_behind(node: Node, tmp_path: Path) -> None:
    studies = [study_files(2, f"k{number}", "20140101") for number in range(4)]
    sent = {}
    for number, files in enumerate(studies):
        sent.update(ingest(node, tmp_path / f"k{number}", files))
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    apply_killed_when_listed(node, policy, MARKERS)
    second = apply(node, policy)
    assert second.returncode == 0, second.stdout + second.stderr
    store = node.object_store()
    assert not list(store.list_objects("strata-catalog", prefix=MARKERS, recursive=True))
    for files in studies:
        assert tiers_by_study(node, study_of(files)) == {"cold"}
    assert packs(node, "strata-cold") == set(placed_in_cold(node))  # no pack unnamed
    moved = {study_of(files) for files in studies}
    assert {bucket for study in moved for bucket, _ in objects_of(node, study)} == {"strata-cold"}
    assert_byte_exact(node, sent)

"""Orthanc from Debian, with Strata configured as a remote modality, forwards a study with
C-STORE and asks for storage commitment: the study arrives complete and byte-identical,
and Orthanc records the commitment as successful."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.client import StrataClient
from cluster.dev import orthanc
from tests.integration.conftest import DIMSE_PEERS, ct_instances, dataset_bytes
from tests.integration.node import Node, free_port

pytestmark = pytest.mark.skipif(
    not orthanc.available(), reason="Orthanc is not installed (make test installs it)"
)


@pytest.fixture(scope="module")
def peer(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[orthanc.Orthanc]:
    with orthanc.Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        dicom_port=DIMSE_PEERS["ORTHANC"],
        http_port=free_port(),
        modalities={"strata": ("STRATA", "127.0.0.1", node.dimse_port)},
    ) as server:
        yield server


def test_orthanc_forwards_a_study_with_storage_commitment(
    node: Node, peer: orthanc.Orthanc, tmp_path: Path
) -> None:
    files = ct_instances(6, "orthanc")
    for _, data in files:
        peer.post("/instances", data)
    [study] = peer.get("/studies")
    job = peer.post(
        "/modalities/strata/store",
        {"Resources": [study], "StorageCommitment": True, "Synchronous": True},
    )
    transaction = job.get("StorageCommitmentTransactionUID")
    assert transaction, job
    deadline = time.monotonic() + 120
    while True:
        report = peer.get(f"/storage-commitment/{transaction}")
        if report["Status"] != "Pending" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert report["Status"] == "Success", (report, peer.log_tail())
    assert len(report["Success"]) == len(files) and not report["Failures"]
    with StrataClient(node.address) as client:
        for instance in peer.get(f"/studies/{study}/instances"):
            sent = peer.get(f"/instances/{instance['ID']}/file").content
            uid = peer.get(f"/instances/{instance['ID']}/simplified-tags")["SOPInstanceUID"]
            held, stored = dataset_bytes(client.retrieve(uid).data), dataset_bytes(sent)
            # Orthanc's DCMTK leaves out Data Set Trailing Padding (FFFC,FFFC) when it
            # sends, as storescu does: the rest is what Strata holds, byte for byte.
            assert stored.startswith(held)
            assert _trailing_padding_only(stored[len(held) :])


def _trailing_padding_only(rest: bytes) -> bool:
    """Whether ``rest`` is empty or exactly one Data Set Trailing Padding element
    (explicit VR little endian: tag FFFC,FFFC, VR OB, 4-byte length)."""
    if not rest:
        return True
    head = bytes.fromhex("fcfffcff") + b"OB\x00\x00"
    return rest.startswith(head) and int.from_bytes(rest[8:12], "little") == len(rest) - 12

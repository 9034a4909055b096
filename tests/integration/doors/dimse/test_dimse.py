"""The DIMSE door with clients nobody on the team wrote (DCMTK from Debian), and
storage commitment from a pynetdicom SCU: what is sent is stored byte for byte, the
archive commits only to what it holds, and callers not on the allowlist are refused."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from cluster.client import StrataClient
from tests.integration.conftest import (
    DIMSE_PEERS,
    ct_instances,
    dataset_bytes,
    dcmtk,
    on_the_wire,
)
from tests.integration.node import Node

pytestmark = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="DCMTK is not installed (make test installs it)"
)

# Native, big endian, and compressed files as the modalities send them.
SENT = (
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
)


def fresh_copy(name: str, folder: Path) -> Path:
    """pydicom's file ``name`` with a SOP Instance UID of its own (the shared node holds
    the original already)."""
    dataset = pydicom.dcmread(get_testdata_file(name))
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = folder / name
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_echo(node: Node) -> None:
    done = dcmtk("echoscu", "-aec", "STRATA", "127.0.0.1", str(node.dimse_port))
    assert done.returncode == 0, done.stderr


def test_a_caller_not_on_the_allowlist_is_rejected(node: Node) -> None:
    done = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "STRATA", "127.0.0.1", str(node.dimse_port))
    assert done.returncode != 0
    assert "Calling AE Title Not Recognized" in done.stderr + done.stdout
    wrong_called = dcmtk("echoscu", "-aec", "NOTSTRATA", "127.0.0.1", str(node.dimse_port))
    assert wrong_called.returncode != 0


# storescu proposes a compressed transfer syntax only when told which one.
_PROPOSE = {
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE lossless
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.2": "-xb",  # explicit VR big endian
}


def test_storescu_over_parallel_associations_stores_every_file_byte_for_byte(
    node: Node, tmp_path: Path
) -> None:
    files = [fresh_copy(name, tmp_path) for name in SENT]
    native = []
    for name, data in ct_instances(8, "dimse"):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        native.append(path)
    # Four associations at once with the native files, and one for each compressed one.
    runs: list[list[str]] = [[*map(str, native[number::4])] for number in range(4)]
    for path in files:
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        runs.append([*([_PROPOSE[syntax]] if syntax in _PROPOSE else []), str(path)])
    started = [
        subprocess.Popen(
            ["storescu", "-aec", "STRATA", "127.0.0.1", str(node.dimse_port), *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arguments in runs
    ]
    for run in started:
        _, errors = run.communicate(timeout=300)
        assert run.returncode == 0, errors
    sent = on_the_wire(runs)
    assert len(sent) == len(files) + len(native)
    with StrataClient(node.address) as client:
        for uid, data in sent.items():
            assert dataset_bytes(client.retrieve(uid).data) == data


def test_a_file_the_archive_refuses_is_answered_with_a_failure_status(
    node: Node, tmp_path: Path
) -> None:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.SOPInstanceUID = generate_uid()
    template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
    template.PixelData = template.PixelData[:-100]  # shorter than rows × columns says
    path = tmp_path / "short.dcm"
    template.save_as(path, enforce_file_format=True)
    done = dcmtk("storescu", "-d", "-aec", "STRATA", "127.0.0.1", str(node.dimse_port), str(path))
    output = done.stdout + done.stderr
    # 0xA903: data set does not match SOP class (the pixel length), named in the comment.
    assert "0xa903" in output.lower(), output
    assert "Pixel Data has" in output  # the Error Comment names the element


class Reports:
    """N-EVENT-REPORTs as the tests' own SCU (or SCP) receives them."""

    def __init__(self) -> None:
        self.received: list[Dataset] = []
        self.arrived = threading.Event()

    def handler(self, event: evt.Event) -> tuple[int, None]:
        self.received.append(event.event_information)
        self.arrived.set()
        return 0x0000, None

    def one(self) -> Dataset:
        assert self.arrived.wait(30), "no N-EVENT-REPORT arrived"
        [report] = self.received
        return report


def stored_by_storescu(node: Node, tmp_path: Path, tag: str) -> Dataset:
    [(name, data)] = ct_instances(1, tag)
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    done = dcmtk("storescu", "-aec", "STRATA", "127.0.0.1", str(node.dimse_port), str(path))
    assert done.returncode == 0, done.stderr
    return pydicom.dcmread(path, stop_before_pixels=True)


def ask_commitment(assoc: Any, instances: list[tuple[str, str]]) -> str:
    """Send an N-ACTION for ``instances`` (SOP Class, SOP Instance); its transaction."""
    request = Dataset()
    request.TransactionUID = generate_uid()
    items = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    request.ReferencedSOPSequence = items
    answer, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
    assert answer.Status == 0x0000
    return str(request.TransactionUID)


COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def test_storage_commitment_commits_only_what_is_stored(node: Node, tmp_path: Path) -> None:
    stored = stored_by_storescu(node, tmp_path, "commit")
    unknown = generate_uid()
    reports = Reports()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1",
        node.dimse_port,
        ae_title="STRATA",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )
    assert assoc.is_established
    try:
        transaction = ask_commitment(
            assoc,
            [(stored.SOPClassUID, stored.SOPInstanceUID), (stored.SOPClassUID, unknown)],
        )
        report = reports.one()  # on this association, still open
    finally:
        assoc.release()
    assert report.TransactionUID == transaction
    assert [i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence] == [
        stored.SOPInstanceUID
    ]
    [failed] = report.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (unknown, 0x0112)


def test_commitment_is_reported_on_a_new_association_when_the_caller_has_left(
    node: Node, tmp_path: Path
) -> None:
    stored = stored_by_storescu(node, tmp_path, "commit-later")
    reports = Reports()
    # The tests' own SCP, where the node's configuration says TESTSCU listens.
    scp = AE(ae_title="TESTSCU")
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = scp.start_server(
        ("127.0.0.1", DIMSE_PEERS["TESTSCU"]),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="STRATA")
        assert assoc.is_established
        transaction = ask_commitment(assoc, [(stored.SOPClassUID, stored.SOPInstanceUID)])
        assoc.release()  # gone before the report
        report = reports.one()
    finally:
        server.shutdown()
    assert report.TransactionUID == transaction
    assert [i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence] == [
        stored.SOPInstanceUID
    ]
    assert "FailedSOPSequence" not in report

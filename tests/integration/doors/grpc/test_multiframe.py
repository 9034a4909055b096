"""Multi-frame instances on a real node: frames encoded by several Ray workers, single
frames read without the whole object, and retrieval transcoded to other syntaxes."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cluster.client import StrataClient
from cluster.dev.samples import pydicom_data_dir
from tests.integration.node import Node
from workers.records import HTJ2K_LOSSLESS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FRAMES = 96  # above the node's default fan-out threshold of 64: three runs of 32
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


@pytest.fixture(scope="module")
def client(node: Node) -> Iterator[StrataClient]:
    with StrataClient(node.address) as client:
        yield client


@pytest.fixture(scope="module")
def cine() -> tuple[bytes, np.ndarray]:
    """A 96-frame 128 x 128 16-bit instance cut from the real 1024 x 1024 MR."""
    source = pydicom.dcmread(pydicom_data_dir() / "MR2_UNCI.dcm")
    pixels = source.pixel_array
    frames = np.stack(
        [
            pixels[(7 * i) % 896 : (7 * i) % 896 + 128, (11 * i) % 896 : (11 * i) % 896 + 128]
            for i in range(FRAMES)
        ]
    )
    source.Rows = source.Columns = 128
    source.NumberOfFrames = FRAMES
    source.SOPInstanceUID = generate_uid()
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    source.PixelData = np.ascontiguousarray(frames).tobytes()
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), frames


@pytest.fixture(scope="module")
def stored_cine(client: StrataClient, cine: tuple[bytes, np.ndarray]) -> str:
    data, _ = cine
    (outcome,) = client.ingest_bytes([("cine", data)])
    assert outcome.status in ("stored", "duplicate"), outcome.message
    return outcome.sop_instance_uid


def test_large_instance_is_encoded_by_several_workers(
    client: StrataClient, cine: tuple[bytes, np.ndarray], stored_cine: str
) -> None:
    (row,) = client.find_instances(sop_instance_uid=stored_cine)
    assert row.storage_action == "transcoded"
    assert f"{FRAMES} frames encoded by 3 parallel tasks" in row.storage_note
    retrieved = client.retrieve(stored_cine)
    assert retrieved.sha256 == hashlib.sha256(cine[0]).hexdigest()


def test_single_frames_are_read_without_the_whole_object(
    client: StrataClient, cine: tuple[bytes, np.ndarray], stored_cine: str
) -> None:
    _, frames = cine
    (row,) = client.find_instances(sop_instance_uid=stored_cine)
    got = client.retrieve_frames(stored_cine, [1, 50, FRAMES], decoded=True)
    assert [f.number for f in got] == [1, 50, FRAMES]
    for frame in got:
        assert frame.transfer_syntax == ExplicitVRLittleEndian
        expected = frames[frame.number - 1].astype("<u2").tobytes()
        assert frame.data == expected
    # The first frame pays for header and manifest; every one is a small part of the object.
    assert sum(f.bytes_read for f in got) < row.bytes_stored / 10
    raw = client.retrieve_frames(stored_cine, [2])[0]
    assert raw.transfer_syntax == HTJ2K_LOSSLESS
    assert raw.data[:2] == b"\xff\x4f"  # a JPEG 2000 codestream (SOC marker)


def test_frame_out_of_range_is_refused(client: StrataClient, stored_cine: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        client.retrieve_frames(stored_cine, [FRAMES + 1])
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"1..{FRAMES}" in (error.value.details() or "")


@pytest.mark.parametrize("target", [JPEG2000_LOSSLESS, ExplicitVRLittleEndian, HTJ2K_LOSSLESS])
def test_retrieval_transcodes_to_the_syntax_asked(
    client: StrataClient, cine: tuple[bytes, np.ndarray], stored_cine: str, target: str
) -> None:
    retrieved = client.retrieve(stored_cine, transfer_syntax=target)
    dataset = pydicom.dcmread(io.BytesIO(retrieved.data))
    assert dataset.file_meta.TransferSyntaxUID == target
    np.testing.assert_array_equal(dataset.pixel_array, cine[1])


def test_lossy_instance_is_not_transcoded(client: StrataClient) -> None:
    dataset = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = dataset.StudyInstanceUID or generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    (outcome,) = client.ingest_bytes([("lossy", buffer.getvalue())])
    assert outcome.status == "stored"
    with pytest.raises(grpc.RpcError) as error:
        client.retrieve(outcome.sop_instance_uid, transfer_syntax=HTJ2K_LOSSLESS)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lossy" in (error.value.details() or "")
    assert client.retrieve(outcome.sop_instance_uid).data == buffer.getvalue()

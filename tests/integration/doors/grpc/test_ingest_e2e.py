"""End to end against a real node: `strata serve --embedded` (real Ray, real 4-drive MinIO).

Ingests every file of pydicom's test data and pydicom-data that pydicom can read, and
checks what the issue promises: byte-for-byte retrieval, compressed storage that decodes
to identical pixels, no plaintext or PHI in the drives or logs, duplicates and versions,
rejections that leave the rest alone, backpressure, and survival across a restart.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import generate_uid

from cluster.client import BearerToken, IngestOutcome, StrataClient
from cluster.rpc import strata_pb2 as pb
from tests.integration.conftest import NODE_INFLIGHT, NODE_MAX_FILE, MiB, packs_by_member
from tests.integration.node import Node
from workers.records import HTJ2K_LOSSLESS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_FILE = NODE_MAX_FILE
INFLIGHT = NODE_INFLIGHT


def _readable(path: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - "pydicom can read it" is the criterion
            return False
    return True


@pytest.fixture(scope="module")
def corpus() -> list[Path]:
    files = sorted({Path(p) for p in get_testdata_files() if _readable(p)})
    assert len(files) > 150, "pydicom and pydicom-data should give well over 150 files"
    return files


@pytest.fixture(scope="module")
def client(node: Node) -> Iterator[StrataClient]:
    with StrataClient(node.address) as client:
        yield client


@pytest.fixture(scope="module")
def ingested(client: StrataClient, corpus: list[Path]) -> dict[str, IngestOutcome]:
    outcomes = list(client.ingest_files(corpus))
    by_source = {o.source: o for o in outcomes}
    assert len(outcomes) == len(by_source) == len(corpus), "one result per file"
    return by_source


def _objects(node: Node) -> dict[str, str]:
    return {
        o.object_name: o.etag
        for o in node.object_store().list_objects("strata-hot", recursive=True)
    }


def _phi_strings(files: list[Path]) -> set[bytes]:
    """Patient names and IDs of the inputs, long enough not to match by chance.

    An ID that also occurs inside a UID of the inputs (pydicom's "12345678") is left out:
    UIDs are stored in the catalog by design, so such an ID would be found there.
    """
    found: set[bytes] = set()
    uids: list[bytes] = []
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID"):
            value = str(dataset.get(keyword, "") or "").strip()
            if len(value) >= 6:
                found.add(value.encode())
        uids.extend(str(e.value).encode() for e in dataset.iterall() if e.VR == "UI")
    return {needle for needle in found if not any(needle in uid for uid in uids)}


# pydicom's test files that are broken on purpose, and what is wrong with them.
BROKEN_ON_PURPOSE = {
    "MR_truncated.dcm": "truncated",
    "rtplan_truncated.dcm": "truncated",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "MR_small_padded.dcm": "pixel_length_mismatch",  # 128 extra bytes after the pixels
    "badVR.dcm": "pixel_length_mismatch",  # Number of Frames is not a number
    # Its file meta names an instance, but the data set stops before its SOP Instance UID.
    "no_meta_group_length.dcm": "truncated",
}


def _expected_reason(path: Path) -> str:
    """Why Strata must refuse this file, or "" if it must store it."""
    if path.name in BROKEN_ON_PURPOSE:
        return BROKEN_ON_PURPOSE[path.name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    if not dataset.get("SOPInstanceUID") or not dataset.get("StudyInstanceUID"):
        return "missing_uid"  # DICOMDIRs and test fragments
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        has_pixels = "PixelData" in pydicom.dcmread(path)
    sop_class = getattr(dataset.get("SOPClassUID"), "name", "")
    if not has_pixels and ("Image Storage" in sop_class or "Rows" in dataset):
        # An image without pixel data is what a file cut before its pixels looks like:
        # acknowledging it could lose an image, so it is refused (dicomdirtests' stubs).
        return "truncated"
    return ""


def test_every_readable_file_is_stored_or_refused_for_its_fault(
    ingested: dict[str, IngestOutcome],
) -> None:
    expected = {source: _expected_reason(Path(source)) for source in ingested}
    got = {source: o.reason if o.status == "rejected" else "" for source, o in ingested.items()}
    wrong = {Path(s).name: (got[s], expected[s]) for s in got if got[s] != expected[s]}
    assert wrong == {}, "(got, expected) per file"
    # Other modules may have stored some of these files first: then they are duplicates.
    assert sum(o.status in ("stored", "duplicate") for o in ingested.values()) > 150


def test_originals_come_back_byte_for_byte(
    client: StrataClient, ingested: dict[str, IngestOutcome]
) -> None:
    accepted = {s: o for s, o in ingested.items() if o.status != "rejected"}
    assert len(accepted) > 150
    for source, outcome in accepted.items():
        retrieved = client.retrieve(outcome.sop_instance_uid, version=outcome.version)
        expected = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        assert retrieved.sha256 == expected, source


def test_native_files_are_stored_compressed_and_decode_identically(
    client: StrataClient, ingested: dict[str, IngestOutcome]
) -> None:
    transcoded = [
        (s, o)
        for s, o in ingested.items()
        if o.status != "rejected" and o.transfer_syntax_stored == HTJ2K_LOSSLESS
    ]
    assert len(transcoded) >= 40
    for source, outcome in transcoded:
        stored = client.retrieve(outcome.sop_instance_uid, stored=True, version=outcome.version)
        assert stored.transfer_syntax == HTJ2K_LOSSLESS
        compressed = pydicom.dcmread(io.BytesIO(stored.data))
        assert compressed.file_meta.TransferSyntaxUID == HTJ2K_LOSSLESS
        original = pydicom.dcmread(source)
        # pydicom decodes HTJ2K with OpenJPEG: an independent decoder of OpenJPH's output.
        np.testing.assert_array_equal(compressed.pixel_array, original.pixel_array, err_msg=source)
    # Sizes from the catalog: a duplicate's result reports nothing newly stored.
    rows = [
        row
        for _, o in transcoded
        for row in client.find_instances(sop_instance_uid=o.sop_instance_uid)
        if row.version == o.version
    ]
    assert len(rows) == len(transcoded)
    assert sum(r.bytes_in for r in rows) / sum(r.bytes_stored for r in rows) > 1.2


def test_drives_hold_no_plaintext_dicom_or_phi(
    node: Node, corpus: list[Path], ingested: dict[str, IngestOutcome]
) -> None:
    # A plaintext Part 10 file: "DICM" then its File Meta group (0002,xxxx), little endian.
    # "DICM" alone is four bytes that turn up in a few hundred MB of ciphertext by chance
    # (about one in 2**32 per position); with the group number it is six.
    needles = {b"DICM\x02\x00", *_phi_strings(corpus)}
    assert len(needles) > 5
    drive_files = [p for p in (node.data_dir / "minio").glob("drive*/**/*") if p.is_file()]
    assert len(drive_files) > len(ingested)
    for path in drive_files:
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            continue  # one of MinIO's own scratch files (.minio.sys/tmp), gone since listed
        for needle in needles:
            assert needle not in content, f"{needle!r} found in {path}"


def test_logs_hold_no_phi(
    node: Node, corpus: list[Path], ingested: dict[str, IngestOutcome]
) -> None:
    log = node.log_text().encode()
    assert log, "the node wrote a log"
    for needle in _phi_strings(corpus):
        assert needle not in log


def test_resent_identical_file_is_duplicate_and_stores_nothing(
    node: Node, client: StrataClient, corpus: list[Path], ingested: dict[str, IngestOutcome]
) -> None:
    before = _objects(node)
    accepted = [Path(s) for s, o in ingested.items() if o.status != "rejected"][:5]
    outcomes = list(client.ingest_files(accepted))
    assert [o.status for o in outcomes] == ["duplicate"] * 5
    assert _objects(node) == before


def test_changed_file_with_same_uid_is_a_new_version(
    client: StrataClient, corpus: list[Path], ingested: dict[str, IngestOutcome]
) -> None:
    source = next(p for p in corpus if p.name == "CT_small.dcm")
    first = ingested[str(source)]
    dataset = pydicom.dcmread(source)
    dataset.SeriesDescription = "re-sent with a corrected description"
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    (outcome,) = client.ingest_bytes([("changed", buffer.getvalue())])
    assert outcome.status == "stored"
    assert outcome.version == first.version + 1
    assert "version" in outcome.message
    latest = client.retrieve(first.sop_instance_uid)
    assert latest.data == buffer.getvalue()
    older = client.retrieve(first.sop_instance_uid, version=first.version)
    assert older.data == source.read_bytes()


def _dataset_bytes(**changes: object) -> bytes:
    dataset = pydicom.dcmread(get_testdata_files("CT_small.dcm")[0])
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def test_bad_inputs_are_rejected_and_the_rest_goes_on(node: Node, client: StrataClient) -> None:
    good_a, good_b = _dataset_bytes(), _dataset_bytes()
    ct = Path(get_testdata_files("CT_small.dcm")[0]).read_bytes()
    short_pixels = pydicom.dcmread(io.BytesIO(_dataset_bytes()))
    short_pixels.PixelData = short_pixels.PixelData[:-64]
    buffer = io.BytesIO()
    short_pixels.save_as(buffer)
    before = _objects(node)
    before_members = set(packs_by_member(node.object_store()))
    files = [
        ("good-a", good_a),
        ("not-dicom", b"%PDF-1.4 this is a scanned referral letter" * 50),
        ("truncated", ct[: len(ct) - 5000]),
        ("no-sop-uid", _dataset_bytes(SOPInstanceUID=None)),
        ("no-study-uid", _dataset_bytes(StudyInstanceUID=None)),
        ("pixel-length", buffer.getvalue()),
        ("too-large", b"\0" * (MAX_FILE + MiB)),
        ("good-b", good_b),
    ]
    outcomes = {o.source: o for o in client.ingest_bytes(files)}
    expected = {
        "good-a": "",
        "not-dicom": "not_dicom",
        "truncated": "truncated",
        "no-sop-uid": "missing_uid",
        "no-study-uid": "missing_uid",
        "pixel-length": "pixel_length_mismatch",
        "too-large": "too_large",
        "good-b": "",
    }
    assert {name: o.reason for name, o in outcomes.items()} == expected
    for name in ("good-a", "good-b"):
        assert outcomes[name].status == "stored"
    for name, outcome in outcomes.items():
        if expected[name]:
            assert outcome.status == "rejected" and outcome.message
    after = _objects(node)
    assert {k: v for k, v in after.items() if k in before} == before, "stored objects untouched"
    added = set(packs_by_member(node.object_store())) - before_members
    assert added == {outcomes["good-a"].sha256, outcomes["good-b"].sha256}


def test_stream_ending_mid_file_rejects_only_that_file(client: StrataClient) -> None:
    good = _dataset_bytes()

    def requests() -> Iterator[pb.IngestChunk]:
        yield pb.IngestChunk(file_id="whole", data=good, last=True)
        yield pb.IngestChunk(file_id="cut", data=good[:1000])  # next file starts instead
        yield pb.IngestChunk(file_id="oversized-chunk", data=b"\0" * (MiB + 1), last=True)
        yield pb.IngestChunk(file_id="unfinished", data=good[:2000])  # stream ends

    results = {r.file_id: r for r in client.archive.Ingest(requests())}
    assert results["whole"].status in (pb.INGEST_STATUS_STORED, pb.INGEST_STATUS_DUPLICATE)
    assert results["cut"].reason == "incomplete_stream"
    assert results["oversized-chunk"].reason == "chunk_too_large"
    assert results["unfinished"].reason == "incomplete_stream"
    assert len(results) == 4


def test_fast_sender_is_pushed_back(client: StrataClient) -> None:
    """The client can never get more than the server's byte budget (plus the HTTP/2
    windows) ahead of the acknowledgements."""
    source = pydicom.dcmread(get_testdata_files("CT_small.dcm")[0])
    sent = 0
    acknowledged = 0
    ahead: list[int] = []
    size = 6 * MiB

    def requests() -> Iterator[pb.IngestChunk]:
        nonlocal sent
        for index in range(60):  # 360 MiB, far more than the 96 MiB budget
            source.SOPInstanceUID = generate_uid()
            source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
            source.PixelData = (
                np.random.default_rng(index).integers(0, 4096, size // 2, dtype=np.uint16).tobytes()
            )
            source.Rows, source.Columns = size // 2 // 512, 512
            buffer = io.BytesIO()
            source.save_as(buffer)
            data = buffer.getvalue()
            for offset in range(0, len(data), MiB):
                sent += len(data[offset : offset + MiB])
                ahead.append(sent - acknowledged)
                yield pb.IngestChunk(
                    file_id=str(index),
                    data=data[offset : offset + MiB],
                    last=offset + MiB >= len(data),
                )

    statuses = []
    for result in client.archive.Ingest(requests()):
        acknowledged += result.bytes_in
        statuses.append(result.status)
    assert statuses.count(pb.INGEST_STATUS_STORED) == 60
    assert max(ahead) < INFLIGHT + 48 * MiB, f"client got {max(ahead) / MiB:.0f} MiB ahead"


def test_catalog_queries(client: StrataClient, ingested: dict[str, IngestOutcome]) -> None:
    ct = [o for o in ingested.values() if o.status == "stored"]
    study_uid = pydicom.dcmread(ct[0].source, stop_before_pixels=True).StudyInstanceUID
    studies = client.find_studies(study_instance_uid=study_uid)
    assert [s.study_instance_uid for s in studies] == [study_uid]
    instances = client.find_instances(study_instance_uid=study_uid)
    assert instances and all(i.study_instance_uid == study_uid for i in instances)
    mr = client.find_instances(modality="MR", limit=5000)
    assert mr and all(i.modality == "MR" for i in mr)
    dated = client.find_studies(study_date_from="20040101", study_date_to="20041231")
    assert dated and all("20040101" <= s.study_date <= "20041231" for s in dated)
    with pytest.raises(grpc.RpcError) as error:
        client.find_studies(study_date_from="2004-01-01")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(node: Node) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    # Reflection, like every call but health checks, takes the bearer token.
    with grpc.insecure_channel(node.address) as plain:
        channel = grpc.intercept_channel(plain, BearerToken(node.http_token))
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"strata.v1.Archive", "strata.v1.Catalog", "grpc.health.v1.Health"} <= services


def test_restart_keeps_every_acknowledged_instance(
    node: Node, corpus: list[Path], ingested: dict[str, IngestOutcome]
) -> None:
    assert node.stop() == 0, node.log_tail()
    node.start()
    with StrataClient(node.address) as client:
        for source, outcome in ingested.items():
            if outcome.status == "rejected":
                continue
            retrieved = client.retrieve(outcome.sop_instance_uid, version=outcome.version)
            assert retrieved.sha256 == hashlib.sha256(Path(source).read_bytes()).hexdigest()
        accepted = [Path(s) for s, o in ingested.items() if o.status != "rejected"][:3]
        again = list(client.ingest_files(accepted))
        assert [o.status for o in again] == ["duplicate"] * 3

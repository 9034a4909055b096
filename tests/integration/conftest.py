"""Shared fixtures for integration tests: a real 4-drive MinIO and a local Ray.

Every test under tests/integration is marked ``integration`` here, so
``pytest -m "not integration"`` selects the unit tests alone.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import ray
from minio.error import S3Error
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from cluster.doors.dimse.door import ACCEPTED_SYNTAXES
from cluster.ops.minio import MinioServer
from cluster.ops.ray_runtime import init_local_ray
from tests.integration.node import Node, free_port
from workers.objects.envelope import build_pack, keys_key_for, read_pack_header, seal_member
from workers.objects.keys import FileKeyProvider
from workers.pipeline.recover import is_pack
from workers.records import HTJ2K_LOSSLESS, InstanceRecord, Stored

_HERE = Path(__file__).parent
MiB = 1024 * 1024
# The shared node's admission limits, small enough for tests to reach them.
NODE_MAX_FILE = 32 * MiB
NODE_INFLIGHT = 96 * MiB


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """One MinIO over 4 drive directories (EC:2) for the whole session."""
    server = MinioServer(tmp_path_factory.mktemp("minio"), drives=4)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs, shut down at the end if this fixture started it."""
    started = not ray.is_initialized()
    if started:
        init_local_ray(address=None, num_cpus=2, namespace=None)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@pytest.fixture
def bucket_name() -> str:
    """A fresh bucket name, so tests sharing one MinIO do not see each other's data."""
    return f"test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One real `strata serve --embedded` process (Ray + 4-drive MinIO) for the session."""
    with Node(
        tmp_path_factory.mktemp("node"),
        max_file_bytes=str(NODE_MAX_FILE),
        max_inflight_bytes=str(NODE_INFLIGHT),
        fanout_min_bytes=str(MiB),  # so that test_multiframe's 3 MB instance fans out
        dimse_port=str(free_port()),
        dimse_peers=",".join(f"{ae}=127.0.0.1:{port}" for ae, port in DIMSE_PEERS.items()),
        http_port=str(free_port()),
    ) as node:
        yield node


# The calling AE titles the shared node's DIMSE door admits, with the ports where those
# that take C-MOVE sub-operations or commitment reports listen (DCMTK's tools call with
# their own names; TESTSCU is the tests' own SCU and SCP).
DIMSE_PEERS = {
    "ECHOSCU": 1,
    "STORESCU": 1,
    "FINDSCU": 1,
    "GETSCU": 1,
    "MOVESCU": free_port(),
    "TESTSCU": free_port(),
    "ORTHANC": free_port(),  # Orthanc from Debian, forwarding to Strata (test_orthanc)
}


def ct_instances(count: int, tag: str, *, frames: int = 0) -> list[tuple[str, bytes]]:
    """``count`` different CT files of one new study, named ``tag-000``, ``tag-001``, …

    Built from pydicom's CT_small.dcm, each with its own SOP Instance UID. With ``frames``,
    each holds that many noisy 512×512 16-bit frames (0.5 MiB each): enough work to keep
    the workers busy.
    """
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if frames:
        template.Rows, template.Columns, template.NumberOfFrames = 512, 512, frames
    study = generate_uid()
    out = []
    for number in range(count):
        dataset = template.copy()
        if frames:
            noise = np.random.default_rng(number).integers(0, 4096, 512 * 512 * frames)
            dataset.PixelData = noise.astype(np.uint16).tobytes()
        dataset.StudyInstanceUID = study
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = number + 1
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        out.append((f"{tag}-{number:03}", buffer.getvalue()))
    return out


STUDY_A = "1.2.826.0.1.3680043.8.498.1"
STUDY_B = "1.2.826.0.1.3680043.8.498.2"


def make_record(
    sop_uid: str,
    *,
    content: str = "",
    study_uid: str = STUDY_A,
    series_uid: str | None = None,
    modality: str = "CT",
    study_date: date | None = date(2024, 3, 1),
    bytes_in: int = 1000,
    ingest_time: datetime | None = None,
) -> InstanceRecord:
    """A record carrying pseudonyms only, as the pipeline builds it."""
    return InstanceRecord(
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid or f"{study_uid}.1",
        study_instance_uid=study_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality=modality,
        body_part="CHEST",
        study_date=study_date,
        patient_pseudonym="pp-" + hashlib.sha256(study_uid.encode()).hexdigest()[:16],
        accession_pseudonym="ap-" + hashlib.sha256(study_uid.encode()).hexdigest()[16:32],
        transfer_syntax_in="1.2.840.10008.1.2.1",
        transfer_syntax_stored=HTJ2K_LOSSLESS,
        storage_action="transcoded",
        storage_note="",
        frames=1,
        rows=512,
        columns=512,
        bits_allocated=16,
        bits_stored=12,
        samples_per_pixel=1,
        photometric_interpretation="MONOCHROME2",
        bytes_in=bytes_in,
        bytes_stored=bytes_in // 2,
        sha256=hashlib.sha256(f"{sop_uid}/{content}".encode()).hexdigest(),
        object_key=f"objects/{sop_uid}/{content or 'v'}",
        tier="hot",
        key_id="kek-1",
        ingest_time=ingest_time or datetime.now(UTC),
    )


def stored(record: InstanceRecord, file_id: str | None = None) -> Stored:
    return Stored(file_id or f"file-{record.sha256[:8]}", record)


# -- DIMSE helpers: DCMTK's tools, and what they put on the wire ---------------------


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's data set, without its preamble and file meta (which the receiver
    writes itself)."""
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def on_the_wire(runs: list[list[str]]) -> dict[str, bytes]:
    """The data sets storescu sends with these arguments, by SOP Instance UID, as a
    listener of the tests' own receives them: DCMTK sends what it re-encodes (it leaves
    out trailing padding, corrects a wrong VR), not the file's bytes."""
    seen: dict[str, bytes] = {}

    def keep(event: evt.Event) -> int:
        seen[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        return 0x0000

    ae = AE(ae_title="STRATA")
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_SYNTAXES)  # as the door
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)]
    )
    try:
        for arguments in runs:
            done = dcmtk("storescu", "-aec", "STRATA", "127.0.0.1", str(port), *arguments)
            assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
    return seen


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def packs_by_member(client: Any, bucket: str = "strata-hot") -> dict[str, str]:
    """SHA-256 → pack key of every member of every pack in ``bucket`` (a minio client),
    read from the pack headers with ranged GETs, as the reconciler reads them."""
    found: dict[str, str] = {}
    for item in client.list_objects(bucket, recursive=True):
        key = item.object_name
        if not key or not is_pack(key):
            continue
        try:
            response = client.get_object(bucket, key, offset=0, length=min(item.size, 1 << 16))
        except S3Error as error:
            if error.code == "NoSuchKey":
                continue  # removed since listed (the reconciler runs meanwhile)
            raise
        try:
            first = response.read()
        finally:
            response.close()
            response.release_conn()
        for member in read_pack_header(first).members:
            found[member.sha256] = key
    return found


def plant_pack(client: Any, sha256s: list[str], key: str, bucket: str = "strata-hot") -> None:
    """A pack of members with these SHA-256s (and its keys object) that no catalog row
    names: what a worker that died between its PUTs and the commit leaves behind."""
    provider = FileKeyProvider(
        Path("/nonexistent"), "kek-planted", {"kek-planted": b"k" * 32}, b"p" * 32
    )
    members = [
        seal_member([b"sealed bytes"], sha256=sha, sop_instance_uid="1.2.3", keys=provider)
        for sha in sha256s
    ]
    pack = build_pack(members, provider.active_key_id)
    client.put_object(bucket, key, io.BytesIO(pack.data), len(pack.data))
    client.put_object(bucket, keys_key_for(key), io.BytesIO(pack.keys), len(pack.keys))

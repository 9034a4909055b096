"""Objects read back into catalog rows (workers/recover.py), with no catalog and no server:
every row must equal the one ingest built, from the header, manifest and prefix alone."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from tests.unit.conftest import PHI, make_file
from workers.dicom.identity import IdentityKeys
from workers.objects.envelope import EnvelopeError, open_object, read_header, seal
from workers.objects.keys import FileKeyProvider, create_key_file, load_key_file
from workers.objects.manifest import Manifest
from workers.pipeline.ingest import PipelineSettings, prepare
from workers.pipeline.recover import UnreadableObjectError, row_from_object
from workers.pipeline.restore import ObjectRef, rebuild
from workers.records import IngestItem, InstanceRecord, StoreSettings

# One file of each way of storing: transcoded (little and big endian, 8-bit OW big endian
# with its byte pairs swapped), zstd, and as received (encapsulated, deflated, no pixels).
FILES = {
    "native little endian": lambda: make_file(rows=32, columns=32),
    "native big endian": lambda: Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes(),
    "8-bit OW big endian": lambda: make_file(
        transfer_syntax=ExplicitVRBigEndian, bits_allocated=8, pixel_vr="OW", rows=32, columns=32
    ),
    "32 bits allocated (zstd)": lambda: Path(get_testdata_file("SC_rgb_32bit.dcm")).read_bytes(),
    "encapsulated": lambda: Path(get_testdata_file("JPEG2000.dcm")).read_bytes(),
    "deflated": lambda: Path(get_testdata_file("image_dfl.dcm")).read_bytes(),
    "no pixel data": lambda: Path(get_testdata_file("rtplan.dcm")).read_bytes(),
}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    create_key_file(path)
    return path


@pytest.fixture(scope="module")
def keys(key_file: Path) -> FileKeyProvider:
    return load_key_file(key_file)


def _stored(data: bytes, key_file: Path) -> tuple[bytes, InstanceRecord]:
    settings = PipelineSettings(StoreSettings("127.0.0.1:1", "unused", "unused"), str(key_file))
    blob, record, _ = prepare(IngestItem("f", data, hashlib.sha256(data).hexdigest()), settings)
    return blob, record


@pytest.mark.parametrize("name", FILES)
def test_the_identity_row_read_back_opens_to_what_ingest_sealed(
    name: str, key_file: Path, keys: FileKeyProvider
) -> None:
    data = FILES[name]()
    settings = PipelineSettings(StoreSettings("127.0.0.1:1", "unused", "unused"), str(key_file))
    blob, record, sealed = prepare(
        IngestItem("f", data, hashlib.sha256(data).hexdigest()), settings
    )
    recovered = row_from_object(
        blob, object_key=record.object_key, size=len(blob), tier=record.tier, keys=keys,
        last_modified=None,
    ).identity  # fmt: skip
    opener = IdentityKeys(keys.pseudonymizer())
    assert recovered.tokens == sealed.tokens and recovered.sha256 == sealed.sha256
    assert opener.open(recovered.sealed, record.sop_instance_uid) == opener.open(
        sealed.sealed, record.sop_instance_uid
    )


def _read_back(
    blob: bytes, record: InstanceRecord, keys: FileKeyProvider, **overrides: object
) -> InstanceRecord:
    arguments: dict[str, object] = {
        "object_key": record.object_key,
        "size": len(blob),
        "tier": record.tier,
        "keys": keys,
        "last_modified": None,
    }
    arguments.update(overrides)
    return row_from_object(blob, **arguments).record  # type: ignore[arg-type]


@pytest.mark.parametrize("name", FILES)
def test_a_row_read_back_equals_the_row_ingest_built(
    name: str, key_file: Path, keys: FileKeyProvider
) -> None:
    blob, record = _stored(FILES[name](), key_file)
    header = read_header(blob)
    start, length = header.segment_range(1)
    # Header, manifest and segment 1 are all it needs: never a frame or the suffix.
    row = row_from_object(
        blob[: start + length],
        object_key=record.object_key,
        size=len(blob),
        tier=record.tier,
        keys=keys,
        last_modified=None,
    )
    assert row.record == record
    assert not row.legacy
    assert row.record.ingest_time.tzinfo is not None


def test_the_manifest_round_trips_its_new_fields() -> None:
    moment = datetime(2026, 3, 1, 12, 30, 5, 7, tzinfo=UTC)  # one microsecond matters
    manifest = Manifest(
        kind="whole",
        sha256="ab" * 32,
        original_length=10,
        transfer_syntax_in=ExplicitVRLittleEndian,
        transfer_syntax_stored=ExplicitVRLittleEndian,
        sop_instance_uid="1.2.3",
        ingest_time=moment,
        storage_note="no pixel data; kept as received",
    )
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


def _legacy(blob: bytes, record: InstanceRecord, keys: FileKeyProvider) -> bytes:
    """The same object as written before manifests named their instance and time."""
    segments = open_object(
        blob, object_key=record.object_key, sop_instance_uid=record.sop_instance_uid, keys=keys
    )
    document = json.loads(segments[0])
    for added in ("sop_instance_uid", "ingest_time", "storage_note"):
        del document[added]
    segments[0] = json.dumps(document).encode()
    return seal(
        segments,
        object_key=record.object_key,
        sop_instance_uid=record.sop_instance_uid,
        keys=keys,
    )


@pytest.mark.parametrize("name", ["native little endian", "32 bits allocated (zstd)"])
def test_an_object_written_before_the_new_manifest_fields_is_still_read(
    name: str, key_file: Path, keys: FileKeyProvider
) -> None:
    data = FILES[name]()
    blob, record = _stored(data, key_file)
    old = _legacy(blob, record, keys)
    ref = ObjectRef(record.object_key, record.sop_instance_uid, record.tier)
    assert rebuild(old, ref, "original", keys).data == data  # retrieval does not break

    written = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    row = row_from_object(
        old,
        object_key=record.object_key,
        size=len(old),
        tier=record.tier,
        keys=keys,
        last_modified=written,
    )
    assert row.legacy
    # The instance is learnt from the file's own header; the time from the store.
    assert row.record == dataclasses.replace(
        record, ingest_time=written, storage_note="", bytes_stored=len(old)
    )


def test_a_damaged_or_misplaced_object_is_refused_without_patient_data(
    key_file: Path, keys: FileKeyProvider
) -> None:
    blob, record = _stored(make_file(), key_file)
    start, _ = read_header(blob).segment_range(0)
    altered = bytearray(blob)
    altered[start + 3] ^= 1
    other_key = record.object_key[:-64] + "0" * 64
    failures = []
    for case, call in (
        ("altered", lambda: _read_back(bytes(altered), record, keys)),
        ("moved", lambda: _read_back(blob, record, keys, object_key=other_key)),
        ("truncated", lambda: _read_back(blob[:-1], record, keys, size=len(blob) - 1)),
        ("not strata", lambda: _read_back(b"x" * 200, record, keys, size=200)),
    ):
        with pytest.raises((EnvelopeError, UnreadableObjectError)) as caught:
            call()
        failures.append((case, str(caught.value)))
    for case, message in failures:
        assert not any(value in message for value in PHI), (case, message)

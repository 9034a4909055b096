"""Pack members read back into catalog rows (workers/pipeline/recover.py), with no catalog
and no server: every row must equal the one ingest built, from the member's header, manifest
and prefix alone."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from tests.unit.conftest import PHI, make_file
from workers.dicom.identity import IdentityKeys, IdentityRow
from workers.objects.envelope import (
    EnvelopeError,
    KeyRing,
    Pack,
    read_member_header,
    read_pack_header,
)
from workers.objects.keys import FileKeyProvider, create_key_file, load_key_file
from workers.objects.manifest import Manifest
from workers.pipeline.ingest import PipelineSettings, pack_instances, prepare
from workers.pipeline.recover import RecoveredRow, UnreadableObjectError, row_from_member
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


def _stored(data: bytes, key_file: Path) -> tuple[Pack, InstanceRecord, IdentityRow]:
    """One file prepared and packed alone: the pack, its row placed in it, its identity."""
    settings = PipelineSettings(StoreSettings("127.0.0.1:1", "unused", "unused"), str(key_file))
    item = IngestItem("f", data, hashlib.sha256(data).hexdigest())
    _, pack, [stored] = pack_instances([prepare(item, settings)])
    return pack, stored.record, stored.identity


def _read_back(
    pack: Pack, record: InstanceRecord, keys: FileKeyProvider, data: bytes | None = None
) -> RecoveredRow:
    """The member's row read from ``data`` (its first bytes, the pack's by default)."""
    [member] = read_pack_header(pack.data).members
    blob = pack.data[member.offset :] if data is None else data
    ring = KeyRing.from_bytes(pack.keys)
    return row_from_member(
        blob, member, pack_key=record.object_key, tier=record.tier, keys=keys, ring=ring
    )


@pytest.mark.parametrize("name", FILES)
def test_the_identity_row_read_back_opens_to_what_ingest_sealed(
    name: str, key_file: Path, keys: FileKeyProvider
) -> None:
    pack, record, sealed = _stored(FILES[name](), key_file)
    recovered = _read_back(pack, record, keys).identity
    opener = IdentityKeys(keys.pseudonymizer())
    assert recovered.tokens == sealed.tokens and recovered.sha256 == sealed.sha256
    assert opener.open(recovered.sealed, record.sop_instance_uid) == opener.open(
        sealed.sealed, record.sop_instance_uid
    )


@pytest.mark.parametrize("name", FILES)
def test_a_row_read_back_equals_the_row_ingest_built(
    name: str, key_file: Path, keys: FileKeyProvider
) -> None:
    pack, record, _ = _stored(FILES[name](), key_file)
    member = pack.data[record.byte_offset : record.byte_offset + record.byte_length]
    start, length = read_member_header(member).segment_range(1)
    # Member header, manifest and segment 1 are all it needs: never a frame or the suffix.
    row = _read_back(pack, record, keys, member[: start + length])
    assert row.record == record
    assert row.record.ingest_time.tzinfo is not None
    assert (record.byte_offset, record.byte_length) == (
        pack.members[0].offset,
        pack.members[0].length,
    )


def test_the_manifest_round_trips_its_fields() -> None:
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


def test_a_member_retrieved_from_its_pack_is_the_original(
    key_file: Path, keys: FileKeyProvider
) -> None:
    data = FILES["native little endian"]()
    pack, record, _ = _stored(data, key_file)
    member = pack.data[record.byte_offset : record.byte_offset + record.byte_length]
    key = KeyRing.from_bytes(pack.keys).data_key(record.sha256, keys)
    assert rebuild(member, ObjectRef.of(record), "original", key).data == data


def test_a_damaged_or_misplaced_member_is_refused_without_patient_data(
    key_file: Path, keys: FileKeyProvider
) -> None:
    pack, record, _ = _stored(make_file(), key_file)
    member = pack.data[record.byte_offset :]
    start, _ = read_member_header(member).segment_range(0)
    altered = bytearray(member)
    altered[start + 3] ^= 1
    other, _, _ = _stored(make_file(rows=16, columns=16), key_file)
    failures = []
    for case, call in (
        ("altered", lambda: _read_back(pack, record, keys, bytes(altered))),
        ("other pack's keys", lambda: _read_back(replace(pack, keys=other.keys), record, keys)),
        ("truncated", lambda: _read_back(pack, record, keys, member[:100])),
        ("not strata", lambda: _read_back(pack, record, keys, b"x" * 200)),
    ):
        with pytest.raises((EnvelopeError, UnreadableObjectError)) as caught:
            call()
        failures.append((case, str(caught.value)))
    for case, message in failures:
        assert not any(value in message for value in PHI), (case, message)

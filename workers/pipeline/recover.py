"""Reading a stored object back into its catalog row, from the object alone.

Used to rebuild a lost catalog (``cluster/catalog/rebuild.py``). An object holds everything
its row needs (docs/object-format.md): the plaintext header the key id; the manifest
(segment 0) the file's SHA-256, length, transfer syntaxes, pixel layout, storage note and
ingest time; the stored file's own DICOM header (segment 1: the prefix of a ``split``
object, the whole file of a ``whole`` one) the UIDs and the attributes pseudonymised at
ingest. The row is then built by ``workers.pipeline.ingest.instance_record``, as at ingest.

Bytes read: one ranged GET of the first ``READ_AHEAD`` bytes (preamble, header, manifest
and, for most ``split`` objects, the prefix), and one more for the rest of the header or
prefix when they are longer; never a frame. A ``whole`` object is read entirely: its file
is one segment, and a segment can only be authenticated whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime

import imagecodecs
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap

from workers.dicom.identity import IdentityRow, identity_keys
from workers.dicom.split import InstanceHeader, PixelLayout, prefix_header, split_file
from workers.objects import store
from workers.objects.envelope import (
    PREAMBLE_LENGTH,
    EnvelopeHeader,
    Opener,
    header_prefix_length,
    read_header,
    unverified_segment,
)
from workers.objects.keys import FileKeyProvider
from workers.objects.manifest import Manifest
from workers.objects.store import object_key_for
from workers.pipeline.ingest import instance_record
from workers.records import InstanceRecord, StoreSettings

# Enough for the preamble, the header and the manifest of any object, and the prefix of
# most split ones (a DICOM header is typically a few KiB).
READ_AHEAD = 64 * 1024


class UnreadableObjectError(Exception):
    """An object that cannot be read back into a row; the message says why, and never
    holds patient data."""


@dataclass(frozen=True)
class RecoveredRow:
    """The row of one object, as ingest built it (``version`` 0: the catalog numbers them)."""

    record: InstanceRecord
    identity: IdentityRow
    # Written before manifests recorded ingest_time and storage_note: the row's
    # ingest_time is the object's last-modified time and its storage_note is empty.
    legacy: bool


def read_row(
    settings: StoreSettings,
    bucket: str,
    listed: store.ListedObject,
    tier: str,
    keys: FileKeyProvider,
) -> RecoveredRow:
    """Fetch the first bytes of one listed object (through segment 1) and read its row."""
    key, size = listed.key, listed.size
    if size is None:
        raise UnreadableObjectError("the store listed it without a size")
    blob = store.get(settings, bucket, key, 0, min(size, READ_AHEAD))
    if len(blob) >= PREAMBLE_LENGTH:
        blob = _extend(settings, bucket, key, blob, min(header_prefix_length(blob), size))
        header = read_header(blob)
        if len(header.segment_lengths) >= 2:
            start, length = header.segment_range(1)
            blob = _extend(settings, bucket, key, blob, min(start + length, size))
    return row_from_object(
        blob, object_key=key, size=size, tier=tier, keys=keys, last_modified=listed.last_modified
    )


def _extend(settings: StoreSettings, bucket: str, key: str, blob: bytes, end: int) -> bytes:
    """``blob`` (the object's first bytes) read on to ``end``."""
    if end <= len(blob):
        return blob
    return blob + store.get(settings, bucket, key, len(blob), end - len(blob))


def row_from_object(
    blob: bytes,
    *,
    object_key: str,
    size: int,
    tier: str,
    keys: FileKeyProvider,
    last_modified: datetime | None,
) -> RecoveredRow:
    """The row of the object of ``size`` bytes whose first bytes, through segment 1 at
    least, are ``blob``. Raises UnreadableObjectError, EnvelopeError (not a Strata object,
    or it fails authentication), KeyFileError (its key id is not in the key file) or
    RejectError (its file's header cannot be read)."""
    header = read_header(blob)
    if header.total_length != size:
        raise UnreadableObjectError(
            f"the object is {size} bytes but its header describes {header.total_length}"
        )
    if len(header.segment_lengths) < 2:
        raise UnreadableObjectError("the object has fewer than two segments")
    manifest_sealed, file_sealed = _segment(blob, header, 0), _segment(blob, header, 1)
    try:
        sop_instance_uid = _claimed_instance(header, manifest_sealed, file_sealed, keys)
        opener = Opener(header, object_key=object_key, sop_instance_uid=sop_instance_uid, keys=keys)
    except InvalidUnwrap:
        raise UnreadableObjectError(
            f"its data key does not unwrap under key id {header.key_id!r}: the header was "
            "altered, or the key file holds another key under that id"
        ) from None
    manifest = _manifest(opener.segment(0, manifest_sealed))
    file_header, layout, header_bytes = _stored_header(manifest, opener.segment(1, file_sealed))
    named = object_key_for(
        file_header.study_instance_uid, file_header.sop_instance_uid, manifest.sha256
    )
    if named != object_key:
        raise UnreadableObjectError(
            "its contents belong under another key (study, instance or SHA-256 differ)"
        )
    legacy = manifest.ingest_time is None
    if legacy:
        if last_modified is None:
            raise UnreadableObjectError(
                "its manifest predates ingest_time and the store gave no last-modified time"
            )
        manifest = replace(manifest, ingest_time=last_modified)
    record = instance_record(
        file_header,
        layout,
        manifest,
        pseudonyms=keys.pseudonymizer(),
        object_key=object_key,
        bytes_stored=size,
        tier=tier,
        key_id=header.key_id,
    )
    identity = identity_keys(keys.pseudonymizer()).row(
        manifest.sha256, file_header.study_instance_uid, file_header.sop_instance_uid, header_bytes
    )
    return RecoveredRow(record, identity, legacy)


def _segment(blob: bytes, header: EnvelopeHeader, index: int) -> memoryview:
    start, length = header.segment_range(index)
    if start + length > len(blob):
        raise UnreadableObjectError(f"the object ends inside segment {index}")
    return memoryview(blob)[start : start + length]


def _claimed_instance(
    header: EnvelopeHeader,
    manifest_sealed: memoryview,
    file_sealed: memoryview,
    keys: FileKeyProvider,
) -> str:
    """The SOP Instance UID the object claims, read before authentication (which needs it).

    From the manifest; for an object written before manifests named their instance, from
    its file's DICOM header. A wrong claim fails authentication right after.
    """
    claimed = _manifest(unverified_segment(header, 0, manifest_sealed, keys))
    if claimed.sop_instance_uid:
        return claimed.sop_instance_uid
    plaintext = unverified_segment(header, 1, file_sealed, keys)
    return _stored_header(claimed, plaintext)[0].sop_instance_uid


def _manifest(plaintext: bytes) -> Manifest:
    try:
        return Manifest.from_bytes(plaintext)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        detail = "not JSON" if isinstance(error, json.JSONDecodeError) else type(error).__name__
        raise UnreadableObjectError(f"segment 0 is not a manifest ({detail})") from None


def _stored_header(
    manifest: Manifest, plaintext: bytes
) -> tuple[InstanceHeader, PixelLayout | None, bytes]:
    """The stored file's header and pixel layout, as ``split_file`` gave them at ingest,
    and the file's bytes before its Pixel Data."""
    if manifest.kind == "split":
        # For a split object, the manifest's layout is the one split_file gave.
        return prefix_header(plaintext), manifest.layout, bytes(plaintext)
    if manifest.kind != "whole":
        raise UnreadableObjectError(f"manifest kind {manifest.kind!r} is not known")
    data = plaintext
    if manifest.compression == "zstd":
        data = bytes(imagecodecs.zstd_decode(plaintext, out=manifest.original_length))
    elif manifest.compression:
        raise UnreadableObjectError(f"compression {manifest.compression!r} is not known")
    split = split_file(data)
    return split.header, split.layout, bytes(data[: split.pixel_start])

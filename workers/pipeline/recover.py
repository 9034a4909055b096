"""Reading a stored pack back into its catalog rows, from the objects alone.

Used to rebuild a lost catalog (``cluster/catalog/rebuild.py``). A pack and its keys object
hold everything their rows need (docs/object-format.md): the pack header where each member
lies and its SHA-256; the keys object the key id and each member's data key; each member's
manifest (segment 0) the file's length, transfer syntaxes, pixel layout, storage note and
ingest time; the stored file's own DICOM header (segment 1: the prefix of a ``split``
member, the whole file of a ``whole`` one) the UIDs and the attributes pseudonymised at
ingest. Each row is then built by ``workers.pipeline.ingest.instance_record``, as at
ingest.

Bytes read: the keys object; one ranged GET of the pack's first ``READ_AHEAD`` bytes (its
header), and per member one ranged GET of its first ``READ_AHEAD`` bytes (header,
manifest and, for most ``split`` members, the prefix), one more when they are longer;
never a frame. A ``whole`` member is read entirely: its file is one segment, and a
segment can only be authenticated whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import imagecodecs

from workers.dicom.identity import IdentityRow, attributes_of, identity_keys
from workers.dicom.split import InstanceHeader, PixelLayout, prefix_header, split_file
from workers.errors import RejectError
from workers.objects import store
from workers.objects.envelope import (
    KEYS_SUFFIX,
    EnvelopeError,
    KeyRing,
    MemberHeader,
    Opener,
    PackMember,
    keys_key_for,
    member_header_length,
    pack_header_length,
    read_member_header,
    read_pack_header,
    unverified_segment,
)
from workers.objects.keys import FileKeyProvider, KeyFileError
from workers.objects.manifest import Manifest
from workers.pipeline.ingest import instance_record
from workers.records import InstanceRecord, StoreSettings

# Enough for a pack's header, and for the header, the manifest and the prefix of most
# split members (a DICOM header is typically a few KiB).
READ_AHEAD = 64 * 1024


class UnreadableObjectError(Exception):
    """An object that cannot be read back into a row; the message says why, and never
    holds patient data."""


@dataclass(frozen=True)
class RecoveredRow:
    """The row of one member, as ingest built it (``version`` 0: the catalog numbers
    them)."""

    record: InstanceRecord
    identity: IdentityRow


@dataclass(frozen=True)
class MemberFailure:
    """A member that could not be read back; ``reason`` holds no patient data."""

    sha256: str
    reason: str


def is_pack(key: str) -> bool:
    """Whether a listed key names a pack (not its keys object)."""
    return not key.endswith(KEYS_SUFFIX)


def read_pack(
    settings: StoreSettings,
    bucket: str,
    listed: store.ListedObject,
    tier: str,
    keys: FileKeyProvider,
) -> tuple[list[RecoveredRow], list[MemberFailure]]:
    """The rows of one listed pack, and the members that could not be read. Raises
    UnreadableObjectError or EnvelopeError when the pack itself cannot be (its header or
    keys object), StoreError when the store fails."""
    key, size = listed.key, listed.size
    if size is None:
        raise UnreadableObjectError("the store listed it without a size")
    try:
        ring = KeyRing.from_bytes(store.get(settings, bucket, keys_key_for(key)))
    except store.ObjectUnreadableError:
        raise UnreadableObjectError(
            "its keys object is missing or unreadable: its data keys were destroyed "
            "(crypto-shredded), or it was cut off while being written"
        ) from None
    first = store.get(settings, bucket, key, 0, min(size, READ_AHEAD))
    needed = min(pack_header_length(first), size)
    if needed > len(first):
        first += store.get(settings, bucket, key, len(first), needed - len(first))
    header = read_pack_header(first)
    if header.total_length != size:
        raise UnreadableObjectError(
            f"the pack is {size} bytes but its header describes {header.total_length}"
        )
    rows, failures = [], []
    for member in header.members:
        try:
            blob = _member_start(settings, bucket, key, member)
            rows.append(
                row_from_member(blob, member, pack_key=key, tier=tier, keys=keys, ring=ring)
            )
        except store.StoreUnavailableError:
            raise
        except (UnreadableObjectError, EnvelopeError, KeyFileError, RejectError) as error:
            reason = error.message if isinstance(error, RejectError) else str(error)
            failures.append(MemberFailure(member.sha256, reason))
    return rows, failures


def _member_start(settings: StoreSettings, bucket: str, key: str, member: PackMember) -> bytes:
    """The member's first bytes, through its segment 1."""
    end = member.offset + member.length
    blob = store.get(settings, bucket, key, member.offset, min(member.length, READ_AHEAD))
    wanted = min(member_header_length(blob), member.length)
    if wanted > len(blob):
        blob += store.get(settings, bucket, key, member.offset + len(blob), wanted - len(blob))
    header = read_member_header(blob)
    if len(header.segment_lengths) >= 2:
        start, length = header.segment_range(1)
        wanted = min(start + length, member.length)
        if wanted > len(blob):
            blob += store.get(settings, bucket, key, member.offset + len(blob), wanted - len(blob))
    assert member.offset + len(blob) <= end
    return blob


def row_from_member(
    blob: bytes,
    member: PackMember,
    *,
    pack_key: str,
    tier: str,
    keys: FileKeyProvider,
    ring: KeyRing,
) -> RecoveredRow:
    """The row of ``member`` of pack ``pack_key`` whose first bytes, through segment 1 at
    least, are ``blob``. Raises UnreadableObjectError, EnvelopeError (not a member, or it
    fails authentication, or its data key is gone), KeyFileError (its key id is not in
    the key file) or RejectError (its file's header cannot be read)."""
    header = read_member_header(blob)
    if header.total_length != member.length:
        raise UnreadableObjectError(
            f"the member is {member.length} bytes but its header describes {header.total_length}"
        )
    if len(header.segment_lengths) < 2:
        raise UnreadableObjectError("the member has fewer than two segments")
    data_key = ring.data_key(member.sha256, keys)
    manifest_sealed, file_sealed = _segment(blob, header, 0), _segment(blob, header, 1)
    claimed = _manifest(unverified_segment(header, 0, manifest_sealed, data_key))
    opener = Opener(
        header, data_key=data_key, sha256=member.sha256, sop_instance_uid=claimed.sop_instance_uid
    )
    manifest = _manifest(opener.segment(0, manifest_sealed))
    if manifest.sha256 != member.sha256:
        raise UnreadableObjectError("its manifest names another file than the pack header")
    if manifest.ingest_time is None:
        raise UnreadableObjectError("its manifest has no ingest_time")
    file_header, layout, header_bytes = _stored_header(manifest, opener.segment(1, file_sealed))
    if file_header.sop_instance_uid != manifest.sop_instance_uid:
        raise UnreadableObjectError("its file's header names another instance than its manifest")
    record = instance_record(
        file_header,
        layout,
        manifest,
        pseudonyms=keys.pseudonymizer(),
        object_key=pack_key,
        bytes_stored=member.length,
        tier=tier,
        key_id=ring.key_id,
        byte_offset=member.offset,
    )
    identity = identity_keys(keys.pseudonymizer()).row(
        manifest.sha256,
        file_header.study_instance_uid,
        file_header.sop_instance_uid,
        attributes_of(header_bytes),
    )
    return RecoveredRow(record, identity)


def _segment(blob: bytes, header: MemberHeader, index: int) -> memoryview:
    start, length = header.segment_range(index)
    if start + length > len(blob):
        raise UnreadableObjectError(f"the member ends inside segment {index}")
    return memoryview(blob)[start : start + length]


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

"""The encrypted object format (version 1): envelope encryption in independent segments.

Layout, documented for operators in docs/object-format.md::

    magic     8 bytes  b"\\x89STRATA\\n"
    version   1 byte   1
    hlen      4 bytes  big-endian length of the header
    header    hlen     JSON: key_id, wrapped_key (base64), nonce_prefix (base64, 8 bytes),
                       segments (list of ciphertext lengths, tag included)
    segments           AES-256-GCM ciphertexts, one after another

Every object gets a fresh 256-bit data key, wrapped by the key provider's active key.
Segment i is sealed with nonce ``nonce_prefix || i`` and associated data binding the header
digest, the object key, the SOP Instance UID and (i, segment count), so a segment cannot be
moved, dropped, or replayed into another object. Segments let a reader fetch one frame with
a ranged GET; the header is plaintext but holds only lengths and key identifiers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from workers.objects.keys import KeyProvider

MAGIC = b"\x89STRATA\n"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct(">8sBI")
TAG_BYTES = 16


class EnvelopeError(Exception):
    """An object that is not a Strata object, or fails authentication."""


@dataclass(frozen=True)
class EnvelopeHeader:
    """The plaintext header: where each segment lies and how its data key is wrapped."""

    key_id: str
    wrapped_key: bytes
    nonce_prefix: bytes
    segment_lengths: tuple[int, ...]
    header_bytes: bytes  # exactly as stored; its digest is bound into every segment
    data_offset: int  # offset of segment 0 in the object

    def segment_range(self, index: int) -> tuple[int, int]:
        """Byte offset and length of segment ``index`` within the object."""
        start = self.data_offset + sum(self.segment_lengths[:index])
        return start, self.segment_lengths[index]

    @property
    def total_length(self) -> int:
        return self.data_offset + sum(self.segment_lengths)


def seal(
    segments: Sequence[bytes | memoryview],
    *,
    object_key: str,
    sop_instance_uid: str,
    keys: KeyProvider,
) -> bytes:
    """Encrypt ``segments`` into one object bound to ``object_key`` and the instance UID."""
    data_key = AESGCM.generate_key(bit_length=256)
    key_id, wrapped_key = keys.wrap(data_key)
    nonce_prefix = secrets.token_bytes(8)
    header_bytes = json.dumps(
        {
            "key_id": key_id,
            "wrapped_key": base64.b64encode(wrapped_key).decode(),
            "nonce_prefix": base64.b64encode(nonce_prefix).decode(),
            "segments": [len(segment) + TAG_BYTES for segment in segments],
        },
        separators=(",", ":"),
    ).encode()
    aead = AESGCM(data_key)
    digest = hashlib.sha256(header_bytes).digest()
    parts = [_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header_bytes)), header_bytes]
    for index, segment in enumerate(segments):
        nonce = nonce_prefix + struct.pack(">I", index)
        aad = _associated_data(digest, object_key, sop_instance_uid, index, len(segments))
        parts.append(aead.encrypt(nonce, bytes(segment), aad))
    return b"".join(parts)


def read_header(blob: bytes | memoryview) -> EnvelopeHeader:
    """Parse the plaintext header from the first bytes of an object."""
    if len(blob) < _PREAMBLE.size:
        raise EnvelopeError("object is shorter than the Strata preamble")
    magic, version, header_length = _PREAMBLE.unpack_from(blob, 0)
    if magic != MAGIC:
        raise EnvelopeError("object does not start with the Strata magic bytes")
    if version != FORMAT_VERSION:
        raise EnvelopeError(f"object format version {version} is not supported (expected 1)")
    end = _PREAMBLE.size + header_length
    if len(blob) < end:
        raise EnvelopeError("object ends inside its header")
    header_bytes = bytes(blob[_PREAMBLE.size : end])
    document = json.loads(header_bytes)
    return EnvelopeHeader(
        key_id=document["key_id"],
        wrapped_key=base64.b64decode(document["wrapped_key"]),
        nonce_prefix=base64.b64decode(document["nonce_prefix"]),
        segment_lengths=tuple(int(length) for length in document["segments"]),
        header_bytes=header_bytes,
        data_offset=end,
    )


def header_prefix_length(first_bytes: bytes) -> int:
    """How many leading bytes hold the preamble and header (for a ranged GET)."""
    _, _, header_length = _PREAMBLE.unpack_from(first_bytes, 0)
    return int(_PREAMBLE.size + header_length)


PREAMBLE_LENGTH = _PREAMBLE.size


class Opener:
    """Decrypts the segments of one object, whole or one at a time."""

    def __init__(
        self, header: EnvelopeHeader, *, object_key: str, sop_instance_uid: str, keys: KeyProvider
    ) -> None:
        self._header = header
        self._aead = AESGCM(keys.unwrap(header.key_id, header.wrapped_key))
        self._digest = hashlib.sha256(header.header_bytes).digest()
        self._object_key = object_key
        self._sop_instance_uid = sop_instance_uid

    def segment(self, index: int, ciphertext: bytes | memoryview) -> bytes:
        """The plaintext of segment ``index`` given its ciphertext."""
        count = len(self._header.segment_lengths)
        nonce = self._header.nonce_prefix + struct.pack(">I", index)
        aad = _associated_data(self._digest, self._object_key, self._sop_instance_uid, index, count)
        try:
            return self._aead.decrypt(nonce, bytes(ciphertext), aad)
        except InvalidTag:
            raise EnvelopeError(
                f"segment {index} failed authentication: the object was altered, truncated, "
                "or belongs to another object key or instance"
            ) from None

    def all_segments(self, blob: bytes | memoryview) -> list[bytes]:
        """Every segment of a whole object, in order."""
        header = self._header
        if len(blob) != header.total_length:
            raise EnvelopeError(
                f"object is {len(blob)} bytes but its header describes {header.total_length}"
            )
        view = memoryview(blob)
        out = []
        for index in range(len(header.segment_lengths)):
            start, length = header.segment_range(index)
            out.append(self.segment(index, view[start : start + length]))
        return out


def unverified_segment(
    header: EnvelopeHeader, index: int, ciphertext: bytes | memoryview, keys: KeyProvider
) -> bytes:
    """Segment ``index`` decrypted WITHOUT authenticating it: only for learning which
    instance an object claims to hold, which ``Opener`` then proves or refutes.

    Every segment's associated data binds the SOP Instance UID, which a reader without a
    catalog does not know yet; the UID is inside the object (manifest, or DICOM header).
    GCM encrypts with AES-CTR starting at counter block ``nonce || 2`` (block 1 masks the
    tag), so CTR mode gives the plaintext the authenticated decryption would. Nothing
    read this way may be used before ``Opener`` has authenticated the segment.
    """
    data_key = keys.unwrap(header.key_id, header.wrapped_key)
    counter = header.nonce_prefix + struct.pack(">II", index, 2)
    decryptor = Cipher(algorithms.AES(data_key), modes.CTR(counter)).decryptor()
    return decryptor.update(bytes(ciphertext[:-TAG_BYTES])) + decryptor.finalize()


def open_object(
    blob: bytes | memoryview, *, object_key: str, sop_instance_uid: str, keys: KeyProvider
) -> list[bytes]:
    """Decrypt every segment of a whole object (authenticating each)."""
    header = read_header(blob)
    opener = Opener(header, object_key=object_key, sop_instance_uid=sop_instance_uid, keys=keys)
    return opener.all_segments(blob)


def _associated_data(
    header_digest: bytes, object_key: str, sop_instance_uid: str, index: int, count: int
) -> bytes:
    fields: Iterable[bytes] = (
        b"strata-object-v1",
        header_digest,
        object_key.encode(),
        sop_instance_uid.encode(),
        struct.pack(">II", index, count),
    )
    return b"\x00".join(fields)

"""The encrypted object format, version 2: packs of instances, each sealed with its own
data key, whose wrapped keys live beside the pack.

Layout, documented for operators (with the measurements behind it) in
docs/object-format.md::

    pack object   <pack key>
      magic       8 bytes  b"\\x89STRATA\\n"
      version     1 byte   2
      hlen        4 bytes  big-endian length of the pack header
      header      hlen     JSON: {"members": [{"sha256", "offset", "length"}, ...]}
                           (offset from the end of the header)
      members              one after another

    member        a byte range of the pack, read alone with a ranged GET
      magic       4 bytes  b"SMv2"
      mlen        4 bytes  big-endian length of the member header
      mheader     mlen     JSON: {"nonce_prefix": base64 of 8 bytes, "segments": [ciphertext
                           lengths, tag included]}
      segments             AES-256-GCM ciphertexts, one after another

    keys object   <pack key>.keys
      JSON: {"format": 2, "key_id": ..., "keys": {sha256: base64 of the wrapped data key}}

Every member gets a fresh 256-bit data key, wrapped by the key provider's active key. The
wrapped keys are not in the pack: rotating the key-encryption key rewrites the small keys
object only, and deleting a study's keys objects (crypto-shredding) makes its packs
unreadable without touching any other object. Segment i of a member is sealed with nonce
``nonce_prefix || i`` and associated data binding the member header's digest, the file's
SHA-256, the SOP Instance UID and (i, segment count): a segment cannot be altered, moved,
dropped, or replayed under another instance. Nothing binds a member to its pack, so a
member's bytes can be copied into another pack (a repack) without being re-encrypted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap

from workers.objects.keys import KeyProvider

MAGIC = b"\x89STRATA\n"
FORMAT_VERSION = 2
MEMBER_MAGIC = b"SMv2"
KEYS_SUFFIX = ".keys"
_PREAMBLE = struct.Struct(">8sBI")
_MEMBER_PREAMBLE = struct.Struct(">4sI")
PREAMBLE_LENGTH = _PREAMBLE.size
MEMBER_PREAMBLE_LENGTH = _MEMBER_PREAMBLE.size
TAG_BYTES = 16
DATA_KEY_BYTES = 32


class EnvelopeError(Exception):
    """An object that is not a Strata object of a known version, or fails
    authentication."""


# -- packs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackMember:
    """Where one member lies in its pack: absolute byte offset and length."""

    sha256: str
    offset: int
    length: int


@dataclass(frozen=True)
class PackHeader:
    members: tuple[PackMember, ...]
    data_offset: int  # where the first member starts

    @property
    def total_length(self) -> int:
        return self.data_offset + sum(member.length for member in self.members)


@dataclass(frozen=True)
class Pack:
    """A pack ready to be written: its bytes, its keys object, and where each member is."""

    data: bytes
    keys: bytes
    members: tuple[PackMember, ...]


def keys_key_for(pack_key: str) -> str:
    """The name of a pack's keys object."""
    return pack_key + KEYS_SUFFIX


def build_pack(members: Sequence[SealedMember], key_id: str) -> Pack:
    """One pack of ``members`` (in order) and its keys object."""
    relative, placed = 0, []
    for member in members:
        placed.append((member.sha256, relative, len(member.data)))
        relative += len(member.data)
    listed = [{"sha256": sha, "offset": offset, "length": n} for sha, offset, n in placed]
    header = json.dumps({"members": listed}, separators=(",", ":")).encode()
    data_offset = _PREAMBLE.size + len(header)
    parts = [_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)), header]
    parts.extend(member.data for member in members)
    keys = KeyRing(key_id, {member.sha256: member.wrapped_key for member in members})
    return Pack(
        b"".join(parts),
        keys.to_bytes(),
        tuple(PackMember(sha, data_offset + offset, n) for sha, offset, n in placed),
    )


def pack_header_length(first_bytes: bytes | memoryview) -> int:
    """How many leading bytes of a pack hold its preamble and header (for a ranged GET)."""
    _check_preamble(first_bytes)
    _, _, header_length = _PREAMBLE.unpack_from(first_bytes, 0)
    return int(_PREAMBLE.size + header_length)


def read_pack_header(blob: bytes | memoryview) -> PackHeader:
    """The member list from the first bytes of a pack (at least ``pack_header_length``)."""
    end = pack_header_length(blob)
    if len(blob) < end:
        raise EnvelopeError("object ends inside its pack header")
    try:
        document = json.loads(bytes(blob[_PREAMBLE.size : end]))
        members = tuple(
            PackMember(str(entry["sha256"]), end + int(entry["offset"]), int(entry["length"]))
            for entry in document["members"]
        )
    except (ValueError, KeyError, TypeError):
        raise EnvelopeError("the pack header is not a member list") from None
    return PackHeader(members, end)


def _check_preamble(blob: bytes | memoryview) -> None:
    if len(blob) < _PREAMBLE.size:
        raise EnvelopeError("object is shorter than the Strata preamble")
    magic, version, _ = _PREAMBLE.unpack_from(blob, 0)
    if magic != MAGIC:
        raise EnvelopeError("object does not start with the Strata magic bytes")
    if version != FORMAT_VERSION:
        raise EnvelopeError(
            f"object format version {version} is not one this reader knows "
            f"(it reads version {FORMAT_VERSION})"
        )


# -- keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRing:
    """A pack's keys object: each member's data key, wrapped by ``key_id``."""

    key_id: str
    wrapped: Mapping[str, bytes]  # by the member's SHA-256

    def to_bytes(self) -> bytes:
        keys = {sha: base64.b64encode(wrapped).decode() for sha, wrapped in self.wrapped.items()}
        document = {"format": FORMAT_VERSION, "key_id": self.key_id, "keys": keys}
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRing:
        try:
            document = json.loads(data)
            version = document.get("format")
            if version != FORMAT_VERSION:
                raise EnvelopeError(
                    f"keys object format {version} is not one this reader knows "
                    f"(it reads version {FORMAT_VERSION})"
                )
            wrapped = {str(sha): base64.b64decode(key) for sha, key in document["keys"].items()}
            return cls(str(document["key_id"]), wrapped)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EnvelopeError("the keys object is not a Strata key list") from None

    def data_key(self, sha256: str, keys: KeyProvider) -> bytes:
        """The data key of member ``sha256``, unwrapped."""
        wrapped = self.wrapped.get(sha256)
        if wrapped is None:
            raise EnvelopeError(
                "the keys object holds no data key for this instance: its key was destroyed "
                "(crypto-shredded) or it belongs to another pack"
            )
        try:
            return keys.unwrap(self.key_id, wrapped)
        except InvalidUnwrap:
            raise EnvelopeError(
                f"a data key does not unwrap under key id {self.key_id!r}: the keys object was "
                "altered, or the key provider holds another key under that id"
            ) from None

    def rewrapped(self, keys: KeyProvider) -> KeyRing:
        """The same data keys wrapped by the provider's active key (a rotation)."""
        key_id, wrapped = keys.active_key_id, {}
        for sha in self.wrapped:
            key_id, wrapped[sha] = keys.wrap(self.data_key(sha, keys))
        return KeyRing(key_id, wrapped)

    def without(self, sha256s: Iterable[str]) -> KeyRing:
        """These members' data keys destroyed (their bytes become unreadable)."""
        gone = set(sha256s)
        return KeyRing(self.key_id, {s: w for s, w in self.wrapped.items() if s not in gone})


# -- members ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedMember:
    """One instance sealed, not yet in a pack: its bytes and its wrapped data key."""

    sha256: str
    data: bytes
    wrapped_key: bytes
    key_id: str


@dataclass(frozen=True)
class MemberHeader:
    """A member's plaintext header: where each segment lies within the member."""

    nonce_prefix: bytes
    segment_lengths: tuple[int, ...]
    header_bytes: bytes  # exactly as stored; its digest is bound into every segment
    data_offset: int  # offset of segment 0 from the member's start

    def segment_range(self, index: int) -> tuple[int, int]:
        """Offset (from the member's start) and length of segment ``index``."""
        start = self.data_offset + sum(self.segment_lengths[:index])
        return start, self.segment_lengths[index]

    @property
    def total_length(self) -> int:
        return self.data_offset + sum(self.segment_lengths)


def seal_member(
    segments: Sequence[bytes | memoryview],
    *,
    sha256: str,
    sop_instance_uid: str,
    keys: KeyProvider,
) -> SealedMember:
    """Encrypt ``segments`` under a fresh data key, bound to the file's SHA-256 and UID."""
    data_key = AESGCM.generate_key(bit_length=256)
    key_id, wrapped_key = keys.wrap(data_key)
    nonce_prefix = secrets.token_bytes(8)
    header_bytes = json.dumps(
        {
            "nonce_prefix": base64.b64encode(nonce_prefix).decode(),
            "segments": [len(segment) + TAG_BYTES for segment in segments],
        },
        separators=(",", ":"),
    ).encode()
    aead = AESGCM(data_key)
    digest = hashlib.sha256(header_bytes).digest()
    parts = [_MEMBER_PREAMBLE.pack(MEMBER_MAGIC, len(header_bytes)), header_bytes]
    for index, segment in enumerate(segments):
        nonce = nonce_prefix + struct.pack(">I", index)
        aad = _associated_data(digest, sha256, sop_instance_uid, index, len(segments))
        parts.append(aead.encrypt(nonce, bytes(segment), aad))
    return SealedMember(sha256, b"".join(parts), wrapped_key, key_id)


def member_header_length(first_bytes: bytes | memoryview) -> int:
    """How many leading bytes of a member hold its preamble and header."""
    if len(first_bytes) < _MEMBER_PREAMBLE.size:
        raise EnvelopeError("the member is shorter than its preamble")
    magic, header_length = _MEMBER_PREAMBLE.unpack_from(first_bytes, 0)
    if magic != MEMBER_MAGIC:
        raise EnvelopeError(
            "the byte range does not start a Strata member of format version 2 (wrong range, "
            "or a format this reader does not know)"
        )
    return int(_MEMBER_PREAMBLE.size + header_length)


def read_member_header(blob: bytes | memoryview) -> MemberHeader:
    """Parse a member's plaintext header from its first bytes."""
    end = member_header_length(blob)
    if len(blob) < end:
        raise EnvelopeError("the member ends inside its header")
    header_bytes = bytes(blob[_MEMBER_PREAMBLE.size : end])
    try:
        document = json.loads(header_bytes)
        nonce_prefix = base64.b64decode(document["nonce_prefix"])
        lengths = tuple(int(length) for length in document["segments"])
    except (ValueError, KeyError, TypeError):
        raise EnvelopeError("the member header is not a segment list") from None
    return MemberHeader(nonce_prefix, lengths, header_bytes, end)


class Opener:
    """Decrypts the segments of one member, whole or one at a time."""

    def __init__(
        self, header: MemberHeader, *, data_key: bytes, sha256: str, sop_instance_uid: str
    ) -> None:
        self._header = header
        self._aead = AESGCM(data_key)
        self._digest = hashlib.sha256(header.header_bytes).digest()
        self._sha256 = sha256
        self._sop_instance_uid = sop_instance_uid

    def segment(self, index: int, ciphertext: bytes | memoryview) -> bytes:
        """The plaintext of segment ``index`` given its ciphertext."""
        count = len(self._header.segment_lengths)
        nonce = self._header.nonce_prefix + struct.pack(">I", index)
        aad = _associated_data(self._digest, self._sha256, self._sop_instance_uid, index, count)
        try:
            return self._aead.decrypt(nonce, bytes(ciphertext), aad)
        except InvalidTag:
            raise EnvelopeError(
                f"segment {index} failed authentication: the object was altered, truncated, "
                "or belongs to another instance"
            ) from None

    def all_segments(self, member: bytes | memoryview) -> list[bytes]:
        """Every segment of a whole member, in order."""
        header = self._header
        if len(member) != header.total_length:
            raise EnvelopeError(
                f"the member is {len(member)} bytes but its header describes {header.total_length}"
            )
        view = memoryview(member)
        out = []
        for index in range(len(header.segment_lengths)):
            start, length = header.segment_range(index)
            out.append(self.segment(index, view[start : start + length]))
        return out


def open_member(
    member: bytes | memoryview, *, data_key: bytes, sha256: str, sop_instance_uid: str
) -> list[bytes]:
    """Decrypt every segment of a whole member (authenticating each)."""
    header = read_member_header(member)
    opener = Opener(header, data_key=data_key, sha256=sha256, sop_instance_uid=sop_instance_uid)
    return opener.all_segments(member)


def unverified_segment(
    header: MemberHeader, index: int, ciphertext: bytes | memoryview, data_key: bytes
) -> bytes:
    """Segment ``index`` decrypted WITHOUT authenticating it: only for learning which
    instance a member claims to hold, which ``Opener`` then proves or refutes.

    Every segment's associated data binds the SOP Instance UID, which a reader without a
    catalog does not know yet; the UID is inside the member (its manifest). GCM encrypts
    with AES-CTR starting at counter block ``nonce || 2`` (block 1 masks the tag), so CTR
    mode gives the plaintext the authenticated decryption would. Nothing read this way may
    be used before ``Opener`` has authenticated the segment.
    """
    counter = header.nonce_prefix + struct.pack(">II", index, 2)
    decryptor = Cipher(algorithms.AES(data_key), modes.CTR(counter)).decryptor()
    return decryptor.update(bytes(ciphertext[:-TAG_BYTES])) + decryptor.finalize()


def _associated_data(
    header_digest: bytes, sha256: str, sop_instance_uid: str, index: int, count: int
) -> bytes:
    fields: Iterable[bytes] = (
        b"strata-object-v2",
        header_digest,
        sha256.encode(),
        sop_instance_uid.encode(),
        struct.pack(">II", index, count),
    )
    return b"\x00".join(fields)

"""The object format (version 2): packs round trip member by member, every kind of
tampering is caught, keys re-wrap and shred without touching a pack, and a reader refuses a
version it does not know."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.objects.envelope import (
    MAGIC,
    EnvelopeError,
    KeyRing,
    Opener,
    SealedMember,
    build_pack,
    open_member,
    read_member_header,
    read_pack_header,
    seal_member,
    unverified_segment,
)
from workers.objects.keys import FileKeyProvider, create_key_file, load_key_file


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> FileKeyProvider:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    create_key_file(path)
    return load_key_file(path)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _member(keys: FileKeyProvider, segments: list[bytes], name: str = "a") -> SealedMember:
    return seal_member(segments, sha256=_sha(name), sop_instance_uid=f"1.2.{len(name)}", keys=keys)


def _open(pack_data: bytes, ring: KeyRing, keys: FileKeyProvider, index: int) -> list[bytes]:
    member = read_pack_header(pack_data).members[index]
    data = pack_data[member.offset : member.offset + member.length]
    uid = {_sha("a"): "1.2.1", _sha("bb"): "1.2.2", _sha("ccc"): "1.2.3"}[member.sha256]
    return open_member(
        data,
        data_key=ring.data_key(member.sha256, keys),
        sha256=member.sha256,
        sop_instance_uid=uid,
    )


@settings(max_examples=40, deadline=None)
@given(
    parts=st.lists(
        st.lists(st.binary(max_size=2000), min_size=1, max_size=6), min_size=1, max_size=3
    )
)
def test_every_member_of_a_pack_round_trips_alone(
    parts: list[list[bytes]], keys: FileKeyProvider
) -> None:
    names = ["a", "bb", "ccc"][: len(parts)]
    members = [_member(keys, segments, name) for segments, name in zip(parts, names, strict=True)]
    pack = build_pack(members, keys.active_key_id)
    assert pack.data.startswith(MAGIC)
    ring = KeyRing.from_bytes(pack.keys)
    assert [m.sha256 for m in read_pack_header(pack.data).members] == [_sha(n) for n in names]
    assert read_pack_header(pack.data).members == pack.members
    for index, segments in enumerate(parts):
        assert _open(pack.data, ring, keys, index) == segments


def test_one_segment_can_be_read_alone(keys: FileKeyProvider) -> None:
    segments = [b"manifest", b"prefix", b"frame-0", b"frame-1", b"suffix"]
    member = _member(keys, segments)
    header = read_member_header(member.data)
    start, length = header.segment_range(3)
    data_key = keys.unwrap(member.key_id, member.wrapped_key)
    opener = Opener(header, data_key=data_key, sha256=_sha("a"), sop_instance_uid="1.2.1")
    assert opener.segment(3, member.data[start : start + length]) == b"frame-1"


def test_plaintext_and_data_keys_do_not_appear_in_the_pack(keys: FileKeyProvider) -> None:
    secret = b"DICM" + b"DOE^JANE" * 100
    member = _member(keys, [secret])
    pack = build_pack([member], keys.active_key_id)
    data_key = keys.unwrap(member.key_id, member.wrapped_key)
    assert b"DICM" not in pack.data and b"DOE^JANE" not in pack.data
    assert data_key not in pack.data and member.wrapped_key not in pack.data


def test_fresh_data_key_per_member(keys: FileKeyProvider) -> None:
    a, b = _member(keys, [b"x"]), _member(keys, [b"x"])
    assert a.wrapped_key != b.wrapped_key
    assert a.data != b.data


@pytest.mark.parametrize(
    "sha256, sop_uid", [(_sha("other"), "1.2.1"), (_sha("a"), "1.2.9")], ids=["sha", "uid"]
)
def test_bound_to_the_file_and_its_instance(
    keys: FileKeyProvider, sha256: str, sop_uid: str
) -> None:
    member = _member(keys, [b"data"])
    data_key = keys.unwrap(member.key_id, member.wrapped_key)
    with pytest.raises(EnvelopeError, match="authentication"):
        open_member(member.data, data_key=data_key, sha256=sha256, sop_instance_uid=sop_uid)


def _tampered(member: SealedMember, keys: FileKeyProvider, data: bytes) -> None:
    data_key = keys.unwrap(member.key_id, member.wrapped_key)
    open_member(data, data_key=data_key, sha256=_sha("a"), sop_instance_uid="1.2.1")


def test_flipped_bit_is_caught(keys: FileKeyProvider) -> None:
    member = _member(keys, [b"a" * 100, b"b" * 100])
    data = bytearray(member.data)
    data[-50] ^= 0x01
    with pytest.raises(EnvelopeError):
        _tampered(member, keys, bytes(data))


def test_swapped_segments_are_caught(keys: FileKeyProvider) -> None:
    member = _member(keys, [b"a" * 10, b"b" * 10])
    header = read_member_header(member.data)
    s0, n0 = header.segment_range(0)
    s1, n1 = header.segment_range(1)
    blob = member.data
    with pytest.raises(EnvelopeError):
        _tampered(member, keys, blob[:s0] + blob[s1 : s1 + n1] + blob[s0 : s0 + n0])


def test_truncated_member_is_caught(keys: FileKeyProvider) -> None:
    member = _member(keys, [b"a" * 10, b"b" * 10])
    with pytest.raises(EnvelopeError):
        _tampered(member, keys, member.data[:-5])


def test_a_member_moved_under_another_instances_key_is_caught(keys: FileKeyProvider) -> None:
    # An attacker who can write the store swaps two members and their keys entries.
    b = seal_member([b"second"], sha256=_sha("bb"), sop_instance_uid="1.2.2", keys=keys)
    data_key_b = keys.unwrap(b.key_id, b.wrapped_key)
    with pytest.raises(EnvelopeError, match="authentication"):
        open_member(b.data, data_key=data_key_b, sha256=_sha("a"), sop_instance_uid="1.2.1")


def test_not_a_strata_object() -> None:
    with pytest.raises(EnvelopeError, match="magic"):
        read_pack_header(b"\0" * 200)
    with pytest.raises(EnvelopeError, match="member"):
        read_member_header(b"\0" * 200)


def test_a_version_it_does_not_know_is_refused_by_name(keys: FileKeyProvider) -> None:
    pack = build_pack([_member(keys, [b"x"])], keys.active_key_id)
    for version in (1, 3):
        other = pack.data[:8] + bytes([version]) + pack.data[9:]
        with pytest.raises(EnvelopeError, match=f"version {version} is not one this reader knows"):
            read_pack_header(other)
    document = json.loads(pack.keys)
    document["format"] = 3
    with pytest.raises(EnvelopeError, match="keys object format 3"):
        KeyRing.from_bytes(json.dumps(document).encode())
    member = _member(keys, [b"x"])
    other_member = b"SMv3" + member.data[4:]
    with pytest.raises(EnvelopeError, match="format version 2"):
        read_member_header(other_member)


def test_other_key_file_cannot_open(keys: FileKeyProvider, tmp_path: Path) -> None:
    pack = build_pack([_member(keys, [b"x"])], keys.active_key_id)
    create_key_file(tmp_path / "other.json")
    other = load_key_file(tmp_path / "other.json")
    with pytest.raises(Exception, match="key id"):
        KeyRing.from_bytes(pack.keys).data_key(_sha("a"), other)


def test_rotation_rewraps_the_keys_object_and_leaves_the_pack_alone(
    keys: FileKeyProvider, tmp_path: Path
) -> None:
    path = tmp_path / "rotating.json"
    create_key_file(path)
    before = load_key_file(path)
    pack = build_pack([_member(before, [b"pixels"], "a")], before.active_key_id)
    # A second key-encryption key, made active (what a rotation does to the key file).
    document = json.loads(path.read_text())
    new_id = "kek-rotated"
    document["keys"][new_id] = base64.b64encode(secrets.token_bytes(32)).decode()
    old_id, document["active"] = document["active"], new_id
    path.write_text(json.dumps(document))
    after = load_key_file(path)
    ring = KeyRing.from_bytes(pack.keys).rewrapped(after)
    assert ring.key_id == new_id != old_id
    assert ring.wrapped != KeyRing.from_bytes(pack.keys).wrapped
    assert _open(pack.data, KeyRing.from_bytes(ring.to_bytes()), after, 0) == [b"pixels"]


def test_shredding_a_members_key_makes_it_unreadable_and_leaves_the_others(
    keys: FileKeyProvider,
) -> None:
    pack = build_pack(
        [_member(keys, [b"one"], "a"), _member(keys, [b"two"], "bb")], keys.active_key_id
    )
    ring = KeyRing.from_bytes(pack.keys).without([_sha("a")])
    with pytest.raises(EnvelopeError, match="destroyed"):
        ring.data_key(_sha("a"), keys)
    assert _open(pack.data, KeyRing.from_bytes(pack.keys), keys, 1) == [b"two"]


@settings(max_examples=30, deadline=None)
@given(segments=st.lists(st.binary(max_size=3000), min_size=1, max_size=5))
def test_an_unverified_segment_is_the_plaintext_authentication_gives(
    segments: list[bytes], keys: FileKeyProvider
) -> None:
    member = _member(keys, segments)
    header = read_member_header(member.data)
    data_key = keys.unwrap(member.key_id, member.wrapped_key)
    for index, segment in enumerate(segments):
        start, length = header.segment_range(index)
        ciphertext = member.data[start : start + length]
        assert unverified_segment(header, index, ciphertext, data_key) == segment


def test_member_preamble_is_magic_and_length(keys: FileKeyProvider) -> None:
    member = _member(keys, [b"x"])
    magic, length = struct.unpack_from(">4sI", member.data)
    assert magic == b"SMv2"
    assert read_member_header(member.data).data_offset == 8 + length

"""The object format: round trips, and every kind of tampering is caught."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.objects.envelope import (
    MAGIC,
    EnvelopeError,
    Opener,
    open_object,
    read_header,
    seal,
    unverified_segment,
)
from workers.objects.keys import FileKeyProvider, create_key_file, load_key_file


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> FileKeyProvider:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    create_key_file(path)
    return load_key_file(path)


@settings(max_examples=60, deadline=None)
@given(segments=st.lists(st.binary(max_size=3000), min_size=1, max_size=8))
def test_round_trip(segments: list[bytes], keys: FileKeyProvider) -> None:
    blob = seal(segments, object_key="k/1", sop_instance_uid="1.2.3", keys=keys)
    assert blob.startswith(MAGIC)
    assert open_object(blob, object_key="k/1", sop_instance_uid="1.2.3", keys=keys) == segments


def test_one_segment_can_be_read_alone(keys: FileKeyProvider) -> None:
    segments = [b"manifest", b"prefix", b"frame-0", b"frame-1", b"suffix"]
    blob = seal(segments, object_key="k", sop_instance_uid="1.2", keys=keys)
    header = read_header(blob)
    start, length = header.segment_range(3)
    opener = Opener(header, object_key="k", sop_instance_uid="1.2", keys=keys)
    assert opener.segment(3, blob[start : start + length]) == b"frame-1"


def test_plaintext_does_not_appear(keys: FileKeyProvider) -> None:
    secret = b"DICM" + b"DOE^JANE" * 100
    blob = seal([secret], object_key="k", sop_instance_uid="1.2", keys=keys)
    assert b"DICM" not in blob and b"DOE^JANE" not in blob


def test_fresh_data_key_per_object(keys: FileKeyProvider) -> None:
    a = read_header(seal([b"x"], object_key="k", sop_instance_uid="1", keys=keys))
    b = read_header(seal([b"x"], object_key="k", sop_instance_uid="1", keys=keys))
    assert a.wrapped_key != b.wrapped_key


@pytest.mark.parametrize(
    "object_key, sop_uid", [("other-key", "1.2"), ("k", "1.2.9")], ids=["key", "uid"]
)
def test_bound_to_object_key_and_uid(keys: FileKeyProvider, object_key: str, sop_uid: str) -> None:
    blob = seal([b"data"], object_key="k", sop_instance_uid="1.2", keys=keys)
    with pytest.raises(EnvelopeError, match="authentication"):
        open_object(blob, object_key=object_key, sop_instance_uid=sop_uid, keys=keys)


def test_flipped_bit_is_caught(keys: FileKeyProvider) -> None:
    blob = bytearray(
        seal([b"a" * 100, b"b" * 100], object_key="k", sop_instance_uid="1", keys=keys)
    )
    blob[-50] ^= 0x01
    with pytest.raises(EnvelopeError):
        open_object(bytes(blob), object_key="k", sop_instance_uid="1", keys=keys)


def test_swapped_segments_are_caught(keys: FileKeyProvider) -> None:
    blob = seal([b"a" * 10, b"b" * 10], object_key="k", sop_instance_uid="1", keys=keys)
    header = read_header(blob)
    s0, n0 = header.segment_range(0)
    s1, n1 = header.segment_range(1)
    swapped = blob[:s0] + blob[s1 : s1 + n1] + blob[s0 : s0 + n0]
    with pytest.raises(EnvelopeError):
        open_object(swapped, object_key="k", sop_instance_uid="1", keys=keys)


def test_truncated_object_is_caught(keys: FileKeyProvider) -> None:
    blob = seal([b"a" * 10, b"b" * 10], object_key="k", sop_instance_uid="1", keys=keys)
    with pytest.raises(EnvelopeError):
        open_object(blob[:-5], object_key="k", sop_instance_uid="1", keys=keys)


def test_not_a_strata_object() -> None:
    with pytest.raises(EnvelopeError, match="magic"):
        read_header(b"\0" * 200)


def test_other_key_file_cannot_open(keys: FileKeyProvider, tmp_path: Path) -> None:
    blob = seal([b"x"], object_key="k", sop_instance_uid="1", keys=keys)
    create_key_file(tmp_path / "other.json")
    other = load_key_file(tmp_path / "other.json")
    with pytest.raises(Exception, match="key id"):
        open_object(blob, object_key="k", sop_instance_uid="1", keys=other)


@settings(max_examples=30, deadline=None)
@given(segments=st.lists(st.binary(max_size=3000), min_size=1, max_size=5))
def test_an_unverified_segment_is_the_plaintext_authentication_gives(
    segments: list[bytes], keys: FileKeyProvider
) -> None:
    blob = seal(segments, object_key="k", sop_instance_uid="1.2.3", keys=keys)
    header = read_header(blob)
    for index, segment in enumerate(segments):
        start, length = header.segment_range(index)
        assert unverified_segment(header, index, blob[start : start + length], keys) == segment

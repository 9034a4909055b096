"""split_file and sizes it is told rather than shown: a deflated data set is inflated no
further than ``max_dataset_bytes`` + 1 bytes, and declared lengths or image dimensions
never make it allocate more than the file holds."""

from __future__ import annotations

import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from tests.unit.conftest import PHI, make_file
from workers.dicom.split import SplitFile, split_file
from workers.errors import Reason, RejectError

MiB = 1 << 20
BOMB_INFLATED = 200 * MiB
BOMB_LIMIT = 8 * MiB


def _deflated_parts(pixel_length: int) -> tuple[bytes, bytes]:
    """(preamble and file meta of a deflated file, the start of its data set up to and
    including the header of Pixel Data, which declares ``pixel_length`` bytes)."""
    assert pixel_length % 2 == 0
    # one 16-bit pixel per frame; the value itself is left for the caller to deflate
    frames = max(pixel_length // 2, 1)
    data = make_file(
        transfer_syntax=DeflatedExplicitVRLittleEndian,
        rows=1,
        columns=1,
        pixel_data=b"",
        NumberOfFrames=frames,
    )
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    dataset = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)
    assert dataset.endswith(b"\xe0\x7f\x10\x00OW\0\0\0\0\0\0")
    return data[:meta_end], dataset[:-4] + struct.pack("<L", pixel_length)


def _deflate(meta: bytes, chunks: Iterable[bytes]) -> bytes:
    """``meta`` followed by the raw deflate stream of ``chunks``, compressed as they come."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [meta]
    out.extend(deflater.compress(chunk) for chunk in chunks)
    out.append(deflater.flush())
    return b"".join(out)


def _deflated_file(pixels: bytes) -> tuple[bytes, int]:
    """A deflated file with these (16-bit) pixels, and the length of its inflated data set."""
    meta, head = _deflated_parts(len(pixels))
    return _deflate(meta, [head, pixels]), len(head) + len(pixels)


@cache
def _bomb() -> tuple[bytes, int]:
    """A deflated file of a few hundred kB whose data set inflates to over 200 MiB of
    zeros (a declared 200 MiB Pixel Data value), and that inflated length."""
    meta, head = _deflated_parts(BOMB_INFLATED)
    zeros = bytes(MiB)
    data = _deflate(meta, [head, *(zeros for _ in range(BOMB_INFLATED // MiB))])
    return data, len(head) + BOMB_INFLATED


@contextmanager
def _counting_inflation() -> Iterator[list[int]]:
    """Patch zlib so that the length of everything anyone inflates is recorded."""
    inflated: list[int] = []
    decompressobj, decompress = zlib.decompressobj, zlib.decompress

    class Counting:
        def __init__(self, *args: Any) -> None:
            self.inner = decompressobj(*args)

        def decompress(self, data: Any, max_length: int = 0) -> bytes:
            out = self.inner.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    def counting_decompress(*args: Any, **kwargs: Any) -> bytes:
        out = decompress(*args, **kwargs)
        inflated.append(len(out))
        return out

    with (
        mock.patch.object(zlib, "decompressobj", Counting),
        mock.patch.object(zlib, "decompress", counting_decompress),
    ):
        yield inflated


def _peak_allocation(call: Callable[[], object]) -> tuple[int, object]:
    """(the peak of Python allocations while ``call`` runs, its result or exception)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            result: object = call()
        except RejectError as error:
            result = error
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def _reject(data: bytes, **limits: int) -> RejectError:
    with pytest.raises(RejectError) as caught:
        split_file(data, **limits)
    for value in PHI:
        assert value not in str(caught.value)
    return caught.value


# --- deflated data sets and max_dataset_bytes -------------------------------------------


def test_a_deflate_bomb_is_refused_once_it_inflates_past_the_limit() -> None:
    bomb, inflated_length = _bomb()
    assert len(bomb) < MiB < BOMB_INFLATED < inflated_length
    with _counting_inflation() as inflated:
        error = _reject(bomb, max_dataset_bytes=BOMB_LIMIT)
    assert error.reason == Reason.TOO_LARGE
    assert error.message.startswith(
        f"the deflated data set inflates past the {BOMB_LIMIT}-byte limit (max_file_bytes)"
    )
    assert "smaller parts" in error.message  # what the sender can do
    # Exactly one byte past the limit was inflated, by split_file alone (not by pydicom).
    assert sum(inflated) == BOMB_LIMIT + 1


def test_refusing_a_deflate_bomb_allocates_about_the_limit_not_the_bomb() -> None:
    bomb, inflated_length = _bomb()
    peak, result = _peak_allocation(lambda: split_file(bomb, max_dataset_bytes=BOMB_LIMIT))
    assert isinstance(result, RejectError) and result.reason == Reason.TOO_LARGE
    # The inflated bytes grow in place: about the limit, never twice it, let alone the
    # 200 MiB the stream would give.
    assert peak < 1.5 * BOMB_LIMIT + 2 * MiB, peak
    assert peak < inflated_length / 10


def test_without_a_limit_the_bomb_is_inflated_and_split_as_before() -> None:
    bomb, inflated_length = _bomb()
    split = split_file(bomb)
    assert split.pixel_start == split.pixel_end == len(bomb)
    assert split.header.patient_id == PHI[1]
    assert split == split_file(bomb, max_dataset_bytes=inflated_length)


@settings(max_examples=40, deadline=None)
@given(
    pixel_words=st.one_of(
        st.integers(0, 4096),
        # around the 1 MiB steps the inflation works in
        st.sampled_from([MiB // 2, MiB, 2 * MiB]).flatmap(
            lambda words: st.integers(words - 300, words + 300)
        ),
    ),
    seed=st.integers(0, 2**32 - 1),
    incompressible=st.booleans(),
    margin=st.integers(-3, 3),
)
def test_a_deflated_file_splits_up_to_the_limit_and_is_refused_past_it(
    pixel_words: int, seed: int, incompressible: bool, margin: int
) -> None:
    generator = random.Random(seed)
    pixels = (
        generator.randbytes(2 * pixel_words)
        if incompressible
        else bytes([generator.randrange(256)]) * (2 * pixel_words)
    )
    data, inflated_length = _deflated_file(pixels)
    limit = inflated_length + margin
    expected = split_file(data)
    assert expected.pixel_start == expected.pixel_end == len(data)
    with _counting_inflation() as inflated:
        if margin >= 0:
            assert split_file(data, max_dataset_bytes=limit) == expected
        else:
            error = _reject(data, max_dataset_bytes=limit)
            assert error.reason == Reason.TOO_LARGE
            assert f"past the {limit}-byte limit (max_file_bytes)" in error.message
    # split_file's own inflation stops one byte past the limit; only a data set within
    # the limit is read by pydicom too (which inflates it once more).
    own = inflated[:-1] if margin >= 0 else inflated
    assert sum(own) == min(inflated_length, limit + 1)
    if margin >= 0:
        assert inflated[-1] == inflated_length


def test_a_cut_deflate_stream_is_truncated_within_the_limit_and_too_large_past_it() -> None:
    generator = random.Random(7)
    data, inflated_length = _deflated_file(generator.randbytes(400_000))
    cut = data[: len(data) - 1000]
    assert _reject(cut).reason == Reason.TRUNCATED
    assert _reject(cut, max_dataset_bytes=inflated_length).reason == Reason.TRUNCATED
    assert _reject(cut, max_dataset_bytes=1000).reason == Reason.TOO_LARGE


def test_deflated_corpus_files_split_the_same_with_their_exact_size_as_limit() -> None:
    data = Path(get_testdata_file("image_dfl.dcm") or "").read_bytes()
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    inflated_length = len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[meta_end:]))
    split = split_file(data)
    assert split_file(data, max_dataset_bytes=inflated_length) == split
    assert _reject(data, max_dataset_bytes=inflated_length - 1).reason == Reason.TOO_LARGE


def test_a_plain_data_set_over_the_limit_is_too_large() -> None:
    data = make_file(rows=16, columns=16)
    split = split_file(data)
    dataset_length = len(data) - 144 - int.from_bytes(data[140:144], "little")
    assert split_file(data, max_dataset_bytes=dataset_length) == split
    error = _reject(data, max_dataset_bytes=dataset_length - 1)
    assert error.reason == Reason.TOO_LARGE
    assert error.message.startswith(
        f"the data set has {dataset_length} bytes, more than the "
        f"{dataset_length - 1}-byte limit (max_file_bytes)"
    )


def test_a_negative_limit_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_dataset_bytes"):
        split_file(make_file(), max_dataset_bytes=-1)


# --- declared sizes: never allocated before they are checked -----------------------------

_SMALL_PEAK = 4 * MiB  # generous: pydicom's own reading of a small file


def _assert_refused_cheaply(data: bytes, reason: Reason) -> RejectError:
    peak, result = _peak_allocation(lambda: split_file(data))
    assert isinstance(result, RejectError), result
    assert result.reason == reason, result.message
    assert peak < _SMALL_PEAK, peak
    return result


def test_a_giant_declared_native_image_is_refused_without_allocating_it() -> None:
    # 65535 × 65535 × 3 samples × 16 bits × 2^31 - 1 frames: about 5.6e19 bytes declared
    data = make_file(
        rows=65535,
        columns=65535,
        pixel_data=bytes(16),
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        NumberOfFrames=2**31 - 1,
    )
    error = _assert_refused_cheaply(data, Reason.PIXEL_LENGTH_MISMATCH)
    assert error.message.startswith("(7FE0,0010) Pixel Data has 16 bytes but Rows 65535")


def _with_declared_length(data: bytes, header: bytes, length: int) -> bytes:
    """``data`` with the 4-byte length after the one occurrence of ``header`` replaced."""
    assert data.count(header) == 1
    at = data.index(header) + len(header)
    return data[:at] + struct.pack("<L", length) + data[at + 4 :]


def test_a_declared_element_length_past_the_end_is_truncated_without_allocating_it() -> None:
    data = _with_declared_length(make_file(), b"\xe0\x7f\x10\x00OW\0\0", 0xFFFFFFF0)
    error = _assert_refused_cheaply(data, Reason.TRUNCATED)
    assert "(7FE0,0010) Pixel Data" in error.message


def test_a_declared_fragment_length_past_the_end_is_truncated_without_allocating_it() -> None:
    frame = b"\xff\x4f\xff\x51" + bytes(60)
    data = make_file(
        transfer_syntax=JPEG2000Lossless,
        pixel_data=encapsulate([frame], has_bot=False),
        pixel_vr="OB",
    )
    # Pixel Data header, an empty Basic Offset Table item, then the fragment's item
    pixel_data = b"\xe0\x7f\x10\x00OB\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\0\0\0\0"
    fragment = pixel_data + b"\xfe\xff\x00\xe0"
    data = _with_declared_length(data, fragment, 0xFFFFFFF0)
    error = _assert_refused_cheaply(data, Reason.TRUNCATED)
    assert "an item of (7FE0,0010) Pixel Data" in error.message


def test_a_deflated_data_set_declaring_a_huge_value_is_truncated_cheaply() -> None:
    meta, head = _deflated_parts(2)
    head = head[:-4] + struct.pack("<L", 0xFFFFFFF0)
    data = _deflate(meta, [head, bytes(2)])
    error = _assert_refused_cheaply(data, Reason.TRUNCATED)
    assert "(7FE0,0010) Pixel Data" in error.message


@pytest.mark.parametrize(
    "value",
    [b"\xb2 ", b"+-5 ", b"9" * 5000, b"1" * 13 + b" ", b"1A"],
    ids=["superscript-two", "two-signs", "5000-digits", "13-digits", "letter"],
)
def test_a_number_of_frames_that_is_not_a_small_integer_is_refused(value: bytes) -> None:
    data = make_file(NumberOfFrames=1)
    element = b"\x28\x00\x08\x00IS\x02\x001 "
    assert data.count(element) == 1
    value += b" " * (len(value) % 2)
    data = data.replace(element, element[:6] + struct.pack("<H", len(value)) + value)
    error = _reject(data)
    assert error.reason == Reason.PIXEL_LENGTH_MISMATCH
    assert error.message.startswith("(0028,0008) Number of Frames is not an integer")


def test_a_number_of_frames_with_leading_zeros_and_sign_is_read() -> None:
    data = make_file(NumberOfFrames=1)
    element = b"\x28\x00\x08\x00IS\x02\x001 "
    data = data.replace(element, element[:6] + b"\x0c\x00" + b"+00000000001")
    split: SplitFile = split_file(data)
    assert split.layout is not None and split.layout.frames == 1

"""encode_verified / decode_to_native: bit-exact round trips on every layout they accept."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import data_store
import imagecodecs
import jpeg_ls
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import HTJ2KLosslessDecoder, JPEGLosslessSV1Decoder
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import UID

from workers.codecs.lossless import (
    JPEG2000_LOSSLESS,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_PREDICTOR,
    JPEG_LOSSLESS_SV1,
    JPEGLS_LOSSLESS,
    EncodedPixels,
    NotLossless,
    decode_frame,
    decode_to_native,
    encode_verified,
    lossless_transfer_syntaxes,
)
from workers.dicom.split import PixelLayout, SplitFile, sample_bytes, split_file, swap_pairs
from workers.records import HTJ2K_LOSSLESS

DATA_STORE = Path(data_store.__file__).parent / "data"
OPENJPEG_PLUGIN = "strata-test-openjpeg"


def layout(**changes: Any) -> PixelLayout:
    values: dict[str, Any] = dict(
        rows=5,
        columns=7,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=12,
        pixel_representation=0,
        planar_configuration=0,
        photometric_interpretation="MONOCHROME2",
        frames=1,
        little_endian=True,
    )
    values.update(changes)
    return PixelLayout(**values)


@st.composite
def native_pixels(
    draw: st.DrawFn,
    bits: list[int],
    *,
    jpegls_profile: bool = False,
    jpeg_profile: bool = False,
) -> tuple[bytes, PixelLayout]:
    """A layout and raw Pixel Data for it, pad byte included when the length is odd.

    With ``jpegls_profile``, only layouts PS3.5 Table 8.2.3-1 allows in JPEG-LS: Bits
    Stored 2 or more, unsigned colour, YBR_FULL of 8 bits. With ``jpeg_profile``, the
    layouts JPEG Lossless takes: the same, with Bits Stored 1 too.
    """
    profile = jpegls_profile or jpeg_profile
    bits_allocated = draw(st.sampled_from(bits))
    samples = draw(st.sampled_from([1, 3]))
    colours = ["RGB"] if profile and bits_allocated == 16 else ["RGB", "YBR_FULL"]
    pixels = layout(
        rows=draw(st.integers(1, 70)),
        columns=draw(st.integers(1, 70)),
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=draw(st.integers(2 if jpegls_profile else 1, bits_allocated)),
        pixel_representation=(0 if profile and samples == 3 else draw(st.sampled_from([0, 1]))),
        planar_configuration=draw(st.sampled_from([0, 1])) if samples == 3 else 0,
        photometric_interpretation=(
            draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"]))
            if samples == 1
            else draw(st.sampled_from(colours))
        ),
        frames=draw(st.integers(1, 3)),
        little_endian=draw(st.booleans()),
    )
    values = _values(pixels, draw(st.sampled_from(["garbage", "fits", "extremes", "ramp"])), draw)
    pad = bytes([draw(st.integers(0, 255))]) if pixels.expected_length % 2 else b""
    return values + pad, pixels


def _values(pixels: PixelLayout, pattern: str, draw: st.DrawFn) -> bytes:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    width = pixels.bits_allocated // 8
    count = pixels.expected_length // width
    kind = "i" if pixels.pixel_representation else "u"
    dtype = np.dtype(f"{'<' if pixels.little_endian else '>'}{kind}{width}")
    info = np.iinfo(dtype)
    if pattern == "garbage":  # every bit random, above Bits Stored too
        return rng.bytes(pixels.expected_length)
    if pattern == "fits":  # values within Bits Stored, sign-extended when signed
        if pixels.pixel_representation:
            limit = 1 << (pixels.bits_stored - 1)
            values = rng.integers(-limit, limit, count)
        else:
            values = rng.integers(0, 1 << pixels.bits_stored, count)
    elif pattern == "extremes":
        values = rng.choice([info.min, info.max, 0, -1 if kind == "i" else 1], count)
    else:
        values = np.arange(count) * max(1, int(info.max) // max(count, 1)) + int(info.min)
    return values.astype(dtype).tobytes()


# What every codestream starts with: J2K SOC + SIZ (no JP2 box); JPEG-LS SOI + SOF55 (no
# SPIFF header, which would put an APP8 segment between the two).
FIRST_MARKERS = {
    HTJ2K_LOSSLESS: b"\xff\x4f\xff\x51",
    JPEG2000_LOSSLESS: b"\xff\x4f\xff\x51",
    JPEGLS_LOSSLESS: b"\xff\xd8\xff\xf7",
    # libjpeg-turbo writes APP0 (JFIF) before SOF3 for one component, APP14 (Adobe) for three.
    JPEG_LOSSLESS_SV1: b"\xff\xd8\xff",
    JPEG_LOSSLESS: b"\xff\xd8\xff",
}


def _assert_round_trip(raw: bytes, pixels: PixelLayout, transfer_syntax: str) -> EncodedPixels:
    encoded = encode_verified(raw, pixels, transfer_syntax)
    assert encoded.transfer_syntax == transfer_syntax
    assert len(encoded.frames) == pixels.frames
    assert encoded.trailing == raw[pixels.expected_length :]
    assert all(frame.startswith(FIRST_MARKERS[transfer_syntax]) for frame in encoded.frames)
    assert decode_to_native(encoded, pixels) == raw
    return encoded


@settings(max_examples=300, deadline=None)
@given(case=native_pixels(bits=[8, 16]))
def test_htj2k_round_trip_is_bit_exact(case: tuple[bytes, PixelLayout]) -> None:
    raw, pixels = case
    encoded = _assert_round_trip(raw, pixels, HTJ2K_LOSSLESS)
    _assert_first_frame_reads_colour_by_pixel(encoded, raw, pixels)


@settings(max_examples=100, deadline=None)
@given(case=native_pixels(bits=[8, 16]))
def test_jpeg2000_round_trip_is_bit_exact(case: tuple[bytes, PixelLayout]) -> None:
    raw, pixels = case
    encoded = _assert_round_trip(raw, pixels, JPEG2000_LOSSLESS)
    _assert_first_frame_reads_colour_by_pixel(encoded, raw, pixels)


@settings(max_examples=300, deadline=None)
@given(case=native_pixels(bits=[8, 16], jpegls_profile=True))
def test_jpegls_round_trip_is_bit_exact(case: tuple[bytes, PixelLayout]) -> None:
    raw, pixels = case
    encoded = _assert_round_trip(raw, pixels, JPEGLS_LOSSLESS)
    _assert_first_frame_reads_colour_by_pixel(encoded, raw, pixels)


@settings(max_examples=300, deadline=None)
@given(case=native_pixels(bits=[8, 16], jpeg_profile=True))
def test_jpeg_lossless_sv1_round_trip_is_bit_exact(case: tuple[bytes, PixelLayout]) -> None:
    raw, pixels = case
    encoded = _assert_round_trip(raw, pixels, JPEG_LOSSLESS_SV1)
    _assert_first_frame_reads_colour_by_pixel(encoded, raw, pixels)
    assert all(_sof3_and_predictor(frame)[1] == 1 for frame in encoded.frames)


@settings(max_examples=150, deadline=None)
@given(case=native_pixels(bits=[8, 16], jpeg_profile=True))
def test_jpeg_lossless_round_trip_is_bit_exact(case: tuple[bytes, PixelLayout]) -> None:
    raw, pixels = case
    encoded = _assert_round_trip(raw, pixels, JPEG_LOSSLESS)
    _assert_first_frame_reads_colour_by_pixel(encoded, raw, pixels)
    predictor = JPEG_LOSSLESS_PREDICTOR
    assert all(_sof3_and_predictor(frame)[1] == predictor for frame in encoded.frames)


def _sof3_and_predictor(codestream: bytes) -> tuple[dict[str, Any], int]:
    """The SOF3 segment's precision and component IDs, and the SOS selection value."""
    frame: dict[str, Any] = {}
    position = 2
    while True:
        marker = codestream[position + 1]
        length = int.from_bytes(codestream[position + 2 : position + 4], "big")
        segment = codestream[position + 4 : position + 2 + length]
        if marker == 0xC3:
            frame = {"precision": segment[0], "ids": bytes(segment[6::3])}
        if marker == 0xDA:
            assert frame, "SOS before SOF3"
            return frame, segment[1 + 2 * segment[0]]
        position += 2 + length


def _assert_first_frame_reads_colour_by_pixel(
    encoded: EncodedPixels, raw: bytes, pixels: PixelLayout
) -> None:
    """decode_frame, as a reader would: the first frame's values, colour-by-pixel."""
    first = decode_frame(encoded.frames[0], pixels, encoded.transfer_syntax)
    frames = np.frombuffer(raw, _container(pixels), pixels.expected_length // _width(pixels))
    expected = frames.reshape(pixels.frames, -1)[0]
    if pixels.samples_per_pixel == 1:
        expected = expected.reshape(pixels.rows, pixels.columns)
    elif pixels.planar_configuration == 1:
        expected = np.moveaxis(expected.reshape(3, pixels.rows, pixels.columns), 0, -1)
    else:
        expected = expected.reshape(pixels.rows, pixels.columns, 3)
    assert first.dtype.isnative and first.dtype.kind == expected.dtype.kind
    assert first.dtype.itemsize == expected.dtype.itemsize
    assert first.shape == expected.shape
    assert np.array_equal(first, expected)


def _width(pixels: PixelLayout) -> int:
    return pixels.bits_allocated // 8


def _container(pixels: PixelLayout) -> np.dtype[Any]:
    kind = "i" if pixels.pixel_representation else "u"
    return np.dtype(f"{'<' if pixels.little_endian else '>'}{kind}{_width(pixels)}")


@st.composite
def admitted_pixels(draw: st.DrawFn, *, jpeg_profile: bool = False) -> tuple[bytes, PixelLayout]:
    """Little-endian JPEG-LS (or JPEG Lossless) layouts whose values fit Bits Stored (what
    the pipeline compresses: see workers.codecs.lossless.values_fit_bits_stored)."""
    profile = {"jpeg_profile": True} if jpeg_profile else {"jpegls_profile": True}
    raw, pixels = draw(native_pixels(bits=[8, 16], **profile))
    pixels = PixelLayout(**{**pixels.__dict__, "little_endian": True})
    values = np.frombuffer(raw, _container(pixels), pixels.expected_length // _width(pixels))
    if pixels.pixel_representation:
        shift = pixels.bits_allocated - pixels.bits_stored
        values = (values << shift) >> shift  # sign-extend from Bits Stored
    else:
        values = values & ((1 << pixels.bits_stored) - 1)
    return values.tobytes() + raw[pixels.expected_length :], pixels


def _native_file(raw: bytes, pixels: PixelLayout) -> bytes:
    """A Part 10 file holding ``raw`` as native Pixel Data of layout ``pixels``."""
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    dataset.SOPInstanceUID = dataset.StudyInstanceUID = "1.2.3.4"
    dataset.Rows, dataset.Columns = pixels.rows, pixels.columns
    dataset.SamplesPerPixel = pixels.samples_per_pixel
    dataset.PhotometricInterpretation = pixels.photometric_interpretation
    if pixels.samples_per_pixel > 1:
        dataset.PlanarConfiguration = pixels.planar_configuration
    dataset.BitsAllocated, dataset.BitsStored = pixels.bits_allocated, pixels.bits_stored
    dataset.HighBit = pixels.bits_stored - 1
    dataset.PixelRepresentation = pixels.pixel_representation
    dataset.NumberOfFrames = pixels.frames
    dataset.PixelData = raw
    dataset["PixelData"].VR = "OB" if pixels.bits_allocated == 8 else "OW"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


@settings(max_examples=100, deadline=None)
@given(case=admitted_pixels())
def test_pydicom_reads_jpegls_as_the_native_pixels(case: tuple[bytes, PixelLayout]) -> None:
    """pydicom's own JPEG-LS decoder sees the pixels a reader of the native file sees:
    precision, sign extension, colour-by-pixel and frames as DICOM defines them."""
    raw, pixels = case
    data = _native_file(raw, pixels)
    split = split_file(data)
    assert split.layout == pixels
    encoded = encode_verified(data[split.pixel_start : split.pixel_end], pixels, JPEGLS_LOSSLESS)
    stored = _stored_form(data, split, encoded)
    assert np.array_equal(stored.pixel_array, _native_array(data))


@pytest.mark.skipif(
    not JPEGLosslessSV1Decoder.is_available,
    reason="pydicom has no JPEG Lossless decoder (pylibjpeg-libjpeg or python-gdcm)",
)
@pytest.mark.parametrize("transfer_syntax", [JPEG_LOSSLESS_SV1, JPEG_LOSSLESS])
@settings(max_examples=60, deadline=None)
@given(case=admitted_pixels(jpeg_profile=True))
def test_pydicom_reads_jpeg_lossless_as_the_native_pixels(
    transfer_syntax: str, case: tuple[bytes, PixelLayout]
) -> None:
    """pydicom (pylibjpeg-libjpeg, a decoder independent of libjpeg-turbo) sees the
    native pixels: precision, sign, colour space left alone, frames."""
    raw, pixels = case
    data = _native_file(raw, pixels)
    split = split_file(data)
    encoded = encode_verified(data[split.pixel_start : split.pixel_end], pixels, transfer_syntax)
    stored = _stored_form(data, split, encoded)
    assert np.array_equal(stored.pixel_array, _native_array(data))


@pytest.mark.parametrize("transfer_syntax", [JPEG_LOSSLESS_SV1, JPEG_LOSSLESS])
def test_jpeg_lossless_declares_bits_stored_when_the_values_fit(transfer_syntax: str) -> None:
    pixels = layout(bits_stored=12, pixel_representation=1)
    fits = np.arange(-17, 18, dtype="<i2")
    encoded = encode_verified(fits.tobytes(), pixels, transfer_syntax)
    assert _sof3_and_predictor(encoded.frames[0])[0]["precision"] == 12
    # Signed samples are stored as their 12-bit two's complement pattern.
    decoded = imagecodecs.jpeg8_decode(encoded.frames[0])
    assert np.array_equal(decoded.ravel(), fits.view("<u2") & 0xFFF)
    overlay = (np.arange(35, dtype="<u2") | 0x8000).view("<i2").tobytes()
    encoded = encode_verified(overlay, pixels, transfer_syntax)
    assert _sof3_and_predictor(encoded.frames[0])[0]["precision"] == 16
    assert decode_to_native(encoded, pixels) == overlay
    # libjpeg-turbo codes 16-bit samples at 9 bits or more: 8 of 16 goes at 16.
    narrow = layout(bits_stored=8, pixel_representation=1)
    encoded = encode_verified(fits.tobytes(), narrow, transfer_syntax)
    assert _sof3_and_predictor(encoded.frames[0])[0]["precision"] == 16
    assert decode_to_native(encoded, narrow) == fits.tobytes()


@pytest.mark.parametrize(("photometric", "ids"), [("RGB", b"RGB"), ("YBR_FULL", b"\1\2\3")])
def test_jpeg_lossless_keeps_colour_samples_as_they_are(photometric: str, ids: bytes) -> None:
    """No colour transform: the samples in the codestream are the file's, colour-by-pixel,
    and YBR_FULL samples are not labelled RGB."""
    pixels = layout(
        rows=2,
        columns=3,
        samples_per_pixel=3,
        planar_configuration=1,
        photometric_interpretation=photometric,
        bits_allocated=8,
        bits_stored=8,
    )
    planes = np.arange(0, 18 * 13, 13, dtype=np.uint8).reshape(3, 2, 3)
    for transfer_syntax in (JPEG_LOSSLESS_SV1, JPEG_LOSSLESS):
        encoded = encode_verified(planes.tobytes(), pixels, transfer_syntax)
        assert _sof3_and_predictor(encoded.frames[0])[0]["ids"] == ids
        assert b"Adobe" in encoded.frames[0] and b"JFIF" not in encoded.frames[0]
        decoded = imagecodecs.jpeg8_decode(encoded.frames[0], colorspace="rgb")
        assert np.array_equal(decoded, np.moveaxis(planes, 0, -1))
        assert decode_to_native(encoded, pixels) == planes.tobytes()


def test_jpegls_declares_bits_stored_when_the_values_fit() -> None:
    pixels = layout(bits_stored=12, pixel_representation=1)
    fits = np.arange(-17, 18, dtype="<i2")
    encoded = encode_verified(fits.tobytes(), pixels, JPEGLS_LOSSLESS)
    decoded, info = jpeg_ls.decode_buffer(encoded.frames[0])
    assert info["bits_per_sample"] == 12
    # Signed samples are stored as their 12-bit two's complement pattern.
    assert np.array_equal(np.frombuffer(decoded, "<u2"), fits.view("<u2") & 0xFFF)
    overlay = (np.arange(35, dtype="<u2") | 0x8000).view("<i2").tobytes()
    encoded = encode_verified(overlay, pixels, JPEGLS_LOSSLESS)
    assert jpeg_ls.decode_buffer(encoded.frames[0])[1]["bits_per_sample"] == 16
    assert decode_to_native(encoded, pixels) == overlay


def test_jpegls_writes_colour_by_pixel_from_a_planar_layout() -> None:
    pixels = layout(
        rows=2,
        columns=3,
        samples_per_pixel=3,
        planar_configuration=1,
        photometric_interpretation="RGB",
        bits_allocated=8,
        bits_stored=8,
    )
    planes = np.arange(18, dtype=np.uint8).reshape(3, 2, 3)
    encoded = encode_verified(planes.tobytes(), pixels, JPEGLS_LOSSLESS)
    decoded, info = jpeg_ls.decode_buffer(encoded.frames[0])
    assert info["interleave_mode"] == 2
    assert np.array_equal(np.frombuffer(decoded, np.uint8), np.moveaxis(planes, 0, -1).ravel())
    assert decode_to_native(encoded, pixels) == planes.tobytes()


def test_jpegls_frames_that_outgrow_pyjpegls_buffer_still_encode() -> None:
    """If the first check starts failing, pyjpegls sizes its output buffer for any frame:
    delete workers.codecs.lossless._jpegls_encode_padded."""
    with pytest.raises(RuntimeError, match="buffer is too small"):
        jpeg_ls.encode_buffer(b"\x07", 1, 1, 1, 8)
    for pixels, raw in [
        (layout(rows=1, columns=1, bits_allocated=8, bits_stored=8), b"\x07\x00"),
        (layout(rows=1, columns=1, bits_stored=16), b"\xff\xff"),
        (layout(rows=64, columns=1, bits_allocated=8, bits_stored=8), bytes(range(0, 256, 4))),
    ]:
        _assert_round_trip(raw, pixels, JPEGLS_LOSSLESS)


@pytest.mark.parametrize(
    "transfer_syntax",
    [HTJ2K_LOSSLESS, JPEG2000_LOSSLESS, JPEGLS_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LOSSLESS],
)
@pytest.mark.parametrize(("rows", "columns"), [(2, 3), (2, 1), (1, 1), (1, 5)])
def test_frames_of_a_planar_layout_decode_colour_by_pixel_for_readers(
    transfer_syntax: str, rows: int, columns: int
) -> None:
    """One column once came out as a grey 3 × Rows image (imagecodecs guessed the shape)."""
    pixels = layout(
        rows=rows,
        columns=columns,
        samples_per_pixel=3,
        planar_configuration=1,
        photometric_interpretation="RGB",
        bits_allocated=8,
        bits_stored=8,
    )
    planes = np.arange(3 * rows * columns, dtype=np.uint8).reshape(3, rows, columns)
    encoded = encode_verified(planes.tobytes(), pixels, transfer_syntax)
    frame = decode_frame(encoded.frames[0], pixels, transfer_syntax)
    assert np.array_equal(frame, np.moveaxis(planes, 0, -1))


@pytest.mark.parametrize(("rows", "columns"), [(2, 3), (2, 1), (1, 1)])
def test_planar_codestreams_stored_before_colour_by_pixel_still_give_the_original(
    rows: int, columns: int
) -> None:
    """Objects written when planar frames went to imagecodecs as planes decode as before."""
    pixels = layout(
        rows=rows,
        columns=columns,
        samples_per_pixel=3,
        planar_configuration=1,
        photometric_interpretation="RGB",
        bits_allocated=8,
        bits_stored=8,
    )
    planes = np.arange(1, 1 + 3 * rows * columns, dtype=np.uint8).reshape(3, rows, columns)
    stored = {
        HTJ2K_LOSSLESS: imagecodecs.htj2k_encode(planes, reversible=True, planar=True, rgb=False),
        JPEG2000_LOSSLESS: imagecodecs.jpeg2k_encode(
            planes, codecformat="J2K", reversible=True, planar=True, mct=False
        ),
    }
    for transfer_syntax, codestream in stored.items():
        encoded = EncodedPixels(transfer_syntax, (bytes(codestream),), b"")
        assert decode_to_native(encoded, pixels) == planes.tobytes()


def test_htj2k_declares_the_container_precision() -> None:
    pixels = layout(bits_stored=12)
    raw = np.arange(35, dtype="<u2").tobytes()
    encoded = encode_verified(raw, pixels, HTJ2K_LOSSLESS)
    assert get_j2k_parameters(encoded.frames[0]) == {
        "precision": 16,
        "is_signed": False,
        "jp2": False,
    }


def test_jpeg2000_declares_bits_stored_when_the_values_fit() -> None:
    pixels = layout(bits_stored=12, pixel_representation=1)
    fits = np.arange(-17, 18, dtype="<i2").tobytes()
    encoded = encode_verified(fits, pixels, JPEG2000_LOSSLESS)
    assert get_j2k_parameters(encoded.frames[0]) == {
        "precision": 12,
        "is_signed": True,
        "jp2": False,
    }
    overlay = (np.arange(35, dtype="<u2") | 0x8000).view("<i2").tobytes()
    encoded = encode_verified(overlay, pixels, JPEG2000_LOSSLESS)
    assert get_j2k_parameters(encoded.frames[0])["precision"] == 16
    assert decode_to_native(encoded, pixels) == overlay


@pytest.mark.parametrize(
    ("changes", "transfer_syntax", "sentence"),
    [
        (
            {"bits_allocated": 1, "bits_stored": 1},
            HTJ2K_LOSSLESS,
            "Bits Allocated 1 is not supported by HTJ2K",
        ),
        ({"bits_allocated": 12}, HTJ2K_LOSSLESS, "Bits Allocated 12 is not supported"),
        ({"bits_allocated": 32}, HTJ2K_LOSSLESS, "Bits Allocated 32 is not supported by HTJ2K"),
        (
            {"bits_allocated": 32},
            JPEG2000_LOSSLESS,
            "Bits Allocated 32 is not supported by JPEG 2000",
        ),
        ({"bits_stored": 17}, HTJ2K_LOSSLESS, "(0028,0101) Bits Stored 17"),
        (
            {"samples_per_pixel": 3, "photometric_interpretation": "YBR_FULL_422"},
            HTJ2K_LOSSLESS,
            "'YBR_FULL_422' is not supported by HTJ2K",
        ),
        (
            {"samples_per_pixel": 3, "photometric_interpretation": "YBR_PARTIAL_420"},
            HTJ2K_LOSSLESS,
            "'YBR_PARTIAL_420'",
        ),
        (
            {"samples_per_pixel": 4, "photometric_interpretation": "ARGB"},
            HTJ2K_LOSSLESS,
            "Samples per Pixel 4",
        ),
        ({"photometric_interpretation": "RGB"}, HTJ2K_LOSSLESS, "'RGB' with one sample"),
        (
            {
                "samples_per_pixel": 3,
                "photometric_interpretation": "RGB",
                "planar_configuration": 2,
            },
            HTJ2K_LOSSLESS,
            "Planar Configuration 2",
        ),
        ({"rows": 0}, HTJ2K_LOSSLESS, "no pixels"),
        ({"bits_allocated": 32}, JPEGLS_LOSSLESS, "Bits Allocated 32 is not supported by JPEG-LS"),
        (
            {"bits_allocated": 8, "bits_stored": 1},
            JPEGLS_LOSSLESS,
            "(0028,0101) Bits Stored 1 is not supported by JPEG-LS",
        ),
        (
            {
                "samples_per_pixel": 3,
                "photometric_interpretation": "RGB",
                "pixel_representation": 1,
            },
            JPEGLS_LOSSLESS,
            "(0028,0103) Pixel Representation 1 (signed) with 3 samples per pixel",
        ),
        (
            {"samples_per_pixel": 3, "photometric_interpretation": "YBR_FULL"},
            JPEGLS_LOSSLESS,
            "(0028,0100) Bits Allocated 16 is not allowed for YBR_FULL in JPEG-LS",
        ),
        (
            {"bits_allocated": 32},
            JPEG_LOSSLESS_SV1,
            "(0028,0100) Bits Allocated 32 is not supported by JPEG Lossless SV1",
        ),
        (
            {
                "samples_per_pixel": 3,
                "photometric_interpretation": "RGB",
                "pixel_representation": 1,
            },
            JPEG_LOSSLESS,
            "(0028,0103) Pixel Representation 1 (signed) with 3 samples per pixel",
        ),
        (
            {"samples_per_pixel": 3, "photometric_interpretation": "YBR_FULL"},
            JPEG_LOSSLESS_SV1,
            "(0028,0100) Bits Allocated 16 is not supported for YBR_FULL by JPEG Lossless",
        ),
        ({}, "1.2.840.10008.1.2.4.50", "no lossless codec is registered"),
    ],
)
def test_layouts_that_cannot_be_encoded(
    changes: dict[str, Any], transfer_syntax: str, sentence: str
) -> None:
    pixels = layout(**changes)
    with pytest.raises(NotLossless) as caught:
        encode_verified(bytes(max(pixels.expected_length, 1)), pixels, transfer_syntax)
    assert sentence in caught.value.sentence
    assert str(caught.value) == caught.value.sentence


def test_32_bit_stays_unsupported_while_openjpeg_cannot_read_it() -> None:
    """If this starts failing, OpenJPEG reads 32-bit codestreams: allow Bits Allocated 32."""
    frame = np.arange(64, dtype=np.uint32).reshape(8, 8) << 20
    codestream = imagecodecs.htj2k_encode(frame, reversible=True)
    assert np.array_equal(imagecodecs.htj2k_decode(codestream), frame)
    with pytest.raises(RuntimeError):
        imagecodecs.jpeg2k_decode(codestream)


def test_a_frame_that_does_not_decode_back_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = imagecodecs.htj2k_decode

    def off_by_one(*args: Any, **kwargs: Any) -> Any:
        decoded = real(*args, **kwargs)
        decoded.flat[0] ^= 1
        return decoded

    monkeypatch.setattr(imagecodecs, "htj2k_decode", off_by_one)
    with pytest.raises(NotLossless, match="did not decode bit-exact"):
        encode_verified(bytes(70), layout())


def test_a_jpegls_frame_that_does_not_decode_back_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = jpeg_ls.decode_buffer

    def off_by_one(codestream: bytes) -> tuple[bytearray, dict[str, int]]:
        decoded, info = real(codestream)
        decoded[0] ^= 1
        return decoded, info

    monkeypatch.setattr(jpeg_ls, "decode_buffer", off_by_one)
    with pytest.raises(NotLossless, match="did not decode bit-exact with JPEG-LS"):
        encode_verified(bytes(70), layout(), JPEGLS_LOSSLESS)


def test_short_pixel_data_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="Pixel Data has 10 bytes"):
        encode_verified(bytes(10), layout())


def test_registered_syntaxes() -> None:
    assert lossless_transfer_syntaxes() == {
        HTJ2K_LOSSLESS,
        JPEG2000_LOSSLESS,
        JPEGLS_LOSSLESS,
        JPEG_LOSSLESS_SV1,
        JPEG_LOSSLESS,
    }


# --- real files -------------------------------------------------------------------------

REAL_FILES = [
    "693_UNCI.dcm",  # CT 512 × 512, 16-bit signed, Bits Stored 14
    "MR2_UNCI.dcm",  # MR 1024 × 1024, Bits Stored 12
    "US1_UNCI.dcm",  # US RGB 640 × 480
    "SC_rgb.dcm",
    "SC_rgb_2frame.dcm",
    "SC_rgb_16bit.dcm",
    "SC_rgb_16bit_2frame.dcm",
    "SC_rgb_expb.dcm",  # big endian
    "SC_rgb_expb_16bit_2frame.dcm",
    "SC_rgb_gdcm2k_uncompressed.dcm",
    "SC_rgb_dcmtk_ebcr_dcmd.dcm",
    "emri_small.dcm",  # 10 frames
    "emri_small_big_endian.dcm",
    "OBXXXX1A.dcm",  # PALETTE COLOR
    "OBXXXX1A_2frame.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # Bits Stored 12 of 16
]


@pytest.mark.parametrize("name", ["OBXXXX1A_expb.dcm", "OBXXXX1A_expb_2frame.dcm"])
def test_big_endian_8_bit_ow_round_trips_in_sample_order(name: str) -> None:
    """Its sample pairs are byte-swapped (pydicom's "be_swap_ow"): split describes the
    samples in order, and swapping the decoded value back gives the file's bytes."""
    data = (DATA_STORE / name).read_bytes()
    split = split_file(data)
    assert split.pairs_swapped and split.layout is not None and split.layout.little_endian
    samples = sample_bytes(data, split)
    encoded = encode_verified(samples, split.layout)
    value = swap_pairs(decode_to_native(encoded, split.layout))
    assert value == data[split.pixel_start : split.pixel_end]
    expected = pydicom.dcmread(DATA_STORE / name).pixel_array
    frames = [decode_frame(f, split.layout, encoded.transfer_syntax) for f in encoded.frames]
    np.testing.assert_array_equal(np.stack(frames).reshape(expected.shape), expected)


def _split(name: str) -> tuple[bytes, SplitFile]:
    data = (DATA_STORE / name).read_bytes()
    split = split_file(data)
    assert split.layout is not None, name
    return data, split


@pytest.fixture(scope="module")
def encoded_files() -> dict[str, tuple[bytes, SplitFile, EncodedPixels]]:
    files = {}
    for name in REAL_FILES:
        data, split = _split(name)
        assert split.layout is not None
        pixels = data[split.pixel_start : split.pixel_end]
        files[name] = (data, split, encode_verified(pixels, split.layout))
    return files


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_round_trip(
    name: str, encoded_files: dict[str, tuple[bytes, SplitFile, EncodedPixels]]
) -> None:
    data, split, encoded = encoded_files[name]
    assert split.layout is not None
    rebuilt = data[: split.pixel_start] + decode_to_native(encoded, split.layout)
    assert rebuilt + data[split.pixel_end :] == data


@pytest.mark.parametrize("name", ["SC_rgb_expb_16bit_2frame.dcm", "emri_small.dcm", "OBXXXX1A.dcm"])
def test_real_file_round_trip_jpeg2000(name: str) -> None:
    data, split = _split(name)
    assert split.layout is not None
    pixels = data[split.pixel_start : split.pixel_end]
    encoded = encode_verified(pixels, split.layout, JPEG2000_LOSSLESS)
    assert decode_to_native(encoded, split.layout) == pixels


def _stored_form(data: bytes, split: SplitFile, encoded: EncodedPixels) -> pydicom.Dataset:
    """The data set in the encoded transfer syntax, as a DICOM reader would receive it."""
    assert split.layout is not None
    dataset = pydicom.dcmread(BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = UID(encoded.transfer_syntax)
    dataset.PixelData = encapsulate(list(encoded.frames), has_bot=True)
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    if split.layout.samples_per_pixel > 1:
        dataset.PlanarConfiguration = 0  # encapsulated data is colour-by-pixel
    out = BytesIO()
    # The original may be big endian, which save_as() refuses to convert; the preamble
    # and file meta are kept from the original, so enforce_file_format is not needed.
    pydicom.dcmwrite(out, dataset, implicit_vr=False, little_endian=True, force_encoding=True)
    return pydicom.dcmread(BytesIO(out.getvalue()))


def _native_array(data: bytes) -> Any:
    return pydicom.dcmread(BytesIO(data)).pixel_array


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_jpegls_round_trip_and_pydicom_reads_it(name: str) -> None:
    data, split = _split(name)
    assert split.layout is not None
    pixels = data[split.pixel_start : split.pixel_end]
    encoded = encode_verified(pixels, split.layout, JPEGLS_LOSSLESS)
    assert decode_to_native(encoded, split.layout) == pixels
    stored = _stored_form(data, split, encoded)
    assert np.array_equal(stored.pixel_array, _native_array(data))


@pytest.mark.parametrize("transfer_syntax", [JPEG_LOSSLESS_SV1, JPEG_LOSSLESS])
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_jpeg_lossless_round_trip_and_pydicom_reads_it(
    name: str, transfer_syntax: str
) -> None:
    if not JPEGLosslessSV1Decoder.is_available:
        pytest.skip("pydicom has no JPEG Lossless decoder (pylibjpeg-libjpeg or python-gdcm)")
    data, split = _split(name)
    assert split.layout is not None
    pixels = data[split.pixel_start : split.pixel_end]
    encoded = encode_verified(pixels, split.layout, transfer_syntax)
    assert decode_to_native(encoded, split.layout) == pixels
    stored = _stored_form(data, split, encoded)
    assert np.array_equal(stored.pixel_array, _native_array(data))


@pytest.mark.parametrize("name", REAL_FILES)
def test_pydicom_decodes_the_stored_form_with_its_own_plugins(
    name: str, encoded_files: dict[str, tuple[bytes, SplitFile, EncodedPixels]]
) -> None:
    if not set(HTJ2KLosslessDecoder.available_plugins) - {OPENJPEG_PLUGIN}:
        pytest.skip(
            "pydicom has no HTJ2K decoder plugin installed "
            f"({'; '.join(HTJ2KLosslessDecoder.missing_dependencies)})"
        )
    data, split, encoded = encoded_files[name]
    stored = _stored_form(data, split, encoded)
    assert np.array_equal(stored.pixel_array, _native_array(data))


# An independent decoder for the same check: OpenJPEG (which reads HTJ2K since 2.5)
# registered as a pydicom plugin for this module only, so that pydicom's own handling
# of the encapsulated form (precision, signedness, frames, colour) is what is tested.


def is_available(uid: str) -> bool:
    """pydicom plugin protocol: this test plugin is always available."""
    return True


def decode_with_openjpeg(src: bytes, runner: Any) -> bytearray:
    """pydicom plugin: one frame decoded by OpenJPEG, colour-by-pixel."""
    precision = runner.get_option("j2k_precision", runner.bits_stored)
    runner.set_option("bits_allocated", 8 if precision <= 8 else 16 if precision <= 16 else 32)
    return bytearray(imagecodecs.jpeg2k_decode(src).tobytes())


@pytest.fixture(scope="module")
def openjpeg_plugin() -> Iterator[str]:
    HTJ2KLosslessDecoder.add_plugin(OPENJPEG_PLUGIN, (__name__, "decode_with_openjpeg"))
    yield OPENJPEG_PLUGIN
    HTJ2KLosslessDecoder.remove_plugin(OPENJPEG_PLUGIN)


@pytest.mark.parametrize("name", REAL_FILES)
def test_pydicom_reads_the_stored_form_through_an_independent_decoder(
    name: str,
    encoded_files: dict[str, tuple[bytes, SplitFile, EncodedPixels]],
    openjpeg_plugin: str,
) -> None:
    data, split, encoded = encoded_files[name]
    stored = _stored_form(data, split, encoded)
    stored.pixel_array_options(decoding_plugin=openjpeg_plugin)
    assert np.array_equal(stored.pixel_array, _native_array(data))

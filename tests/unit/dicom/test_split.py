"""split_file: every real file splits exactly or is rejected for a named reason."""

from __future__ import annotations

import datetime
import os
import warnings
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import data_store
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from tests.unit.conftest import PHI, make_file
from workers.dicom.identity import attributes_of
from workers.dicom.split import SplitFile, sample_bytes, split_file
from workers.errors import Reason, RejectError

DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"

# --- the corpus: pydicom's test files and pydicom-data --------------------------------

DATA_STORE = Path(data_store.__file__).parent / "data"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _corpus() -> list[Path]:
    files = {Path(name) for name in get_testdata_files()} | set(DATA_STORE.iterdir())
    return sorted(path for path in files if path.is_file())


def _label(path: Path) -> str:
    root = DATA_STORE if path.is_relative_to(DATA_STORE) else PYDICOM_FILES
    return str(path.relative_to(root))


def _read(path: Path) -> Dataset | None:
    """The file as pydicom reads it with force=False, or None when pydicom refuses it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, force=False)
        except Exception:  # noqa: BLE001 - any exception is pydicom refusing the file
            return None


# Files in the corpus that are genuinely broken (or not instances at all), with the
# reason split_file must give. Everything else that pydicom reads must split.
EXPECTED_REJECTIONS: dict[str, Reason] = {
    # the encapsulated Pixel Data stops before its Sequence Delimitation Item; pydicom
    # only warns "End of file reached before delimiter" and drops the element
    "emri_small_jpeg_2k_lossless_too_short.dcm": Reason.TRUNCATED,
    # Pixel Data declares 8192 bytes, the file ends 62 bytes short of them
    "MR_truncated.dcm": Reason.TRUNCATED,
    # Beam Sequence declares 976 bytes, the file ends 265 bytes short of them
    "rtplan_truncated.dcm": Reason.TRUNCATED,
    # 128 bytes of zeros after 64 × 64 × 16 bits of pixels
    "MR_small_padded.dcm": Reason.PIXEL_LENGTH_MISMATCH,
    # Number of Frames is '1A'
    "badVR.dcm": Reason.PIXEL_LENGTH_MISMATCH,
    # no Study Instance UID
    "JPEGLSNearLossless_08.dcm": Reason.MISSING_UID,
    "JPEGLSNearLossless_16.dcm": Reason.MISSING_UID,
    "SC_rgb_jls_lossy_line.dcm": Reason.MISSING_UID,
    "SC_rgb_jls_lossy_sample.dcm": Reason.MISSING_UID,
    # no SOP Instance UID (fragments: no file meta SOP Instance UID either)
    "meta_missing_tsyntax.dcm": Reason.MISSING_UID,
    "nested_priv_SQ.dcm": Reason.MISSING_UID,
    "empty_charset_LEI.dcm": Reason.MISSING_UID,
    "priv_SQ.dcm": Reason.MISSING_UID,
    "UN_sequence.dcm": Reason.MISSING_UID,
    # (0002,0003) names an RT Image, the data set stops at (0008,0013), before the place
    # of (0008,0018) SOP Instance UID: a cut, as far as anyone can tell
    "no_meta_group_length.dcm": Reason.TRUNCATED,
}


def _expected_rejection(label: str) -> Reason | None:
    name = os.path.basename(label)
    if name.startswith("DICOMDIR"):
        return Reason.MISSING_UID  # a media directory, not an instance: no SOP Instance UID
    if "TINY_ALPHA" in label and name.startswith("IM"):
        # CT Image Storage stubs for DICOMDIR tests without Pixel Data: exactly what a CT
        # file cut after (0020,0013) Instance Number looks like
        return Reason.TRUNCATED
    return EXPECTED_REJECTIONS.get(name)


CORPUS = _corpus()
READABLE = [path for path in CORPUS if _read(path) is not None]
REFUSED = [path for path in CORPUS if path not in READABLE]


def test_the_corpus_is_what_these_tests_expect() -> None:
    assert len(READABLE) > 200
    labels = {os.path.basename(_label(path)) for path in READABLE}
    assert set(EXPECTED_REJECTIONS) <= labels


@pytest.mark.parametrize("path", READABLE, ids=_label)
def test_every_readable_file_splits_exactly_or_is_rejected_as_listed(path: Path) -> None:
    data = path.read_bytes()
    expected = _expected_rejection(_label(path))
    if expected is not None:
        with pytest.raises(RejectError) as caught:
            split_file(data)
        assert caught.value.reason == expected, caught.value.message
        return

    split = split_file(data)
    dataset = _read(path)
    assert dataset is not None
    assert 0 < split.pixel_start <= split.pixel_end <= len(data)
    middle = data[split.pixel_start : split.pixel_end]
    assert data[: split.pixel_start] + middle + data[split.pixel_end :] == data
    _assert_header_matches(split, dataset)
    # The identity index's attributes, from the read split_file made, are what a read of
    # the header alone gives.
    assert split.searchable() == attributes_of(data[: split.pixel_start])

    if "PixelData" not in dataset or split.header.transfer_syntax == DeflatedExplicitVRLittleEndian:
        assert split.pixel_start == split.pixel_end == len(data)
        assert split.layout is None and not split.encapsulated
    elif split.encapsulated:
        assert split.layout is None
        assert middle.endswith(DELIMITER)
        assert middle[:-8] == dataset.PixelData
    else:
        assert middle == dataset.PixelData
        if split.layout is not None:
            layout = split.layout
            assert len(middle) == layout.expected_length + layout.expected_length % 2
            assert layout.rows == dataset.Rows and layout.columns == dataset.Columns
            assert layout.bits_allocated == dataset.BitsAllocated
            assert layout.frames == int(dataset.get("NumberOfFrames") or 1)
            # 8-bit OW big endian is described in sample order (little endian).
            assert layout.little_endian == (dataset.original_encoding[1] or split.pairs_swapped)


def _assert_header_matches(split: SplitFile, dataset: Dataset) -> None:
    header = split.header
    assert header.sop_instance_uid == dataset.SOPInstanceUID
    assert header.study_instance_uid == dataset.StudyInstanceUID
    assert header.series_instance_uid == dataset.get("SeriesInstanceUID", "")
    assert header.modality == dataset.get("Modality", "")
    assert header.patient_id == dataset.get("PatientID", "")
    assert header.patient_name == str(dataset.get("PatientName", ""))
    assert header.transfer_syntax == dataset.file_meta.get("TransferSyntaxUID", "")


@pytest.mark.parametrize("path", REFUSED, ids=_label)
def test_files_pydicom_refuses_are_not_dicom(path: Path) -> None:
    with pytest.raises(RejectError) as caught:
        split_file(path.read_bytes())
    assert caught.value.reason == Reason.NOT_DICOM


# --- crafted files ----------------------------------------------------------------------


def _reject(data: bytes) -> RejectError:
    with pytest.raises(RejectError) as caught:
        split_file(data)
    for value in PHI:
        assert value not in caught.value.message and value not in str(caught.value)
    return caught.value


@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_native_pixel_data_is_found_in_every_native_transfer_syntax(transfer_syntax: str) -> None:
    pixels = bytes(range(32))
    data = make_file(transfer_syntax=transfer_syntax, pixel_data=pixels)
    split = split_file(data)
    assert (split.pixel_start, split.pixel_end) == (len(data) - 32, len(data))
    assert data[split.pixel_start : split.pixel_end] == pixels
    assert split.layout is not None and not split.encapsulated
    assert split.layout.little_endian == (transfer_syntax != ExplicitVRBigEndian)
    assert split.layout.frame_length == split.layout.expected_length == 32
    header = split.header
    assert header.transfer_syntax == transfer_syntax
    assert header.study_date == datetime.date(2024, 1, 31)
    assert (header.patient_name, header.patient_id, header.accession_number) == PHI
    assert (header.modality, header.series_instance_uid) == ("OT", "1.2.826.0.1.3680043.8.498.3")


def test_encapsulated_pixel_data_spans_items_and_delimiter() -> None:
    value = encapsulate([b"\xff\x4f\xff\x51frame-one", b"\xff\x4f\xff\x51frame-2"], has_bot=True)
    data = make_file(transfer_syntax=JPEG2000Lossless, pixel_data=value)
    # pydicom writes the undefined length when the syntax is compressed
    split = split_file(data)
    assert split.encapsulated and split.layout is None
    assert data[split.pixel_start : split.pixel_end] == value + DELIMITER
    assert split.pixel_end == len(data)


def test_deflated_files_are_not_split() -> None:
    data = make_file(transfer_syntax=DeflatedExplicitVRLittleEndian)
    split = split_file(data)
    assert split.pixel_start == split.pixel_end == len(data)
    assert split.layout is None and not split.encapsulated
    assert split.header.patient_id == PHI[1]


def test_big_endian_8_bit_ow_pixel_data_is_described_in_sample_order() -> None:
    big_ow = make_file(transfer_syntax=ExplicitVRBigEndian, bits_allocated=8, pixel_vr="OW")
    big_ow_split = split_file(big_ow)
    assert big_ow_split.pairs_swapped and not big_ow_split.encapsulated
    assert big_ow_split.layout is not None and big_ow_split.layout.little_endian
    assert big_ow_split.pixel_end - big_ow_split.pixel_start == 16
    value = big_ow[big_ow_split.pixel_start : big_ow_split.pixel_end]
    assert sample_bytes(big_ow, big_ow_split) == bytes(value[i ^ 1] for i in range(16))


def test_a_file_without_pixel_data_is_not_split() -> None:
    data = make_file(sop_class=BasicTextSRStorage)
    split = split_file(data)
    assert split.pixel_start == split.pixel_end == len(data)


def test_only_top_level_pixel_data_counts() -> None:
    icon = Dataset()
    icon.Rows = icon.Columns = 2
    icon.BitsAllocated = 8
    icon.PixelData = b"ICON"
    pixels = bytes(range(32))
    data = make_file(pixel_data=pixels, IconImageSequence=Sequence([icon]))
    split = split_file(data)
    assert data[split.pixel_start : split.pixel_end] == pixels


def test_elements_after_pixel_data_stay_in_the_suffix() -> None:
    pixels = bytes(range(32))
    data = make_file(pixel_data=pixels, DataSetTrailingPadding=b"\0" * 6)
    split = split_file(data)
    assert data[split.pixel_start : split.pixel_end] == pixels
    assert split.pixel_end == len(data) - 18


def test_undefined_length_sequences_are_walked() -> None:
    item = Dataset()
    item.CodeValue = "X"
    item.CodeMeaning = "nested"
    item.is_undefined_length_sequence_item = True
    pixels = bytes(range(32))
    data = make_file(
        pixel_data=pixels,
        AnatomicRegionSequence=Sequence([item, item]),
        undefined_length=("AnatomicRegionSequence",),
    )
    assert b"\xfe\xff\x0d\xe0" in data  # item delimiters: undefined-length items
    split = split_file(data)
    assert data[split.pixel_start : split.pixel_end] == pixels
    with pytest.raises(RejectError) as caught:
        split_file(data[: data.index(b"\xfe\xff\xdd\xe0") + 4])
    assert caught.value.reason == Reason.TRUNCATED


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\0" * 128 + b"DICX" + b"\0" * 64, b"\0" * 131],
    ids=["empty", "text", "wrong-prefix", "short"],
)
def test_not_dicom(data: bytes) -> None:
    assert _reject(data).reason == Reason.NOT_DICOM


def test_truncated_native_pixel_data() -> None:
    data = make_file(rows=8, columns=8)
    error = _reject(data[:-5])
    assert error.reason == Reason.TRUNCATED
    assert "(7FE0,0010) Pixel Data" in error.message


def test_truncated_encapsulated_pixel_data_where_pydicom_only_warns() -> None:
    value = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)], has_bot=True)
    data = make_file(transfer_syntax=JPEG2000Lossless, pixel_data=value)
    cut = data[: -len(DELIMITER)]
    with pytest.warns(UserWarning, match="delimiter"):
        dataset = pydicom.dcmread(BytesIO(cut))
    assert "PixelData" not in dataset  # pydicom drops it and carries on
    error = _reject(cut)
    assert error.reason == Reason.TRUNCATED
    assert "Sequence Delimitation Item" in error.message


def test_truncated_inside_an_element_header_at_the_end() -> None:
    data = make_file(sop_class=BasicTextSRStorage, ContentDate="20240101")
    error = _reject(data + b"\x08\x00\x23")  # three bytes of a further element
    assert error.reason == Reason.TRUNCATED


def test_truncated_file_meta() -> None:
    data = make_file()
    assert _reject(data[:140]).reason == Reason.TRUNCATED
    assert _reject(data[:132]).reason == Reason.TRUNCATED


@pytest.mark.parametrize(
    ("attributes", "element"),
    [
        ({"SOPInstanceUID": None}, "(0008,0018) SOP Instance UID"),
        ({"SOPInstanceUID": ""}, "(0008,0018) SOP Instance UID"),
        ({"StudyInstanceUID": None}, "(0020,000D) Study Instance UID"),
        ({"StudyInstanceUID": ""}, "(0020,000D) Study Instance UID"),
    ],
)
def test_missing_uid(attributes: dict[str, Any], element: str) -> None:
    error = _reject(make_file(**attributes))
    assert error.reason == Reason.MISSING_UID
    assert element in error.message


def test_an_empty_series_uid_is_allowed() -> None:
    assert split_file(make_file(SeriesInstanceUID="")).header.series_instance_uid == ""


def test_pixel_length_mismatch_names_every_factor() -> None:
    error = _reject(make_file(rows=512, columns=512, pixel_data=bytes(1000)))
    assert error.reason == Reason.PIXEL_LENGTH_MISMATCH
    assert error.message == (
        "(7FE0,0010) Pixel Data has 1000 bytes but Rows 512 × Columns 512 × "
        "Samples per Pixel 1 × Bits Allocated 16 × Number of Frames 1 need 524288"
    )


def test_one_pad_byte_is_allowed_only_after_an_odd_length() -> None:
    odd = dict(rows=3, columns=3, bits_allocated=8)
    split = split_file(make_file(**odd, pixel_data=bytes(10)))
    assert split.layout is not None and split.layout.expected_length == 9
    assert split.pixel_end - split.pixel_start == 10
    assert _reject(make_file(**odd, pixel_data=bytes(12))).reason == Reason.PIXEL_LENGTH_MISMATCH
    even = dict(rows=2, columns=2, bits_allocated=8)
    assert _reject(make_file(**even, pixel_data=bytes(6))).reason == Reason.PIXEL_LENGTH_MISMATCH


def test_one_bit_pixel_data_rounds_up_to_whole_bytes() -> None:
    # 5 × 5 × 3 frames = 75 bits: 10 bytes
    split = split_file(make_file(rows=5, columns=5, frames=3, bits_allocated=1))
    assert split.layout is not None and split.layout.expected_length == 10
    short = make_file(rows=5, columns=5, frames=3, bits_allocated=1, pixel_data=bytes(8))
    assert _reject(short).reason == Reason.PIXEL_LENGTH_MISMATCH


def test_native_ybr_full_422_stores_two_samples_per_pixel() -> None:
    data = make_file(
        rows=2,
        columns=4,
        samples_per_pixel=3,
        bits_allocated=8,
        photometric="YBR_FULL_422",
        pixel_data=bytes(16),
    )
    split = split_file(data)
    assert split.layout is not None and split.layout.expected_length == 16


def test_missing_rows_cannot_be_checked() -> None:
    error = _reject(make_file(Rows=None))
    assert error.reason == Reason.PIXEL_LENGTH_MISMATCH
    assert "(0028,0010) Rows is missing" in error.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240229", datetime.date(2024, 2, 29)),
        ("2024.02.29", datetime.date(2024, 2, 29)),
        ("20230229", None),
        ("2024", None),
        ("", None),
    ],
)
def test_study_date(value: str, expected: datetime.date | None) -> None:
    assert split_file(make_file(StudyDate=value)).header.study_date == expected


def test_values_longer_than_pydicom_defer_size_are_read() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: a 5000-character LO is invalid
        data = make_file(PatientID="P" * 5000)
    assert split_file(data).header.patient_id == "P" * 5000


def test_patient_attributes_are_decoded_with_the_character_set() -> None:
    data = make_file(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Zoë")
    assert split_file(data).header.patient_name == "Müller^Zoë"


@settings(max_examples=100, deadline=None)
@given(
    transfer_syntax=st.sampled_from(
        [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
    ),
    rows=st.integers(1, 9),
    columns=st.integers(1, 9),
    samples_per_pixel=st.sampled_from([1, 3]),
    bits_allocated=st.sampled_from([1, 8, 16, 32]),
    frames=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_round_trip(
    transfer_syntax: str,
    rows: int,
    columns: int,
    samples_per_pixel: int,
    bits_allocated: int,
    frames: int,
    seed: int,
) -> None:
    length = -(-(rows * columns * samples_per_pixel * frames * bits_allocated) // 8)
    pixels = seed.to_bytes(4, "little") * (length // 4 + 1)
    pixels = pixels[: length + length % 2]
    data = make_file(
        transfer_syntax=transfer_syntax,
        pixel_data=pixels,
        rows=rows,
        columns=columns,
        samples_per_pixel=samples_per_pixel,
        bits_allocated=bits_allocated,
        frames=frames,
    )
    split = split_file(data)
    assert data[split.pixel_start : split.pixel_end] == pixels
    assert split.layout is not None and split.layout.expected_length == length


# --- truncation at every offset ---------------------------------------------------------


def _deflate_end(data: bytes) -> int:
    """Where the deflate stream of a deflated file ends (bytes after it are ignored)."""
    meta_length = int.from_bytes(data[140:144], "little")
    start = 144 + meta_length
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflater.decompress(data[start:])
    return len(data) - len(inflater.unused_data)


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("MR_small_expb.dcm", 1),  # explicit VR big endian, elements after Pixel Data
        ("MR_small_implicit.dcm", 1),  # implicit VR little endian
        ("JPEG2000-embedded-sequence-delimiter.dcm", 1),  # delimiter bytes inside a frame
        ("image_dfl.dcm", 1),  # deflated
        ("SC_rgb_rle_2frame.dcm", 1),  # encapsulated, two frames
        ("CT_small.dcm", 2),
        ("explicit_VR-UN.dcm", 89),  # undefined-length UN sequences
        ("emri_small.dcm", 83),  # pydicom-data, 10 frames
    ],
)
def test_every_truncation_is_rejected(name: str, step: int) -> None:
    """A cut anywhere past the preamble is TRUNCATED or NOT_DICOM, never accepted.

    The one exception no reader can see: a cut exactly between two top-level elements
    that follow the Pixel Data (e.g. Data Set Trailing Padding), or inside the bytes a
    deflated file carries after the end of its deflate stream.
    """
    data = Path(get_testdata_file(name) or DATA_STORE / name).read_bytes()
    whole = split_file(data)
    if whole.header.transfer_syntax == DeflatedExplicitVRLittleEndian:
        undetectable = range(_deflate_end(data), len(data))
    else:
        undetectable = range(whole.pixel_end, whole.pixel_end + 1)
    accepted = []
    for offset in [*range(132, len(data), step), len(data) - 1]:
        try:
            split_file(data[:offset])
        except RejectError as error:
            assert error.reason in (Reason.TRUNCATED, Reason.NOT_DICOM), (offset, error)
        else:
            accepted.append(offset)
    assert all(offset in undetectable for offset in accepted), accepted

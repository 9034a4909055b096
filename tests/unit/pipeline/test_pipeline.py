"""Whole files through the worker's code path: split, choose, encode, verify, seal,
then open and rebuild. Every file must come back bit for bit, and the stored form must
show the original's pixels."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.unit.conftest import make_file
from workers.objects.envelope import KeyRing
from workers.objects.keys import create_key_file, load_key_file
from workers.pipeline import ingest
from workers.pipeline.ingest import PipelineSettings, pack_instances, prepare
from workers.pipeline.restore import ObjectRef, TranscodeRefusedError, rebuild, transcode_targets
from workers.records import HTJ2K_LOSSLESS, IngestItem, InstanceRecord, StoreSettings

SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    create_key_file(path)
    return path


def _stored(
    item: IngestItem, settings: PipelineSettings
) -> tuple[bytes, InstanceRecord, ObjectRef, bytes]:
    """One file prepared and packed alone, as a worker would store it: the member's bytes
    (what a ranged GET of its row reads), its row, its address and its data key."""
    _, pack, [stored] = pack_instances([prepare(item, settings)])
    record = stored.record
    member = pack.data[record.byte_offset : record.byte_offset + record.byte_length]
    assert b"PROP" not in pack.keys
    key = KeyRing.from_bytes(pack.keys).data_key(
        record.sha256, load_key_file(Path(settings.key_file))
    )
    return member, record, ObjectRef.of(record), key


def _settings(key_file: Path, min_saving: float = 0.95) -> PipelineSettings:
    # prepare() never touches the store; the settings only have to be well formed.
    return PipelineSettings(
        StoreSettings("127.0.0.1:1", "unused", "unused"), str(key_file), min_saving=min_saving
    )


@st.composite
def images(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A DICOM file with random native pixel data; and whether its high bits are clean."""
    bits_allocated = draw(st.sampled_from([8, 16]))
    bits_stored = draw(st.integers(min_value=max(2, bits_allocated - 6), max_value=bits_allocated))
    signed = draw(st.booleans())
    colour = draw(st.booleans())
    photometric = (
        draw(st.sampled_from(["RGB", "YBR_FULL"]))
        if colour
        else draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"]))
    )
    samples = 3 if colour else 1
    planar = draw(st.sampled_from([0, 1])) if colour else 0
    rows = draw(st.integers(1, 24))
    columns = draw(st.integers(1, 24))
    frames = draw(st.integers(1, 3))
    syntax = draw(st.sampled_from(SYNTAXES))
    dirty = draw(st.booleans()) and bits_stored < bits_allocated
    seed = draw(st.integers(0, 2**32 - 1))

    rng = np.random.default_rng(seed)
    low, high = (
        (-(1 << (bits_stored - 1)), 1 << (bits_stored - 1)) if signed else (0, 1 << bits_stored)
    )
    kind = "i" if signed else "u"
    dtype = np.dtype(f"<{kind}{bits_allocated // 8}")
    shape = (frames, samples, rows, columns) if planar else (frames, rows, columns, samples)
    values = rng.integers(low, high, size=shape, dtype=np.int64)
    if dirty:  # set a bit above Bits Stored somewhere, as an overlay would
        values.flat[0] = int(values.flat[0]) ^ (1 << bits_stored)
    raw = values.astype(dtype)
    if syntax == ExplicitVRBigEndian:
        raw = raw.astype(dtype.newbyteorder(">"))

    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.PatientName = "PROPERTY^TEST"
    dataset.PatientID = "PROP-0001"
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = samples
    dataset.PhotometricInterpretation = photometric
    if colour:
        dataset.PlanarConfiguration = planar
    dataset.BitsAllocated, dataset.BitsStored = bits_allocated, bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = int(signed)
    if frames > 1:
        dataset.NumberOfFrames = frames
    value = raw.tobytes()
    dataset.PixelData = value + (b"\0" if len(value) % 2 else b"")
    dataset["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    # Big-endian 8-bit OW pairs are swapped in a way no layout describes; OB avoids that.
    return buffer.getvalue(), not dirty


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(image=images())
def test_every_file_comes_back_bit_for_bit(image: tuple[bytes, bool], key_file: Path) -> None:
    data, clean = image
    item = IngestItem("f", data, hashlib.sha256(data).hexdigest())
    # The images are tiny; transcode them even where the codec saves nothing, to test it.
    blob, record, ref, key = _stored(item, _settings(key_file, min_saving=float("inf")))
    assert b"PROPERTY^TEST" not in blob and b"PROP-0001" not in blob and b"DICM" not in blob
    assert rebuild(blob, ref, "original", key).data == data
    assert record.storage_note
    if not clean:
        assert record.storage_action in ("zstd", "as_received"), record.storage_note
        return
    assert record.storage_action == "transcoded", record.storage_note
    assert record.transfer_syntax_stored == HTJ2K_LOSSLESS
    stored = rebuild(blob, ref, "stored", key)
    compressed = pydicom.dcmread(io.BytesIO(stored.data))
    assert compressed.file_meta.TransferSyntaxUID == HTJ2K_LOSSLESS
    expected = pixel_array(io.BytesIO(data), raw=True)
    np.testing.assert_array_equal(pixel_array(compressed, raw=True), expected)


def test_layout_no_codec_holds_falls_back_to_zstd(key_file: Path) -> None:
    """32 bits allocated: no registered codec is readable there, so zstd inside the object."""
    dataset = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_32bit.dcm"))
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    data = buffer.getvalue()
    blob, record, ref, key = _stored(
        IngestItem("f", data, hashlib.sha256(data).hexdigest()), _settings(key_file)
    )
    assert record.storage_action in ("zstd", "as_received")
    if record.storage_action == "zstd":
        assert record.bytes_stored < 0.95 * len(data)
    assert rebuild(blob, ref, "original", key).data == data


def test_modality_policy_picks_the_codec(key_file: Path) -> None:
    data = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    settings_ = PipelineSettings(
        StoreSettings("127.0.0.1:1", "unused", "unused"),
        str(key_file),
        modality_codecs=(("CT", "1.2.840.10008.1.2.4.90"),),
    )
    record = prepare(IngestItem("f", data, hashlib.sha256(data).hexdigest()), settings_).record
    assert record.transfer_syntax_stored == "1.2.840.10008.1.2.4.90"
    assert "JPEG 2000" in record.storage_note


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"],
)
@pytest.mark.parametrize(
    "target",
    [
        HTJ2K_LOSSLESS,
        JPEG2000Lossless,
        JPEGLSLossless,
        JPEGLosslessSV1,
        JPEGLossless,
        RLELossless,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_retrieval_transcodes_lossless_inputs_to_any_lossless_syntax(
    name: str, target: str, key_file: Path
) -> None:
    data = Path(pydicom.data.get_testdata_file(name)).read_bytes()
    blob, _, ref, key = _stored(
        IngestItem("f", data, hashlib.sha256(data).hexdigest()), _settings(key_file)
    )
    out = rebuild(blob, ref, target, key)
    assert out.transfer_syntax == target
    dataset = pydicom.dcmread(io.BytesIO(out.data))
    assert dataset.file_meta.TransferSyntaxUID == target
    np.testing.assert_array_equal(
        pixel_array(dataset, raw=True), pixel_array(io.BytesIO(data), raw=True)
    )


def test_unknown_target_is_refused_naming_every_syntax_strata_writes(key_file: Path) -> None:
    data = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    blob, _, ref, key = _stored(
        IngestItem("f", data, hashlib.sha256(data).hexdigest()), _settings(key_file)
    )
    with pytest.raises(TranscodeRefusedError) as caught:
        rebuild(blob, ref, "1.2.840.10008.1.2.4.50", key)
    for syntax in transcode_targets():
        assert syntax in str(caught.value)
    assert transcode_targets() >= {RLELossless, DeflatedExplicitVRLittleEndian, JPEGLossless}


def test_rle_refuses_a_layout_it_cannot_write_naming_the_element(key_file: Path) -> None:
    """pydicom's RLE encoder takes no 32-bit colour: refused, the data set intact."""
    dataset = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_32bit.dcm"))
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    data = buffer.getvalue()
    blob, _, ref, key = _stored(
        IngestItem("f", data, hashlib.sha256(data).hexdigest()), _settings(key_file)
    )
    with pytest.raises(TranscodeRefusedError, match=r"RLE Lossless .*\(0028,0100\) Bits Allocated"):
        rebuild(blob, ref, RLELossless, key)


def test_lossy_original_is_never_transcoded(key_file: Path) -> None:
    data = Path(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).read_bytes()
    blob, _, ref, key = _stored(
        IngestItem("f", data, hashlib.sha256(data).hexdigest()), _settings(key_file)
    )
    with pytest.raises(TranscodeRefusedError, match="lossy"):
        rebuild(blob, ref, HTJ2K_LOSSLESS, key)
    assert rebuild(blob, ref, "original", key).data == data


def test_an_ingest_item_pickles_its_bytes_out_of_band() -> None:
    """Ray pickles task arguments with protocol 5: the file's bytes must travel as one
    out-of-band buffer (copied once into the object store), not inside the pickle."""
    data = bytearray(np.random.default_rng(3).bytes(1 << 20))
    item = IngestItem("f", data, hashlib.sha256(data).hexdigest())
    buffers: list[pickle.PickleBuffer] = []
    inline = pickle.dumps(item, protocol=5, buffer_callback=buffers.append)
    assert len(inline) < 1024
    assert [len(buffer.raw()) for buffer in buffers] == [len(data)]
    again = pickle.loads(inline, buffers=buffers)
    assert isinstance(again.data, bytes)
    assert again == IngestItem("f", bytes(data), item.sha256)
    # Without out-of-band support (an older protocol) it still round-trips.
    assert pickle.loads(pickle.dumps(item, protocol=4)) == again


def test_a_batch_prepared_on_several_threads_answers_each_file_in_order(key_file: Path) -> None:
    settings_ = PipelineSettings(StoreSettings("127.0.0.1:1", "unused", "unused"), str(key_file))
    good = make_file(transfer_syntax=ExplicitVRLittleEndian)
    cut = good[:-10]  # truncated inside its Pixel Data
    items = [
        IngestItem(f"f{number}", data, hashlib.sha256(data).hexdigest())
        for number, data in enumerate([b"not dicom", cut, b"\0" * 200, cut])
    ]
    assert all(ingest._may_share_cores(item) for item in items)
    result = ingest.ingest_batch(items, settings_)
    assert [outcome.file_id for outcome in result.outcomes] == ["f0", "f1", "f2", "f3"]
    assert [outcome.reason for outcome in result.outcomes] == [  # type: ignore[union-attr]
        "not_dicom",
        "truncated",
        "not_dicom",
        "truncated",
    ]


def test_only_small_whole_files_that_are_not_deflated_share_the_cores() -> None:
    def item(data: bytes, parts: tuple[object, ...] = ()) -> IngestItem:
        return IngestItem("f", data, "ab" * 32, parts, 4 << 20 if parts else 0)

    assert ingest._may_share_cores(item(make_file(transfer_syntax=ExplicitVRLittleEndian)))
    assert not ingest._may_share_cores(item(b"tail", parts=(object(),)))  # may fan out
    deflated = make_file(transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert not ingest._may_share_cores(item(deflated))

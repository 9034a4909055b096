"""Shared builders for unit tests."""

from __future__ import annotations

from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

# Identifying values the builders put in every file; no message or log may carry them.
PHI = ("Doe^Jane", "PID-12345", "ACC-777")


def make_file(
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
    rows: int = 4,
    columns: int = 4,
    samples_per_pixel: int = 1,
    bits_allocated: int = 16,
    bits_stored: int | None = None,
    frames: int | None = None,
    photometric: str | None = None,
    sop_class: str = SecondaryCaptureImageStorage,
    undefined_length: tuple[str, ...] = (),
    pixel_vr: str | None = None,
    **attributes: Any,
) -> bytes:
    """A small Part 10 file; pixel data of the right length unless given."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    dataset.StudyDate = "20240131"
    dataset.AccessionNumber = PHI[2]
    dataset.Modality = "OT"
    dataset.PatientName = PHI[0]
    dataset.PatientID = PHI[1]
    dataset.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    if sop_class == SecondaryCaptureImageStorage:
        dataset.SamplesPerPixel = samples_per_pixel
        dataset.PhotometricInterpretation = photometric or (
            "MONOCHROME2" if samples_per_pixel == 1 else "RGB"
        )
        if samples_per_pixel > 1:
            dataset.PlanarConfiguration = 0
        if frames is not None:
            dataset.NumberOfFrames = frames
        dataset.Rows = rows
        dataset.Columns = columns
        dataset.BitsAllocated = bits_allocated
        dataset.BitsStored = bits_stored or bits_allocated
        dataset.HighBit = dataset.BitsStored - 1
        dataset.PixelRepresentation = 0
        if pixel_data is None:
            bits = rows * columns * samples_per_pixel * (frames or 1) * bits_allocated
            pixel_data = bytes(range(256)) * (-(-bits // 8) // 256 + 1)
            pixel_data = pixel_data[: -(-bits // 8)]
            pixel_data += b"\0" * (len(pixel_data) % 2)
        dataset.PixelData = pixel_data
        dataset["PixelData"].VR = pixel_vr or ("OW" if bits_allocated > 8 else "OB")
    for keyword, value in attributes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    for keyword in undefined_length:
        dataset[keyword].is_undefined_length = True
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

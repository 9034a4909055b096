"""Sample studies for the demo and the benchmarks, generated from real images.

The pixel data comes from pydicom-data's real CT, MR, CR and US images; each generated
slice is the source image shifted by a different offset, so every file is distinct and
compresses like the real thing. Patients are synthetic ("DEMO^PATIENT^n") so that tests
can prove no name or ID reaches storage or logs. Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


def pydicom_data_dir() -> Path:
    """Folder of the pydicom-data package's files."""
    import data_store  # the import name of the pydicom-data package

    return Path(os.path.dirname(data_store.__file__)) / "data"


@dataclass(frozen=True)
class SeriesPlan:
    """``count`` instances made from one pydicom-data file."""

    source: str
    modality: str
    count: int
    # When set, each instance is a tile x tile window of the source at a different
    # position (e.g. CT-sized 512 x 512 images with the texture of a real 1024 x 1024 MR).
    tile: int | None = None


# About 330 instances and 230 MB: the demo's study set.
DEMO_PLAN: tuple[tuple[SeriesPlan, ...], ...] = (
    (SeriesPlan("693_UNCI.dcm", "CT", 110),),
    (SeriesPlan("693_UNCI.dcm", "CT", 100),),
    (SeriesPlan("MR2_UNCI.dcm", "MR", 40),),
    (SeriesPlan("RG1_UNCI.dcm", "CR", 2), SeriesPlan("RG3_UNCI.dcm", "CR", 2)),
    (SeriesPlan("US1_UNCI.dcm", "US", 24),),
    (SeriesPlan("693_UNCI.dcm", "CT", 60),),
)


def generate(out_dir: Path, plan: tuple[tuple[SeriesPlan, ...], ...] = DEMO_PLAN) -> list[Path]:
    """Write one folder per study under ``out_dir``; return the files written."""
    written: list[Path] = []
    for study_index, series_plans in enumerate(plan, start=1):
        study_dir = out_dir / f"study-{study_index:03d}"
        study_dir.mkdir(parents=True, exist_ok=True)
        study_uid = generate_uid()
        for series_index, series in enumerate(series_plans, start=1):
            series_uid = generate_uid()
            for number, dataset in enumerate(_slices(series), start=1):
                _identify(dataset, study_index, study_uid, series_uid, series_index, number)
                path = study_dir / f"s{series_index:02d}-{number:04d}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                written.append(path)
    return written


def _slices(series: SeriesPlan) -> Iterator[Dataset]:
    source = pydicom.dcmread(pydicom_data_dir() / series.source)
    pixels = source.pixel_array
    for index in range(series.count):
        dataset = pydicom.dcmread(pydicom_data_dir() / series.source)
        if series.tile:
            rows, columns = pixels.shape[:2]
            top = (index * 7) % (rows - series.tile + 1)
            left = (index * 13) % (columns - series.tile + 1)
            window = pixels[top : top + series.tile, left : left + series.tile]
            dataset.Rows = dataset.Columns = series.tile
            dataset.PixelData = np.ascontiguousarray(window).tobytes()
        else:
            # A shifted copy: same statistics as the real image, different bytes per slice.
            shifted = np.roll(pixels, shift=(index * 3, index * 2), axis=(0, 1))
            dataset.PixelData = np.ascontiguousarray(shifted).tobytes()
        yield dataset


def _identify(
    dataset: Dataset,
    study_index: int,
    study_uid: str,
    series_uid: str,
    series_index: int,
    number: int,
) -> None:
    dataset.PatientName = f"DEMO^PATIENT^{study_index}"
    dataset.PatientID = f"DEMO-PID-{study_index:04d}"
    dataset.PatientBirthDate = "19700101"
    dataset.AccessionNumber = f"DEMO-ACC-{study_index:04d}"
    dataset.StudyDate = f"2026{(study_index % 12) + 1:02d}15"
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.SeriesNumber = series_index
    dataset.InstanceNumber = number
    sop_uid = generate_uid()
    dataset.SOPInstanceUID = sop_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid


def bad_inputs(out_dir: Path, good: Path) -> list[Path]:
    """Files a real archive receives and must refuse: each gets a distinct reason."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    files = {
        "not-dicom.txt": b"This is a referral letter, not an image.\n" * 20,
        "truncated.dcm": data[: len(data) // 2],
    }
    dataset = pydicom.dcmread(good)
    dataset.PixelData = dataset.PixelData[:-1000]
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    mismatch = out_dir / "pixel-length-mismatch.dcm"
    dataset.save_as(mismatch, enforce_file_format=True)
    paths = [mismatch]
    for name, content in files.items():
        path = out_dir / name
        path.write_bytes(content)
        paths.append(path)
    return paths

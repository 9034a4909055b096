"""Strata's compressed files read by independent DICOM toolkits: DCMTK, GDCM and pydicom.

For a few real native files and every encapsulated syntax Strata writes (each registered
lossless codec, and RLE Lossless through pydicom's encoder), the file that
``workers.pipeline.restore.transcode`` builds (what ``strata get --syntax`` gives back) must parse
in dcmdump, decompress with DCMTK and GDCM where they know the transfer syntax, and show
exactly the original's pixels (as pydicom reads them) after each decompression.
A tool that does not know a syntax skips that one check, naming its version.

deploy/local/install-peers.sh installs DCMTK and GDCM's tools (Debian packages).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import data_store
import numpy as np
import pydicom
import pydicom.data
import pytest
from numpy.typing import NDArray
from pydicom.uid import UID

from workers.codecs.lossless import lossless_transfer_syntaxes
from workers.pipeline.restore import transcode
from workers.records import HTJ2K_LOSSLESS

pytestmark = [pytest.mark.integration]

DATA_STORE = Path(data_store.__file__).parent / "data"
INSTALL = "deploy/local/install-peers.sh installs it (make test runs it)"
JPEGLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

ORIGINALS = {
    "CT_small": Path(pydicom.data.get_testdata_file("CT_small.dcm") or ""),  # signed 16/16
    "693_UNCI": DATA_STORE / "693_UNCI.dcm",  # CT, signed, Bits Stored 14 of 16
    "MR2_UNCI": DATA_STORE / "MR2_UNCI.dcm",  # MR 1024 x 1024, 12 of 16
    "US1_UNCI": DATA_STORE / "US1_UNCI.dcm",  # US, RGB 8-bit
    "emri_small": DATA_STORE / "emri_small.dcm",  # MR, 10 frames
    # Explicit VR Big Endian: signed MR, and 16-bit RGB with 2 frames
    "MR_small_bigendian": Path(pydicom.data.get_testdata_file("MR_small_bigendian.dcm") or ""),
    "SC_rgb_expb_16bit_2frame": DATA_STORE / "SC_rgb_expb_16bit_2frame.dcm",
}
SYNTAXES = sorted(lossless_transfer_syntaxes() | {RLE_LOSSLESS})
# DCMTK's decompressor per syntax. Debian's DCMTK 3.6.7 has no dcmdjp2k (JPEG 2000 is
# not in the free toolkit), so the JPEG 2000 family is skipped there, naming the version.
DCMTK_DECOMPRESSORS = {
    JPEGLS_LOSSLESS: "dcmdjpls",
    JPEG_LOSSLESS_SV1: "dcmdjpeg",
    JPEG_LOSSLESS: "dcmdjpeg",
    RLE_LOSSLESS: "dcmdrle",
    JPEG2000_LOSSLESS: "dcmdjp2k",
    HTJ2K_LOSSLESS: "dcmdjp2k",
}
# Syntaxes newer than some GDCM releases: a GDCM that cannot read them skips, naming its
# version. Any other failure of gdcmconv fails the test.
NEWER_THAN_GDCM_3_0 = frozenset({HTJ2K_LOSSLESS})

CASES = [(name, syntax) for name in ORIGINALS for syntax in SYNTAXES]
IDS = [f"{name}-{UID(syntax).name or syntax}" for name, syntax in CASES]


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")


def _compressed(directory: Path, name: str, syntax: str) -> Path:
    """The original ``name`` transcoded to ``syntax`` (built once per module)."""
    path = directory / f"{name}.{syntax}.dcm"
    if not path.exists():
        original = ORIGINALS[name].read_bytes()
        syntax_in = pydicom.dcmread(ORIGINALS[name], stop_before_pixels=True).file_meta
        path.write_bytes(transcode(original, syntax_in.TransferSyntaxUID, syntax))
    return path


@functools.cache
def _original_pixels(name: str) -> NDArray[np.generic]:
    pixels: NDArray[np.generic] = pydicom.dcmread(ORIGINALS[name]).pixel_array
    return pixels


def _assert_same_pixels(decompressed: Path, name: str, reader: str) -> None:
    dataset = pydicom.dcmread(decompressed)
    pixels = dataset.pixel_array
    original = _original_pixels(name)
    assert pixels.shape == original.shape, reader
    assert pixels.dtype.kind == original.dtype.kind, reader
    assert pixels.dtype.itemsize == original.dtype.itemsize, reader
    assert np.array_equal(pixels, original), f"{reader} decoded other pixels than the original"


def _run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=120
    )


def _require(tool: str, toolkit: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{toolkit} is not installed ({tool} not on PATH); {INSTALL}")


@functools.cache
def _dcmtk_version() -> str:
    """'DCMTK 3.6.7', from dcmdump's version banner."""
    banner = _run("dcmdump", "--version").stdout.split()
    version = next((word for word in banner if word.startswith("v3.")), "unknown version")
    return f"DCMTK {version.removeprefix('v')}"


@functools.cache
def _gdcm_version() -> str:
    """'GDCM 3.0.21', from gdcminfo's version banner."""
    banner = _run("gdcminfo", "--version").stdout.split()
    version = banner[banner.index("gdcm") + 1] if "gdcm" in banner else "unknown version"
    return f"GDCM {version}"


def _frames(name: str) -> int:
    return int(pydicom.dcmread(ORIGINALS[name], stop_before_pixels=True).get("NumberOfFrames", 1))


@pytest.mark.parametrize(("name", "syntax"), CASES, ids=IDS)
def test_dcmdump_parses_the_file(compressed_dir: Path, name: str, syntax: str) -> None:
    _require("dcmdump", "DCMTK")
    path = _compressed(compressed_dir, name, syntax)
    # -Un prints UIDs as numbers, so that a syntax DCMTK has no name for shows too.
    result = _run("dcmdump", "-Un", path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"{_dcmtk_version()} complained: {result.stderr}"
    assert f"(0002,0010) UI [{syntax}]" in result.stdout
    # The Basic Offset Table and one fragment per frame, up to the delimiter.
    assert f"(7fe0,0010) OB (PixelSequence #={_frames(name) + 1})" in result.stdout
    # DCMTK knows these and says it read the data set in them.
    known = {
        JPEGLS_LOSSLESS: "JPEG-LS Lossless",
        JPEG2000_LOSSLESS: "JPEG 2000",
        JPEG_LOSSLESS_SV1: "JPEG Lossless, Non-hierarchical, 1st Order Prediction",
        JPEG_LOSSLESS: "JPEG Lossless, Non-hierarchical, Process 14",
        RLE_LOSSLESS: "RLE Lossless",
    }
    if syntax in known:
        assert f"# Used TransferSyntax: {known[syntax]}" in result.stdout


@pytest.mark.parametrize(("name", "syntax"), CASES, ids=IDS)
def test_dcmtk_decompresses_to_the_original_pixels(
    compressed_dir: Path, name: str, syntax: str
) -> None:
    _require("dcmdump", "DCMTK")
    tool = DCMTK_DECOMPRESSORS[syntax]
    if shutil.which(tool) is None:
        pytest.skip(f"{_dcmtk_version()} has no {tool}, so it cannot decompress {UID(syntax).name}")
    path = _compressed(compressed_dir, name, syntax)
    out = path.with_suffix(f".{tool}.dcm")
    result = _run(tool, path, out)
    assert result.returncode == 0, f"{_dcmtk_version()} {tool}: {result.stderr}"
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID.is_compressed is False
    _assert_same_pixels(out, name, f"{_dcmtk_version()} {tool}")


@pytest.mark.parametrize(("name", "syntax"), CASES, ids=IDS)
def test_gdcm_decompresses_to_the_original_pixels(
    compressed_dir: Path, name: str, syntax: str
) -> None:
    _require("gdcmconv", "GDCM's tools (libgdcm-tools)")
    path = _compressed(compressed_dir, name, syntax)
    out = path.with_suffix(".gdcmconv.dcm")
    result = _run("gdcmconv", "--raw", path, out)
    if result.returncode != 0 and syntax in NEWER_THAN_GDCM_3_0:
        pytest.skip(
            f"{_gdcm_version()} cannot read {UID(syntax).name} "
            f"(gdcmconv: {result.stderr.strip() or result.stdout.strip()})"
        )
    if result.returncode != 0:
        # GDCM's writer refuses some data sets whatever their pixels (it will not write a
        # multi-frame Secondary Capture Image Storage): then the native original fails too.
        native = _run("gdcmconv", "--raw", ORIGINALS[name], path.with_suffix(".native.dcm"))
        if native.returncode != 0:
            pytest.skip(
                f"{_gdcm_version()} gdcmconv fails on the native original as well, so not "
                f"because of its pixel data: {native.stderr.strip()}"
            )
    assert result.returncode == 0, f"{_gdcm_version()} gdcmconv: {result.stderr}"
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID.is_compressed is False
    _assert_same_pixels(out, name, f"{_gdcm_version()} gdcmconv --raw")


@pytest.mark.parametrize(("name", "syntax"), CASES, ids=IDS)
def test_pydicom_decodes_to_the_original_pixels(
    compressed_dir: Path, name: str, syntax: str
) -> None:
    path = _compressed(compressed_dir, name, syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    _assert_same_pixels(path, name, f"pydicom {pydicom.__version__}")

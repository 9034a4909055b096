"""Lossless codecs on real images: speed per core and compression, against HTJ2K.

    .venv/bin/python bench/codecs.py [--rounds 5] [--min-round 0.1]

1. Reads the native CT, MR, CR, US and multi-frame images of pydicom-data and splits
   each with workers.dicom.split.split_file, as ingest does.
2. For every lossless codec registered in workers.codecs.lossless: encode_verified once (every
   frame decoded back and compared bit for bit), which proves the codec lossless on the
   image and gives the codestreams; then times
   - encode: the codec's encoder over every frame, without the verifying decode that
     encode_verified adds (ingest pays encode + decode);
   - decode: decode_to_native, every frame decoded back into the file's Pixel Data
     value (byte order, planar configuration), which is what retrieval pays.
3. Prints MB/s per core (MB = 10^6 bytes of native Pixel Data; time = this process's CPU
   time, so other load on the machine does not count; one thread), the compression ratio
   (native Pixel Data / codestreams) and each codec's speed over HTJ2K's in this run.

Each time is the median of --rounds rounds; a round repeats the work until it has taken
--min-round seconds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data_store
import imagecodecs
import jpeg_ls
import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from workers.codecs.lossless import (
    _CODECS,  # the registry: timing a codec's encoder alone needs it
    EncodedPixels,
    _frames,
    decode_to_native,
    encode_verified,
    lossless_transfer_syntaxes,
)
from workers.dicom.split import PixelLayout, split_file
from workers.records import HTJ2K_LOSSLESS

console = Console()
DATA = Path(data_store.__file__).parent / "data"
IMAGES = [
    "693_UNCI.dcm",  # CT
    "MR2_UNCI.dcm",  # MR
    "RG1_UNCI.dcm",  # CR
    "US1_UNCI.dcm",  # US, RGB
    "emri_small.dcm",  # MR, 10 frames
    "eCT_Supplemental.dcm",  # CT, 2 frames
]


@dataclass(frozen=True)
class Image:
    name: str
    modality: str
    layout: PixelLayout
    pixels: bytes  # the native Pixel Data value


@dataclass(frozen=True)
class Measure:
    megabytes: float  # native Pixel Data
    encoded_bytes: int
    encode_seconds: float  # CPU seconds for all frames
    decode_seconds: float


def load(name: str) -> Image:
    data = (DATA / name).read_bytes()
    split = split_file(data)
    if split.layout is None:
        raise SystemExit(f"{name}: Pixel Data is not native, so there is nothing to encode")
    return Image(
        name, split.header.modality, split.layout, data[split.pixel_start : split.pixel_end]
    )


def cpu_seconds(work: Callable[[], object], rounds: int, min_round: float) -> float:
    """Median CPU seconds of one call of ``work`` (after one call to warm up)."""
    started = time.process_time()
    work()
    first = time.process_time() - started
    calls = max(1, math.ceil(min_round / max(first, 1e-6)))
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(calls):
            work()
        samples.append((time.process_time() - started) / calls)
    return statistics.median(samples)


def measure(image: Image, transfer_syntax: str, rounds: int, min_round: float) -> Measure:
    layout = image.layout
    encoded = encode_verified(image.pixels, layout, transfer_syntax)  # proof, once
    frames = _frames(image.pixels, layout)
    frames = frames.astype(frames.dtype.newbyteorder("="), copy=False)  # what codecs take
    codec = _CODECS[transfer_syntax]

    def encode() -> None:
        for frame in frames:
            codec.encode(frame, layout)

    def decode() -> None:
        decode_to_native(encoded, layout)

    assert decode_to_native(encoded, layout) == image.pixels
    return Measure(
        megabytes=len(image.pixels) / 1e6,
        encoded_bytes=_size(encoded),
        encode_seconds=cpu_seconds(encode, rounds, min_round),
        decode_seconds=cpu_seconds(decode, rounds, min_round),
    )


def _size(encoded: EncodedPixels) -> int:
    return sum(map(len, encoded.frames))


def _describe(image: Image) -> str:
    """Name; modality, rows×columns[×samples][, frames]; Bits Stored/Allocated (s)igned or
    (u)nsigned and MB."""
    layout = image.layout
    samples = "" if layout.samples_per_pixel == 1 else f"×{layout.samples_per_pixel}"
    frames = "" if layout.frames == 1 else f", {layout.frames} fr"
    signed = "s" if layout.pixel_representation else "u"
    return (
        f"{Path(image.name).stem}\n"
        f"{image.modality} {layout.rows}×{layout.columns}{samples}{frames}\n"
        f"{layout.bits_stored}/{layout.bits_allocated}{signed} {len(image.pixels) / 1e6:.2f} MB"
    )


def _row(measure: Measure, baseline: Measure) -> list[str]:
    encode = measure.megabytes / measure.encode_seconds
    decode = measure.megabytes / measure.decode_seconds
    return [
        f"{encode:.1f}",
        f"{decode:.1f}",
        f"{measure.megabytes * 1e6 / measure.encoded_bytes:.2f}",
        f"{encode / (baseline.megabytes / baseline.encode_seconds):.2f}×",
        f"{decode / (baseline.megabytes / baseline.decode_seconds):.2f}×",
    ]


def _total(measures: list[Measure]) -> Measure:
    return Measure(
        megabytes=sum(m.megabytes for m in measures),
        encoded_bytes=sum(m.encoded_bytes for m in measures),
        encode_seconds=sum(m.encode_seconds for m in measures),
        decode_seconds=sum(m.decode_seconds for m in measures),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-round", type=float, default=0.1, help="seconds per round")
    args = parser.parse_args()

    names = {uid: _CODECS[uid].name for uid in lossless_transfer_syntaxes()}
    # HTJ2K first: it is the default codec and the baseline of every ratio.
    syntaxes = sorted(names, key=lambda uid: (uid != HTJ2K_LOSSLESS, names[uid]))
    images = [load(name) for name in IMAGES]
    started = time.perf_counter()
    results: dict[tuple[str, str], Measure] = {}
    for image in images:
        for syntax in syntaxes:
            with console.status(f"{image.name}: {names[syntax]}…"):
                results[image.name, syntax] = measure(image, syntax, args.rounds, args.min_round)
    wall = time.perf_counter() - started

    table = Table(
        title="Lossless codecs on one core (CPU time); every frame verified bit-exact",
        box=box.SIMPLE_HEAD,
        caption=(
            f"imagecodecs {imagecodecs.__version__} ({imagecodecs.htj2k_version()}, "
            f"{imagecodecs.jpeg2k_version()}), pyjpegls {jpeg_ls.__version__} (CharLS), "
            f"numpy {np.__version__}; median of {args.rounds} rounds; run took {wall:.0f} s"
        ),
    )
    table.add_column("image", no_wrap=True)
    table.add_column("codec", no_wrap=True)
    table.add_column("encode\nMB/s", justify="right")
    table.add_column("decode\nMB/s", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("encode\n÷ HTJ2K", justify="right")
    table.add_column("decode\n÷ HTJ2K", justify="right")
    for image in images:
        baseline = results[image.name, HTJ2K_LOSSLESS]
        lines = _describe(image).splitlines()
        for index, syntax in enumerate(syntaxes):
            label = lines[index] if index < len(lines) else ""
            table.add_row(label, names[syntax], *_row(results[image.name, syntax], baseline))
        table.add_section()
    baseline = _total([results[image.name, HTJ2K_LOSSLESS] for image in images])
    megabytes = sum(len(image.pixels) for image in images) / 1e6
    lines = ["total", f"{len(images)} images", f"{megabytes:.2f} MB"]
    for index, syntax in enumerate(syntaxes):
        total = _total([results[image.name, syntax] for image in images])
        label = lines[index] if index < len(lines) else ""
        table.add_row(label, names[syntax], *_row(total, baseline), style="bold")
    console.print(table)


if __name__ == "__main__":
    main()

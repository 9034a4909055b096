"""One large multi-frame instance: encode + verify on one core vs fanned out over Ray.

    .venv/bin/python bench/multiframe.py [--frames 2000] [--size 256]

Builds a tomosynthesis-like instance (frames cut from the real 1024 x 1024 MR of
pydicom-data), then times workers.codecs.lossless.encode_verified on one core (the
baseline) and workers.pipeline.fanout.FrameFanout on a local Ray with every core, and prints
both and the speed-up.
On a 2-core machine the ideal speed-up is 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pydicom
import ray
from rich.console import Console
from rich.table import Table

from cluster.dev.samples import pydicom_data_dir
from workers.codecs.lossless import encode_verified
from workers.dicom.split import PixelLayout
from workers.pipeline.fanout import FrameFanout
from workers.records import HTJ2K_LOSSLESS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    args = parser.parse_args()
    size = args.size
    source = pydicom.dcmread(pydicom_data_dir() / "MR2_UNCI.dcm").pixel_array
    span = source.shape[0] - size
    frames = np.stack(
        [
            source[(7 * i) % span : (7 * i) % span + size, (11 * i) % span : (11 * i) % span + size]
            for i in range(args.frames)
        ]
    )
    pixels = memoryview(np.ascontiguousarray(frames).tobytes())
    layout = PixelLayout(size, size, 1, 16, 12, 0, 0, "MONOCHROME2", args.frames, True)
    megabytes = len(pixels) / 1e6

    started = time.perf_counter()
    serial = encode_verified(pixels, layout, HTJ2K_LOSSLESS)
    one_core = time.perf_counter() - started

    ray.init(include_dashboard=False, log_to_driver=False)
    fanout = FrameFanout(min_frames=1, chunk_frames=args.chunk, min_bytes=0)
    warm_up = replace(layout, frames=args.chunk)  # Ray starts its workers on first use
    fanout.encode(pixels[: layout.frame_length * args.chunk], warm_up, HTJ2K_LOSSLESS)
    started = time.perf_counter()
    parallel, tasks = fanout.encode(pixels, layout, HTJ2K_LOSSLESS)
    fanned = time.perf_counter() - started
    ray.shutdown()
    assert parallel.frames == serial.frames, "fan-out must give the same codestreams"

    table = Table(title=f"{args.frames} frames of {size} x {size} x 16 bit ({megabytes:.0f} MB)")
    table.add_column("path")
    table.add_column("seconds", justify="right")
    table.add_column("MB/s", justify="right")
    table.add_row("one core (baseline)", f"{one_core:.2f}", f"{megabytes / one_core:.1f}")
    table.add_row(
        f"fan-out: {tasks} Ray tasks on {os.cpu_count()} cores",
        f"{fanned:.2f}",
        f"{megabytes / fanned:.1f}",
    )
    table.add_row("speed-up", f"{one_core / fanned:.2f}x", "")
    Console().print(table)


if __name__ == "__main__":
    main()

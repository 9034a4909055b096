"""Ingest throughput against the codec-bound limit measured in the same run.

    .venv/bin/python bench/ingest.py [--instances 320] [--worker-cpus N]

1. Generates CT-sized instances (512 x 512, 16 bit, real CT pixels from pydicom-data).
2. Baseline: one process splits each file, HTJ2K-encodes every frame and decodes it back
   to verify (what a worker must do at the least); MB/s of input files.
   Codec-bound limit = that MB/s x the cores given to workers.
3. Starts a real node (MinIO with 4 drives, Ray, gRPC), ingests every file through the
   gRPC client, and times first byte sent to last acknowledgement (object written and
   catalog row committed).
4. Prints instances/s, MB/s, compression ratio and ingest MB/s / codec-bound limit.
   The goal on a 2-core machine is a ratio of at least 0.4.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from cluster import config as config_module
from cluster.client import StrataClient
from cluster.dev.samples import SeriesPlan, generate
from cluster.ops.node import Stack
from workers.codecs.lossless import encode_verified
from workers.dicom.split import split_file

console = Console()
SOURCES = {
    "ct": lambda count: SeriesPlan("693_UNCI.dcm", "CT", count),
    "mr-tiles": lambda count: SeriesPlan("MR2_UNCI.dcm", "MR", count, tile=512),
}


def codec_baseline(files: list[Path]) -> tuple[float, float]:
    """Single-process split + encode + verify-decode: (MB/s of input, seconds)."""
    datas = [path.read_bytes() for path in files]
    started = time.perf_counter()
    for data in datas:
        split = split_file(data)
        assert split.layout is not None
        encode_verified(memoryview(data)[split.pixel_start : split.pixel_end], split.layout)
    seconds = time.perf_counter() - started
    return sum(map(len, datas)) / 1e6 / seconds, seconds


async def ingest(files: list[Path], work: Path, worker_cpus: int) -> tuple[float, int, int, int]:
    config = replace(
        config_module.load(),
        data_dir=work / "data",
        key_file=work / "keys" / "keys.json",
        port=0,
        worker_cpus=worker_cpus,
    )
    stack = Stack(config, embedded=True)
    await stack.start()
    try:
        # The sender runs in its own process, as a modality gateway would: sharing the
        # server's interpreter would make the two fight over one GIL.
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            return await asyncio.to_thread(
                pool.apply, send, (stack.address, stack.tokens.first, files)
            )
    finally:
        await stack.stop()


def send(address: str, token: str, files: list[Path]) -> tuple[float, int, int, int]:
    """Ingest ``files`` over one stream; (seconds, stored, bytes in, bytes stored)."""
    with StrataClient(address, token) as client:
        client.wait_ready()
        started = time.perf_counter()
        outcomes = list(client.ingest_files(files))
        seconds = time.perf_counter() - started
    stored = [o for o in outcomes if o.status == "stored"]
    return (
        seconds,
        len(stored),
        sum(o.bytes_in for o in stored),
        sum(o.bytes_stored for o in stored),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=320)
    parser.add_argument("--worker-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--source",
        choices=sorted(SOURCES),
        default="ct",
        help="ct: the real 512x512 CT, shifted per slice (compresses ~9:1, fast codec); "
        "mr-tiles: 512x512 windows of the real 1024x1024 MR (~3.5:1, typical texture)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="strata-bench-") as scratch:
        work = Path(scratch)
        with console.status(f"generating {args.instances} CT-sized instances…"):
            files = generate(work / "samples", ((SOURCES[args.source](args.instances),),))
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        with console.status("measuring the single-process codec baseline…"):
            codec_mbps, _ = codec_baseline(files)
        limit = codec_mbps * args.worker_cpus
        with console.status("ingesting through gRPC into a real node…"):
            seconds, stored, bytes_in, bytes_stored = asyncio.run(
                ingest(files, work, args.worker_cpus)
            )

    mbps = bytes_in / 1e6 / seconds
    table = Table(
        title=f"Strata ingest benchmark ({len(files)} CT-sized instances from "
        f"{args.source}, {size_mb:.0f} MB)"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("instances stored", f"{stored} / {len(files)}")
    table.add_row("ingest wall time (s)", f"{seconds:.2f}")
    table.add_row("instances/s", f"{stored / seconds:.1f}")
    table.add_row("ingest MB/s (acknowledged)", f"{mbps:.1f}")
    table.add_row("compression ratio (in / stored)", f"{bytes_in / bytes_stored:.2f}")
    table.add_row("baseline: 1-process encode+verify MB/s", f"{codec_mbps:.1f}")
    table.add_row("worker cores", str(args.worker_cpus))
    table.add_row("codec-bound limit MB/s (baseline x cores)", f"{limit:.1f}")
    table.add_row("ratio to codec-bound limit (goal >= 0.4)", f"{mbps / limit:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()

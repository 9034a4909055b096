"""Strata side by side with Orthanc (Debian), the archive a hospital would pick instead.

    .venv/bin/python bench/vs_orthanc.py [--instances 320] [--associations 4]
        [--source mr-tiles|ct]

1. Generates CT-sized instances (512 x 512, 16 bit) from real pydicom-data images:
   ``mr-tiles`` (default) takes 512 x 512 windows of the real 1024 x 1024 MR, shifted per
   slice (typical texture, ~3.5:1); ``ct`` the real CT, shifted per slice.
2. Sends the same files with DCMTK's storescu over the same number of parallel
   associations (4) to, in turn:
   - Orthanc storing files as received;
   - Orthanc with ``IngestTranscoding`` to JPEG 2000 lossless (1.2.840.10008.1.2.4.90);
   - Strata's DIMSE door (HTJ2K, proven lossless, encrypted, erasure-coded MinIO, catalog);
   and, on the same files, Strata's gRPC door (one stream, the project's client).
   Each is timed from the first association to the last storescu's exit (every C-STORE
   answered: for Strata, only once the object and its catalog row are durable).
3. Prints instances/s, MB/s (of files sent) and stored MB for each, and Strata's ratios
   to both Orthanc setups, all from this one run. Stored MB is what each keeps on disk:
   Orthanc's storage directory (its SQLite index not counted); for Strata the erasure-coded
   object bytes (parity included), as MinIO's drives hold them.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from cluster import config as config_module
from cluster.client import StrataClient
from cluster.dev import orthanc
from cluster.dev.samples import SeriesPlan, generate
from cluster.ops.node import Stack

console = Console()
SOURCES = {
    "ct": lambda count: SeriesPlan("693_UNCI.dcm", "CT", count),
    "mr-tiles": lambda count: SeriesPlan("MR2_UNCI.dcm", "MR", count, tile=512),
}
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


@dataclass
class Result:
    name: str
    seconds: float
    instances: int
    mb_stored: float
    mb_sent: float

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.mb_sent / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def storescu(port: int, ae_title: str, files: list[Path], associations: int) -> float:
    """Send ``files`` over ``associations`` storescu processes at once; seconds."""
    runs = [files[number::associations] for number in range(associations)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                ae_title,
                "127.0.0.1",
                str(port),
                *map(str, run),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for run in runs
        if run
    ]
    for process in processes:
        _, errors = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {errors.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - started


def against_orthanc(
    files: list[Path], work: Path, associations: int, transcoding: str
) -> tuple[float, int, float]:
    """(seconds, instances Orthanc holds, MB on its disk)."""
    with orthanc.Orthanc(
        work,
        dicom_port=free_port(),
        http_port=free_port(),
        ingest_transcoding=transcoding,
        concurrent_jobs=2,
    ) as server:
        seconds = storescu(server.dicom_port, server.ae_title, files, associations)
        held = int(server.get("/statistics")["CountInstances"])
        return seconds, held, server.disk_bytes() / 1e6


async def against_strata(
    files: list[Path], work: Path, associations: int
) -> tuple[tuple[float, int, float], tuple[float, int, float]]:
    """DIMSE then gRPC, each into a node of its own: (seconds, instances, MB stored)."""
    results = []
    for door in ("dimse", "grpc"):
        config = replace(
            config_module.load(),
            data_dir=work / door / "data",
            key_file=work / door / "keys" / "keys.json",
            port=0,
            dimse_port=free_port() if door == "dimse" else 0,
            dimse_max_associations=max(10, associations * 2),
        )
        stack = Stack(config, embedded=True)
        await stack.start()
        try:
            if door == "dimse":
                seconds = await asyncio.to_thread(
                    storescu, config.dimse_port, config.dimse_ae_title, files, associations
                )
            else:
                seconds = await asyncio.to_thread(
                    _grpc_send, stack.address, stack.tokens.first, files
                )
            stats = await stack.catalog_stats()
            stored = _drive_bytes(config.data_dir / "minio", f"strata-{config.tier}")
            results.append((seconds, stats["rows_written"], stored / 1e6))
        finally:
            await stack.stop()
    return results[0], results[1]


def _drive_bytes(drives: Path, bucket: str) -> int:
    """Bytes the tier bucket holds on every MinIO drive: data and parity shards."""
    return sum(
        path.stat().st_size
        for drive in drives.glob("drive*")
        for path in (drive / bucket).rglob("*")
        if path.is_file()
    )


def _grpc_send(address: str, token: str, files: list[Path]) -> float:
    with StrataClient(address, token) as client:
        client.wait_ready()
        started = time.perf_counter()
        outcomes = list(client.ingest_files(files))
        seconds = time.perf_counter() - started
    refused = [o for o in outcomes if o.status not in ("stored", "duplicate")]
    if refused:
        raise RuntimeError(f"{len(refused)} files refused over gRPC: {refused[0].reason}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=320)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--source", choices=sorted(SOURCES), default="mr-tiles")
    args = parser.parse_args()
    if not orthanc.available():
        sys.exit("Orthanc is not installed (deploy/local/install-peers.sh installs it)")

    with tempfile.TemporaryDirectory(prefix="strata-vs-orthanc-") as scratch:
        work = Path(scratch)
        with console.status(f"generating {args.instances} CT-sized instances…"):
            files = generate(work / "samples", ((SOURCES[args.source](args.instances),),))
        mb_sent = sum(p.stat().st_size for p in files) / 1e6
        results = []
        for name, transcoding in (
            ("Orthanc, as received", ""),
            ("Orthanc, JPEG 2000 lossless", JPEG2000_LOSSLESS),
        ):
            with console.status(f"{name}: storescu × {args.associations}…"):
                seconds, held, stored = against_orthanc(
                    files, work / name.replace(" ", "_").replace(",", ""), args.associations,
                    transcoding,
                )  # fmt: skip
            results.append(Result(name, seconds, held, stored, mb_sent))
        with console.status(f"Strata: storescu × {args.associations}, then gRPC…"):
            dimse, grpc_door = asyncio.run(
                against_strata(files, work / "strata", args.associations)
            )
        results.append(Result("Strata, DIMSE (HTJ2K, verified, encrypted, EC)", *dimse, mb_sent))
        results.append(Result("Strata, gRPC (one stream)", *grpc_door, mb_sent))
    report(results, args, mb_sent)


def report(results: list[Result], args: argparse.Namespace, mb_sent: float) -> None:
    table = Table(
        title=f"{args.instances} instances ({args.source}, {mb_sent:.0f} MB) over "
        f"{args.associations} associations, this run"
    )
    for column in ("archive", "instances", "s", "instances/s", "MB/s", "stored MB"):
        table.add_column(column, justify="right" if column != "archive" else "left")
    for result in results:
        table.add_row(
            result.name,
            str(result.instances),
            f"{result.seconds:.1f}",
            f"{result.per_second:.1f}",
            f"{result.mb_per_second:.1f}",
            f"{result.mb_stored:.1f}",
        )
    console.print(table)
    plain, j2k, strata = results[0], results[1], results[2]
    ratios = Table(title="Strata's DIMSE door against each Orthanc setup (× = Strata / Orthanc)")
    for column in ("against", "throughput ×", "stored bytes ×"):
        ratios.add_column(column)
    for other in (plain, j2k):
        ratios.add_row(
            other.name,
            f"{strata.per_second / other.per_second:.2f}",
            f"{strata.mb_stored / other.mb_stored:.2f}",
        )
    console.print(ratios)
    console.print(
        "stored MB: Strata's counts MinIO's erasure-coding parity (EC:2 over 4 drives: any two "
        "drives may be lost), Orthanc's is one copy on one disk; Strata also encrypts each "
        "object and proves each recompression lossless before answering."
    )


if __name__ == "__main__":
    main()

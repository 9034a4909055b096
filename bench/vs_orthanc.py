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
   and, on the same files, Strata's gRPC door through ``strata ingest`` (the CLI, one
   stream). Each is timed from the first association to the last sender's exit (every
   file answered: for Strata, only once its pack and its catalog row are durable).
3. Prints instances/s, MB/s (of files sent) and stored MB for each, and each Strata door's
   ratios to both Orthanc setups, all from this one run. Stored MB is what each keeps on
   disk: Orthanc's storage directory (its SQLite index not counted); for Strata the
   erasure-coded object bytes (parity included), as MinIO's drives hold them.
4. Where Strata's time goes: CPU milliseconds per instance of each process group during
   each Strata run (the sender, from the kernel's accounting of finished children; the
   front end, this process, which hosts the embedded node and its Ray driver; the Ray
   workers, split into the work inside their tasks, as the tasks measure it, and the
   rest, Ray's overhead; MinIO; the catalog writer; Ray's own services), beside the
   essential work measured in this process on the same files (split, HTJ2K encode, the
   verifying decode, SHA-256 of the file, AES-GCM of what is stored). The goal: all of
   it together at most 2.5 times the essential work.
5. The front end's peak resident memory during each run, against its byte budget.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rich.console import Console
from rich.table import Table

from cluster import config as config_module
from cluster.dev import orthanc
from cluster.dev.samples import SeriesPlan, generate
from cluster.ops.node import Stack
from workers.codecs.lossless import encode_verified
from workers.dicom.split import sample_bytes, split_file
from workers.records import HTJ2K_LOSSLESS

console = Console()
SOURCES = {
    "ct": lambda count: SeriesPlan("693_UNCI.dcm", "CT", count),
    "mr-tiles": lambda count: SeriesPlan("MR2_UNCI.dcm", "MR", count, tile=512),
}
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


GROUPS = (
    "sender",
    "front end",
    "Ray workers: in tasks",
    "Ray workers: overhead",
    "MinIO",
    "catalog writer",
    "Ray services",
)


@dataclass
class Result:
    name: str
    seconds: float
    instances: int
    mb_stored: float
    mb_sent: float
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per instance, by group
    peak_rss_mb: float = 0.0

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
    files: list[Path], samples: Path, work: Path, associations: int
) -> list[Result]:
    """DIMSE then gRPC (``strata ingest``), each into a node of its own, with where the
    CPU went."""
    results = []
    mb_sent = sum(path.stat().st_size for path in files) / 1e6
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
            before = stack.dispatch_stats()
            with measuring() as measured:
                if door == "dimse":
                    seconds = await asyncio.to_thread(
                        storescu, config.dimse_port, config.dimse_ae_title, files, associations
                    )
                else:
                    seconds = await asyncio.to_thread(
                        strata_ingest, stack.address, stack.tokens.first, samples
                    )
            in_tasks = (
                stack.dispatch_stats().get("task_cpu_ms", 0) - before.get("task_cpu_ms", 0)
            ) / 1000
            stats = await stack.catalog_stats()
            stored = _drive_bytes(config.data_dir / "minio", f"strata-{config.tier}")
        finally:
            await stack.stop()
        cpu = measured.seconds
        workers = cpu.pop("Ray workers", 0.0)
        cpu["Ray workers: in tasks"] = in_tasks
        cpu["Ray workers: overhead"] = max(0.0, workers - in_tasks)
        count = stats["rows_written"]
        name = (
            f"Strata, storescu × {associations} (DIMSE)"
            if door == "dimse"
            else "Strata, strata ingest (gRPC, one stream)"
        )
        results.append(
            Result(
                name,
                seconds,
                count,
                stored / 1e6,
                mb_sent,
                {group: 1000 * cpu.get(group, 0.0) / len(files) for group in GROUPS},
                measured.peak_rss / 1e6,
            )
        )
    return results


@dataclass
class Measured:
    seconds: dict[str, float] = field(default_factory=dict)  # CPU seconds by group
    peak_rss: int = 0  # this process's, bytes


@contextmanager
def measuring() -> Iterator[Measured]:
    """CPU seconds of every process group while the block runs, and this process's peak
    resident memory (sampled every 50 ms)."""
    me = psutil.Process()
    measured = Measured(peak_rss=me.memory_info().rss)
    start = _cpu_by_process(me)
    children_start = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            measured.peak_rss = max(measured.peak_rss, me.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield measured
    finally:
        done.set()
        sampler.join()
        end = _cpu_by_process(me)
        children_end = resource.getrusage(resource.RUSAGE_CHILDREN)
        groups: Counter[str] = Counter()
        for pid, (group, seconds) in end.items():
            groups[group] += seconds - start.get(pid, (group, 0.0))[1]
        # Senders are this process's children that ran and were waited for meanwhile.
        groups["sender"] += (children_end.ru_utime + children_end.ru_stime) - (
            children_start.ru_utime + children_start.ru_stime
        )
        measured.seconds = dict(groups)


def _cpu_by_process(me: psutil.Process) -> dict[int, tuple[str, float]]:
    found = {me.pid: ("front end", _cpu(me))}
    for child in me.children(recursive=True):
        try:
            found[child.pid] = (_group_of(child), _cpu(child))
        except psutil.Error:
            continue  # gone meanwhile
    return found


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _group_of(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    if "minio" in process.name() or " server --address" in command:
        return "MinIO"
    if "CatalogWriter" in command:
        return "catalog writer"
    if command.startswith("ray::") and "DashboardAgent" not in command:
        return "Ray workers"  # ray::IDLE, ray::ingest_batch, ...: worker processes
    if "storescu" in command or "cluster.cli" in command:
        return "sender"
    return "Ray services"  # raylet, GCS, dashboard, log monitor, agents


def strata_ingest(address: str, token: str, folder: Path) -> float:
    """Send every file of ``folder`` with the ``strata ingest`` CLI; seconds."""
    environment = {**os.environ, "STRATA_TOKEN": token}
    command = [sys.executable, "-m", "cluster.cli", "ingest", str(folder), "--server", address]
    started = time.perf_counter()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(
            f"strata ingest failed: {finished.stdout[-2000:]}{finished.stderr[-2000:]}"
        )
    return seconds


def essential_work(files: list[Path]) -> dict[str, float]:
    """CPU ms per instance of the work no design can skip, in this process, by step; and
    the compression ratio (file bytes / codestream and header bytes)."""
    steps: Counter[str] = Counter()
    bytes_in = bytes_kept = 0
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    for path in files:
        data = path.read_bytes()
        clock = time.process_time()
        split = split_file(data)
        steps["split"] += time.process_time() - clock
        layout = split.layout
        assert layout is not None
        pixels = memoryview(sample_bytes(data, split))
        clock = time.process_time()
        encoded = encode_verified(pixels, layout, HTJ2K_LOSSLESS)
        steps["encode + verify-decode"] += time.process_time() - clock
        clock = time.process_time()
        hashlib.sha256(data).digest()
        steps["SHA-256"] += time.process_time() - clock
        kept = [data[: split.pixel_start], *encoded.frames, data[split.pixel_end :]]
        clock = time.process_time()
        for part in kept:
            aead.encrypt(b"\0" * 12, bytes(part), None)
        steps["AES-GCM"] += time.process_time() - clock
        bytes_in += len(data)
        bytes_kept += sum(len(part) for part in kept)
    out = {step: 1000 * seconds / len(files) for step, seconds in steps.items()}
    out["ratio"] = bytes_in / bytes_kept
    return out


def _drive_bytes(drives: Path, bucket: str) -> int:
    """Bytes the tier bucket holds on every MinIO drive: data and parity shards."""
    return sum(
        path.stat().st_size
        for drive in drives.glob("drive*")
        for path in (drive / bucket).rglob("*")
        if path.is_file()
    )


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
        with console.status(f"Strata: storescu × {args.associations}, then strata ingest…"):
            results += asyncio.run(
                against_strata(files, work / "samples", work / "strata", args.associations)
            )
        with console.status("the essential work, in this process…"):
            essential = essential_work(files)
    report(results, essential, args, mb_sent)


def report(
    results: list[Result], essential: dict[str, float], args: argparse.Namespace, mb_sent: float
) -> None:
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
    plain, j2k, *strata = results
    ratios = Table(title="each Strata door against each Orthanc setup (× = Strata / Orthanc, MB/s)")
    for column in (
        "Strata door",
        "× Orthanc as received (goal 1.5)",
        "× Orthanc JPEG 2000 (goal 3)",
    ):
        ratios.add_column(column)
    for door in strata:
        ratios.add_row(
            door.name,
            f"{door.mb_per_second / plain.mb_per_second:.2f}",
            f"{door.mb_per_second / j2k.mb_per_second:.2f}",
        )
    console.print(ratios)

    work = sum(value for step, value in essential.items() if step != "ratio")
    cpu = Table(title="where Strata's CPU goes: ms per instance (goal: total ≤ 2.5 × essential)")
    cpu.add_column("process group")
    for door in strata:
        cpu.add_column(door.name, justify="right")
    for group in GROUPS:
        cpu.add_row(group, *(f"{door.cpu_ms.get(group, 0.0):.1f}" for door in strata))
    totals = [sum(door.cpu_ms.values()) for door in strata]
    cpu.add_row("total", *(f"{total:.1f}" for total in totals))
    cpu.add_row("total / essential", *(f"{total / work:.2f}" for total in totals))
    cpu.add_row("front end peak RSS MB", *(f"{door.peak_rss_mb:.0f}" for door in strata))
    console.print(cpu)
    needed = Table(title="the essential work, in one process on the same files: ms per instance")
    needed.add_column("step")
    needed.add_column("ms", justify="right")
    for step, value in essential.items():
        if step != "ratio":
            needed.add_row(step, f"{value:.2f}")
    needed.add_row("total", f"{work:.2f}")
    console.print(needed)
    console.print(
        f"compression ratio (file bytes / codestreams and headers): {essential['ratio']:.3f}. "
        "Stored MB: Strata's counts MinIO's erasure-coding parity (EC:2 over 4 drives: any "
        "two drives may be lost), Orthanc's is one copy on one disk; Strata also encrypts "
        "each instance and proves each recompression lossless before answering. The front "
        f"end's byte budget is {config_module.load().max_inflight_bytes / 1e6:.0f} MB."
    )


if __name__ == "__main__":
    main()

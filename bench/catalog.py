"""Catalog costs as the archive grows: does anything cost what the archive holds?

    .venv/bin/python bench/catalog.py [--rows 100000] [--group 64] [--seed 1]

Drives the real ``CatalogWriter`` (in this process, over a real 4-drive MinIO) through
group commits of ``--group`` synthetic instance rows (about 30 instances per study, a
few studies per patient, five modalities), up to ``--rows``. At each size from 10³ by
powers of ten it prints, measured in the same run:

- the median group-commit latency of the last commits (and its ratio to that at 10³);
- the median of 200 duplicate checks (by SHA-256) and 200 retrieval lookups (by SOP
  Instance UID), and their ratio to those at 10³;
- a study search by patient pseudonym and study date range (``find_studies``);
- ``SELECT modality, count(*) FROM instances GROUP BY 1`` through ``strata query``'s path;
- a writer restart (index kept: open and catch up) and a rebuild (index lost);
- the catalog's bytes in MinIO against the bytes of its live files;
- the process's peak memory so far.

What the issue asks for beyond this first cut (10⁷ and 10⁸ rows on synthetic tables) is
not here yet; see README, "Limits known today".
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltalake import DeltaTable
from rich.console import Console
from rich.table import Table

from cluster import catalog
from cluster.catalog.maintenance import MaintenancePolicy
from cluster.minio_server import MinioServer, ensure_minio_binary
from workers import store
from workers.records import HTJ2K_LOSSLESS, InstanceRecord, Stored, StoreSettings

console = Console(width=180)
BUCKET = "bench-catalog"
MODALITIES = ("CT", "MR", "CR", "US", "DX")


@dataclass
class Row:
    rows: int
    commit_ms: float
    sha_ms: float
    sop_ms: float
    search_ms: float
    group_by_ms: float
    restart_s: float
    rebuild_s: float
    bytes_on_disk: int
    bytes_live: int
    peak_mib: float


def synthetic(n: int, rng: random.Random, start: datetime) -> InstanceRecord:
    """Instance ``n`` of a synthetic archive: 30 per study, 3 studies per patient."""
    study = n // 30
    patient = study // 3
    sop = f"1.2.826.0.1.3680043.9.7.{study}.{n}"
    return InstanceRecord(
        sop_instance_uid=sop,
        series_instance_uid=f"1.2.826.0.1.3680043.9.7.{study}.s{n % 3}",
        study_instance_uid=f"1.2.826.0.1.3680043.9.7.{study}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality=MODALITIES[study % len(MODALITIES)],
        body_part="CHEST",
        study_date=date(2015, 1, 1) + timedelta(days=study % 3650),
        patient_pseudonym=f"pp-{patient:012d}",
        accession_pseudonym=f"ap-{study:012d}",
        transfer_syntax_in="1.2.840.10008.1.2.1",
        transfer_syntax_stored=HTJ2K_LOSSLESS,
        storage_action="transcoded",
        storage_note="pixel data re-encoded losslessly; verified bit for bit",
        frames=1,
        rows=512,
        columns=512,
        bits_allocated=16,
        bits_stored=12,
        samples_per_pixel=1,
        photometric_interpretation="MONOCHROME2",
        bytes_in=525_000 + rng.randrange(1000),
        bytes_stored=180_000 + rng.randrange(1000),
        sha256=hashlib.sha256(sop.encode()).hexdigest(),
        object_key=f"v1/{n}",
        tier="hot",
        key_id="kek-1",
        ingest_time=start + timedelta(milliseconds=n),
    )


async def lookups_ms(
    writer: catalog.CatalogWriter, keys: list[InstanceRecord]
) -> tuple[float, float]:
    """Median ms of a duplicate check (by SHA-256) and a retrieval lookup (by SOP UID)."""
    by_sha, by_sop = [], []
    for record in keys:
        started = time.perf_counter()
        await writer.lookup_sha256(record.sha256)
        by_sha.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await writer.latest(record.sop_instance_uid)
        by_sop.append((time.perf_counter() - started) * 1000)
    return statistics.median(by_sha), statistics.median(by_sop)


def timed_ms(call: Callable[[], Any], times: int = 5) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def bytes_in_bucket(settings: StoreSettings) -> int:
    listed = store.client(settings).list_objects(BUCKET, recursive=True)
    return sum(item.size or 0 for item in listed)


def live_bytes(settings: StoreSettings) -> int:
    total = 0
    for name in (catalog.INSTANCES, catalog.STUDIES):
        table = DeltaTable(
            catalog.table_uri(BUCKET, name), storage_options=catalog.storage_options(settings)
        )
        sizes = table.get_add_actions(flatten=True).column("size_bytes").to_pylist()
        total += sum(sizes)
    return total


async def run(rows: int, group: int, seed: int, work: Path) -> list[Row]:
    ensure_minio_binary()
    minio = MinioServer(work / "minio", drives=4).start()
    try:
        settings = minio.settings
        index_path = work / "index.sqlite"
        policy = MaintenancePolicy(every_commits=200, retention_hours=0)

        def new_writer(path: Path) -> catalog.CatalogWriter:
            return catalog.CatalogWriter(
                settings,
                BUCKET,
                max_batch=group,
                max_wait_s=0.0,
                index_path=str(path),
                maintenance=policy,
            )

        writer = new_writer(index_path)
        await writer.ready()
        rng = random.Random(seed)
        start = datetime(2026, 1, 1, tzinfo=UTC)
        results: list[Row] = []
        written = 0
        checkpoint = 1000
        latencies: list[float] = []
        while written < rows:
            batch = [
                Stored(f"f{n}", synthetic(n, rng, start))
                for n in range(written, min(written + group, rows))
            ]
            started = time.perf_counter()
            await writer.commit(batch)
            latencies.append((time.perf_counter() - started) * 1000)
            written += len(batch)
            if written < checkpoint and written < rows:
                continue
            await writer.close()  # lets a maintenance pass in flight finish
            keys = [synthetic(rng.randrange(written), rng, start) for _ in range(200)]
            sha_ms, sop_ms = await lookups_ms(writer, keys)
            patient = f"pp-{rng.randrange(max(1, written // 90)):012d}"
            search_ms = timed_ms(
                lambda patient=patient: catalog.find_studies(
                    settings,
                    bucket=BUCKET,
                    patient_pseudonym=patient,
                    date_from=date(2015, 1, 1),
                    date_to=date(2030, 1, 1),
                )
            )

            def group_by() -> None:
                connection = catalog.connect(settings, BUCKET, tables=(catalog.INSTANCES,))
                connection.execute("SELECT modality, count(*) FROM instances GROUP BY 1")
                connection.close()

            group_by_ms = timed_ms(group_by, 3)
            started = time.perf_counter()
            writer = new_writer(index_path)  # a restart: the index is kept
            await writer.ready()
            restart_s = time.perf_counter() - started
            started = time.perf_counter()
            rebuilt = new_writer(work / f"rebuilt-{written}.sqlite")  # the index lost
            await rebuilt.ready()
            rebuild_s = time.perf_counter() - started
            recent = latencies[-max(1, 1000 // group) :]
            results.append(
                Row(
                    rows=written,
                    commit_ms=statistics.median(recent),
                    sha_ms=sha_ms,
                    sop_ms=sop_ms,
                    search_ms=search_ms,
                    group_by_ms=group_by_ms,
                    restart_s=restart_s,
                    rebuild_s=rebuild_s,
                    bytes_on_disk=bytes_in_bucket(settings),
                    bytes_live=live_bytes(settings),
                    peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                )
            )
            console.print(f"{written} rows done")
            checkpoint *= 10
        await writer.close()
        return results
    finally:
        minio.stop()


def report(results: list[Row]) -> None:
    first = results[0]
    table = Table(title="catalog costs by size (medians; ratios against the first size)")
    for column in (
        "rows",
        "commit ms",
        "×",
        "SHA-256 lookup ms",
        "×",
        "SOP lookup ms",
        "×",
        "study search ms",
        "GROUP BY ms",
        "restart s",
        "rebuild s",
        "disk / live",
        "peak MiB",
    ):
        table.add_column(column, justify="right")
    for row in results:
        table.add_row(
            f"{row.rows:,}",
            f"{row.commit_ms:.1f}",
            f"{row.commit_ms / first.commit_ms:.2f}",
            f"{row.sha_ms:.3f}",
            f"{row.sha_ms / first.sha_ms:.2f}",
            f"{row.sop_ms:.3f}",
            f"{row.sop_ms / first.sop_ms:.2f}",
            f"{row.search_ms:.0f}",
            f"{row.group_by_ms:.0f}",
            f"{row.restart_s:.2f}",
            f"{row.rebuild_s:.2f}",
            f"{row.bytes_on_disk / max(1, row.bytes_live):.2f}",
            f"{row.peak_mib:.0f}",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="strata-bench-catalog-") as work:
        results = asyncio.run(run(args.rows, args.group, args.seed, Path(work)))
    report(results)


if __name__ == "__main__":
    main()

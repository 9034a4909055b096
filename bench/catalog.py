"""Catalog costs as the archive grows: does anything cost what the archive holds?

    .venv/bin/python bench/catalog.py [--rows 1000000] [--synthetic 1000,10000000]

Two parts, over one real 4-drive MinIO started for the run; every figure is measured in
the same run and compared with the smallest size.

**The writer** (``--rows``): the real ``CatalogWriter`` (in this process) is filled
through group commits of ``--fill-group`` synthetic instance rows (about 30 instances
per study, three studies per patient, five modalities; UIDs, pseudonyms and object keys
as long as real ones), with its background flushes, folds and maintenance passes running
as in production. At each size from 10³ by powers of ten it measures:

- the median latency of group commits of ``--group`` rows (the front end's size), with no
  flush or pass running meanwhile, and the cost of a flush per 10⁴ rows;
- the median of 200 duplicate checks (by SHA-256) and 200 retrieval lookups (latest
  version of a SOP Instance UID, with where it lives), through the writer;
- two study searches of the kind C-FIND and QIDO make, through the writer's index
  (patient pseudonym and study date range; study date range and modality);
- ``SELECT modality, count(*) FROM instances GROUP BY 1`` through ``strata query``'s
  DuckDB path over the Delta table;
- a restart to serving (a new process opens the writer with its index kept and answers
  a lookup) and a rebuild (a new process with the index lost), each with its peak RSS;
- the catalog's bytes in MinIO against the bytes of the files its tables' current
  versions hold, after a maintenance pass (time-travel window ``--retention-hours``, the
  production week unless given).

**Synthetic tables** (``--synthetic``): for each size, an ``instances`` table written
directly (10 instances per study, so 10⁷ rows hold 10⁶ studies), then the same reads:
index rebuild and restart (new processes, with peak RSS), lookups, study searches and
the GROUP BY.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import ray
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError
from rich.console import Console
from rich.table import Table

from cluster import catalog
from cluster.catalog.maintenance import MaintenancePolicy
from cluster.ops.minio import MinioServer, ensure_minio_binary
from cluster.ops.ray_runtime import init_local_ray
from workers.objects import store
from workers.records import HTJ2K_LOSSLESS, InstanceRecord, Stored, StoreSettings

console = Console(width=200)
MODALITIES = ("CT", "MR", "CR", "US", "DX")
# A root as long as real ones, so that UIDs are too (about 50 characters).
ROOT = "1.2.826.0.1.3680043.10.543.20261202"
START = datetime(2026, 1, 1, tzinfo=UTC)
DAY0 = date(2015, 1, 1)


@dataclass
class Row:
    part: str
    rows: int
    commit_ms: float | None
    flush_ms: float | None  # per 10⁴ rows flushed
    pass_s: float | None
    sha_ms: float
    sop_ms: float
    patient_search_ms: float
    modality_search_ms: float
    group_by_ms: float
    restart_s: float
    restart_mib: float
    rebuild_s: float
    rebuild_mib: float
    disk_over_live: float | None
    live_mib: float
    index_bytes_per_row: float


# -- synthetic rows ---------------------------------------------------------------------


def pseudonym(kind: str, value: int) -> str:
    """A pseudonym as ingest makes them (32 hex digits of a keyed HMAC)."""
    return hashlib.sha256(f"{kind}{value}".encode()).hexdigest()[:32]


def synthetic(n: int, per_study: int = 30) -> InstanceRecord:
    """Instance ``n`` of a synthetic archive: ``per_study`` per study, 3 studies per patient,
    with UIDs, pseudonyms and object keys of real lengths."""
    study = n // per_study
    sop = f"{ROOT}.{study}.{n}"
    sha = hashlib.sha256(sop.encode()).hexdigest()
    return InstanceRecord(
        sop_instance_uid=sop,
        series_instance_uid=f"{ROOT}.{study}.s{n % 3}",
        study_instance_uid=f"{ROOT}.{study}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality=MODALITIES[study % len(MODALITIES)],
        body_part="CHEST",
        study_date=DAY0 + timedelta(days=study % 3650),
        patient_pseudonym=pseudonym("patient", study // 3),
        accession_pseudonym=pseudonym("accession", study),
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
        bytes_in=525_000 + n % 1000,
        bytes_stored=180_000 + n % 997,
        sha256=sha,
        object_key=synthetic_pack(f"{ROOT}.{study}"),
        tier="hot",
        key_id="kek-1",
        ingest_time=START + timedelta(milliseconds=250 * n),
        byte_offset=synthetic_offset(n, per_study),
        byte_length=180_000 + n % 997,
    )


def synthetic_pack(study_instance_uid: str) -> str:
    """One pack per study, named as ingest names packs (16 bytes, here derived)."""
    suffix = hashlib.sha256(study_instance_uid.encode()).hexdigest()[:32]
    return store.study_prefix(study_instance_uid) + suffix


def synthetic_offset(n: Any, per_study: int) -> Any:
    """Where row ``n`` (an int or an array) lies in its study's pack."""
    return 4096 + (n % per_study) * 200_000


def synthetic_columns(first: int, count: int, per_study: int) -> pa.Table:
    """Rows ``first`` to ``first + count`` of ``synthetic`` as one Arrow table, built by
    column (the same values as ``synthetic(n, per_study)``)."""
    n = np.arange(first, first + count, dtype=np.int64)
    study = n // per_study
    studies = study.tolist()
    sops = [f"{ROOT}.{s}.{i}" for s, i in zip(studies, n.tolist(), strict=True)]
    shas = [hashlib.sha256(s.encode()).hexdigest() for s in sops]
    # Per study, then spread over its rows.
    first = int(study[0]) if count else 0
    distinct = range(first, int(study[-1]) + 1 if count else first)
    study_uids = np.array([f"{ROOT}.{s}" for s in distinct], dtype=object)[study - first]
    patients = np.array([pseudonym("patient", s // 3) for s in distinct], dtype=object)
    accessions = np.array([pseudonym("accession", s) for s in distinct], dtype=object)
    times = np.datetime64(START.replace(tzinfo=None), "us") + (n * 250_000).astype(
        "timedelta64[us]"
    )
    strings = {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "body_part": "CHEST",
        "transfer_syntax_in": "1.2.840.10008.1.2.1",
        "transfer_syntax_stored": HTJ2K_LOSSLESS,
        "storage_action": "transcoded",
        "storage_note": "pixel data re-encoded losslessly; verified bit for bit",
        "photometric_interpretation": "MONOCHROME2",
        "tier": "hot",
        "key_id": "kek-1",
        "source": "grpc",
        "manufacturer": "SYNTHETIC",
        "model": "BENCH-1",
    }
    ints = {"frames": 1, "rows": 512, "columns": 512, "bits_allocated": 16}
    ints |= {"bits_stored": 12, "samples_per_pixel": 1, "version": 1}
    columns: dict[str, Any] = {
        "sop_instance_uid": sops,
        "series_instance_uid": [
            f"{ROOT}.{s}.s{i % 3}" for s, i in zip(studies, n.tolist(), strict=True)
        ],
        "study_instance_uid": study_uids.tolist(),
        "modality": np.array(MODALITIES)[study % len(MODALITIES)],
        "study_date": np.datetime64(DAY0, "D") + (study % 3650).astype("timedelta64[D]"),
        "patient_pseudonym": patients[study - first].tolist(),
        "accession_pseudonym": accessions[study - first].tolist(),
        "bytes_in": 525_000 + n % 1000,
        "bytes_stored": 180_000 + n % 997,
        "sha256": shas,
        "object_key": [synthetic_pack(uid) for uid in study_uids.tolist()],
        "byte_offset": synthetic_offset(n, per_study),
        "byte_length": 180_000 + n % 997,
        "ingest_time": times,
        "ingest_date": times.astype("datetime64[D]"),
    }
    arrays = []
    for field in catalog.INSTANCES_SCHEMA:
        if field.name in strings:
            value: Any = pa.array([strings[field.name]] * count, pa.string())
        elif field.name in ints:
            value = pa.array(np.full(count, ints[field.name]), field.type)
        elif field.name == "ingest_time":
            value = pa.array(columns[field.name], pa.timestamp("us")).cast(field.type)
        else:
            value = pa.array(columns[field.name]).cast(field.type)
        arrays.append(value)
    return pa.Table.from_arrays(arrays, schema=catalog.INSTANCES_SCHEMA)


# -- measuring --------------------------------------------------------------------------


async def median_ms(call: Callable[[], Awaitable[Any]], times: int) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def reads(
    writer: catalog.CatalogWriter,
    settings: StoreSettings,
    bucket: str,
    rows: int,
    per_study: int,
    rng: random.Random,
) -> dict[str, float]:
    """Lookups, searches and the GROUP BY, as medians in ms."""
    # Different rows for each kind of lookup: none finds pages the other left in the cache.
    sha = iter([synthetic(rng.randrange(rows), per_study) for _ in range(200)])
    keys = [synthetic(rng.randrange(rows), per_study) for _ in range(200)]
    sop = iter(keys)
    found = {
        "sha_ms": await median_ms(lambda: writer.lookup_sha256(next(sha).sha256), 200),
        "sop_ms": await median_ms(lambda: writer.latest(next(sop).sop_instance_uid), 200),
    }
    for record in keys[:3]:
        assert await writer.lookup_sha256(record.sha256) is not None, "a lookup missed a row"
    patients = max(1, rows // per_study // 3)

    def by_patient() -> catalog.StudyFilters:
        return catalog.StudyFilters(
            patient_pseudonym=pseudonym("patient", rng.randrange(patients)),
            date_from=DAY0,
            date_to=DAY0 + timedelta(days=3650),
        )

    def by_modality() -> catalog.StudyFilters:
        day = DAY0 + timedelta(days=rng.randrange(3650))
        return catalog.StudyFilters(
            modality=rng.choice(MODALITIES), date_from=day, date_to=day + timedelta(days=7)
        )

    found["patient_search_ms"] = await median_ms(lambda: writer.find_studies(by_patient(), 100), 50)
    found["modality_search_ms"] = await median_ms(
        lambda: writer.find_studies(by_modality(), 100), 50
    )

    async def group_by() -> None:
        def run() -> None:
            connection = catalog.connect(settings, bucket, tables=(catalog.INSTANCES,))
            sql = "SELECT modality, count(*) FROM instances GROUP BY 1"
            counts = dict(connection.execute(sql).fetchall())
            connection.close()
            assert sum(counts.values()) == rows, (counts, rows)

        await asyncio.to_thread(run)

    found["group_by_ms"] = await median_ms(group_by, 3)
    return found


def child(settings: StoreSettings, bucket: str, index: Path, sha: str) -> dict:
    """Open a writer in a new process (a restart, or a rebuild when ``index`` is absent)
    until it answers a lookup; its seconds and peak RSS."""
    config = json.dumps(
        {"settings": settings.__dict__, "bucket": bucket, "index": str(index), "sha": sha}
    )
    output = subprocess.run(
        [sys.executable, __file__, "--child", config],
        check=True,
        stdout=subprocess.PIPE,  # stderr passes through: the rebuild's phases show
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


async def child_main(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="  child: %(message)s")
    started = time.perf_counter()
    writer = catalog.CatalogWriter(
        StoreSettings(**config["settings"]), config["bucket"], index_path=config["index"]
    )
    found = await writer.lookup_sha256(config["sha"])
    seconds = time.perf_counter() - started
    assert found is not None, "the reopened writer does not know a catalogued row"
    fold_started = time.perf_counter()
    await writer.close()  # folds what a rebuild found unwritten
    print(
        json.dumps(
            {
                "seconds": seconds,
                "fold_s": time.perf_counter() - fold_started,
                "peak_mib": peak_rss_mib(),
            }
        )
    )


def ray_lookups(settings: StoreSettings, bucket: str, index: Path, rows: int) -> dict[str, float]:
    """Median ms of 200 lookups by SHA-256 and 200 by SOP Instance UID as the doors make
    them: calls to the writer as a Ray actor (local Ray, started once for the run)."""
    if not ray.is_initialized():
        init_local_ray(address=None, num_cpus=1, namespace=None)
    actor = (
        ray.remote(catalog.CatalogWriter)
        .options(num_cpus=0)
        .remote(settings, bucket, index_path=str(index))
    )
    ray.get(actor.stats.remote())  # opened
    rng = random.Random(3)
    found = {}
    for kind in ("sha", "sop"):
        samples = []
        for _ in range(200):
            record = synthetic(rng.randrange(rows), 10)
            started = time.perf_counter()
            call = (
                actor.lookup_sha256.remote(record.sha256)
                if kind == "sha"
                else actor.latest.remote(record.sop_instance_uid)
            )
            assert ray.get(call) is not None, "a lookup missed a row"
            samples.append((time.perf_counter() - started) * 1000)
        found[kind] = statistics.median(samples)
    ray.kill(actor)
    return found


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss``, not inherited
    from the parent across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def index_bytes(path: Path) -> int:
    """The index file with its write-ahead log."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def bucket_bytes(settings: StoreSettings, bucket: str) -> int:
    listed = store.client(settings).list_objects(bucket, recursive=True)
    return sum(item.size or 0 for item in listed)


def live_bytes(settings: StoreSettings, bucket: str) -> int:
    total = 0
    for name in catalog.TABLES:
        table = DeltaTable(
            catalog.table_uri(bucket, name), storage_options=catalog.storage_options(settings)
        )
        total += sum(table.get_add_actions(flatten=True).column("size_bytes").to_pylist())
    return total


async def restart_and_rebuild(
    settings: StoreSettings, bucket: str, work: Path, index: Path, sha: str
) -> dict[str, float]:
    restart = await asyncio.to_thread(child, settings, bucket, index, sha)
    lost = work / "lost" / "index.sqlite"
    shutil.rmtree(lost.parent, ignore_errors=True)
    rebuild = await asyncio.to_thread(child, settings, bucket, lost, sha)
    shutil.rmtree(lost.parent, ignore_errors=True)
    return {
        "restart_s": restart["seconds"],
        "restart_mib": restart["peak_mib"],
        "rebuild_s": rebuild["seconds"],
        "rebuild_mib": rebuild["peak_mib"],
    }


# -- the two parts ----------------------------------------------------------------------


async def writer_part(
    settings: StoreSettings, rows: int, fill: int, group: int, retention: int, work: Path
) -> list[Row]:
    bucket = "bench-writer"
    index = work / "writer" / "index.sqlite"
    policy = MaintenancePolicy(retention_hours=retention)
    writer = catalog.CatalogWriter(
        settings,
        bucket,
        max_batch=max(fill, group),
        max_wait_s=0.0,
        index_path=str(index),
        maintenance=policy,
    )
    await writer.ready()
    rng = random.Random(1)
    results: list[Row] = []
    written = 0
    size = 1000
    while size <= rows:
        measured = min(20, size // group)
        while written < size - measured * group:
            count = min(fill, size - measured * group - written)
            await writer.commit(
                [Stored(f"f{n}", synthetic(n)) for n in range(written, written + count)]
            )
            written += count
        # The group commits measured are the commit path's cost; the background work
        # (a flush every 10⁵ rows, a pass every 12 flushes) is measured on its own
        # (``flush ms``, ``pass s``) and not left to compete with them for this machine's
        # two cores.
        await writer.wait_idle()
        before = (await writer.stats())["flushed_rows"]
        started = time.perf_counter()
        await writer.flush_now(raise_errors=True, maintain=False)
        flushed = (await writer.stats())["flushed_rows"] - before
        flush_ms = (time.perf_counter() - started) * 1000 * 10_000 / max(flushed, 1)
        latencies = []
        for _ in range(measured):
            batch = [Stored(f"f{n}", synthetic(n)) for n in range(written, written + group)]
            started = time.perf_counter()
            await writer.commit(batch)
            latencies.append((time.perf_counter() - started) * 1000)
            written += group
        found = await reads(writer, settings, bucket, written, 30, rng)
        maintained = await writer.maintain_now()
        await writer.close()
        live = live_bytes(settings, bucket)
        disk = bucket_bytes(settings, bucket)
        timings = await restart_and_rebuild(
            settings, bucket, work, index, synthetic(written - 1).sha256
        )
        results.append(
            Row(
                part="writer",
                rows=written,
                commit_ms=statistics.median(latencies),
                flush_ms=flush_ms if flushed >= 1000 else None,
                pass_s=maintained.seconds,
                disk_over_live=disk / live,
                live_mib=live / 2**20,
                index_bytes_per_row=index_bytes(index) / written,
                **found,
                **timings,
            )
        )
        console.print(f"writer: {written:,} rows measured")
        size *= 10
    await writer.close()
    return results


def rows_held(uri: str, options: dict[str, str]) -> int:
    """Rows a synthetic table already holds (0 when it has none): a kept run's tables."""
    try:
        actions = DeltaTable(uri, storage_options=options).get_add_actions(flatten=True)
    except (TableNotFoundError, OSError):  # no table, or no bucket yet
        return 0
    return sum(int(count) for count in pa.table(actions).column("num_records").to_pylist())


async def synthetic_part(settings: StoreSettings, sizes: list[int], work: Path) -> list[Row]:
    results = []
    for size in sizes:
        bucket = f"bench-synthetic-{size}"
        uri = catalog.table_uri(bucket, catalog.INSTANCES)
        options = catalog.storage_options(settings)
        index = work / bucket / "index.sqlite"
        if rows_held(uri, options) == size:
            # A kept run's table (--keep): measured again, its index rebuilt from nothing.
            for stale in index.parent.glob("index.sqlite*"):
                stale.unlink()
            console.print(f"synthetic: {size:,} rows kept from an earlier run")
        else:
            catalog.create_tables(settings, bucket)
            started = time.perf_counter()
            for first in range(0, size, 1_000_000):
                table = synthetic_columns(first, min(1_000_000, size - first), 10)
                write_deltalake(uri, table, mode="append", storage_options=options)
            console.print(
                f"synthetic: {size:,} rows written in {time.perf_counter() - started:.0f} s"
            )
        sha = synthetic(size - 1, 10).sha256
        # The first open builds the index (and folds the studies): the rebuild.
        rebuild = await asyncio.to_thread(child, settings, bucket, index, sha)
        restart = await asyncio.to_thread(child, settings, bucket, index, sha)
        writer = catalog.CatalogWriter(settings, bucket, index_path=str(index))
        found = await reads(writer, settings, bucket, size, 10, random.Random(2))
        await writer.close()
        via_ray = await asyncio.to_thread(ray_lookups, settings, bucket, index, size)
        console.print(
            f"synthetic: {size:,} rows: lookups as the doors make them (a call to the writer "
            f"as a Ray actor): SHA-256 {via_ray['sha']:.3f} ms, SOP {via_ray['sop']:.3f} ms"
        )
        results.append(
            Row(
                part="synthetic",
                rows=size,
                commit_ms=None,
                flush_ms=None,
                pass_s=None,
                disk_over_live=None,
                live_mib=live_bytes(settings, bucket) / 2**20,
                index_bytes_per_row=index_bytes(index) / size,
                restart_s=restart["seconds"],
                restart_mib=restart["peak_mib"],
                rebuild_s=rebuild["seconds"],
                rebuild_mib=rebuild["peak_mib"],
                **found,
            )
        )
        console.print(
            f"synthetic: {size:,} rows measured (studies folded in {rebuild['fold_s']:.0f} s)"
        )
    return results


def report(results: list[Row]) -> None:
    table = Table(title="catalog costs by size (medians; × against the smallest size of the part)")
    columns = (
        "part", "rows", "commit ms", "×", "flush ms/10⁴", "pass s",
        "SHA lookup ms", "×", "SOP lookup ms", "×",
        "patient search ms", "modality search ms", "GROUP BY ms", "restart s", "MiB",
        "rebuild s", "MiB", "disk/live", "live MiB", "index B/row",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    first: dict[str, Row] = {}
    for row in results:
        base = first.setdefault(row.part, row)
        table.add_row(
            row.part,
            f"{row.rows:,}",
            f"{row.commit_ms:.1f}" if row.commit_ms is not None else "",
            f"{row.commit_ms / base.commit_ms:.2f}" if row.commit_ms and base.commit_ms else "",
            f"{row.flush_ms:.0f}" if row.flush_ms is not None else "",
            f"{row.pass_s:.1f}" if row.pass_s is not None else "",
            f"{row.sha_ms:.3f}",
            f"{row.sha_ms / base.sha_ms:.2f}",
            f"{row.sop_ms:.3f}",
            f"{row.sop_ms / base.sop_ms:.2f}",
            f"{row.patient_search_ms:.2f}",
            f"{row.modality_search_ms:.2f}",
            f"{row.group_by_ms:.0f}",
            f"{row.restart_s:.2f}",
            f"{row.restart_mib:.0f}",
            f"{row.rebuild_s:.1f}",
            f"{row.rebuild_mib:.0f}",
            f"{row.disk_over_live:.2f}" if row.disk_over_live is not None else "",
            f"{row.live_mib:.1f}",
            f"{row.index_bytes_per_row:.0f}",
        )
    console.print(table)


async def run(args: argparse.Namespace, work: Path) -> list[Row]:
    ensure_minio_binary()
    minio = MinioServer(work / "minio", drives=4, parity=args.parity).start()
    try:
        results: list[Row] = []
        if args.rows:
            results += await writer_part(
                minio.settings, args.rows, args.fill_group, args.group, args.retention_hours, work
            )
        sizes = [int(size) for size in args.synthetic.split(",") if size]
        if sizes:
            results += await synthetic_part(minio.settings, sizes, work)
        return results
    finally:
        if ray.is_initialized():
            ray.shutdown()
        minio.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="writer part: up to (0: skip)")
    parser.add_argument("--fill-group", type=int, default=1024, help="rows per filling commit")
    parser.add_argument("--group", type=int, default=64, help="rows per measured commit")
    parser.add_argument(
        "--retention-hours", type=int, default=168, help="time-travel window (production: 168)"
    )
    parser.add_argument(
        "--synthetic", default="1000,100000", help="synthetic table sizes, comma-separated"
    )
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument(
        "--parity",
        type=int,
        default=2,
        help="MinIO's parity over its 4 drives (2, as deployed; 1 where a run at 10⁸ rows "
        "must fit a smaller disk: parity changes the drives' bytes, not the catalog's)",
    )
    parser.add_argument(
        "--keep",
        help="working directory kept after the run; synthetic tables already there are "
        "measured again rather than written (a 10⁸-row table takes 17 minutes to write)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child_main(json.loads(args.child)))
        return
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        report(asyncio.run(run(args, Path(args.keep))))
        return
    with tempfile.TemporaryDirectory(prefix="strata-bench-catalog-", dir=args.work) as work:
        results = asyncio.run(run(args, Path(work)))
    report(results)


if __name__ == "__main__":
    main()

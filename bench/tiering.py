"""How the tier plan's cost grows with the archive, and how fast apply moves studies.

    .venv/bin/python bench/tiering.py [--sizes 100000,1000000] [--per-study 10]
                                      [--changes 1000] [--apply-studies 24]

**Plan.** For each size, real Delta tables in a real 4-drive MinIO: ``studies`` (study
dates spread over ten years, growing 20 % a year; modalities mixed), ``instances``
(``--per-study`` rows per study, the project's schema), ``access`` (reads: most studies
read in their first weeks, a few later) and ``placements``. Every study is put in the tier
the policy gives it today, except ``--changes`` studies left behind in hot: so the plan
"as of today" changes exactly that many studies, whatever the archive's size, and the plan
"as of tomorrow" changes those and the studies whose day has come. Printed per size: each
plan's time, its peak memory (resident, sampled) and the studies it changes.
Goal (issue 10): a daily plan over 10⁷ studies under 5 s here, growing with the studies
that change, not with the archive.

**Apply.** An embedded node (real Ray, real MinIO) ingests ``--apply-studies`` studies of
8 MR-sized instances; then the whole plan (every study hot → cold, REDUCED_REDUNDANCY) is
carried out by ``apply_tiering`` and timed: studies and MB per second.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
from deltalake import write_deltalake
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog import ROOT, synthetic_columns
from full_scan_states import study_states

from cluster import catalog
from cluster import config as config_module
from cluster.catalog import index as index_module
from cluster.catalog import schema
from cluster.client import StrataClient
from cluster.dev.samples import SeriesPlan, generate
from cluster.ops.minio import MinioServer, ensure_minio_binary
from cluster.ops.node import Stack
from cluster.tiering import due, engine
from cluster.tiering.engine import StudyState
from cluster.tiering.policy import parse_policy

console = Console(width=160)
MODALITIES = ("CT", "MR", "CR", "US", "DX")
NOW = datetime.now(UTC)  # the plans below run as of now: due moments are real ones
POLICY = parse_policy(
    {
        "tiers": {
            "hot": {"price_per_gb_month": 0.023},
            "warm": {"price_per_gb_month": 0.0125},
            "cold": {"price_per_gb_month": 0.004, "storage_class": "REDUCED_REDUNDANCY"},
        },
        "rules": [
            {
                "name": "promote on read",
                "from": ["warm", "cold"],
                "to": "hot",
                "read_within_days": 7,
            },
            {"name": "warm after 90 days unread", "from": "hot", "to": "warm", "unread_days": 90},
            {
                "name": "cold after a year unread",
                "from": ["hot", "warm"],
                "to": "cold",
                "min_age_days": 365,
                "unread_days": 365,
            },
        ],
    }
)


def write_archive(
    settings: catalog.StoreSettings, bucket: str, studies: int, per: int, changes: int
) -> None:
    """The four tables for ``studies`` studies (see module)."""
    catalog.create_tables(settings, bucket)
    options = catalog.storage_options(settings)
    rng = np.random.default_rng(studies)
    # Ages: ten years of studies, each year 20 % more than the one before.
    weights = 1.2 ** np.arange(10)
    years = rng.choice(10, size=studies, p=weights / weights.sum())
    age_days = (9 - years) * 365 + rng.integers(0, 365, size=studies)
    # Numbered in the order they came in (oldest first), as an archive receives them: a
    # million instance rows written at once then fall in a few weeks of ingest_date
    # partitions, not in all 3,650 (tens of rows a file, hundreds of thousands of files).
    age_days = np.sort(age_days)[::-1]
    born = NOW - age_days.astype("timedelta64[D]").astype(timedelta)
    read = rng.random(studies) < 0.6  # 60 % read at least once: most soon after ingest
    read_after = np.where(
        rng.random(studies) < 0.9, rng.integers(0, 30, studies), rng.integers(30, 3650, studies)
    )
    read_at = [
        b + timedelta(days=int(a)) if r and b + timedelta(days=int(a)) < NOW else None
        for b, a, r in zip(born, read_after, read, strict=True)
    ]
    uids = [f"{ROOT}.{s}" for s in range(studies)]
    modality = np.array(MODALITIES)[np.arange(studies) % len(MODALITIES)]
    patients = [f"p{s // 3:016x}" for s in range(studies)]
    tiers = []
    left = set(rng.choice(studies, size=min(changes, studies), replace=False).tolist())
    for number in range(studies):
        state = StudyState(
            uids[number],
            patients[number],
            "hot",
            born[number].date(),
            born[number],
            read_at[number],
            born[number],
            (str(modality[number]),),
            ("CHEST",),
            per,
            per * 180_000,
        )
        tier = "hot"
        if number not in left:  # settled: where the policy puts it today
            for _ in range(2):  # hot → warm → cold, as the engine would over time
                decision = engine.decide(replace(state, tier=tier), POLICY, NOW)
                if decision is None or decision.action != "move":
                    break
                tier = decision.to
        tiers.append(tier)
    ingest = pa.array(born, pa.timestamp("us", tz="UTC"))
    studies_table = pa.table(
        {
            "study_instance_uid": uids,
            "patient_pseudonym": patients,
            "accession_pseudonym": [f"a{s:016x}" for s in range(studies)],
            "study_date": pa.array([b.date() for b in born], pa.date32()),
            "modalities": [[m] for m in modality.tolist()],
            "instance_count": np.full(studies, per),
            "series_count": np.full(studies, 3),
            "bytes_in": np.full(studies, per * 525_000),
            "bytes_stored": np.full(studies, per * 180_000),
            "tier": ["hot"] * studies,
            "first_ingest_time": ingest,
            "last_ingest_time": ingest,
            "ingest_date": pa.array([b.date() for b in born], pa.date32()),
        }
    ).cast(schema.STUDIES_SCHEMA)
    write_deltalake(
        catalog.table_uri(bucket, catalog.STUDIES),
        studies_table,
        mode="append",
        storage_options=options,
    )
    rows = studies * per
    born_us = np.array([int(b.timestamp() * 1e6) for b in born], dtype=np.int64)
    tier_of = np.array(tiers, dtype=object)
    # Written a million rows at a time, instances and the placements of their moved
    # studies alike: at 10⁸ instance rows, no column is ever whole in memory.
    for first in range(0, rows, 1_000_000):
        part = synthetic_columns(first, min(1_000_000, rows - first), per)
        owner = np.arange(first, first + part.num_rows) // per
        # Each instance dated and ingested as its study (its row of `studies`).
        moments = pa.array(born_us[owner] + (np.arange(part.num_rows) % per), pa.int64())
        moments = moments.cast(pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC"))
        days = moments.cast(pa.date32())
        for name, value in (("study_date", days), ("ingest_time", moments), ("ingest_date", days)):
            part = part.set_column(part.schema.get_field_index(name), name, value)
        write_deltalake(
            catalog.table_uri(bucket, catalog.INSTANCES),
            part,
            mode="append",
            storage_options=options,
        )
        moved = tier_of[owner] != "hot"
        if moved.any():
            write_deltalake(
                catalog.table_uri(bucket, catalog.PLACEMENTS),
                placements_of(part.filter(pa.array(moved)), tier_of[owner][moved], owner[moved]),
                mode="append",
                storage_options=options,
            )
    reads = [(uids[s], moment) for s, moment in enumerate(read_at) if moment is not None]
    access = pa.table(
        {
            "study_instance_uid": [uid for uid, _ in reads],
            "access_time": pa.array([m for _, m in reads], pa.timestamp("us", tz="UTC")),
            "access_date": pa.array([m.date() for _, m in reads], pa.date32()),
        }
    ).cast(schema.ACCESS_SCHEMA)
    write_deltalake(
        catalog.table_uri(bucket, catalog.ACCESS), access, mode="append", storage_options=options
    )


def placements_of(instances: pa.Table, tiers: np.ndarray, studies: np.ndarray) -> pa.Table:
    """The placement rows of these instance rows, each in its study's tier (as a move
    writes them)."""
    count = instances.num_rows
    placed = NOW - timedelta(days=1)
    return pa.table(
        {
            "sha256": instances.column("sha256"),
            "sop_instance_uid": instances.column("sop_instance_uid"),
            "version": pa.array(np.ones(count, dtype=np.int32)),
            "study_instance_uid": instances.column("study_instance_uid"),
            "tier": pa.array(tiers.tolist(), pa.string()),
            "bucket": pa.array([f"strata-{tier}" for tier in tiers.tolist()], pa.string()),
            "object_key": pa.array([f"v2/{study}" for study in studies.tolist()], pa.string()),
            "byte_offset": pa.array(np.zeros(count, dtype=np.int64)),
            "byte_length": pa.array(np.full(count, 180_000, dtype=np.int64)),
            "key_id": pa.array(["kek-1"] * count, pa.string()),
            "reason": pa.array(["tier move: bench"] * count, pa.string()),
            "placed_time": pa.array([placed] * count, pa.timestamp("us", tz="UTC")),
            "placed_date": pa.array([placed.date()] * count, pa.date32()),
            "transfer_syntax_stored": pa.nulls(count, pa.string()),
        }
    ).cast(schema.PLACEMENTS_SCHEMA)


class Peak:
    """Peak resident memory of this process above its level at the start, sampled."""

    def __enter__(self) -> Peak:
        self._me = psutil.Process()
        self.base = self._me.memory_info().rss
        self.top = self.base
        self._done = threading.Event()

        def sample() -> None:
            while not self._done.wait(0.02):
                self.top = max(self.top, self._me.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.mib = (self.top - self.base) / 2**20


def timed_plan(
    settings: catalog.StoreSettings, bucket: str, at: datetime
) -> tuple[float, float, int]:
    """Seconds, peak resident MiB above the start, and studies changed, of one plan."""
    with Peak() as peak:
        started = time.perf_counter()
        planned = engine.plan(study_states(settings, bucket), POLICY, at)
        seconds = time.perf_counter() - started
    return seconds, peak.mib, len(planned.decisions)


def index_plans(
    settings: catalog.StoreSettings, bucket: str, work: Path, changes: int, studies: int
) -> dict[str, float]:
    """The writer's index built from the tables (as after a lost index), then its plans:
    the first under the policy (every study looked at once), a day's reads of ``changes``
    studies, the daily plan (the due studies only), and the plan as of tomorrow."""
    options = catalog.storage_options(settings)
    tables = {name: schema.open_table(settings, bucket, name) for name in index_module.SOURCES}
    out: dict[str, float] = {}
    started = time.perf_counter()
    index = index_module.CatalogIndex.open(work / f"index-{bucket}.sqlite", tables, options)
    out["build_s"] = time.perf_counter() - started

    def plan(at: datetime | None = None) -> engine.Plan:
        for step in due.plan_steps(index, POLICY, at):
            if step is not None:
                return step
        raise AssertionError

    for name, at in (("first", None), ("daily", None), ("tomorrow", NOW + timedelta(days=1))):
        if name == "daily":  # the day's reads: studies read now become due
            rng = np.random.default_rng(7)
            read = [f"{ROOT}.{s}" for s in rng.choice(studies, size=changes, replace=False)]
            moment = datetime.now(UTC)
            rows = pa.table(
                {
                    "study_instance_uid": read,
                    "access_time": pa.array([moment] * len(read), pa.timestamp("us", tz="UTC")),
                    "access_date": pa.array([moment.date()] * len(read), pa.date32()),
                }
            ).cast(schema.ACCESS_SCHEMA)
            index.apply(catalog.ACCESS, index.last_seq() + 1, rows, b"")
        with Peak() as peak:
            began = time.perf_counter()
            planned = plan(at)
            out[f"{name}_s"] = time.perf_counter() - began
        out[f"{name}_mib"] = peak.mib
        out[f"{name}_considered"] = planned.considered
        out[f"{name}_decided"] = len(planned.decisions)
    index.close()
    return out


async def apply_run(
    work: Path, plan: tuple[tuple[SeriesPlan, ...], ...], codec: str = ""
) -> tuple[int, float, float, dict[str, list[int]]]:
    """A real node ingests ``plan``'s studies and its apply moves every one hot → cold
    (REDUCED_REDUNDANCY, with ``codec`` if given). Returns the studies moved, seconds, MB
    moved, and per modality the bytes stored before and after."""
    files = generate(work / "samples", plan)
    config = replace(
        config_module.load(), data_dir=work / "node", port=0, key_file=work / "keys" / "keys.json"
    )
    stack = Stack(config, embedded=True)
    await stack.start()
    try:
        with StrataClient(stack.address, stack.tokens.first) as client:
            outcomes = await asyncio.to_thread(lambda: list(client.ingest_files(files)))
        assert {o.status for o in outcomes} == {"stored"}
        before = await asyncio.to_thread(sizes_by_modality, stack)
        cold = {"storage_class": "REDUCED_REDUNDANCY", **({"codec": codec} if codec else {})}
        everything = parse_policy(
            {"rules": [{"name": "all cold", "from": "hot", "to": "cold"}], "tiers": {"cold": cold}}
        )
        started = time.perf_counter()
        last = None
        async for step in stack.apply_tiering(everything):
            last = step
        seconds = time.perf_counter() - started
        assert last is not None and last.studies_failed == 0, last
        after = await asyncio.to_thread(sizes_by_modality, stack)
        by_modality = {m: [before[m], after.get(m, 0)] for m in before}
        return last.studies_done, seconds, last.bytes_done / 1e6, by_modality
    finally:
        await stack.stop()


def sizes_by_modality(stack: Stack) -> dict[str, int]:
    """Bytes stored now (placements applied) by modality, from the node's catalog."""
    found: dict[str, int] = {}
    with StrataClient(stack.address, stack.tokens.first) as client:
        for instance in client.find_instances(limit=100_000):
            found[instance.modality] = found.get(instance.modality, 0) + instance.bytes_stored
    return found


# pydicom-data's real images, whole (not tiled): what a cold tier's own codec saves.
REAL_PLAN: tuple[tuple[SeriesPlan, ...], ...] = (
    (SeriesPlan("MR2_UNCI.dcm", "MR", 4),),
    (SeriesPlan("RG1_UNCI.dcm", "CR", 1), SeriesPlan("RG3_UNCI.dcm", "CR", 1)),
    (SeriesPlan("US1_UNCI.dcm", "US", 4),),
    (SeriesPlan("693_UNCI.dcm", "CT", 4),),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--apply-studies", type=int, default=24)
    parser.add_argument(
        "--full-scan", action="store_true", help="also time the whole-archive plan of before"
    )
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    ensure_minio_binary()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        server = MinioServer(work / "minio", drives=4).start()
        table = Table(title="the daily tier plan from the writer's index (only the due studies)")
        for column in (
            "studies",
            "instance rows",
            "write s",
            "index build s",
            "first pass s",
            "daily plan s",
            "MiB",
            "looked at",
            "changes",
            "tomorrow s",
            "looked at ",
            "full scan s (before)",
        ):
            table.add_column(column, justify="right")
        try:
            for size in sizes:
                bucket = f"bench-tiering-{size}"
                started = time.perf_counter()
                write_archive(server.settings, bucket, size, args.per_study, args.changes)
                written = time.perf_counter() - started
                got = index_plans(server.settings, bucket, work, args.changes, size)
                scan = timed_plan(server.settings, bucket, NOW) if args.full_scan else None
                table.add_row(
                    f"{size:,}",
                    f"{size * args.per_study:,}",
                    f"{written:.0f}",
                    f"{got['build_s']:.0f}",
                    f"{got['first_s']:.1f}",
                    f"{got['daily_s']:.3f}",
                    f"{got['daily_mib']:.0f}",
                    f"{got['daily_considered']:,.0f}",
                    f"{got['daily_decided']:,.0f}",
                    f"{got['tomorrow_s']:.3f}",
                    f"{got['tomorrow_considered']:,.0f}",
                    f"{scan[0]:.1f}" if scan else "",
                )
                console.print(table)
        finally:
            server.stop()
        first, last = sizes[0], sizes[-1]
        console.print(
            f"goal: a daily plan over 10⁷ studies under 5 s, growing with the "
            f"studies that change ({args.changes:,} a day here at every size), "
            f"not with the archive ({last // first}× from {first:,} to {last:,})"
        )
        if not args.apply_studies:
            return
        mr_sized = tuple(
            (SeriesPlan("MR2_UNCI.dcm", "MR", 8, tile=512),) for _ in range(args.apply_studies)
        )
        moved, seconds, mb, _ = asyncio.run(apply_run(work / "apply", mr_sized))
        console.print(
            f"apply on real MinIO: {moved} studies ({mb:.1f} MB stored) in "
            f"{seconds:.1f} s: {moved / seconds:.2f} studies/s, {mb / seconds:.1f} MB/s "
            "(copy, verify every instance by rebuilding it, commit, delete the source)"
        )
        codecs = Table(title="a cold tier's own codec: pydicom-data's images, moved from HTJ2K")
        for column in ("codec", "modality", "hot MB (HTJ2K)", "cold MB", "saved", "studies/s"):
            codecs.add_column(column, justify="right")
        for codec in ("jpegls", "jpeg2000"):
            moved, seconds, _, sizes = asyncio.run(apply_run(work / codec, REAL_PLAN, codec))
            for modality, (hot, cold) in sorted(sizes.items()):
                codecs.add_row(
                    codec,
                    modality,
                    f"{hot / 1e6:.2f}",
                    f"{cold / 1e6:.2f}",
                    f"{1 - cold / hot:.1%}",
                    f"{moved / seconds:.2f}",
                )
        console.print(codecs)


if __name__ == "__main__":
    main()

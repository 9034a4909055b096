"""How far one front end and one catalog writer go, and how many worker cores each feeds.

    .venv/bin/python bench/ceilings.py [--instances 320] [--writer-rows 20000]

On a real node (embedded MinIO with 4 drives, Ray, the gRPC door), in one run:

1. Ingests the CT-sized instances of ``bench/vs_orthanc.py`` with ``strata ingest`` and
   reads, per stored instance, the CPU the front end (this process: the door, the archive
   core, the dispatcher and its Ray driver) and the Ray workers spent.
2. Sends the same files again: every one is answered DUPLICATE by the front end alone
   (received, hashed, looked up, answered; no worker, no commit), the front end's own
   ceiling with the workers out of the way.
3. Drives the catalog writer directly, as the dispatcher does but from many callers at
   once (``--callers``, each committing batches of 8 synthetic rows in the project's
   schema back to back), so that the workers are not the limit: rows/s it commits, and
   its CPU per row.

Prints, for the front end and the catalog writer, the most instances per second one of
each can take on one core, and how many worker cores that keeps busy (instances/s × the
workers' CPU seconds per instance measured in step 1).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from catalog import synthetic
from rich.console import Console
from rich.table import Table
from vs_orthanc import SOURCES, measuring, strata_ingest

from cluster import config as config_module
from cluster.dev.samples import generate
from cluster.ops.node import Stack
from workers.records import Stored

console = Console()


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="strata-ceilings-") as scratch:
        work = Path(scratch)
        files = generate(work / "samples", ((SOURCES["mr-tiles"](args.instances),),))
        config = replace(
            config_module.load(),
            data_dir=work / "data",
            key_file=work / "keys" / "keys.json",
            port=0,
        )
        stack = Stack(config, embedded=True)
        await stack.start()
        try:
            before = stack.dispatch_stats()
            with measuring() as stored_run:
                stored_s = await asyncio.to_thread(
                    strata_ingest, stack.address, stack.tokens.first, work / "samples"
                )
            in_tasks_s = (
                stack.dispatch_stats().get("task_cpu_ms", 0) - before.get("task_cpu_ms", 0)
            ) / 1000
            with measuring() as duplicate_run:
                duplicate_s = await asyncio.to_thread(
                    strata_ingest, stack.address, stack.tokens.first, work / "samples"
                )
            writer = await commit_flat_out(stack, args.writer_rows, args.callers)
        finally:
            await stack.stop()

    count = len(files)
    front_ms = 1000 * stored_run.seconds.get("front end", 0.0) / count
    duplicate_ms = 1000 * duplicate_run.seconds.get("front end", 0.0) / count
    worker_ms = 1000 * stored_run.seconds.get("Ray workers", 0.0) / count
    table = Table(title=f"one front end and one catalog writer ({count} instances, this run)")
    for column in ("component", "CPU ms / instance", "instances/s on one core", "worker cores fed"):
        table.add_column(column, justify="right" if column != "component" else "left")
    rows = [
        ("front end, files stored", front_ms),
        ("front end, files answered DUPLICATE", duplicate_ms),
        ("catalog writer, committing flat out", writer["cpu_ms_per_row"]),
    ]
    for name, ms in rows:
        rate = 1000 / ms if ms else float("inf")
        table.add_row(name, f"{ms:.2f}", f"{rate:.0f}", f"{rate * worker_ms / 1000:.1f}")
    console.print(table)
    console.print(
        f"Ray workers: {worker_ms:.1f} ms of CPU per stored instance "
        f"({1000 * in_tasks_s / count:.1f} inside the tasks). Stored pass "
        f"{count / stored_s:.1f} instances/s, duplicate pass "
        f"{count / duplicate_s:.1f}/s (the whole node on this machine's 2 cores). The writer "
        f"committed {writer['rows']} rows from {args.callers} callers at "
        f"{writer['rows_per_s']:.0f} rows/s wall ({writer['commits']} group commits)."
    )


async def commit_flat_out(stack: Stack, rows: int, callers: int) -> dict[str, float]:
    """Commit ``rows`` synthetic rows from ``callers`` concurrent callers, 8 per call."""
    catalog = stack.catalog_writer  # the node's writer actor, as the dispatcher calls it
    writer_process = _writer_process()
    before = await stack.catalog_stats()
    cpu_before = _cpu(writer_process)
    per_caller = rows // callers

    async def caller(number: int) -> None:
        first = 10_000_000 + number * per_caller
        for start in range(first, first + per_caller, 8):
            batch = [Stored(f"c{n}", synthetic(n)) for n in range(start, start + 8)]
            await catalog.commit.remote(batch)

    started = time.perf_counter()
    await asyncio.gather(*(caller(number) for number in range(callers)))
    seconds = time.perf_counter() - started
    after = await stack.catalog_stats()
    written = after["rows_written"] - before["rows_written"]
    return {
        "rows": written,
        "rows_per_s": written / seconds,
        "cpu_ms_per_row": 1000 * (_cpu(writer_process) - cpu_before) / written,
        "commits": after["commits"] - before["commits"],
    }


def _writer_process() -> psutil.Process:
    for child in psutil.Process().children(recursive=True):
        try:
            if "CatalogWriter" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise RuntimeError("the catalog writer's process was not found")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=320)
    parser.add_argument("--writer-rows", type=int, default=20_000)
    parser.add_argument("--callers", type=int, default=32)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

"""What a pack saves: per-instance CPU and time of storing instances one object each
(object format 1) against one pack per study batch (format 2), on real erasure-coded MinIO.

    .venv/bin/python bench/packs.py [--instances 256] [--member-kib 180] [--drives 4]

Members are sealed with the real format (``seal_member``, random plaintext standing for
codestreams, which encryption makes random anyway) once, before timing. Then, for each
layout, every instance is written and the CPU seconds of this process (the writer: the S3
client, signing, HTTP) and of the MinIO process (erasure coding, hashing, the drives'
synchronous writes) are read before and after from the kernel, with the wall time:

- ``single``: one PUT per instance (what format 1 did);
- ``pack N``: instances in packs of N, each pack two PUTs (the pack, its keys object).

Then the read side: the median time of a ranged GET of one member (and of its keys object)
from a pack of the largest N, against a GET of a whole single object of the same size.
MinIO runs with its defaults (no fsync or parity turned off). Prints ms per instance and
the ratio of each layout to ``single``, all measured in this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from rich.console import Console
from rich.table import Table

from cluster.ops.minio import MinioServer
from workers.objects import store
from workers.objects.envelope import SealedMember, build_pack, keys_key_for, seal_member
from workers.objects.keys import create_key_file, load_key_file

console = Console()
BUCKET = "strata-hot"


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _members(count: int, size: int, key_file: Path) -> list[SealedMember]:
    keys = load_key_file(key_file)
    return [
        seal_member(
            [os.urandom(4096), os.urandom(size - 4096)],
            sha256=f"{n:064x}",
            sop_instance_uid=f"1.2.826.0.1.3680043.10.{n}",
            keys=keys,
        )
        for n in range(count)
    ]


def _write(
    server: MinioServer, members: list[SealedMember], per_pack: int, study: str
) -> dict[str, float]:
    """Write every member, ``per_pack`` to a pack (0: one object each); the seconds."""
    me, minio = psutil.Process(), psutil.Process(server.pid)
    settings = server.settings
    cpu_me, cpu_minio, started = _cpu(me), _cpu(minio), time.perf_counter()
    if per_pack == 0:
        for member in members:
            store.put(settings, BUCKET, store.pack_key_for(study), member.data)
    else:
        for first in range(0, len(members), per_pack):
            pack = build_pack(members[first : first + per_pack], members[0].key_id)
            key = store.pack_key_for(study)
            store.put(settings, BUCKET, key, pack.data)
            store.put(settings, BUCKET, keys_key_for(key), pack.keys)
    return {
        "wall": time.perf_counter() - started,
        "client": _cpu(me) - cpu_me,
        "minio": _cpu(minio) - cpu_minio,
    }


def _median_ms(call: object, times: int = 30) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=256)
    parser.add_argument("--member-kib", type=int, default=180)
    parser.add_argument("--drives", type=int, default=4)
    parser.add_argument("--packs", default="4,16,64")
    args = parser.parse_args()
    sizes = [int(n) for n in args.packs.split(",")]
    with tempfile.TemporaryDirectory(prefix="strata-packs-") as scratch:
        key_file = Path(scratch) / "keys.json"
        create_key_file(key_file)
        members = _members(args.instances, args.member_kib * 1024, key_file)
        with MinioServer(Path(scratch) / "minio", drives=args.drives) as server:
            store.ensure_bucket(server.settings, BUCKET)
            _write(server, members[:16], 0, "1.2.3.warm-up")
            results = {"single": _write(server, members, 0, "1.2.3.single")}
            for size in sizes:
                results[f"pack {size}"] = _write(server, members, size, f"1.2.3.pack{size}")

            largest = max(sizes)
            pack = build_pack(members[:largest], members[0].key_id)
            key = store.pack_key_for("1.2.3.read")
            store.put(server.settings, BUCKET, key, pack.data)
            store.put(server.settings, BUCKET, keys_key_for(key), pack.keys)
            single = store.pack_key_for("1.2.3.read-single")
            store.put(server.settings, BUCKET, single, members[0].data)
            middle = pack.members[largest // 2]
            settings = server.settings
            reads = {
                "GET whole single object": _median_ms(lambda: store.get(settings, BUCKET, single)),
                f"ranged GET of one member of a pack of {largest}": _median_ms(
                    lambda: store.get(settings, BUCKET, key, middle.offset, middle.length)
                ),
                "GET of the pack's keys object": _median_ms(
                    lambda: store.get(settings, BUCKET, keys_key_for(key))
                ),
            }

    count = args.instances
    table = Table(
        title=f"{count} instances of {args.member_kib} KiB, MinIO on {args.drives} drives "
        "(default parity)"
    )
    for column in ("layout", "wall ms/inst", "writer CPU ms/inst", "MinIO CPU ms/inst",
                   "total CPU ms/inst", "total CPU ×"):  # fmt: skip
        table.add_column(column, justify="right")
    base = (results["single"]["client"] + results["single"]["minio"]) / count
    for name, figures in results.items():
        total = (figures["client"] + figures["minio"]) / count
        table.add_row(
            name,
            f"{1000 * figures['wall'] / count:.2f}",
            f"{1000 * figures['client'] / count:.2f}",
            f"{1000 * figures['minio'] / count:.2f}",
            f"{1000 * total:.2f}",
            f"{total / base:.2f}",
        )
    console.print(table)
    reads_table = Table(title="reading one instance back (median of 30)")
    reads_table.add_column("read")
    reads_table.add_column("ms", justify="right")
    for name, ms in reads.items():
        reads_table.add_row(name, f"{ms:.2f}")
    console.print(reads_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

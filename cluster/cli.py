"""The ``strata`` command: serve, ingest, get, query, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections import Counter
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cluster import config as config_module
from cluster.config import CODECS, Config, ConfigError

console = Console(stderr=True)
# Retrieval-only targets (never chosen at ingest), beside the codecs of cluster.config.
OTHER_TARGETS = {
    "rle": "1.2.840.10008.1.2.5",
    "explicit": "1.2.840.10008.1.2.1",
    "deflated": "1.2.840.10008.1.2.1.99",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except ConfigError as error:
        console.print(f"[red]configuration error:[/red] {error}")
        return 2
    except grpc.RpcError as error:
        console.print(f"[red]server answered {error.code().name}:[/red] {error.details()}")
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC front end")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--embedded", action="store_true", help="also start local Ray and MinIO")
    serve.add_argument("--data-dir", type=Path, help="where embedded MinIO keeps its drives")
    serve.set_defaults(run=_serve)

    ingest = commands.add_parser("ingest", help="send files and folders (recursive)")
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    ingest.set_defaults(run=_ingest)

    get = commands.add_parser("get", help="retrieve one instance")
    get.add_argument("sop_instance_uid")
    get.add_argument("--out", type=Path, required=True, help="file to write")
    get.add_argument(
        "--syntax",
        default="original",
        choices=["original", "stored", *CODECS, *OTHER_TARGETS],
        help="original: the file as received, byte for byte; stored: the compressed form "
        f"Strata keeps; {', '.join(CODECS)}, rle: transcoded losslessly to that codec; "
        "explicit, deflated: uncompressed Explicit VR Little Endian, or deflated",
    )
    get.add_argument("--version", type=int, default=0, help="0 = latest")
    get.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    get.set_defaults(run=_get)

    query = commands.add_parser("query", help="SQL over the catalog (DuckDB)")
    query.add_argument("sql", help='e.g. "SELECT modality, count(*) FROM instances GROUP BY 1"')
    query.add_argument("--data-dir", type=Path, help="data dir of an embedded node")
    query.set_defaults(run=_query)

    demo = commands.add_parser("demo", help="ingest sample studies end to end and report")
    demo.add_argument("--work-dir", type=Path, help="keep the demo's files here")
    demo.set_defaults(run=_demo)
    return parser


def _load(args: argparse.Namespace, **overrides: object) -> Config:
    return config_module.load(args.config, **overrides)


def _serve(args: argparse.Namespace) -> int:
    from cluster.stack import Stack

    config = _load(args, host=args.host, port=args.port, data_dir=args.data_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def run() -> None:
        stack = Stack(config, embedded=args.embedded)
        await stack.start()
        console.print(f"strata serving on {stack.address}  (Ctrl-C to stop)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await stack.stop()

    asyncio.run(run())
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from cluster.client import StrataClient, expand_paths

    missing = [p for p in args.paths if not p.exists()]
    for path in missing:
        console.print(f"[red]no such file or folder:[/red] {path}")
    files = expand_paths(p for p in args.paths if p.exists())
    total = sum(path.stat().st_size for path in files)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    bytes_stored = 0
    with StrataClient(args.server) as client, _progress() as progress:
        sent = progress.add_task("sent", total=total)
        done = progress.add_task("answered", total=len(files))
        for outcome in client.ingest_files(files, on_sent=lambda n: progress.advance(sent, n)):
            counts[outcome.status] += 1
            bytes_stored += outcome.bytes_stored
            progress.advance(done)
            if outcome.status == "rejected":
                reasons[outcome.reason] += 1
                progress.console.print(
                    f"[yellow]rejected[/yellow] {outcome.source}: {outcome.reason}: "
                    f"{outcome.message}"
                )
    table = Table(title="ingest summary")
    for column in ("files", "stored", "duplicate", "rejected", "MB sent", "MB stored"):
        table.add_column(column, justify="right")
    table.add_row(
        str(len(files)),
        str(counts["stored"]),
        str(counts["duplicate"]),
        str(counts["rejected"]),
        f"{total / 1e6:.1f}",
        f"{bytes_stored / 1e6:.1f}",
    )
    Console().print(table)
    for reason, count in reasons.most_common():
        Console().print(f"  rejected {count} × {reason}")
    return 1 if counts["rejected"] or missing else 0


def _get(args: argparse.Namespace) -> int:
    from cluster.client import StrataClient

    targets = {**CODECS, **OTHER_TARGETS}
    with StrataClient(args.server) as client:
        retrieved = client.retrieve(
            args.sop_instance_uid,
            stored=args.syntax == "stored",
            version=args.version,
            transfer_syntax=targets.get(args.syntax, ""),
        )
    args.out.write_bytes(retrieved.data)
    console.print(
        f"wrote {args.out} ({len(retrieved.data)} bytes, transfer syntax "
        f"{retrieved.transfer_syntax}, sha256 {retrieved.sha256[:16]}…)"
    )
    return 0


def _query(args: argparse.Namespace) -> int:
    from cluster import catalog
    from cluster.stack import node_store_settings

    config = _load(args, data_dir=args.data_dir)
    settings = node_store_settings(config)
    connection = catalog.connect(settings, bucket=config.catalog_bucket)
    result = connection.execute(args.sql)
    columns = [d[0] for d in result.description]
    table = Table()
    for column in columns:
        table.add_column(column)
    for row in result.fetchall():
        table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cluster.demo import run_demo

    return run_demo(_load(args), work_dir=args.work_dir)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


if __name__ == "__main__":
    sys.exit(main())

"""The ``strata`` command: serve, ingest, get, query, catalog rebuild, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from rich.console import Console
from rich.markup import escape
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

if TYPE_CHECKING:
    from workers.records import StoreSettings

console = Console(stderr=True, soft_wrap=True)  # one failure, one line
# Retrieval-only targets (never chosen at ingest), beside the codecs of cluster.config.
OTHER_TARGETS = {
    "rle": "1.2.840.10008.1.2.5",
    "explicit": "1.2.840.10008.1.2.1",
    "deflated": "1.2.840.10008.1.2.1.99",
}


class CommandError(Exception):
    """A failure the command explains in one sentence (no traceback, nothing internal)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code.

    Every failure ends in one line that says what failed and what to do, and a non-zero
    exit; the detail goes to the log (``strata serve``) or is shown with ``--debug``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code: int = args.run(args)
        return code
    except ConfigError as error:
        console.print(f"[red]configuration error:[/red] {escape(str(error))}")
        return 2
    except grpc.RpcError as error:
        console.print(f"[red]{escape(_rpc_failure(error, getattr(args, 'server', '')))}[/red]")
        return 1
    except CommandError as error:
        console.print(f"[red]{escape(str(error))}[/red]")  # "[tiers]" is not markup
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if args.debug:
            raise
        console.print(
            f"[red]strata {args.command} failed ({type(error).__name__}); run it again with "
            "--debug for the details[/red]"
        )
        return 1


def _rpc_failure(error: grpc.RpcError, server: str) -> str:
    """One sentence for a failed call: the server's own words, or why it was not reached."""
    code = error.code()
    details = error.details() or ""
    # gRPC's own texts (connection refused, name resolution, deadline) carry addresses and
    # socket errors; Strata's servers answer with sentences written for people.
    if code == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details.lower() or "connection" in details.lower()
    ):
        return (
            f"no Strata node answers at {server}: start one with `strata serve`, or name "
            "the right one with --server HOST:PORT"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and details.lower().startswith("deadline"):
        return (
            f"the node at {server} did not answer in time; it may be overloaded or "
            "restarting a component, try again (or raise --timeout)"
        )
    return f"the node answered {code.name}: {details}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument(
        "--debug", action="store_true", help="show a traceback when a command fails"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command")

    serve = commands.add_parser("serve", help="run the gRPC front end")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--dimse-port", type=int, help="DIMSE port (default: no DIMSE door)")
    serve.add_argument("--dimse-ae-title", help="the DIMSE door's AE title (default STRATA)")
    serve.add_argument("--http-port", type=int, help="DICOMweb port (default: no DICOMweb door)")
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
    get.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for the whole file"
    )
    get.set_defaults(run=_get)

    query = commands.add_parser(
        "query", help="SQL over the catalog (DuckDB): its tables and the analytics view"
    )
    query.add_argument("sql", help='e.g. "SELECT modality, count(*) FROM instances GROUP BY 1"')
    query.add_argument("--data-dir", type=Path, help="data dir of an embedded node")
    query.set_defaults(run=_query)

    catalog = commands.add_parser("catalog", help="catalog maintenance")
    actions = catalog.add_subparsers(required=True, metavar="ACTION", dest="action")
    rebuild = actions.add_parser(
        "rebuild",
        help="rebuild a lost catalog from the objects in the store (with the node stopped)",
    )
    rebuild.add_argument("--data-dir", type=Path, help="data dir of an embedded node")
    rebuild.add_argument(
        "--force",
        action="store_true",
        help="if the catalog's tables hold rows (or cannot be read), delete them first",
    )
    rebuild.set_defaults(run=_catalog_rebuild)

    tier = commands.add_parser("tier", help="tiering: what the policy would move, and its cost")
    tier_actions = tier.add_subparsers(required=True, metavar="ACTION", dest="action")
    tier_plan = tier_actions.add_parser(
        "plan", help="show what the policy would move (changes nothing)"
    )
    tier_plan.add_argument("--policy", type=Path, help="policy file (default: tier_policy)")
    tier_plan.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    tier_plan.add_argument(
        "--at",
        type=_moment,
        help="plan as of this day or time (ISO 8601, UTC; default now), e.g. to see next "
        "month's moves",
    )
    tier_plan.set_defaults(run=_tier_plan)
    tier_apply = tier_actions.add_parser(
        "apply",
        help="carry the plan out on the node: copy, verify, commit, delete the source "
        "(run it again after an interruption: it finishes what was begun)",
    )
    tier_apply.add_argument("--policy", type=Path, help="policy file (default: tier_policy)")
    tier_apply.add_argument("--at", type=_moment, help="plan as of this day or time (UTC)")
    tier_apply.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    tier_apply.set_defaults(run=_tier_apply)

    forecast = commands.add_parser(
        "forecast", help="capacity and cost year by year as the archive grows (from the catalog)"
    )
    forecast.add_argument(
        "--growth",
        type=float,
        action="append",
        help="yearly growth of ingest, e.g. 0.20 (repeat for several; default 0.20 and 0.25)",
    )
    forecast.add_argument("--years", type=int, default=10)
    forecast.add_argument("--policy", type=Path, help="policy file (default: tier_policy)")
    forecast.add_argument(
        "--annual-tb", type=float, help="raw TB ingested a year now (default: from the catalog)"
    )
    forecast.add_argument("--drive-tb", type=float, default=16.0, help="drive size (TB)")
    forecast.add_argument("--drives-per-node", type=int, default=4)
    forecast.add_argument("--csv", type=Path, default=Path("forecast.csv"))
    forecast.add_argument("--png", type=Path, default=Path("forecast.png"))
    forecast.add_argument("--data-dir", type=Path, help="data dir of an embedded node")
    forecast.set_defaults(run=_forecast)

    demo = commands.add_parser("demo", help="ingest sample studies end to end and report")
    demo.add_argument("--work-dir", type=Path, help="keep the demo's files here")
    demo.set_defaults(run=_demo)
    return parser


def _load(args: argparse.Namespace, **overrides: object) -> Config:
    return config_module.load(args.config, **overrides)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token to call a node with: STRATA_TOKEN, or the one the local node
    (the configuration's data_dir) generated."""
    from cluster.security import tokens

    try:
        data_dir: Path | None = _load(args).data_dir
    except config_module.ConfigError:
        data_dir = None
    return tokens.for_client(data_dir)


def _serve(args: argparse.Namespace) -> int:
    from cluster.ops import supervise

    config = _load(
        args,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        dimse_port=args.dimse_port,
        dimse_ae_title=args.dimse_ae_title,
        http_port=args.http_port,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if os.environ.get(supervise.CHILD_ENVIRONMENT) != "1":
        # The configuration is checked above, once; the node runs in a child from here.
        return supervise.supervise(args.argv)
    from cluster.doors.grpc.server import PortUnavailableError
    from cluster.ops.minio import MinioServerError
    from cluster.ops.node import Stack

    # pynetdicom writes each query's identifier (names, IDs, birth dates) at INFO: PHI.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    async def run() -> None:
        stack = Stack(config, embedded=args.embedded)
        try:
            await stack.start()
        except PortUnavailableError as error:
            raise CommandError(f"strata serve could not start: {error}") from None
        except MinioServerError as error:
            logging.getLogger("strata.serve").error("MinIO did not start: %s", error)
            raise CommandError(
                "strata serve could not start its object store (MinIO); the log above says why"
            ) from None
        except Exception as error:
            logging.getLogger("strata.serve").error(
                "start-up failed: %s: %s", type(error).__name__, error, exc_info=args.debug
            )
            raise CommandError(
                f"strata serve could not start ({type(error).__name__}): is the object store "
                "reachable and the data directory writable? The log above has the details"
            ) from None
        doors = f"gRPC {stack.address}"
        if stack.dimse is not None:
            doors += f", DIMSE {config.dimse_ae_title}@{config.dimse_host}:{stack.dimse.port}"
        console.print(f"strata serving: {doors}  (Ctrl-C to stop)")
        supervise.signal_ready()
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
    with StrataClient(args.server, _token(args)) as client, _progress() as progress:
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
    from cluster.client import IntegrityError, StrataClient

    targets = {**CODECS, **OTHER_TARGETS}
    with StrataClient(args.server, _token(args)) as client:
        try:
            retrieved = client.retrieve_to(
                args.out,
                args.sop_instance_uid,
                stored=args.syntax == "stored",
                version=args.version,
                transfer_syntax=targets.get(args.syntax, ""),
                timeout=args.timeout,
            )
        except IntegrityError as error:
            raise CommandError(f"{error}; nothing was written, try again") from None
    console.print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes, transfer syntax "
        f"{retrieved.transfer_syntax}, sha256 {retrieved.sha256[:16]}…)"
    )
    return 0


def _query(args: argparse.Namespace) -> int:
    import duckdb
    from deltalake.exceptions import DeltaError

    from cluster import catalog
    from cluster.ops.node import node_store_settings
    from workers.objects.keys import KeyFileError, load_key_file

    config = _load(args, data_dir=args.data_dir)
    try:
        settings = node_store_settings(config)
    except RuntimeError as error:
        raise CommandError(str(error)) from None
    try:
        pseudonyms = load_key_file(config.key_file).pseudonymizer()
    except KeyFileError:
        study_key = None  # no key file here: no analytics view (its study key needs it)
    else:
        study_key = functools.partial(pseudonyms.pseudonym, "analytics study")
    try:
        connection = catalog.connect(settings, bucket=config.catalog_bucket, study_key=study_key)
    except (OSError, DeltaError):
        raise CommandError(
            "the catalog cannot be read: its object store does not answer (is the node "
            "running?) or the catalog tables do not exist yet"
        ) from None
    try:
        result = connection.execute(args.sql)
    except duckdb.Error as error:
        # DuckDB's own sentence names the bad column or syntax; its first line is enough.
        raise CommandError(f"the query failed: {str(error).splitlines()[0]}") from None
    columns = [d[0] for d in result.description]
    table = Table()
    for column in columns:
        table.add_column(column)
    for row in result.fetchall():
        table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)
    return 0


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 day or time (e.g. 2027-01-31)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _tier_plan(args: argparse.Namespace) -> int:
    from cluster.client import StrataClient
    from cluster.tiering import engine
    from cluster.tiering.policy import PolicyError, default_policy, load_policy
    from cluster.tiering.policy import warnings as policy_warnings

    config = _load(args)
    path = args.policy or (Path(config.tier_policy) if config.tier_policy else None)
    try:
        policy = load_policy(path) if path is not None else default_policy()
    except PolicyError as error:
        raise CommandError(str(error)) from None
    at = args.at.isoformat() if args.at else ""
    with StrataClient(args.server, _token(args)) as client:
        answer = client.plan_tiering(path.read_text() if path is not None else "", at)
    flows = [
        engine.Flow(f.source, f.to, f.studies, f.instances, f.bytes_stored) for f in answer.flows
    ]
    planned = engine.Plan(
        [], answer.considered, dict(answer.stored_before), dict(answer.stored_after)
    )
    console = Console()
    for warning in policy_warnings(policy):
        console.print(f"[yellow]warning:[/yellow] {warning}")
    moves = Table(
        title=f"tier plan: {planned.considered} studies due and considered "
        f"({answer.seconds:.2f} s in the node), nothing changed"
    )
    for column in ("from", "to", "studies", "instances", "GB stored"):
        moves.add_column(column, justify="right" if column not in ("from", "to") else "left")
    for flow in flows:
        moves.add_row(
            flow.source,
            flow.to,
            str(flow.studies),
            str(flow.instances),
            f"{flow.bytes_stored / engine.GB:.3f}",
        )
    console.print(moves if flows else "tier plan: the policy moves no study now")
    before = engine.monthly_cost(planned.stored_before, policy)
    after = engine.monthly_cost(planned.stored_after, policy)
    costs = Table(
        title="monthly cost at the policy's prices"
        + (" (list prices: no [tiers] in a policy file)" if policy.default_prices else "")
    )
    for column in ("tier", "$/GB-month", "GB before", "$ before", "GB after", "$ after"):
        costs.add_column(column, justify="left" if column == "tier" else "right")
    for name, tier in policy.tiers.items():
        costs.add_row(
            name,
            f"{tier.price_per_gb_month:g}",
            f"{planned.stored_before.get(name, 0) / engine.GB:.3f}",
            f"{before[name]:.2f}",
            f"{planned.stored_after.get(name, 0) / engine.GB:.3f}",
            f"{after[name]:.2f}",
        )
    costs.add_row("total", "", "", f"{sum(before.values()):.2f}", "", f"{sum(after.values()):.2f}")
    console.print(costs)
    return 0


def _forecast(args: argparse.Namespace) -> int:
    from deltalake.exceptions import DeltaError

    from cluster.ops.node import node_store_settings
    from cluster.tiering import forecast
    from cluster.tiering.policy import PolicyError, default_policy, load_policy

    growths = args.growth or [0.20, 0.25]
    if args.years < 1 or any(not -1 < growth < 10 for growth in growths):
        raise CommandError("--years must be at least 1 and each --growth between -1 and 10")
    if args.drive_tb <= 0 or args.drives_per_node < 1:
        raise CommandError("--drive-tb must be above 0 and --drives-per-node at least 1")
    config = _load(args, data_dir=args.data_dir)
    path = args.policy or (Path(config.tier_policy) if config.tier_policy else None)
    try:
        policy = load_policy(path) if path is not None else default_policy()
    except PolicyError as error:
        raise CommandError(str(error)) from None
    try:
        settings = node_store_settings(config)
        measured = forecast.measure(settings, config.catalog_bucket)
    except RuntimeError as error:
        raise CommandError(str(error)) from None
    except (OSError, DeltaError):
        raise CommandError(
            "the catalog cannot be read: its object store does not answer (is the node "
            "running?) or the catalog tables do not exist yet"
        ) from None
    annual = args.annual_tb * forecast.TB if args.annual_tb is not None else None
    rows = forecast.project(
        measured,
        policy,
        growths,
        args.years,
        now=datetime.now(UTC).date(),
        annual_raw_bytes=annual,
        drive_tb=args.drive_tb,
        drives_per_node=args.drives_per_node,
    )
    console = Console()
    rate = (annual if annual is not None else measured.annual_raw_bytes) / forecast.TB
    console.print(
        f"now: {sum(c.stored_bytes for c in measured.cohorts) / forecast.TB:.4f} TB stored "
        f"({sum(c.raw_bytes for c in measured.cohorts) / forecast.TB:.4f} TB raw), "
        f"ingest {rate:.4f} raw TB a year"
        + (" (given)" if annual is not None else " (last 365 days, or scaled to a year)")
    )
    table = Table(title="forecast (the model: cluster/tiering/forecast.py)")
    for column in ("growth", "year", "hot TB", "warm TB", "cold TB", "raw TB", "drives", "nodes"):
        table.add_column(column, justify="right")
    for column in ("$/month", "all hot $/month"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            f"{row.growth:.0%}",
            str(row.year),
            *(f"{row.stored_tb[tier]:.3f}" for tier in ("hot", "warm", "cold")),
            f"{row.raw_tb:.3f}",
            str(row.drives),
            str(row.nodes),
            f"{row.cost:,.2f}",
            f"{row.all_hot_cost:,.2f}",
        )
    console.print(table)
    forecast.write_csv(rows, args.csv)
    forecast.plot(rows, args.png)
    console.print(f"wrote {args.csv} and {args.png}")
    return 0


def _tier_apply(args: argparse.Namespace) -> int:
    from cluster.client import StrataClient
    from cluster.tiering.policy import PolicyError, load_policy
    from cluster.tiering.policy import warnings as policy_warnings

    config = _load(args)
    path = args.policy or (Path(config.tier_policy) if config.tier_policy else None)
    if path is None:
        raise CommandError("no policy: give --policy FILE or configure tier_policy")
    try:
        policy = load_policy(path)  # the node checks it too; shown before connecting
    except PolicyError as error:
        raise CommandError(str(error)) from None
    for warning in policy_warnings(policy):
        console.print(f"[yellow]warning:[/yellow] {warning}")
    at = args.at.isoformat() if args.at else ""
    last = None
    with StrataClient(args.server, _token(args)) as client, _progress() as progress:
        moved = progress.add_task("moved", total=None)
        for step in client.apply_tiering(path.read_text(), at):
            progress.update(moved, total=step.bytes_total, completed=step.bytes_done)
            if step.studies_failed and (last is None or step.studies_failed > last.studies_failed):
                progress.console.print(f"[yellow]failed[/yellow] {step.message}")
            last = step
    if last is None:
        raise CommandError("the node sent no progress; run the apply again")
    table = Table(title="tier apply")
    for column in ("planned", "moved", "deleted", "failed", "GB", "resumed"):
        table.add_column(column, justify="right")
    table.add_row(
        str(last.studies_total),
        str(last.studies_done - last.studies_deleted),
        str(last.studies_deleted),
        str(last.studies_failed),
        f"{last.bytes_done / 1e9:.3f}",
        str(last.resumed),
    )
    Console().print(table)
    if last.studies_deleted:
        Console().print(
            f"Deleted at the end of their retention: {last.studies_deleted} studies (their "
            "data keys destroyed, crypto-shredded; the catalog's placements record it)"
        )
    if last.recoded_bytes_before:
        before, after = last.recoded_bytes_before, last.recoded_bytes_after
        Console().print(
            f"Re-encoded with the target tier's codec and verified: {before / 1e6:.1f} MB → "
            f"{after / 1e6:.1f} MB ({1 - after / before:.1%} smaller)"
        )
    if last.not_carried_out:
        Console().print(f"Not carried out: {last.not_carried_out} decisions")
    return 1 if last.studies_failed else 0


def _catalog_rebuild(args: argparse.Namespace) -> int:
    from cluster.catalog.rebuild import CatalogNotEmptyError, RebuildProgress, rebuild_catalog
    from cluster.config import TIERS
    from cluster.ops.node import catalog_index_path
    from cluster.tiering.locations import load_locations
    from workers.objects.keys import KeyFileError, load_key_file
    from workers.objects.store import StoreError

    config = _load(args, data_dir=args.data_dir)
    try:
        keys = load_key_file(config.key_file)
    except KeyFileError as error:
        raise CommandError(f"{error}; without it no object can be read") from None
    with _store_of_stopped_node(config) as settings, _counting() as progress:
        read = progress.add_task("read", total=None)
        written = progress.add_task("written", total=None)

        def show(counts: RebuildProgress) -> None:
            progress.update(read, completed=counts.read, total=counts.listed)
            progress.update(written, completed=counts.written, total=counts.to_write or None)

        try:
            report = rebuild_catalog(
                settings,
                keys,
                index_path=catalog_index_path(config),
                tiers=TIERS,
                bucket=config.catalog_bucket,
                force=args.force,
                on_progress=show,
                locations=(
                    load_locations(Path(config.tier_locations), settings)
                    if config.tier_locations
                    else ()
                ),
            )
        except CatalogNotEmptyError as error:
            raise CommandError(str(error)) from None
        except StoreError as error:
            raise CommandError(
                f"the object store failed during the rebuild ({error}); run it again, with "
                "--force if it had begun writing the catalog"
            ) from None
    for failure in report.failures:
        console.print(
            f"[yellow]not rebuilt[/yellow] {failure.bucket}/{failure.key}: {failure.reason}"
        )
    table = Table(title=f"catalog rebuild ({config.catalog_bucket})")
    for column in ("packs read", "rows written", "studies", "failed"):
        table.add_column(column, justify="right")
    table.add_row(
        str(report.objects_read),
        str(report.rows_written),
        str(report.studies),
        str(len(report.failures)),
    )
    Console().print(table)
    if report.copies_left_out:
        Console().print(
            f"  {report.copies_left_out} files were stored twice (a resend raced the duplicate "
            "check); the copy stored first is in the catalog"
        )
    return 1 if report.failures else 0


@contextlib.contextmanager
def _store_of_stopped_node(config: Config) -> Iterator[StoreSettings]:
    """The object store to rebuild from: ``minio_endpoint``, or else the embedded MinIO
    under ``data_dir``, started for the rebuild; refused while that node runs."""
    from cluster.ops.minio import MinioServer, MinioServerError
    from cluster.ops.node import NODE_FILE
    from workers.records import StoreSettings

    if config.minio_endpoint:
        yield StoreSettings(config.minio_endpoint, config.minio_access_key, config.minio_secret_key)
        return
    node_file = config.data_dir / NODE_FILE
    if node_file.exists() and _answers(json.loads(node_file.read_text())["grpc"]):
        raise CommandError(
            f"a node is running under {config.data_dir}; stop it before rebuilding its catalog "
            "(its catalog writer and orphan reconciler must not run meanwhile)"
        )
    drives = config.data_dir / "minio"
    if not drives.is_dir():
        raise CommandError(
            f"there is no embedded object store under {config.data_dir}; name the node's "
            "--data-dir, or set minio_endpoint"
        )
    server = MinioServer(drives, drives=config.minio_drives)
    try:
        server.start()
    except MinioServerError as error:
        raise CommandError(f"the embedded object store did not start: {error}") from None
    try:
        yield server.settings
    finally:
        server.stop()


def _answers(address: str) -> bool:
    """Whether something accepts connections at ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def _demo(args: argparse.Namespace) -> int:
    from cluster.cli.demo import run_demo

    return run_demo(_load(args), work_dir=args.work_dir)


def _counting() -> Progress:
    return Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


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

"""`strata demo`: ingest sample studies end to end on a throwaway node and report."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster import catalog
from cluster.client import IngestOutcome, StrataClient
from cluster.config import Config
from cluster.dev import samples
from cluster.ops.node import Stack
from cluster.tiering.policy import parse_policy

console = Console()


@dataclass
class DemoReport:
    """What the demo measured."""

    outcomes: list[IngestOutcome] = field(default_factory=list)
    seconds: float = 0.0
    verified: list[str] = field(default_factory=list)
    catalog_rows: list[tuple[object, ...]] = field(default_factory=list)
    studies: int = 0
    doors: list[tuple[str, str]] = field(default_factory=list)  # (what was done, outcome)
    tiering: list[tuple[str, str]] = field(default_factory=list)  # (what, outcome)


# The demo's tiering policy: studies older than 180 days go cold (the samples are dated
# over the past year, so some do), re-encoded as JPEG 2000 on the way (about 10 % smaller
# than HTJ2K on pydicom-data's images: bench/tiering.py), read back byte for byte.
DEMO_POLICY = {
    "tiers": {
        "hot": {"price_per_gb_month": 0.023},
        "warm": {"price_per_gb_month": 0.0125},
        "cold": {
            "price_per_gb_month": 0.004,
            "storage_class": "REDUCED_REDUNDANCY",
            "codec": "jpeg2000",
        },
    },
    "rules": [{"name": "cold after 180 days", "from": "hot", "to": "cold", "min_age_days": 180}],
}


def run_demo(config: Config, work_dir: Path | None = None) -> int:
    """Generate, ingest, retrieve, query, report; stop everything started. Exit code."""
    with tempfile.TemporaryDirectory(prefix="strata-demo-") as scratch:
        base = work_dir or Path(scratch)
        config = replace(
            config,
            data_dir=base / "data",
            key_file=base / "keys" / "keys.json",
            port=0,
            minio_endpoint="",
            dimse_port=config.dimse_port or _free_port(),
            http_port=config.http_port or _free_port(),
        )
        with console.status("generating sample studies from pydicom-data…"):
            files = samples.generate(base / "samples")
            rejects = samples.bad_inputs(base / "rejects", files[0])
        size = sum(path.stat().st_size for path in files)
        console.print(
            f"generated {len(files)} instances, {size / 1e6:.0f} MB (CT, MR, CR, US) "
            f"+ {len(rejects)} bad files"
        )
        report = asyncio.run(_run(config, files + rejects))
        _print(report, files)
        rejected_good = [
            o for o in report.outcomes if o.status == "rejected" and "rejects" not in o.source
        ]
        return 0 if not rejected_good and report.verified else 1


async def _run(config: Config, files: list[Path]) -> DemoReport:
    stack = Stack(config, embedded=True)
    with console.status("starting MinIO (4 drives, erasure coded), Ray and the gRPC server…"):
        await stack.start()
    minio = stack.minio.settings.endpoint if stack.minio else "external"
    console.print(
        f"node up: gRPC {stack.address}, DIMSE {config.dimse_ae_title}@127.0.0.1:"
        f"{config.dimse_port}, DICOMweb http://127.0.0.1:{config.http_port}/dicomweb, "
        f"MinIO {minio}"
    )
    try:
        report = await asyncio.to_thread(_client_work, stack.address, stack.tokens.first, files)
        report.doors = await asyncio.to_thread(
            _through_the_other_doors,
            config,
            stack.tokens.first,
            [path for path in files if path.parent.name != "rejects"],
        )
        assert stack.store_settings is not None
        await stack.flush_catalog()  # analysts read Delta: flushed every few minutes
        report.catalog_rows, report.studies = await asyncio.to_thread(
            _query_catalog, stack, config.catalog_bucket
        )
        report.tiering = await _tier(stack, config.catalog_bucket)
        return report
    finally:
        with console.status("stopping everything the demo started…"):
            await stack.stop()


async def _tier(stack: Stack, bucket: str) -> list[tuple[str, str]]:
    """Move the studies the demo policy sends cold, and read one back from there."""
    policy = parse_policy(DEMO_POLICY, "the demo policy")
    last = None
    with console.status("tiering: studies older than 180 days to cold, as JPEG 2000…"):
        async for step in stack.apply_tiering(policy):
            last = step
    assert last is not None and stack.store_settings is not None
    done = [
        (
            "studies moved hot → cold (every instance rebuilt and checked)",
            f"{last.studies_done} of {last.studies_total}, {last.bytes_done / 1e6:.1f} MB",
        ),
        ("failed", str(last.studies_failed)),
    ]
    if last.recoded_bytes_before:
        before, after = last.recoded_bytes_before, last.recoded_bytes_after
        done.append(
            (
                "re-encoded HTJ2K → JPEG 2000 for cold, every frame verified",
                f"{before / 1e6:.1f} → {after / 1e6:.1f} MB ({1 - after / before:.1%} smaller)",
            )
        )
    connection = catalog.connect(stack.store_settings, bucket=bucket)
    row = connection.execute(
        "SELECT p.sop_instance_uid, p.sha256 FROM placements p WHERE p.tier = 'cold' LIMIT 1"
    ).fetchone()
    if row is not None:
        with StrataClient(stack.address, stack.tokens.first) as client:
            back = await asyncio.to_thread(client.retrieve, str(row[0]))
        same = back.sha256 == row[1] and hashlib.sha256(back.data).hexdigest() == row[1]
        done.append(("an instance read back from cold", "byte-identical" if same else "DIFFERENT"))
        if not same:
            raise RuntimeError("an instance read back from the cold tier came back different")
    return done


def _client_work(address: str, token: str, files: list[Path]) -> DemoReport:
    report = DemoReport()
    with StrataClient(address, token) as client:
        client.wait_ready()
        progress = Progress(
            TextColumn("ingesting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        started = time.perf_counter()
        with progress:
            task = progress.add_task("ingest", total=len(files))
            for outcome in client.ingest_files(files):
                report.outcomes.append(outcome)
                progress.advance(task)
        report.seconds = time.perf_counter() - started
        # Give back one instance of each modality and compare with the file sent.
        by_path = {o.source: o for o in report.outcomes if o.status == "stored"}
        seen: set[str] = set()
        for path in files:
            stored = by_path.get(str(path))
            if stored is None or path.parent.name in seen:
                continue
            seen.add(path.parent.name)
            retrieved = client.retrieve(stored.sop_instance_uid)
            if hashlib.sha256(path.read_bytes()).hexdigest() != retrieved.sha256:
                raise RuntimeError(f"{path} came back different")
            report.verified.append(f"{path.parent.name}/{path.name}")
    return report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _through_the_other_doors(
    config: Config, token: str, files: list[Path]
) -> list[tuple[str, str]]:
    """One study found and fetched back through DIMSE (DCMTK's findscu and getscu, when
    installed) and DICOMweb (QIDO-RS and WADO-RS): what each door did."""
    done: list[tuple[str, str]] = []
    read = [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in files]
    study_uid = str(read[0][1].StudyInstanceUID)
    sent = {
        str(header.SOPInstanceUID): path.read_bytes()
        for path, header in read
        if header.StudyInstanceUID == study_uid
    }
    port = str(config.dimse_port)
    if shutil.which("findscu") and shutil.which("getscu"):
        with tempfile.TemporaryDirectory(prefix="strata-demo-dimse-") as folder:
            found = subprocess.run(
                ["findscu", "-S", "-aec", config.dimse_ae_title, "-X", "-od", folder,
                 "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                 "-k", "ModalitiesInStudy", "127.0.0.1", port],
                capture_output=True, check=False, timeout=120,
            )  # fmt: skip
            studies = len(list(Path(folder).glob("rsp*.dcm")))
            done.append(("DIMSE C-FIND (findscu), every study", f"{studies} matches"))
        with tempfile.TemporaryDirectory(prefix="strata-demo-dimse-") as folder:
            subprocess.run(
                ["getscu", "-S", "+B", "-aec", config.dimse_ae_title, "-od", folder,
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                 "127.0.0.1", port],
                capture_output=True, check=False, timeout=300,
            )  # fmt: skip
            same = sum(
                1
                for path in Path(folder).iterdir()
                if _dataset(path.read_bytes())
                == _dataset(sent.get(str(pydicom.dcmread(path).SOPInstanceUID), b""))
            )
            done.append(
                ("DIMSE C-GET (getscu), one study", f"{same} of {len(sent)} byte-identical")
            )
        if found.returncode != 0:
            done.append(("findscu", "failed (see its output)"))
    else:
        done.append(("DIMSE", "DCMTK not installed: findscu/getscu skipped"))
    base = f"http://127.0.0.1:{config.http_port}/dicomweb"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}
    request = urllib.request.Request(f"{base}/studies", headers=headers)
    with urllib.request.urlopen(request, timeout=120) as answer:
        count = len(json.loads(answer.read() or b"[]"))
    done.append(("DICOMweb QIDO-RS /studies", f"{count} studies"))
    try:
        urllib.request.urlopen(f"{base}/studies", timeout=120)
        refused = 200
    except urllib.error.HTTPError as error:
        refused = error.code
    done.append(("DICOMweb without a token", f"HTTP {refused}"))
    return done


def _dataset(data: bytes) -> bytes:
    """A Part 10 file's data set, without its preamble and file meta."""
    if data[128:132] != b"DICM":
        return data
    return data[144 + int.from_bytes(data[140:144], "little") :]


def _query_catalog(stack: Stack, bucket: str) -> tuple[list[tuple[object, ...]], int]:
    assert stack.store_settings is not None
    connection = catalog.connect(stack.store_settings, bucket=bucket)
    rows = connection.execute(
        "SELECT modality, count(*) AS instances, sum(bytes_in) AS bytes_in, "
        "sum(bytes_stored) AS bytes_stored, any_value(transfer_syntax_stored) "
        "FROM instances GROUP BY modality ORDER BY modality"
    ).fetchall()
    studies = connection.execute("SELECT count(*) FROM studies").fetchone()
    return rows, int(studies[0]) if studies else 0


def _print(report: DemoReport, good_files: list[Path]) -> None:
    counts = Counter(o.status for o in report.outcomes)
    bytes_in = sum(o.bytes_in for o in report.outcomes if o.status == "stored")
    bytes_stored = sum(o.bytes_stored for o in report.outcomes if o.status == "stored")
    reasons = Counter(o.reason for o in report.outcomes if o.status == "rejected")

    table = Table(title="catalog: instances by modality (DuckDB over the Delta tables)")
    for column in ("modality", "instances", "MB in", "MB stored", "ratio", "stored as"):
        table.add_column(column, justify="right")
    for modality, instances, raw, stored, syntax in report.catalog_rows:
        assert isinstance(raw, int) and isinstance(stored, int)
        table.add_row(
            str(modality),
            str(instances),
            f"{raw / 1e6:.1f}",
            f"{stored / 1e6:.1f}",
            f"{raw / stored:.2f}",
            str(syntax),
        )
    console.print(table)

    summary = Table(title="Strata demo", show_header=False)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    summary.add_row("instances stored", str(counts["stored"]))
    summary.add_row("duplicates", str(counts["duplicate"]))
    summary.add_row("studies in catalog", str(report.studies))
    summary.add_row("MB in", f"{bytes_in / 1e6:.1f}")
    summary.add_row("MB stored (encrypted, before erasure parity)", f"{bytes_stored / 1e6:.1f}")
    summary.add_row("compression ratio", f"{bytes_in / max(bytes_stored, 1):.2f}")
    summary.add_row(
        "ingest MB/s (end to end, acknowledged)", f"{bytes_in / 1e6 / report.seconds:.1f}"
    )
    summary.add_row("instances/s", f"{counts['stored'] / report.seconds:.1f}")
    summary.add_row("rejected", str(counts["rejected"]))
    for reason, count in reasons.most_common():
        summary.add_row(f"  {reason}", str(count))
    summary.add_row("retrieved and byte-identical", f"{len(report.verified)} (one per study)")
    console.print(summary)
    doors = Table(title="the other doors")
    doors.add_column("what")
    doors.add_column("outcome", justify="right")
    for what, outcome in report.doors:
        doors.add_row(what, outcome)
    console.print(doors)
    tiers = Table(title="tiering (strata tier apply, the demo policy)")
    tiers.add_column("what")
    tiers.add_column("outcome", justify="right")
    for what, outcome in report.tiering:
        tiers.add_row(what, outcome)
    console.print(tiers)

"""Every acknowledgement names exactly the file it answers, under any concurrency.

Many streams in one process and several sender processes at once, all numbering their
files from 0 (the same file_ids everywhere), against one real node: every answer's SOP
Instance UID, SHA-256 and status must be its own file's.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest

from cluster.client import IngestOutcome, StrataClient
from tests.integration.conftest import ct_instances
from tests.integration.node import Node

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMS = 8
FILES_PER_STREAM = 6
PROCESSES = 3


def _expected(files: list[tuple[str, bytes]]) -> dict[str, tuple[str, str]]:
    """name → (SOP Instance UID, SHA-256)."""
    out = {}
    for name, data in files:
        uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        out[name] = (str(uid), hashlib.sha256(data).hexdigest())
    return out


def _check(outcomes: list[IngestOutcome], expected: dict[str, tuple[str, str]]) -> None:
    assert sorted(o.source for o in outcomes) == sorted(expected), "one answer per file"
    wrong = [
        (o.source, o.status, o.reason)
        for o in outcomes
        if (o.sop_instance_uid, o.sha256) != expected[o.source] or o.status != "stored"
    ]
    assert not wrong, f"{len(wrong)} of {len(outcomes)} answers are not their file's: {wrong}"


def test_concurrent_streams_each_get_their_own_answers(node: Node) -> None:
    per_stream = [ct_instances(FILES_PER_STREAM, f"s{n}") for n in range(STREAMS)]
    expected = {name: value for files in per_stream for name, value in _expected(files).items()}

    def send(files: list[tuple[str, bytes]]) -> list[IngestOutcome]:
        with StrataClient(node.address) as client:  # one connection per stream
            return list(client.ingest_bytes(files))

    with ThreadPoolExecutor(STREAMS) as pool:
        outcomes = [o for result in pool.map(send, per_stream) for o in result]
    _check(outcomes, expected)


def test_single_file_streams_at_once_get_their_own_answers(node: Node) -> None:
    # The case the review found: 8 one-file streams, every file_id "0".
    files = ct_instances(STREAMS, "single")
    expected = _expected(files)

    def send(item: tuple[str, bytes]) -> list[IngestOutcome]:
        with StrataClient(node.address) as client:
            return list(client.ingest_bytes([item]))

    with ThreadPoolExecutor(STREAMS) as pool:
        outcomes = [o for result in pool.map(send, files) for o in result]
    _check(outcomes, expected)


_SENDER = """
import json, sys
from pathlib import Path
from cluster.client import StrataClient
paths = sorted(Path(sys.argv[2]).iterdir())
with StrataClient(sys.argv[1]) as client:
    out = [
        {"source": Path(o.source).name, "status": o.status, "reason": o.reason,
         "sop_instance_uid": o.sop_instance_uid, "sha256": o.sha256}
        for o in client.ingest_files(paths)
    ]
print(json.dumps(out))
"""


def test_sender_processes_at_once_get_their_own_answers(node: Node, tmp_path: Path) -> None:
    expected: dict[str, tuple[str, str]] = {}
    folders = []
    for number in range(PROCESSES):
        folder = tmp_path / f"sender{number}"
        folder.mkdir()
        files = ct_instances(FILES_PER_STREAM * 2, f"p{number}")
        for name, data in files:
            (folder / name).write_bytes(data)
        # A file that is not DICOM and a file another sender also sends, in every folder.
        (folder / f"p{number}-zz-junk").write_bytes(b"not a DICOM file" * 50)
        expected.update(_expected(files))
        folders.append(folder)
    shared_name, shared = ct_instances(1, "shared")[0]
    shared_uid, shared_sha = _expected([(shared_name, shared)])[shared_name]
    for folder in folders:
        (folder / shared_name).write_bytes(shared)

    senders = [
        subprocess.Popen(
            [sys.executable, "-c", _SENDER, node.address, str(folder)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    answers = []
    for sender in senders:
        out, _ = sender.communicate(timeout=300)
        assert sender.returncode == 0
        answers.extend(json.loads(out))

    junk = [a for a in answers if a["source"].endswith("-zz-junk")]
    assert len(junk) == PROCESSES
    assert all(a["status"] == "rejected" and a["reason"] == "not_dicom" for a in junk)
    same = [a for a in answers if a["source"] == shared_name]
    assert len(same) == PROCESSES
    # Identical files from different senders are stored once; the others are duplicates.
    assert sorted(a["status"] for a in same) == ["duplicate"] * (PROCESSES - 1) + ["stored"]
    assert all((a["sop_instance_uid"], a["sha256"]) == (shared_uid, shared_sha) for a in same)
    outcomes = [
        IngestOutcome(
            source=a["source"],
            status=a["status"],
            reason=a["reason"],
            message="",
            sop_instance_uid=a["sop_instance_uid"],
            version=0,
            bytes_in=0,
            bytes_stored=0,
            transfer_syntax_stored="",
            sha256=a["sha256"],
        )
        for a in answers
        if a not in junk and a not in same
    ]
    _check(outcomes, expected)

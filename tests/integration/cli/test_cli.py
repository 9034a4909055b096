"""The `strata` command against a real node: ingest, get, query; and the demo."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from cluster.dev import samples
from tests.integration.node import Node
from workers.records import HTJ2K_LOSSLESS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def strata(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    plan = ((samples.SeriesPlan("MR2_UNCI.dcm", "MR", 3),),)
    return samples.generate(tmp_path_factory.mktemp("study"), plan)


def test_ingest_folder_then_get_and_query(node: Node, study: list[Path], tmp_path: Path) -> None:
    result = strata("ingest", str(study[0].parent), "--server", node.address)
    assert result.returncode == 0, result.stderr
    assert "ingest summary" in result.stdout

    uid = pydicom.dcmread(study[1], stop_before_pixels=True).SOPInstanceUID
    original = tmp_path / "original.dcm"
    result = strata("get", uid, "--out", str(original), "--server", node.address)
    assert result.returncode == 0, result.stderr
    assert original.read_bytes() == study[1].read_bytes()

    compressed = tmp_path / "htj2k.dcm"
    result = strata(
        "get", uid, "--out", str(compressed), "--syntax", "htj2k", "--server", node.address
    )
    assert result.returncode == 0, result.stderr
    dataset = pydicom.dcmread(compressed)
    assert dataset.file_meta.TransferSyntaxUID == HTJ2K_LOSSLESS
    assert (dataset.pixel_array == pydicom.dcmread(study[1]).pixel_array).all()
    assert len(compressed.read_bytes()) < len(original.read_bytes())

    sql = (
        "SELECT count(*) AS n FROM instances WHERE sha256 = "
        f"'{hashlib.sha256(study[1].read_bytes()).hexdigest()}'"
    )
    result = strata("query", sql, "--data-dir", str(node.data_dir))
    assert result.returncode == 0, result.stderr
    assert "│ 1 " in result.stdout


def test_ingest_exits_non_zero_when_anything_is_rejected(
    node: Node, study: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "letter.txt"
    bad.write_text("not an image\n" * 40)
    result = strata(
        "ingest", str(study[0]), str(bad), str(tmp_path / "absent.dcm"), "--server", node.address
    )
    assert result.returncode == 1
    assert "not_dicom" in result.stderr
    assert "no such file or folder" in result.stderr


def test_get_unknown_uid_says_not_found(node: Node, tmp_path: Path) -> None:
    result = strata(
        "get", "1.2.3.4.5.6.7", "--out", str(tmp_path / "x.dcm"), "--server", node.address
    )
    assert result.returncode != 0
    assert "no stored instance" in result.stderr


def test_bad_configuration_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "strata.toml"
    config.write_text('codec = "gif"\n')
    result = strata("--config", str(config), "query", "SELECT 1")
    assert result.returncode == 2
    assert "codec must be one of" in result.stderr


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = strata("demo", "--work-dir", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for line in ("instances stored", "compression ratio", "retrieved and byte-identical"):
        assert line in out
    assert "not_dicom" in out and "truncated" in out and "pixel_length_mismatch" in out
    studies = re.search(r"studies in catalog\D*(\d+)", out)
    assert studies is not None and int(studies.group(1)) > 0, out[-3000:]
    assert not (tmp_path / "data" / "node.json").exists(), "the demo stops what it started"
    # Tiering: the samples dated more than 180 days ago went cold and one came back whole.
    moved = re.search(r"studies moved hot → cold.*?(\d+) of (\d+)", out)
    assert moved is not None and int(moved.group(1)) > 0, out[-3000:]
    assert moved.group(1) == moved.group(2)
    assert re.search(r"an instance read back from cold\W+byte-identical", out), out[-3000:]
    # ... re-encoded as JPEG 2000 on the way, and smaller for it.
    saved = re.search(r"JPEG 2000 for cold.*?\(([\d.]+)% smaller\)", out, re.S)
    assert saved is not None and float(saved.group(1)) > 0, out[-3000:]


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's output: one line, no traceback, pid, internal address or URL."""
    assert result.returncode != 0
    text = (result.stdout + result.stderr).strip()
    assert "Traceback" not in text
    for internal in ("ipv4:", "http://", "pid", "raylet", "RayError"):
        assert internal not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) <= 2, text  # rich may wrap one sentence
    return " ".join(lines)


def test_get_from_a_node_that_is_not_running_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    result = strata("get", "1.2.3", "--out", str(tmp_path / "x"), "--server", f"127.0.0.1:{port}")
    assert "no Strata node answers" in _one_clear_line(result)
    assert not (tmp_path / "x").exists()


def test_query_without_a_node_is_one_line(tmp_path: Path) -> None:
    result = strata("query", "SELECT 1", "--data-dir", str(tmp_path / "nothing-here"))
    assert "no running embedded node" in _one_clear_line(result)


def test_a_bad_query_is_one_line(node: Node) -> None:
    result = strata("query", "SELECT nonsense FROM instances", "--data-dir", str(node.data_dir))
    assert "the query failed" in _one_clear_line(result)


def test_serve_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "serve", "--embedded", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={
                **os.environ,
                "STRATA_DATA_DIR": str(tmp_path / "data"),
                "STRATA_KEY_FILE": str(tmp_path / "keys.json"),
            },
        )
    assert result.returncode != 0
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert "strata serve could not start" in last and str(port) in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr

"""Bounded memory and bounded waits, against a real node with a small budget.

- several fast senders of large files: the front end's private memory stays within its
  byte budget (measured, the figures printed);
- a sender that stalls mid-file beside a large upload: it is cut off after the idle
  timeout, and a small file from a third client is served;
- a small deflated file that would inflate past the size limit is refused, unexpanded;
- an object MinIO cannot reconstruct is answered DATA_LOSS at once, the log names it, and
  the worker that tried is free for the next request.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from cluster.client import StrataClient
from cluster.rpc import strata_pb2 as pb
from tests.integration.conftest import ct_instances, packs_by_member
from tests.integration.node import Node

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
BUDGET = 100 * MiB
MAX_FILE = 96 * MiB
IDLE_S = 3
CALLS = 4
# What the front end may hold beyond its budget (see README, "Bounded memory").
PER_STREAM = 4 * MiB
RUNTIME = 16 * MiB


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with Node(
        tmp_path_factory.mktemp("bounds"),
        max_inflight_bytes=str(BUDGET),
        max_file_bytes=str(MAX_FILE),
        idle_timeout_s=str(IDLE_S),
        read_deadline_s="30",
        max_concurrent_calls=str(CALLS),
    ) as node:
        yield node


def _large_file(megabytes: int, seed: int) -> bytes:
    """A multi-frame 512×512×16-bit CT instance of about ``megabytes`` MB, noisy pixels."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    frames = max(1, megabytes * MiB // (512 * 512 * 2))
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = 512, 512, frames
    pixels = np.random.default_rng(seed).integers(0, 4096, 512 * 512 * frames, dtype=np.uint16)
    dataset.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _small_file() -> bytes:
    return ct_instances(1, "small")[0][1]


def _private_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_full_info().uss)


def test_fast_senders_of_large_files_stay_within_the_budget(small_node: Node) -> None:
    senders = 3
    files = [[_large_file(60, 10 * s + n) for n in range(2)] for s in range(senders)]
    baseline = _private_bytes(small_node.front_end_pid)
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _private_bytes(small_node.front_end_pid))
            time.sleep(0.05)

    answers: list[str] = []

    def send(own: list[bytes]) -> None:
        with StrataClient(small_node.address) as client:
            named = [(f"f{i}", data) for i, data in enumerate(own)]
            answers.extend(outcome.status for outcome in client.ingest_bytes(named))

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=send, args=(own,)) for own in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    done.set()
    sampler.join()
    sent = sum(len(data) for own in files for data in own)
    growth = peak - baseline
    print(
        f"{senders} senders, {sent / MiB:.0f} MiB sent; front end private memory "
        f"{baseline / MiB:.0f} MiB at rest, peak {peak / MiB:.0f} MiB (+{growth / MiB:.0f} "
        f"MiB) against a budget of {BUDGET / MiB:.0f} MiB"
    )
    assert sorted(answers) == ["stored"] * (2 * senders)
    # The budget counts every received byte until its file is answered, in the front end's
    # heap or in Ray's object store. Beyond it (README, "Bounded memory"): gRPC's buffers
    # of each open stream, about one chunk and one receive window, and the runtime's
    # thread arenas. Measured: +111..+119 MiB here; before the fixes +225..+271 MiB.
    beyond = senders * PER_STREAM + RUNTIME
    assert growth < BUDGET + beyond, f"grew by {growth / MiB:.0f} MiB"


def test_a_stalled_sender_is_cut_off_and_others_are_served(small_node: Node) -> None:
    stalled = _large_file(80, 99)
    large = _large_file(80, 98)
    release = threading.Event()
    stalled_answers: list[pb.IngestResult] = []

    def stalling_requests() -> Iterator[pb.IngestChunk]:
        for offset in range(0, 60 * MiB, MiB):  # 60 of 80 MiB, then nothing
            yield pb.IngestChunk(file_id="stalled", data=stalled[offset : offset + MiB])
        release.wait(120)

    def stall() -> None:
        with StrataClient(small_node.address) as client:
            stalled_answers.extend(client.archive.Ingest(stalling_requests()))

    large_answers: list[str] = []

    def upload() -> None:
        with StrataClient(small_node.address) as client:
            large_answers.extend(o.status for o in client.ingest_bytes([("large", large)]))

    threads = [threading.Thread(target=stall), threading.Thread(target=upload)]
    threads[0].start()
    time.sleep(1.0)  # the stalled sender holds 60 MiB of the 100 MiB budget first
    threads[1].start()
    time.sleep(0.5)
    try:
        with StrataClient(small_node.address) as client:
            small = list(client.ingest_bytes([("small", _small_file())]))
    finally:
        release.set()
        for thread in threads:
            thread.join(300)
    assert [o.status for o in small] == ["stored"]
    assert large_answers == ["stored"]
    assert len(stalled_answers) == 1
    assert stalled_answers[0].status == pb.INGEST_STATUS_REJECTED
    assert stalled_answers[0].reason == "idle_timeout"
    assert f"nothing arrived for {IDLE_S} s" in stalled_answers[0].message


def test_calls_past_the_limit_are_refused_while_health_still_answers(small_node: Node) -> None:
    release = threading.Event()
    answered: list[str] = []

    def one_file_then_wait() -> Iterator[pb.IngestChunk]:
        (name, data) = ct_instances(1, "held")[0]
        yield pb.IngestChunk(file_id=name, data=data, last=True)
        release.wait(60)  # the stream stays open between files: not timed out

    def hold() -> None:
        with StrataClient(small_node.address) as client:
            answered.extend(r.status for r in client.archive.Ingest(one_file_then_wait()))

    threads = [threading.Thread(target=hold) for _ in range(CALLS)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(answered) < CALLS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answered == [pb.INGEST_STATUS_STORED] * CALLS
        with StrataClient(small_node.address) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.retrieve("1.2.3.4.5")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_calls" in (refused.value.details() or "")
        assert small_node.healthy()  # health checks are not counted
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    with StrataClient(small_node.address) as client:  # the slots are free again
        with pytest.raises(grpc.RpcError) as missing:
            client.retrieve("1.2.3.4.5")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_deflate_bomb_is_refused_before_it_is_inflated(small_node: Node) -> None:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.add_new(0x00091010, "LO", "STRATA TEST")
    dataset.add_new(0x00091011, "OB", bytes(2 * MAX_FILE))  # zeros: inflates 1000-fold
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    plain = buffer.getvalue()
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    bomb = buffer.getvalue()
    del plain
    assert len(bomb) < MAX_FILE // 50
    with StrataClient(small_node.address) as client:
        (outcome,) = client.ingest_bytes([("bomb", bomb)])
    assert outcome.status == "rejected"
    assert outcome.reason == "too_large"
    assert "max_file_bytes" in outcome.message
    assert "inflates past" in outcome.message


def _drive_parts(node: Node, key: str) -> list[str]:
    drives = sorted((node.data_dir / "minio").glob("drive*"))
    return [str(drive / "strata-hot" / key) for drive in drives]


def test_an_object_minio_cannot_rebuild_is_data_loss_at_once(small_node: Node) -> None:
    data = _small_file()
    with StrataClient(small_node.address) as client:
        (outcome,) = client.ingest_bytes([("to-break", data)])
        assert outcome.status == "stored"
        key = packs_by_member(small_node.object_store())[outcome.sha256]
        # EC:2 over 4 drives: losing 3 of an object's 4 parts leaves it unrecoverable.
        for part in _drive_parts(small_node, key)[:3]:
            shutil.rmtree(part)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failure:
            client.retrieve(outcome.sop_instance_uid)
        elapsed = time.monotonic() - started
        print(f"DATA_LOSS after {elapsed:.1f} s: {failure.value.details()}")
        assert failure.value.code() == grpc.StatusCode.DATA_LOSS
        details = failure.value.details() or ""
        assert "127.0.0.1" not in details and "http" not in details and "pid" not in details
        # The worker that tried is free again: the next read and the next ingest work.
        again = _small_file()
        (second,) = client.ingest_bytes([("after", again)])
        assert second.status == "stored"
        assert client.retrieve(second.sop_instance_uid).data == again
    assert key in small_node.log_text()
    assert hashlib.sha256(data).hexdigest() == outcome.sha256

"""The node heals itself: each component is killed mid-ingest, and nothing is lost.

One private node (real Ray, real 4-drive MinIO) for the module, since these tests kill its
parts. For each of the catalog writer, a Ray worker, MinIO and the Ray runtime (raylet):
files are sent over two streams, the component is killed with SIGKILL while they are in
flight, and then

- every file answered STORED or DUPLICATE is retrievable byte for byte;
- every file answered ``storage_failed`` has no catalog row (it was truly not committed);
- the node serves again without anyone restarting it, and every file not stored can be
  sent again to completion;
- once the reconciler has run, the store holds exactly the objects of acknowledged files:
  no orphan is left by the files that died with the component and were not sent again.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import psutil
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import IngestOutcome, StrataClient
from cluster.ops.reconcile import ORPHANS_AT_MOST
from tests.integration.conftest import ct_instances, packs_by_member, plant_pack
from tests.integration.node import Node
from workers.objects.envelope import keys_key_for
from workers.objects.store import pack_key_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILES = 24  # per test, over two streams


@pytest.fixture(scope="module")
def healing_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with Node(
        tmp_path_factory.mktemp("healing"),
        watch_interval_s="1",
        reconcile_interval_s="2",
        orphan_grace_s="0",  # in-flight files are protected; nothing else may linger
        commit_deadline_s="90",
        ingest_deadline_s="120",
        read_deadline_s="30",
        batch_max_files="4",
    ) as node:
        yield node


@pytest.fixture(scope="module")
def acknowledged() -> dict[str, bytes]:
    """SHA-256 → bytes of every file the node acknowledged in this module."""
    return {}


def _processes(node: Node, marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(node.pid).children(recursive=True):
        try:
            if marker in " ".join(process.cmdline()) or marker in process.name():
                found.append(process)
        except psutil.Error:
            continue
    return found


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"gave up waiting for {what} after {seconds:g} s")


def _serving(node: Node) -> bool:
    try:
        with grpc.insecure_channel(node.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def _send_while(
    node: Node, files: list[tuple[str, bytes]], kill: Callable[[], None]
) -> list[IngestOutcome]:
    """Send ``files`` over two streams; call ``kill`` once the first answers arrive."""
    halves = [files[0::2], files[1::2]]
    outcomes: list[IngestOutcome] = []
    answered = threading.Event()
    errors: list[BaseException] = []

    def send(part: list[tuple[str, bytes]]) -> None:
        try:
            with StrataClient(node.address) as client:
                for outcome in client.ingest_bytes(part):
                    outcomes.append(outcome)
                    answered.set()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=send, args=(half,)) for half in halves]
    for thread in threads:
        thread.start()
    answered.wait(60)
    kill()
    for thread in threads:
        thread.join(300)
    assert not errors, f"a stream failed instead of answering every file: {errors!r}"
    return outcomes


def _object_shas(node: Node) -> set[str]:
    """The SHA-256 of every file stored in the hot bucket (members of its packs)."""
    return set(packs_by_member(node.object_store()))


def _check_and_heal(
    node: Node,
    files: list[tuple[str, bytes]],
    outcomes: list[IngestOutcome],
    acknowledged: dict[str, bytes],
) -> dict[str, int]:
    by_name = dict(files)
    assert sorted(o.source for o in outcomes) == sorted(by_name), "one answer per file"
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = outcome.status if outcome.status != "rejected" else outcome.reason
        counts[key] = counts.get(key, 0) + 1
    _wait_for(lambda: _serving(node), "the node to serve again")

    not_stored = []
    with StrataClient(node.address) as client:
        for outcome in outcomes:
            data = by_name[outcome.source]
            if outcome.status in ("stored", "duplicate"):
                # What was acknowledged is there, byte for byte.
                assert outcome.sha256 == hashlib.sha256(data).hexdigest()
                assert client.retrieve(outcome.sop_instance_uid).data == data, outcome.source
                acknowledged[outcome.sha256] = data
                continue
            assert outcome.reason in ("storage_failed", "commit_unconfirmed", "unavailable"), (
                outcome
            )
            assert "Ray" not in outcome.message and "127.0.0.1" not in outcome.message
            uid = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
            if outcome.reason == "commit_unconfirmed":
                # Either way is the truth here; if it landed, it is whole.
                try:
                    if client.retrieve(uid).data == data:
                        acknowledged[outcome.sha256] = data
                        continue
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND
            if outcome.reason in ("storage_failed", "unavailable"):
                # "Not stored" is the truth: there is no catalog row for it.
                with pytest.raises(grpc.RpcError) as missing:
                    client.retrieve(uid)
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND, outcome
            not_stored.append((outcome.source, data))

        # Everything not stored can be sent again to completion (half of it; the rest is
        # left to show that whatever objects it left behind are removed).
        again = not_stored[: (len(not_stored) + 1) // 2]
        counts["resent"] = len(again)
        for _ in range(5):
            answers = list(client.ingest_bytes(again))
            for answer in answers:
                if answer.status in ("stored", "duplicate"):
                    acknowledged[answer.sha256] = by_name[answer.source]
            left = {a.source for a in answers if a.status not in ("stored", "duplicate")}
            again = [(name, data) for name, data in again if name in left]
            if not again:
                break
            time.sleep(2)
        assert not again, f"{len(again)} files could not be stored after healing"
        for sha, data in acknowledged.items():
            uid = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
            assert client.retrieve(uid).sha256 == sha

    # No orphans: once reconciled, of this test's files exactly the acknowledged ones have
    # an object in the store.
    ours = {hashlib.sha256(data).hexdigest() for _, data in files}
    stored = ours & set(acknowledged)
    _wait_for(lambda: _object_shas(node) & ours == stored, "orphans to be removed", 90)
    print(f"answers while killing: {counts}")
    return counts


def test_catalog_writer_killed_mid_ingest(
    healing_node: Node, acknowledged: dict[str, bytes]
) -> None:
    files = ct_instances(FILES, frames=8, tag="writer")

    def kill() -> None:
        writers = _processes(healing_node, "CatalogWriter")
        assert writers, "the catalog writer's process should be running"
        for process in writers:
            process.kill()

    outcomes = _send_while(healing_node, files, kill)
    _check_and_heal(healing_node, files, outcomes, acknowledged)


def test_ray_worker_killed_mid_ingest(healing_node: Node, acknowledged: dict[str, bytes]) -> None:
    files = ct_instances(FILES, frames=8, tag="worker")

    def kill() -> None:
        _wait_for(lambda: bool(_processes(healing_node, "ingest_batch")), "a busy worker", 30)
        for process in _processes(healing_node, "ingest_batch"):
            process.kill()

    outcomes = _send_while(healing_node, files, kill)
    counts = _check_and_heal(healing_node, files, outcomes, acknowledged)
    # Ray runs a batch again on another worker: nothing is lost, nothing needs resending.
    assert counts.get("stored", 0) + counts.get("duplicate", 0) == FILES, counts


def test_minio_killed_mid_ingest(healing_node: Node, acknowledged: dict[str, bytes]) -> None:
    files = ct_instances(FILES, frames=8, tag="minio")

    def kill() -> None:
        servers = _processes(healing_node, "minio")
        assert servers, "MinIO should be running"
        for process in servers:
            process.kill()

    started = time.monotonic()
    outcomes = _send_while(healing_node, files, kill)
    print(f"all {len(outcomes)} answers within {time.monotonic() - started:.1f} s")
    _check_and_heal(healing_node, files, outcomes, acknowledged)
    assert "the object store (MinIO) is back" in healing_node.log_text()


def test_ray_runtime_killed_mid_ingest(healing_node: Node, acknowledged: dict[str, bytes]) -> None:
    files = ct_instances(FILES, frames=8, tag="raylet")

    def kill() -> None:
        raylets = _processes(healing_node, "raylet")
        assert raylets, "the raylet should be running"
        for process in raylets:
            process.kill()

    outcomes = _send_while(healing_node, files, kill)
    _check_and_heal(healing_node, files, outcomes, acknowledged)
    log = healing_node.log_text()
    # Either the node restarted Ray itself, or Ray ended the front end (it does when the
    # front end touches the object store of a dead raylet) and the supervisor started the
    # node again; the streams were opened again by the client either way.
    healed_inside = "the Ray runtime" in log and "is back; serving again" in log
    restarted = "the node's process ended unexpectedly" in log and "serves" in log
    assert healed_inside or restarted, healing_node.log_tail()


def test_an_object_without_a_catalog_row_is_removed(
    healing_node: Node, acknowledged: dict[str, bytes]
) -> None:
    # What a worker that died between its PUTs and the commit leaves behind; and a pack
    # whose every file was a duplicate of one stored before (its SHA-256 is known, but no
    # row names this pack).
    orphan_sha = hashlib.sha256(b"an orphan").hexdigest()
    key = pack_key_for("1.2.826.0.1.3680043.10.1.1")
    plant_pack(healing_node.object_store(), [orphan_sha], key)
    duplicates = pack_key_for("1.2.826.0.1.3680043.10.1.2")
    if acknowledged:
        plant_pack(healing_node.object_store(), sorted(acknowledged)[:2], duplicates)
    assert orphan_sha in _object_shas(healing_node)
    _wait_for(lambda: orphan_sha not in _object_shas(healing_node), "the orphan's removal", 60)
    assert f"removed orphan pack {key}" in healing_node.log_text()
    if acknowledged:
        _wait_for(
            lambda: duplicates not in set(packs_by_member(healing_node.object_store()).values()),
            "the removal of a pack of duplicates",
            60,
        )
    listed = {
        o.object_name
        for o in healing_node.object_store().list_objects("strata-hot", recursive=True)
    }
    assert keys_key_for(key) not in listed  # its keys object went with it
    if acknowledged:  # the acknowledged files' objects were left alone
        assert set(acknowledged) <= _object_shas(healing_node)


def test_a_mass_of_objects_without_rows_is_not_removed(healing_node: Node) -> None:
    """As after a lost catalog: the reconciler must not delete the archive to rebuild from."""
    planted = {}
    packs = len(set(packs_by_member(healing_node.object_store()).values()))
    for n in range(max(60, 2 * packs)):
        sha = hashlib.sha256(f"lost catalog {n}".encode()).hexdigest()
        planted[sha] = pack_key_for(f"1.2.826.0.1.3680043.10.2.{n}")
        plant_pack(healing_node.object_store(), [sha], planted[sha])
    _wait_for(lambda: "nothing removed" in healing_node.log_text(), "the refusal", 60)
    # A pass that ran while the first few were being planted may have taken them for
    # crash leftovers (up to ORPHANS_AT_MOST); once the mass is there, nothing goes.
    survivors = set(planted) & _object_shas(healing_node)
    assert len(survivors) > ORPHANS_AT_MOST
    time.sleep(3)  # a further pass, at 2 s
    assert survivors <= _object_shas(healing_node)
    for key in planted.values():
        healing_node.object_store().remove_object("strata-hot", key)
        healing_node.object_store().remove_object("strata-hot", keys_key_for(key))


def test_the_log_explains_and_hides_no_phi(healing_node: Node) -> None:
    log = healing_node.log_text()
    assert "has stopped; refusing new work and restarting it" in log
    # CT_small.dcm's Patient's Name and Patient ID, in every file these tests sent.
    for phi in ("CompressedSamples", "1CT1"):
        assert phi not in log

"""How the dispatcher forms batches: held for senders that wait on each answer, sent as
one task, a lone sender never held.

The worker task is a small fake (it records the batches it is given and answers when the
test says); the real pipeline and Ray are exercised by the integration tests."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from cluster.archive import dispatch
from cluster.archive.dispatch import Dispatcher, FileResult
from workers.pipeline.ingest import BatchResult
from workers.records import IngestItem, Rejected


class FakeTask:
    """Stands in for the Ray task: each call is a batch the test answers."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.answers: list[asyncio.Future[BatchResult]] = []

    def remote(self, items: list[IngestItem], settings: Any) -> asyncio.Future[BatchResult]:
        self.batches.append([item.data.decode() for item in items])
        answer: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        answer.set_result(
            BatchResult([Rejected(item.file_id, "invalid_dicom", "fake") for item in items], 0.0)
        )
        self.answers.append(answer)
        return answer


@pytest.fixture
def task(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTask]:
    fake = FakeTask()
    monkeypatch.setattr(dispatch, "_ingest_task", fake)
    monkeypatch.setattr(dispatch.ray, "put", lambda value: value)
    yield fake


def dispatcher(hold_s: float = 5.0, quiet_s: float = 10.0) -> Dispatcher:
    return Dispatcher(
        settings=None,  # type: ignore[arg-type]
        catalog=None,
        worker_cpus=2,
        batch_max_files=8,
        batch_max_bytes=1 << 30,
        batch_hold_s=hold_s,
        sender_quiet_s=quiet_s,
    )


def item(name: str) -> IngestItem:
    data = name.encode()
    return IngestItem(name, data, hashlib.sha256(data).hexdigest())


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_files_of_awaited_senders_wait_for_each_other_and_leave_together(task: FakeTask) -> None:
    asyncio.run(_files_of_awaited_senders_wait_for_each_other_and_leave_together(task))


async def _files_of_awaited_senders_wait_for_each_other_and_leave_together(task: FakeTask) -> None:
    work = dispatcher()
    senders = [object() for _ in range(4)]
    for sender in senders:
        work.sender_answered(sender)  # each sent a file before, and was answered
    sent = [
        asyncio.create_task(work.submit(item(f"f{number}"), sender=sender))
        for number, sender in enumerate(senders[:3])
    ]
    await settle()
    assert task.batches == []  # held: the fourth sender is sending
    sent.append(asyncio.create_task(work.submit(item("f3"), sender=senders[3])))
    results: list[FileResult] = await asyncio.gather(*sent)
    assert [sorted(batch) for batch in task.batches] == [["f0", "f1", "f2", "f3"]]
    assert [result.status for result in results] == ["rejected"] * 4


def test_a_sender_that_goes_away_releases_the_held_batch(task: FakeTask) -> None:
    asyncio.run(_a_sender_that_goes_away_releases_the_held_batch(task))


async def _a_sender_that_goes_away_releases_the_held_batch(task: FakeTask) -> None:
    work = dispatcher()
    first, gone = object(), object()
    work.sender_answered(first)
    work.sender_answered(gone)
    sent = asyncio.create_task(work.submit(item("f0"), sender=first))
    await settle()
    assert task.batches == []
    work.sender_quiet(gone)
    await sent
    assert task.batches == [["f0"]]


def test_a_held_batch_leaves_after_the_hold(task: FakeTask) -> None:
    asyncio.run(_a_held_batch_leaves_after_the_hold(task))


async def _a_held_batch_leaves_after_the_hold(task: FakeTask) -> None:
    work = dispatcher(hold_s=0.05)
    first, silent = object(), object()
    work.sender_answered(first)
    work.sender_answered(silent)
    await asyncio.wait_for(work.submit(item("f0"), sender=first), 5)
    assert task.batches == [["f0"]]


def test_a_lone_sender_and_a_stream_are_never_held(task: FakeTask) -> None:
    asyncio.run(_a_lone_sender_and_a_stream_are_never_held(task))


async def _a_lone_sender_and_a_stream_are_never_held(task: FakeTask) -> None:
    work = dispatcher()
    lone = object()
    work.sender_answered(lone)
    await asyncio.wait_for(work.submit(item("f0"), sender=lone), 1)
    await asyncio.wait_for(work.submit(item("f1")), 1)  # a stream names no sender
    assert task.batches == [["f0"], ["f1"]]


def test_a_sender_silent_too_long_is_not_awaited(task: FakeTask) -> None:
    asyncio.run(_a_sender_silent_too_long_is_not_awaited(task))


async def _a_sender_silent_too_long_is_not_awaited(task: FakeTask) -> None:
    work = dispatcher(quiet_s=0.0)
    first, silent = object(), object()
    work.sender_answered(first)
    work.sender_answered(silent)
    await asyncio.wait_for(work.submit(item("f0"), sender=first), 1)
    assert task.batches == [["f0"]]

"""The DIMSE door's replacements for pynetdicom's polling loops (cluster/doors/dimse/
reactor.py): the socket read and the association reactor, on small fakes of the objects
they are installed on; the real door is exercised by the DIMSE integration tests."""

from __future__ import annotations

import queue
import socket
import threading
import tracemalloc
import types
from typing import Any

import pytest

from cluster.doors.dimse import reactor


def _reader(sock: socket.socket) -> Any:
    fake = types.SimpleNamespace(socket=sock)
    return types.MethodType(reactor._recv, fake)


def test_a_pdu_is_read_whole_across_many_arrivals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reactor, "_READ_AHEAD", 16)  # the buffer grows many times
    ours, theirs = socket.socketpair()
    with ours, theirs:
        payload = bytes(range(256)) * 4
        sender = threading.Thread(
            target=lambda: [theirs.sendall(payload[i : i + 37]) for i in range(0, 1024, 37)]
        )
        sender.start()
        got = _reader(ours)(len(payload))
        sender.join()
        assert bytes(got) == payload


def test_a_claimed_length_the_peer_never_sends_is_not_allocated() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        theirs.sendall(b"0123456789")
        theirs.close()  # then the connection ends: 4 GiB were announced
        tracemalloc.start()
        try:
            got = _reader(ours)(2**32 - 1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert bytes(got) == b"0123456789"
    assert peak < 4 * 1024 * 1024  # what the buffer may grow by, not what was announced


class _Queue(queue.Queue[Any]):
    """A DIMSE queue whose first ``get`` lets a pauser in before it answers."""

    def __init__(self, paused: threading.Event) -> None:
        super().__init__()
        self._paused = paused
        self.gets = 0

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.gets += 1
        if self.gets == 1:
            self._paused.clear()  # another thread pauses the reactor just now
        return super().get(block, timeout)


def _association(checkpoint: threading.Event, messages: queue.Queue[Any]) -> Any:
    served: list[Any] = []
    fake = types.SimpleNamespace(
        _kill=False,
        _is_paused=False,
        _reactor_checkpoint=checkpoint,
        dimse=types.SimpleNamespace(msg_queue=messages),
        is_established=True,
        acse=types.SimpleNamespace(is_release_requested=lambda: False, is_aborted=lambda *_: False),
        dul=types.SimpleNamespace(is_alive=lambda: True, idle_timer_expired=lambda: False),
        served=served,
    )
    fake._serve_request = lambda msg, context_id: served.append((context_id, msg))
    return fake


def test_a_message_taken_while_another_thread_pauses_the_reactor_goes_back() -> None:
    checkpoint = threading.Event()
    checkpoint.set()
    messages = _Queue(checkpoint)
    messages.put((1, "N-EVENT-REPORT response"))
    messages.put((1, "the next request"))
    assoc = _association(checkpoint, messages)
    loop = threading.Thread(target=reactor._run_reactor, args=(assoc,), daemon=True)
    loop.start()
    for _ in range(400):  # the reactor gives the message back and waits at its checkpoint
        if assoc._is_paused and messages.gets == 1:
            break
        threading.Event().wait(0.005)
    assert assoc.served == []
    # The pauser takes its own answer, first in the queue, and lets the reactor go on.
    assert messages.get_nowait() == (1, "N-EVENT-REPORT response")
    checkpoint.set()
    for _ in range(400):
        if assoc.served:
            break
        threading.Event().wait(0.005)
    assoc._kill = True
    loop.join(5)
    assert assoc.served == [(1, "the next request")]
    assert not loop.is_alive()


def test_the_loops_replaced_are_those_of_the_pynetdicom_installed() -> None:
    import pynetdicom

    # An upgrade must check reactor._run_reactor against the new Association._run_reactor
    # (and AssociationSocket.recv), then move WRITTEN_FOR; until then the door polls.
    assert pynetdicom.__version__ == reactor.WRITTEN_FOR

"""The DIMSE door's replacements for pynetdicom's polling loops (cluster/doors/dimse/
reactor.py): the socket read and the association reactor, on small fakes of the objects
they are installed on; the real door is exercised by the DIMSE integration tests."""

from __future__ import annotations

import os
import queue
import resource
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


def _fake_dul(connection: socket.socket) -> Any:
    dul = types.SimpleNamespace(
        to_provider_queue=queue.Queue(), socket=types.SimpleNamespace(socket=connection)
    )
    reactor.wait_on_the_socket(dul)
    return dul


def _waits_until(dul: Any, wake: Any) -> bool:
    """Whether ``_wait_for`` returns once ``wake`` has run (it would wait a minute else)."""
    waiting = threading.Thread(target=reactor._wait_for, args=(dul,), daemon=True)
    waiting.start()
    wake()
    waiting.join(30)
    return not waiting.is_alive()


def test_the_dul_loop_wakes_for_a_primitive_to_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reactor, "_DUL_WAIT_S", 60.0)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        dul = _fake_dul(ours)
        assert _waits_until(dul, lambda: dul.to_provider_queue.put("a P-DATA primitive"))
        assert dul.to_provider_queue.get_nowait() == "a P-DATA primitive"
        # The wake-up was taken: the next wait waits again, for the peer this time.
        assert _waits_until(dul, lambda: theirs.sendall(b"\x04\x00"))


def test_the_dul_loop_waits_on_descriptors_past_1024(monkeypatch: pytest.MonkeyPatch) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    monkeypatch.setattr(reactor, "_DUL_WAIT_S", 60.0)
    monkeypatch.setattr(reactor.time, "sleep", _never)  # the fallback for a failed wait
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            dul = _fake_dul(ours)
            assert dul._strata_alarm.bell.fileno() > 1024
            waiting = threading.Thread(target=reactor._wait_for, args=(dul,), daemon=True)
            waiting.start()
            waiting.join(0.2)
            assert waiting.is_alive()  # it waits: nothing has come
            dul.to_provider_queue.put("a primitive")
            waiting.join(30)
            assert not waiting.is_alive()
    finally:
        for descriptor in held:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _never(seconds: float) -> None:
    raise AssertionError("the wait failed and fell back to sleeping")


def test_the_dul_loop_ends_its_wake_up_socket() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        dul = _fake_dul(ours)
        dul._kill_thread = True
        dul._idle_timer = types.SimpleNamespace(start=lambda: None)
        dul.assoc = types.SimpleNamespace(_dul_ready=threading.Event())
        reactor._run_dul(dul)
        assert dul._strata_alarm.bell.fileno() == -1
        dul.to_provider_queue.put("sent after the end")  # no error: nobody to wake


def test_the_loops_replaced_are_those_of_the_pynetdicom_installed() -> None:
    import pynetdicom

    # An upgrade must check reactor._run_reactor against the new Association._run_reactor
    # (and AssociationSocket.recv), then move WRITTEN_FOR; until then the door polls.
    assert pynetdicom.__version__ == reactor.WRITTEN_FOR

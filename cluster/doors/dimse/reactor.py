"""Three of pynetdicom's per-association loops, made to wait instead of poll.

pynetdicom (3.0) serves each association with two threads that poll: the association's
reactor sleeps 1 ms between looks at its DIMSE queue (1,000 wake-ups a second per
association, each taking the GIL from the node's event loop while the archive works on
the file), and its DUL provider sleeps between looks at its socket and at the primitives
to send (``_run_loop_delay``: a C-STORE request waits for it to wake, and so does the
response), while its socket reads a PDU 4 KiB per ``recv`` (130 system calls for a CT
slice). None of this can be configured, and no other DIMSE library for Python fits the
door (the door is built on pynetdicom's services), so ``wait_instead_of_polling`` and
``wait_on_the_socket`` replace them on one accepted association's objects, before its
threads start; nothing else of pynetdicom changes.

The reactor below is pynetdicom 3.0.4's ``Association._run_reactor`` with one change: it
blocks on the DIMSE queue, up to ``_WAIT_S``, where the original slept 1 ms and then
looked (200 wake-ups a second, not 1,000). A message it takes while another thread has
paused it (a storage commitment report sent on the same association, which waits for its
own answer on that queue) goes back to the front of the queue. The DUL loop is 3.0.4's
``DULServiceProvider.run_reactor`` with one change: where it slept, it waits in
``select`` on the association's socket and on a wake-up socket that every primitive put
on its queue to send writes to, up to ``_DUL_WAIT_S`` (for its timers and for being
stopped): a request is read, and a response sent, as soon as there is one.

``_WAIT_S`` bounds two delays, both once per association: noticing the peer's A-RELEASE
or A-ABORT (which arrive on another queue; a modality that opens an association per image
waits up to that much longer for its release), and a thread that pauses the reactor
waiting for it to reach its checkpoint. ``_DUL_WAIT_S`` bounds how long an association's
threads outlive it once it has ended.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import time
import types
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger("pynetdicom.association")  # as pynetdicom's own loop logs
dul_log = logging.getLogger("pynetdicom.dul")

_WAIT_S = 0.005
_DUL_WAIT_S = 0.02
# The pynetdicom whose loops these replace; any other keeps its own (the upgrade test
# fails until these are checked against it).
WRITTEN_FOR = "3.0.4"
# ``_recv`` grows its buffer by at most this much before the bytes are there: a PDU
# length comes from the peer (up to 4 GiB), the bytes behind it may never.
_READ_AHEAD = 1024 * 1024 + 6


def wait_instead_of_polling(assoc: Any) -> None:
    """Make accepted association ``assoc`` wait for its DIMSE messages and read whole
    PDUs (see module); called from its EVT_REQUESTED handler."""
    if pynetdicom.__version__ != WRITTEN_FOR:
        return
    assoc._run_reactor = types.MethodType(_run_reactor, assoc)
    sock = assoc.dul.socket
    if sock is not None:
        sock.recv = types.MethodType(_recv, sock)


def wait_on_the_socket(dul: Any) -> None:
    """Make accepted association's DUL provider ``dul`` wait on its socket and on what it
    has to send instead of sleeping between looks (see module); called before its thread
    starts (EVT_CONN_OPEN)."""
    if pynetdicom.__version__ != WRITTEN_FOR:
        return
    alarm = _Alarm()
    dul._strata_alarm = alarm
    to_send = dul.to_provider_queue
    put = to_send.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        alarm.ring()

    to_send.put = put_and_wake
    dul.run = types.MethodType(_run_dul, dul)


class _Alarm:
    """A socket pair that other threads ring and the DUL loop waits on."""

    def __init__(self) -> None:
        self._ringer, self.bell = socket.socketpair()
        self._ringer.setblocking(False)
        self.bell.setblocking(False)
        self._lock = threading.Lock()  # a ring never meets a close (the number reused)

    def ring(self) -> None:
        # Full: the loop is awake anyway; closed: the loop has ended.
        with self._lock, contextlib.suppress(OSError):
            self._ringer.send(b"\0")

    def silence(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.bell.recv(4096):
                pass

    def close(self) -> None:
        with self._lock:
            self._ringer.close()
            self.bell.close()


def _run_dul(self: Any) -> None:
    # pynetdicom 3.0.4's DULServiceProvider.run_reactor (dul.py), waiting in _wait_for
    # where it slept; the rest is the same and in the same order.
    self._idle_timer.start()
    sleep = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                _wait_for(self)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom's loop: abort, never hang
                dul_log.error("Exception in DUL.run(), aborting association")
                dul_log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False
    finally:
        self._strata_alarm.close()


def _wait_for(dul: Any) -> None:
    """Until the peer has sent something, a primitive is put to be sent, or
    ``_DUL_WAIT_S`` has passed. (``poll``, not ``select``: a process serving many
    associations has descriptors past ``select``'s 1,024.)"""
    alarm: _Alarm = dul._strata_alarm
    waiting = select.poll()
    waiting.register(alarm.bell, select.POLLIN)
    connection = getattr(dul.socket, "socket", None)
    if connection is not None and connection.fileno() >= 0:
        waiting.register(connection, select.POLLIN)
    try:
        waiting.poll(_DUL_WAIT_S * 1000)
    except OSError:  # closed meanwhile: waited for nothing; the loop's own checks see it
        time.sleep(_DUL_WAIT_S)
    alarm.silence()


def _run_reactor(self: Any) -> None:
    # pynetdicom 3.0.4's acceptor loop (association.py), waiting on the queue instead of
    # sleeping; the checks after it are the same and in the same order.
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        try:
            context_id, msg = self.dimse.msg_queue.get(timeout=_WAIT_S)
        except queue.Empty:
            context_id, msg = None, None
        if msg and not self._reactor_checkpoint.is_set():
            _give_back(self.dimse.msg_queue, (context_id, msg))  # the pauser's answer
            continue
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            message = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                message += " (A-P-ABORT)"
            log.info(message)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def _give_back(messages: queue.Queue[Any], item: Any) -> None:
    """Put ``item`` back at the front of ``messages``, for the thread waiting on it."""
    with messages.mutex:
        messages.queue.appendleft(item)
        messages.not_empty.notify()


def _recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: ``nr_bytes`` from the socket, or fewer if the
    connection ended first; into one buffer, as much per call as the kernel has, which
    grows only as the bytes arrive (by ``_READ_AHEAD`` at most)."""
    buffer = bytearray(min(nr_bytes, _READ_AHEAD))
    got = 0
    while got < nr_bytes:
        if got == len(buffer):
            buffer.extend(bytes(min(nr_bytes - got, _READ_AHEAD)))
        with memoryview(buffer) as view:
            read = self.socket.recv_into(view[got:])
        if not read:
            break
        got += read
    del buffer[got:]
    return buffer

"""Two of pynetdicom's per-association loops, made to wait instead of poll.

pynetdicom (3.0) serves each association with two threads that poll: the association's
reactor sleeps 1 ms between looks at its DIMSE queue (1,000 wake-ups a second per
association, each taking the GIL from the node's event loop while the archive works on
the file), and its socket reads a PDU 4 KiB per ``recv`` (130 system calls for a CT
slice). Neither can be configured, and no other DIMSE library for Python fits the door
(the door is built on pynetdicom's services), so ``wait_instead_of_polling`` replaces
both on one accepted association's objects, before its reactor starts; nothing else of
pynetdicom changes. The reactor below is pynetdicom 3.0.4's ``Association._run_reactor``
with one change: it blocks on the DIMSE queue, up to ``_WAIT_S``, where the original
slept 1 ms and then looked (200 wake-ups a second, not 1,000). A message it takes while
another thread has paused it (a storage commitment report sent on the same association,
which waits for its own answer on that queue) goes back to the front of the queue.

``_WAIT_S`` bounds two delays, both once per association: noticing the peer's A-RELEASE
or A-ABORT (which arrive on another queue; a modality that opens an association per image
waits up to that much longer for its release), and a thread that pauses the reactor
waiting for it to reach its checkpoint.
"""

from __future__ import annotations

import logging
import queue
import types
from typing import Any

import pynetdicom
from pynetdicom import evt

log = logging.getLogger("pynetdicom.association")  # as pynetdicom's own loop logs

_WAIT_S = 0.005
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

"""`strata serve` keeps its node running: the node in a child process, started again if it dies.

Most failures are healed inside the node (cluster/ops/node.py watches MinIO and Ray's own
processes and restarts them). One cannot be: Ray fate-shares a driver with its raylet. A
driver that touches the object store after its raylet died is ended by Ray itself
(``plasma::StoreConn::ExitIfErrorStatus`` calls ``QuickExit``, on purpose, with no way to
turn it off), and the front end touches the object store with every file it hands a
worker. So the front end is a child of this small supervisor, which starts it again when
it ends without being asked to; MinIO and Ray's processes end with it (they are started
to die with their parent) and come back with the new child. Clients see their streams
break and send again what was not answered (`StrataClient` does so by itself); nothing
acknowledged is lost, since an answer is sent only after its catalog commit.

On Kubernetes the same is the pod's restart policy; the supervisor is what gives a node
on one machine the same behaviour. No library fits this (systemd or supervisord would be
one more thing to install and configure for a single child), hence the few lines here.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from cluster.ops.processes import die_with_parent

__all__ = ["CHILD_ENVIRONMENT", "READY_FD_ENVIRONMENT", "signal_ready", "supervise"]

log = logging.getLogger("strata.serve")

# Set in the child's environment: it runs the node instead of supervising one.
CHILD_ENVIRONMENT = "STRATA_SERVE_CHILD"
# The file descriptor the child writes to once it serves.
READY_FD_ENVIRONMENT = "STRATA_SERVE_READY_FD"

# Started again at most this often within the window; past it the node is left down
# (something is wrong that a restart does not cure) and the supervisor exits with its code.
RESTARTS_AT_MOST = 5
RESTART_WINDOW_S = 600.0


def signal_ready() -> None:
    """In the child, once every door serves: tell the supervisor (no-op when unsupervised)."""
    fd = os.environ.pop(READY_FD_ENVIRONMENT, "")
    if not fd:
        return
    try:
        os.write(int(fd), b"1")
        os.close(int(fd))
    except OSError:
        pass  # the supervisor is gone; the child ends with it (see die_with_parent)


def supervise(argv: Sequence[str], program: Sequence[str] = ()) -> int:
    """Run ``python -m cluster.cli <argv>`` (or ``program``) as the node; keep it running.

    A child that ends before it served (a bad configuration, a port taken) is not started
    again: its exit code is returned. One that ends after it served, without SIGTERM or
    SIGINT having been sent here, is started again after a short pause.
    """
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    restarts: list[float] = []
    while True:
        child, ready = _start([*(program or (sys.executable, "-m", "cluster.cli")), *argv])
        if stopping:  # asked to stop while it was being started
            child.send_signal(signal.SIGTERM)
        served = _served(ready)
        if served and child.poll() is None:
            log.info("the node's process (pid %d) serves", child.pid)
        code = child.wait()
        if stopping or code == 0 or not served:
            return _exit_code(code)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(restarts) > RESTARTS_AT_MOST:
            log.error(
                "the node's process ended %d times in %d s; leaving it down (%s)",
                len(restarts),
                RESTART_WINDOW_S,
                _describe(code),
            )
            return _exit_code(code)
        log.error(
            "the node's process ended unexpectedly (%s; Ray ends a front end whose raylet "
            "died); starting it again",
            _describe(code),
        )
        time.sleep(1.0)
        if stopping:
            return _exit_code(code)


def _start(command: Sequence[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start the child; return it and the read end of its ready pipe."""
    read_end, write_end = os.pipe()
    environment = {**os.environ, CHILD_ENVIRONMENT: "1", READY_FD_ENVIRONMENT: str(write_end)}
    try:
        child = subprocess.Popen(
            list(command),
            env=environment,
            pass_fds=(write_end,),
            preexec_fn=die_with_parent,
        )
    finally:
        os.close(write_end)
    return child, read_end


def _served(read_end: int) -> bool:
    """Whether the child came to serve: one byte once it does, end of file if it ended."""
    with os.fdopen(read_end, "rb") as ready:
        return ready.read(1) == b"1"


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code

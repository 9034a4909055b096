"""Child processes that end with the process that started them."""

from __future__ import annotations

import ctypes
import signal

__all__ = ["die_with_parent"]


def die_with_parent() -> None:
    """In a child before exec (``preexec_fn``): ask Linux to SIGTERM it when its parent dies.

    Without it a killed `strata serve` or test run would leave MinIO or the node running.
    Linux sends the signal when the *thread* that started the child ends, so start it from
    a thread that lives as long as the child should. Without prctl it does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

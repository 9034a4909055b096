"""A running node listens on the loopback interface only (Strata's promise).

Lists every listening socket (TCP in LISTEN, UDP not connected) of `strata serve` and of
every process it started: MinIO, and Ray's GCS, raylet, dashboard head and agent, runtime
env agent, autoscaler monitor, log monitor and workers.

Which processes: Ray starts the GCS, raylet and its helpers as children of the driver
(the `strata serve` process), and the agents and workers as children of the raylet, so
they are all its descendants while the node runs (they are started fate-sharing, and the
agents exit when the raylet goes). In case one is ever reparented, the test also takes
every process on the machine that names this node's Ray session directory on its command
line or inherited this node's own STRATA_KEY_FILE (the agents rename themselves, which
overwrites their command line and environment, but they stay children of the raylet),
and their descendants. As a check independent of process ancestry, each port Ray
recorded in the session directory (GCS, dashboard agent gRPC, metrics export, runtime env
agent) must be among the sockets found.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pydicom
import pytest

from cluster.client import StrataClient
from tests.integration.node import Node

pytestmark = [pytest.mark.integration]

# 127.0.0.1 as an AF_INET6 socket sees it: gRPC binds "127.0.0.1:port" on a dual-stack
# socket, which accepts connections to 127.0.0.1 only.
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
SESSION_DIR = re.compile(r"(/[^\s=]*/session_\d{4}-\d\d-\d\d_[^/\s]+)")


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str
    protocol: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.process} (pid {self.pid}) {self.protocol} {self.ip}:{self.port}"


def _descendants(root: psutil.Process) -> dict[int, psutil.Process]:
    found = {root.pid: root}
    with contextlib.suppress(psutil.NoSuchProcess):
        found.update({p.pid: p for p in root.children(recursive=True)})
    return found


def _session_dirs(processes: Iterable[psutil.Process]) -> set[str]:
    dirs = set()
    for process in processes:
        try:
            dirs.update(SESSION_DIR.findall(" ".join(process.cmdline())))
        except psutil.Error:
            continue
    return dirs


def node_processes(node: Node) -> tuple[dict[int, psutil.Process], set[str]]:
    """The node process, its descendants, and Ray processes of its session outside them."""
    processes = _descendants(psutil.Process(node.pid))
    sessions = _session_dirs(processes.values())
    key_file = str(node.key_file)
    for process in psutil.process_iter():
        if process.pid in processes:
            continue
        try:
            command = " ".join(process.cmdline())
            ours = any(session in command for session in sessions)
            ours = ours or process.environ().get("STRATA_KEY_FILE") == key_file
        except psutil.Error:
            continue
        if ours:
            processes.update(_descendants(process))
    return processes, sessions


def listeners(processes: Iterable[psutil.Process]) -> list[Listener]:
    found = []
    for process in processes:
        try:
            name = process.name()
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for connection in connections:
            tcp = connection.type == socket.SOCK_STREAM
            if (tcp and connection.status == psutil.CONN_LISTEN) or (
                not tcp and not connection.raddr
            ):
                found.append(
                    Listener(
                        process.pid,
                        name,
                        "tcp" if tcp else "udp",
                        connection.laddr.ip,
                        connection.laddr.port,
                    )
                )
    return sorted(found, key=lambda item: (item.process, item.port))


def recorded_ports(sessions: Iterable[str]) -> dict[str, int]:
    """The ports Ray wrote to ``<session>/<name>_port_<node id>``, by file name."""
    ports = {}
    for session in sessions:
        for path in Path(session).glob("*_port_*"):
            text = path.read_text().strip()
            if text.isdigit() and int(text) > 0:
                ports[path.name] = int(text)
    return ports


def test_node_listens_on_loopback_only(node: Node) -> None:
    # One file first, so that Ray's worker processes (and their gRPC servers) exist.
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    assert path is not None
    with StrataClient(node.address) as client:
        outcomes = list(client.ingest_bytes([("ct", Path(path).read_bytes())]))
    assert [outcome.status for outcome in outcomes] in (["stored"], ["duplicate"])

    processes, sessions = node_processes(node)
    found = listeners(processes.values())
    report = "\n".join(f"  {listener}" for listener in found)
    print(f"listening sockets of node pid {node.pid} (Ray session {sorted(sessions)}):")
    print(report)

    names = {listener.process for listener in found}
    assert len(found) >= 5, f"found only {len(found)} listening sockets:\n{report}"
    assert {"raylet", "gcs_server"} <= names, f"Ray's processes were not found:\n{report}"
    assert sessions, "no Ray session directory on the command line of the node's processes"

    exposed = [listener for listener in found if listener.ip not in LOOPBACK]
    assert not exposed, (
        "listening on more than the loopback interface:\n"
        + "\n".join(f"  {listener}" for listener in exposed)
        + f"\nall listening sockets:\n{report}"
    )

    ports = {listener.port for listener in found}
    missing = {name: port for name, port in recorded_ports(sessions).items() if port not in ports}
    assert not missing, f"ports Ray recorded but no process found listens on: {missing}"

"""The supervisor of `strata serve`: a node that dies after it served is started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.ops import supervise

# A stand-in node: counts its starts in a file, says it serves unless told not to, then
# ends as its start's entry in EXITS says ("wait": until SIGTERM).
NODE = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from cluster.ops import supervise
    starts = Path(sys.argv[1])
    n = int(starts.read_text() or 0) if starts.exists() else 0
    starts.write_text(str(n + 1))
    exits = sys.argv[2].split(",")
    what = exits[min(n, len(exits) - 1)]
    if what != "never-ready":
        supervise.signal_ready()
    if what == "wait":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        time.sleep(60)
        sys.exit(3)
    sys.exit(int(what) if what.isdigit() else 1)
    """
)


def _node(tmp_path: Path) -> list[str]:
    script = tmp_path / "node.py"
    script.write_text(NODE.format(root=str(Path(__file__).parents[3])))
    return [sys.executable, str(script)]


def test_a_node_that_dies_after_serving_is_started_again(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    code = supervise.supervise([str(starts), "1,1,0"], program=_node(tmp_path))
    assert code == 0
    assert starts.read_text() == "3"


def test_a_node_that_never_served_is_not_started_again(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    code = supervise.supervise([str(starts), "never-ready"], program=_node(tmp_path))
    assert code == 1
    assert starts.read_text() == "1"


def test_a_node_that_keeps_dying_is_left_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervise, "RESTARTS_AT_MOST", 2)
    monkeypatch.setattr(supervise.time, "sleep", lambda _s: None)
    starts = tmp_path / "starts"
    code = supervise.supervise([str(starts), "7"], program=_node(tmp_path))
    assert code == 7
    assert starts.read_text() == "3"  # the first start and two more


def test_sigterm_stops_the_node_and_the_supervisor(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    runner = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[3])!r})
        from cluster.ops import supervise
        sys.exit(supervise.supervise({[str(starts), "wait"]!r}, program={_node(tmp_path)!r}))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", runner])
    deadline = time.monotonic() + 30
    while not (starts.exists() and starts.read_text() == "1"):
        assert time.monotonic() < deadline, "the node did not start"
        time.sleep(0.05)
    time.sleep(0.5)  # let it say it serves
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0  # the node's own exit code: it stopped as asked
    assert starts.read_text() == "1"  # and was not started again

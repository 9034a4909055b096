"""The ``strata`` command: one module per command (``main`` parses and dispatches)."""

from cluster.cli.main import main

__all__ = ["main"]

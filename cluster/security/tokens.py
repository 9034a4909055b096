"""Bearer tokens: what the gRPC and DICOMweb doors check on every request.

Tokens come from ``access_tokens`` (comma-separated); when none are configured, one is
generated at start-up into ``<data_dir>/access-token`` (mode 0600), where the node's own
CLI and the demo read it. Never in the repository, never in a log.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("strata.security")

TOKEN_FILE = "access-token"
ENVIRONMENT = "STRATA_TOKEN"  # where a client looks first


class Tokens:
    """The bearer tokens a door accepts."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("a door needs at least one bearer token")
        self._tokens = [token.encode() for token in tokens]
        self.first = tokens[0]  # what the node's own clients (demo, benchmarks) send

    def admits(self, header: str) -> bool:
        """Whether an ``Authorization`` header value carries one of the tokens."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # Every token compared, each in constant time: how long it takes says nothing.
        return any([hmac.compare_digest(given, known) for known in self._tokens])


def configured(value: str) -> list[str]:
    return [token.strip() for token in value.split(",") if token.strip()]


def for_node(value: str, data_dir: Path) -> Tokens:
    """The configured tokens, or one generated now and written to ``data_dir``."""
    tokens = configured(value)
    if not tokens:
        tokens = [secrets.token_urlsafe(32)]
        path = write(data_dir, tokens[0])
        log.info("bearer token generated at start-up, written to %s", path)
    return Tokens(tokens)


def write(data_dir: Path, token: str) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return path


def for_client(data_dir: Path | None = None) -> str | None:
    """The token a client sends: ``STRATA_TOKEN``, else the one a local node wrote."""
    if token := os.environ.get(ENVIRONMENT, "").strip():
        return token
    if data_dir is not None and (data_dir / TOKEN_FILE).is_file():
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    return None

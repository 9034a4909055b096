"""Key-encryption keys and patient pseudonyms.

A ``KeyProvider`` wraps and unwraps per-object data keys; objects never hold a key in the
clear. The default provider is a key file (JSON, mode 0600) kept outside the repository;
a KMS (Vault transit, cloud KMS) fits behind the same three members.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

KEY_FILE_FORMAT = 1


class KeyFileError(Exception):
    """A key file or key id that cannot be used; the message says which and why."""


class KeyProvider(Protocol):
    """What the pipeline needs from a key-management system."""

    @property
    def active_key_id(self) -> str: ...

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        """Wrap ``data_key`` under the active key; return (key id, wrapped key)."""
        ...

    def unwrap(self, key_id: str, wrapped_key: bytes) -> bytes:
        """Return the data key that ``wrap`` wrapped under ``key_id``."""
        ...


@dataclass(frozen=True)
class FileKeyProvider:
    """Key-encryption keys held in a local JSON file (AES-256, RFC 3394 key wrap)."""

    path: Path
    active: str
    keys: dict[str, bytes]
    pseudonym_key: bytes

    @property
    def active_key_id(self) -> str:
        return self.active

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        return self.active, aes_key_wrap(self.keys[self.active], data_key)

    def unwrap(self, key_id: str, wrapped_key: bytes) -> bytes:
        try:
            kek = self.keys[key_id]
        except KeyError:
            raise KeyFileError(
                f"key id {key_id!r} is not in {self.path}; the object was wrapped by a key "
                "this provider does not hold (rotated out, or another key file)"
            ) from None
        return aes_key_unwrap(kek, wrapped_key)

    def pseudonymizer(self) -> Pseudonymizer:
        return Pseudonymizer(self.pseudonym_key)


def create_key_file(path: Path) -> None:
    """Create a new key file with one fresh key-encryption key, mode 0600, if none exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_id = "kek-" + datetime.now(UTC).strftime("%Y%m%d") + "-" + secrets.token_hex(4)
    document = {
        "format": KEY_FILE_FORMAT,
        "active": key_id,
        "keys": {key_id: _b64(secrets.token_bytes(32))},
        "pseudonym_key": _b64(secrets.token_bytes(32)),
    }
    # O_EXCL: two processes starting at once must not each write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)


def load_key_file(path: Path) -> FileKeyProvider:
    """Read a key file, refusing one that other users could read."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist; `strata serve` creates it") from None
    if mode & 0o077:
        raise KeyFileError(f"key file {path} has mode {mode:o}; it must be 600 (owner only)")
    document = json.loads(path.read_text())
    if document.get("format") != KEY_FILE_FORMAT:
        raise KeyFileError(f"key file {path} has format {document.get('format')!r}; expected 1")
    keys = {key_id: base64.b64decode(value) for key_id, value in document["keys"].items()}
    if document["active"] not in keys:
        raise KeyFileError(f"key file {path}: active key {document['active']!r} is not in 'keys'")
    for key_id, key in keys.items():
        if len(key) != 32:
            raise KeyFileError(f"key file {path}: key {key_id!r} is {len(key)} bytes, not 32")
    return FileKeyProvider(
        path=path,
        active=document["active"],
        keys=keys,
        pseudonym_key=base64.b64decode(document["pseudonym_key"]),
    )


@lru_cache(maxsize=4)
def cached_key_file(path: str) -> FileKeyProvider:
    """The key file at ``path``, read once per worker process."""
    return load_key_file(Path(path))


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed HMAC pseudonyms: stable for one key, unlinkable to the value without it."""

    key: bytes

    def pseudonym(self, kind: str, value: str) -> str:
        """Pseudonym of ``value`` (e.g. a Patient ID); empty for an empty value."""
        if not value:
            return ""
        digest = hmac.new(self.key, f"{kind}\x00{value}".encode(), hashlib.sha256)
        return digest.hexdigest()[:32]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()

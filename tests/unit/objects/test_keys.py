"""Key file handling and pseudonyms."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from workers.objects.keys import KeyFileError, Pseudonymizer, create_key_file, load_key_file


def test_key_file_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "keys.json"
    create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    provider = load_key_file(path)
    key_id, wrapped = provider.wrap(b"\x01" * 32)
    assert key_id == provider.active_key_id
    assert provider.unwrap(key_id, wrapped) == b"\x01" * 32


def test_second_create_keeps_the_first_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    create_key_file(path)
    first = path.read_bytes()
    create_key_file(path)
    assert path.read_bytes() == first


def test_readable_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    create_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="mode 644"):
        load_key_file(path)


def test_missing_key_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_key_file(tmp_path / "absent.json")


def test_pseudonyms_are_keyed_and_stable() -> None:
    a = Pseudonymizer(b"a" * 32)
    b = Pseudonymizer(b"b" * 32)
    assert a.pseudonym("patient_id", "12345") == a.pseudonym("patient_id", "12345")
    assert a.pseudonym("patient_id", "12345") != b.pseudonym("patient_id", "12345")
    assert a.pseudonym("patient_id", "12345") != a.pseudonym("accession_number", "12345")
    assert "12345" not in a.pseudonym("patient_id", "12345")
    assert a.pseudonym("patient_id", "") == ""

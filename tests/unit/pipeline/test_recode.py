"""A member rewritten for a tier with its own codec: re-encoded where the codec holds the
layout, kept (its data key wrapped again) where it does not or the file was not split,
and in every case the original comes back bit for bit from the new member alone."""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings

from tests.unit.pipeline.test_pipeline import _settings, _stored, images
from workers.objects.keys import create_key_file, load_key_file
from workers.pipeline.recode import recode_member
from workers.pipeline.restore import RestoredFile, rebuild
from workers.records import IngestItem

JPEG_LS = "1.2.840.10008.1.2.4.80"


@pytest.fixture(scope="module")
def keys_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    create_key_file(path)
    return path


def _recoded(
    data: bytes, key_file: Path, *, only_if_smaller: bool
) -> tuple[int, int, bool, RestoredFile]:
    """The member's size before and after, whether it was re-encoded, and its stored form."""
    item = IngestItem("f", data, hashlib.sha256(data).hexdigest())
    blob, _, ref, key = _stored(item, _settings(key_file, min_saving=float("inf")))
    keys = load_key_file(key_file)
    member, recoded = recode_member(blob, key, ref, JPEG_LS, keys, only_if_smaller=only_if_smaller)
    assert member.key_id == keys.active_key_id
    if not recoded:
        assert member.data == blob  # kept as it was: not re-encrypted
    there = replace(ref, byte_length=len(member.data))
    new_key = keys.unwrap(member.key_id, member.wrapped_key)
    assert rebuild(member.data, there, "original", new_key).data == data
    return len(blob), len(member.data), recoded, rebuild(member.data, there, "stored", new_key)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(image=images())
def test_a_recoded_member_rebuilds_the_original(image: tuple[bytes, bool], keys_path: Path) -> None:
    data, clean = image
    _, _, recoded, stored = _recoded(data, keys_path, only_if_smaller=False)
    if recoded:
        assert stored.transfer_syntax == JPEG_LS
        assert pydicom.dcmread(io.BytesIO(stored.data)).file_meta.TransferSyntaxUID == JPEG_LS
    elif clean:
        # Kept: a layout JPEG-LS cannot hold; the stored form is the ingest's.
        assert stored.transfer_syntax != JPEG_LS


def test_a_real_mr_is_smaller_in_jpeg_ls_and_a_lossy_original_is_kept(keys_path: Path) -> None:
    mr = Path(pydicom.data.get_testdata_file("MR_small.dcm")).read_bytes()
    before, after, recoded, _ = _recoded(mr, keys_path, only_if_smaller=True)
    assert recoded and after < before
    lossy = Path(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).read_bytes()
    before, after, recoded, _ = _recoded(lossy, keys_path, only_if_smaller=True)
    assert not recoded and after == before

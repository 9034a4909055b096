"""The identity index's rows: sealed boxes bound to their instance, and blind tokens."""

from __future__ import annotations

import logging
import warnings
from io import BytesIO

import pydicom
import pytest
from cryptography.exceptions import InvalidTag
from pydicom.data import get_testdata_file

from workers.dicom.identity import IdentityKeys, attributes_of
from workers.dicom.split import split_file
from workers.objects.keys import Pseudonymizer

KEYS = IdentityKeys(Pseudonymizer(b"\x02" * 32))


def test_a_box_opens_only_for_its_instance_and_unaltered() -> None:
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()  # noqa: SIM115
    row = KEYS.row("ab" * 32, "1.2", "1.2.3", attributes_of(data))
    assert KEYS.open(row.sealed, "1.2.3") == attributes_of(data)
    assert b"CompressedSamples" not in row.sealed  # the name is not in the clear
    with pytest.raises(InvalidTag):
        KEYS.open(row.sealed, "1.2.4")  # another instance's box
    altered = row.sealed[:-1] + bytes([row.sealed[-1] ^ 1])
    with pytest.raises(InvalidTag):
        KEYS.open(altered, "1.2.3")


def test_attributes_are_read_from_the_header() -> None:
    found = attributes_of(open(get_testdata_file("CT_small.dcm"), "rb").read())  # noqa: SIM115
    assert found["PatientName"] == "CompressedSamples^CT1"
    assert found["PatientID"] == "1CT1"
    assert found["Modality"] == "CT"
    assert attributes_of(b"not dicom at all") == {}


def test_tokens_are_keyed_and_cover_family_name_prefixes() -> None:
    tokens = KEYS.tokens({"PatientName": "Doe^Jane", "PatientBirthDate": "19800101"})
    assert set(tokens) == {
        KEYS.name_token("D"),
        KEYS.name_token("DO"),
        KEYS.name_token("DOE"),
        KEYS.birth_date_token("19800101"),
    }
    other = IdentityKeys(Pseudonymizer(b"\x03" * 32))
    assert not set(tokens) & set(other.tokens({"PatientName": "Doe^Jane"}))
    # Tokens are not the catalog's pseudonyms: a birth date's never equals a Patient ID's.
    assert KEYS.birth_date_token("X") != KEYS.patient_token("X")


def test_a_value_its_vr_cannot_hold_is_sealed_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.PatientBirthDate = "19X70412"  # not a DA: pydicom would quote it in a warning
    dataset.PatientName = "Secret^Name"
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        split = split_file(buffer.getvalue())
        found = split.searchable()
    assert found["PatientBirthDate"] == "19X70412"
    assert found == attributes_of(buffer.getvalue()[: split.pixel_start])
    assert "19X70412" not in caplog.text
    assert not [w for w in warned if "19X70412" in str(w.message)]

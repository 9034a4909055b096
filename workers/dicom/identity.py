"""The attributes C-FIND and QIDO answer on and return, sealed for the identity index.

The analysts' catalog holds no identity in the clear: Patient ID and Accession Number
appear there only as keyed pseudonyms, names and birth dates not at all. A search on
them still has to be answered, to callers allowed to see them. So, per instance, ingest
seals the attributes the searches return (patient, study, series and instance level) in
one AES-256-GCM box under the identity key, bound to the SOP Instance UID, and computes
blind tokens (keyed HMACs) of the values a search matches exactly:

- Patient ID and Accession Number: the catalog's own pseudonyms;
- Patient's Birth Date: ``birth_date`` token;
- Patient's Name: tokens of the first one, two and three letters of the family name
  (upper-cased), which narrow a wildcard search (``DOE*``) to a few studies before their
  boxes are opened and matched in full.

Both keys are derived (HKDF-SHA256) from the key file's pseudonym key, under their own
labels: whoever holds the catalog alone learns nothing; the door that answers a search
opens the boxes of the candidates only.
"""

from __future__ import annotations

import json
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from io import BytesIO
from typing import Any

import pydicom
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from workers.objects.keys import Pseudonymizer

# What a search can return, by level; each level also returns the levels above it.
PATIENT_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
)
STUDY_ATTRIBUTES = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)
SERIES_ATTRIBUTES = (
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "Modality",
)
INSTANCE_ATTRIBUTES = ("InstanceNumber", "ContentDate", "ContentTime", "NumberOfFrames")
SEALED = (*PATIENT_ATTRIBUTES, *STUDY_ATTRIBUTES, *SERIES_ATTRIBUTES, *INSTANCE_ATTRIBUTES)
_TAGS: list[str] = [*SEALED, "SpecificCharacterSet"]
SEALED_TAGS: tuple[int, ...] = tuple(int(Tag(name)) for name in SEALED)

NONCE_BYTES = 12
PREFIX_LETTERS = (1, 2, 3)  # family-name prefixes a name search can be narrowed by


@dataclass(frozen=True)
class IdentityRow:
    """One instance's row of the identity index: its blind tokens and sealed box."""

    sha256: str
    study_instance_uid: str
    tokens: tuple[str, ...]
    sealed: bytes


def attributes_of(header_bytes: bytes) -> dict[str, str]:
    """The searchable attributes of a file (``header_bytes``: the file up to its Pixel
    Data, or all of it), as strings; absent and empty ones left out. Never raises on a
    file the pipeline accepted: what cannot be read is left out. (Ingest takes them from
    the data set ``split_file`` has already read: ``SplitFile.searchable``.)"""
    try:
        dataset = pydicom.dcmread(
            BytesIO(header_bytes), force=True, stop_before_pixels=True, specific_tags=_TAGS
        )
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError):
        return {}
    return attributes_in(dataset)


def attributes_in(dataset: Dataset) -> dict[str, str]:
    """The searchable attributes of a data set pydicom has read (with at least
    ``SEALED_TAGS`` among its specific tags), as ``attributes_of`` gives them."""
    found = {}
    for name in SEALED:
        try:
            value = dataset.get(name)
        except (ValueError, TypeError, KeyError, AttributeError, LookupError, OSError):
            continue  # a value this keyword's VR cannot hold: not searchable
        if value is None:
            continue
        text = str(value).strip() if not isinstance(value, bytes) else ""
        if text:
            found[name] = text
    return found


def family_name(person_name: str) -> str:
    """The family name of a PN value (its alphabetic group), upper-cased."""
    return person_name.split("=")[0].split("^")[0].strip().upper()


class IdentityKeys:
    """The identity index's sealing key and token key, derived from the pseudonym key."""

    def __init__(self, pseudonyms: Pseudonymizer) -> None:
        self._pseudonyms = pseudonyms

    @cached_property
    def _aead(self) -> AESGCM:
        return AESGCM(_derive(self._pseudonyms.key, b"strata identity index: sealing"))

    @cached_property
    def _tokens(self) -> Pseudonymizer:
        return Pseudonymizer(_derive(self._pseudonyms.key, b"strata identity index: tokens"))

    def patient_token(self, patient_id: str) -> str:
        """The catalog's pseudonym of a Patient ID (its token too)."""
        return self._pseudonyms.pseudonym("patient_id", patient_id)

    def accession_token(self, accession_number: str) -> str:
        return self._pseudonyms.pseudonym("accession_number", accession_number)

    def birth_date_token(self, birth_date: str) -> str:
        return self._tokens.pseudonym("birth_date", birth_date)

    def name_token(self, prefix: str) -> str:
        """The token of a family-name prefix of 1 to 3 letters (upper-cased)."""
        return self._tokens.pseudonym("family_name_prefix", prefix.upper())

    def tokens(self, attributes: Mapping[str, str]) -> tuple[str, ...]:
        """The blind tokens of an instance's attributes (pseudonyms are in its catalog row)."""
        found = []
        if birth := attributes.get("PatientBirthDate"):
            found.append(self.birth_date_token(birth))
        family = family_name(attributes.get("PatientName", ""))
        found += [self.name_token(family[:n]) for n in PREFIX_LETTERS if len(family) >= n]
        return tuple(sorted(set(found)))

    def seal(self, attributes: Mapping[str, str], sop_instance_uid: str) -> bytes:
        nonce = _nonce()
        plain = zlib.compress(json.dumps(dict(attributes), separators=(",", ":")).encode())
        return nonce + self._aead.encrypt(nonce, plain, sop_instance_uid.encode())

    def open(self, sealed: bytes, sop_instance_uid: str) -> dict[str, str]:
        """The attributes sealed for ``sop_instance_uid``; raises
        ``cryptography.exceptions.InvalidTag`` for a box sealed for another, or altered."""
        nonce, box = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        plain = self._aead.decrypt(nonce, box, sop_instance_uid.encode())
        opened: Any = json.loads(zlib.decompress(plain))
        return {str(key): str(value) for key, value in opened.items()}

    def row(
        self,
        sha256: str,
        study_instance_uid: str,
        sop_instance_uid: str,
        attributes: Mapping[str, str],
    ) -> IdentityRow:
        """The row of one instance with these searchable attributes (``attributes_of``)."""
        return IdentityRow(
            sha256=sha256,
            study_instance_uid=study_instance_uid,
            tokens=self.tokens(attributes),
            sealed=self.seal(attributes, sop_instance_uid),
        )


@lru_cache(maxsize=4)
def identity_keys(pseudonyms: Pseudonymizer) -> IdentityKeys:
    """The identity keys of a key file's pseudonym key, derived once per process (ingest
    seals every file with them; HKDF per file would be work for nothing)."""
    return IdentityKeys(pseudonyms)


def _derive(root: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(root)


def _nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)

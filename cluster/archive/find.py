"""Searches as C-FIND and QIDO make them: levels, keys, and PS3.4 C.2.2.2 matching.

A search names a level (PATIENT, STUDY, SERIES, IMAGE) and keys: attribute keywords with
a value to match (empty: return it, match anything). The catalog's keyed index narrows
the candidates by what it can match exactly (Study Instance UIDs, the pseudonyms of
Patient ID and Accession Number, the study date range, a modality, and the blind tokens
of birth date and family-name prefix, ``workers.dicom.identity``); then the candidates'
sealed boxes are opened and every key is matched in full:

- single value, exact (Person Names case-insensitively, as most archives do);
- a list of values (``\\``-separated), any of them (UID list matching, and lists of codes);
- wildcards ``*`` and ``?`` for the string VRs PS3.4 allows them on;
- ranges ``from-to``, ``-to`` and ``from-`` for dates and times;
- empty: universal.

Patient Name, Patient ID, Birth Date and Accession Number are returned in the clear, so a
search is only served to a caller a door has admitted.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from cluster.catalog.queries import InstanceFilters, StudyFilters
from cluster.catalog.schema import StudyRow
from workers.dicom.identity import (
    INSTANCE_ATTRIBUTES,
    PATIENT_ATTRIBUTES,
    PREFIX_LETTERS,
    SERIES_ATTRIBUTES,
    STUDY_ATTRIBUTES,
    IdentityKeys,
    family_name,
)
from workers.errors import Reason
from workers.records import InstanceRecord

if TYPE_CHECKING:
    from cluster.archive.service import Archive

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# Unique keys, by level.
UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
_RANGE_VRS = {"DA", "TM", "DT"}
# Attributes the catalog row answers, by level (the rest come from the sealed box).
_COUNTS = {
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "ModalitiesInStudy",
}
# Studies read at most to answer one search; past it the search says so (``truncated``).
SCAN_LIMIT = 10_000


class FindError(Exception):
    """A search that cannot be made as asked; ``reason`` and a sentence for the caller."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Query:
    """One search: its level, whether it is patient-rooted, and its keys."""

    level: str
    keys: Mapping[str, str]
    patient_root: bool = False

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise FindError(
                Reason.BAD_REQUEST,
                f"Query/Retrieve Level {self.level!r} is not one of {', '.join(LEVELS)}",
            )
        if self.level == "PATIENT" and not self.patient_root:
            raise FindError(
                Reason.BAD_REQUEST, "the PATIENT level is searched in the Patient Root model"
            )

    def value(self, keyword: str) -> str:
        return self.keys.get(keyword, "").strip()


@dataclass
class Found:
    """The answer to a search: matches (keyword → value), and whether more matched."""

    matches: list[dict[str, str]] = field(default_factory=list)
    truncated: bool = False


# -- matching ---------------------------------------------------------------------------


@lru_cache(maxsize=512)
def vr_of(keyword: str) -> str:
    try:
        return str(dictionary_VR(tag_for_keyword(keyword) or 0))
    except KeyError:
        return ""


def matches(keyword: str, wanted: str, value: str) -> bool:
    """Whether ``value`` (what the instance holds) matches ``wanted`` (the query's value
    of ``keyword``), by PS3.4 C.2.2.2."""
    wanted = wanted.strip()
    if not wanted or wanted == "*":
        return True
    vr = vr_of(keyword)
    value = value.strip()
    alternatives = wanted.split("\\")
    return any(_matches_one(vr, option, value) for option in alternatives if option != "")


def _matches_one(vr: str, wanted: str, value: str) -> bool:
    if vr in _RANGE_VRS and "-" in wanted:
        low, _, high = wanted.partition("-")
        held = _comparable(vr, value)
        if not held:
            return False
        return (not low or held >= _comparable(vr, low)) and (
            not high or held <= _comparable(vr, high, upper=True)
        )
    if vr in _RANGE_VRS:
        return _comparable(vr, value) == _comparable(vr, wanted)
    if vr == "PN":
        wanted, value = wanted.upper(), value.upper()
        # Trailing empty components are not significant ("DOE^JOHN^^" is "DOE^JOHN").
        value = value.rstrip("^")
        if "*" not in wanted and "?" not in wanted:
            wanted = wanted.rstrip("^")
    if vr in _WILDCARD_VRS and ("*" in wanted or "?" in wanted):
        return _wildcard(wanted).fullmatch(value) is not None
    return value == wanted


@lru_cache(maxsize=256)
def _wildcard(pattern: str) -> re.Pattern[str]:
    # fnmatch's own syntax has [] classes, which DICOM does not: escape them first.
    escaped = pattern.replace("[", "[[]")
    return re.compile(fnmatch.translate(escaped), re.DOTALL)


def _comparable(vr: str, text: str, upper: bool = False) -> str:
    """A DA, TM or DT value in a form whose string order is its time order (``upper``:
    the end of a range, padded to its last instant)."""
    digits = text.strip().replace(":", "").replace("-", "")
    if vr == "TM":
        whole, _, fraction = digits.partition(".")
        pad = "99" if upper else "00"
        whole = (whole + pad * 3)[:6]
        return whole + "." + (fraction + ("9" if upper else "0") * 6)[:6]
    return digits


def date_range(wanted: str) -> tuple[date | None, date | None] | None:
    """The dates a single DA value or range spans, for the index (None: not one)."""
    wanted = wanted.strip()
    if not wanted or "\\" in wanted:
        return None
    low, dash, high = wanted.partition("-")
    try:
        start = _day(low) if low else None
        end = _day(high) if high else None
    except ValueError:
        raise FindError(
            Reason.BAD_REQUEST, f"Study Date {wanted!r} is not a DA value or range"
        ) from None
    if not dash:
        end = start
    return start, end


def _day(text: str) -> date:
    text = text.strip().replace(".", "")
    return date(int(text[0:4]), int(text[4:6]), int(text[6:8]))


def _exact(wanted: str) -> str | None:
    """The one value a key asks for exactly (no list, no wildcard), or None."""
    if not wanted or "\\" in wanted or "*" in wanted or "?" in wanted:
        return None
    return wanted


# -- searching --------------------------------------------------------------------------


def study_filters(query: Query, keys: IdentityKeys) -> list[StudyFilters]:
    """The index searches that hold every study ``query`` can match (one per Study
    Instance UID it lists, or one)."""
    tokens: list[str] = []
    patient = accession = None
    if patient_id := _exact(query.value("PatientID")):
        patient = keys.patient_token(patient_id)
    if number := _exact(query.value("AccessionNumber")):
        accession = keys.accession_token(number)
    birth = _exact(query.value("PatientBirthDate"))
    if birth and "-" not in birth:  # a range is matched when the boxes are opened
        tokens.append(keys.birth_date_token(birth))
    name = query.value("PatientName")
    if name and "\\" not in name:
        # The family name's letters before any wildcard: their first three are a token.
        family = family_name(re.split(r"[*?]", name, maxsplit=1)[0])
        if family:
            tokens.append(keys.name_token(family[: max(PREFIX_LETTERS)]))
    dates = date_range(query.value("StudyDate"))
    modality = _exact(query.value("ModalitiesInStudy")) or (
        _exact(query.value("Modality")) if query.level in ("SERIES", "IMAGE") else None
    )
    common = StudyFilters(
        patient_pseudonym=patient,
        accession_pseudonym=accession,
        modality=modality,
        date_from=dates[0] if dates else None,
        date_to=dates[1] if dates else None,
        tokens=tuple(tokens),
    )
    uids = [uid for uid in query.value("StudyInstanceUID").split("\\") if uid]
    if not uids:
        return [common]
    return [StudyFilters(**{**common.__dict__, "study_uid": uid}) for uid in uids]


async def find(archive: Archive, query: Query, limit: int, keys: IdentityKeys) -> Found:
    """Every match of ``query`` (at most ``limit``), each with the keys it asked for."""
    found = Found()
    studies: list[StudyRow] = []
    for filters in study_filters(query, keys):
        rows = await archive.find_studies(filters, limit=SCAN_LIMIT + 1)
        studies += rows
    if len(studies) > SCAN_LIMIT:
        studies, found.truncated = studies[:SCAN_LIMIT], True
    boxes = await archive.study_boxes([row.study_instance_uid for row in studies])
    study_level = []
    for row in studies:
        if row.study_instance_uid not in boxes:
            continue
        sop, sealed = boxes[row.study_instance_uid]
        held = _study_values(row, keys.open(sealed, sop))
        keywords = (*PATIENT_ATTRIBUTES, *STUDY_ATTRIBUTES, "StudyInstanceUID")
        if _all_match(query, held, keywords) and _modalities_match(query, held):
            study_level.append((row, held))
    if query.level == "PATIENT":
        patients: dict[str, dict[str, str]] = {}
        for row, held in study_level:
            patient = patients.setdefault(
                held.get("PatientID", ""),
                {name: held.get(name, "") for name in PATIENT_ATTRIBUTES}
                | {"NumberOfPatientRelatedStudies": "0", "NumberOfPatientRelatedInstances": "0"},
            )
            for count, add in (
                ("NumberOfPatientRelatedStudies", 1),
                ("NumberOfPatientRelatedInstances", row.instance_count),
            ):
                patient[count] = str(int(patient[count]) + add)
        found.matches = [_answer(query, held) for held in patients.values()][:limit]
        found.truncated |= len(patients) > limit
        return found
    if query.level == "STUDY":
        found.matches = [_answer(query, held) for _, held in study_level][:limit]
        found.truncated |= len(study_level) > limit
        return found
    for row, held in study_level:
        for match in await _below_study(archive, query, row, held, keys):
            if len(found.matches) == limit:
                found.truncated = True
                return found
            found.matches.append(match)
    return found


async def _below_study(
    archive: Archive, query: Query, row: StudyRow, held: dict[str, str], keys: IdentityKeys
) -> list[dict[str, str]]:
    series_uids: list[str | None] = [
        uid for uid in query.value("SeriesInstanceUID").split("\\") if uid
    ]
    records: list[InstanceRecord] = []
    for series in series_uids or [None]:
        records += await archive.find_instances(
            InstanceFilters(study_uid=row.study_instance_uid, series_uid=series), limit=1_000_000
        )
    current = latest(records)
    boxes = await archive.identities([record.sha256 for record in current])
    answers = []
    if query.level == "SERIES":
        by_series: dict[str, list[InstanceRecord]] = {}
        for record in current:
            by_series.setdefault(record.series_instance_uid, []).append(record)
        for series, members in by_series.items():
            last = max(members, key=lambda r: r.ingest_time)
            opened = (
                keys.open(boxes[last.sha256], last.sop_instance_uid) if last.sha256 in boxes else {}
            )
            values = held | {name: opened.get(name, "") for name in SERIES_ATTRIBUTES}
            values |= {
                "SeriesInstanceUID": series,
                "Modality": opened.get("Modality") or last.modality,
                "NumberOfSeriesRelatedInstances": str(len(members)),
            }
            if _all_match(query, values, (*SERIES_ATTRIBUTES, "SeriesInstanceUID")):
                answers.append(_answer(query, values))
        return answers
    wanted_sops = {uid for uid in query.value("SOPInstanceUID").split("\\") if uid}
    for record in current:
        if wanted_sops and record.sop_instance_uid not in wanted_sops:
            continue
        opened = (
            keys.open(boxes[record.sha256], record.sop_instance_uid)
            if record.sha256 in boxes
            else {}
        )
        values = held | {
            name: opened.get(name, "") for name in (*SERIES_ATTRIBUTES, *INSTANCE_ATTRIBUTES)
        }
        values |= {
            "SeriesInstanceUID": record.series_instance_uid,
            "SOPInstanceUID": record.sop_instance_uid,
            "SOPClassUID": record.sop_class_uid,
            "Modality": opened.get("Modality") or record.modality,
            "Rows": str(record.rows) if record.rows else "",
            "Columns": str(record.columns) if record.columns else "",
            "NumberOfFrames": opened.get("NumberOfFrames")
            or (str(record.frames) if record.frames > 1 else ""),
        }
        checked = (*SERIES_ATTRIBUTES, *INSTANCE_ATTRIBUTES, "SeriesInstanceUID", "SOPClassUID")
        if _all_match(query, values, checked):
            answers.append(_answer(query, values))
    return answers


def as_dataset(match: Mapping[str, str]) -> Dataset:
    """A match as a data set (each value in its attribute's VR; empty ones present but
    empty, as a search returns a key it has no value for)."""
    dataset = Dataset()
    if any(not value.isascii() for value in match.values()):
        dataset.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in match.items():
        vr = vr_of(keyword)
        if vr in ("US", "UL", "SS", "SL"):
            setattr(dataset, keyword, int(value) if value else None)
        elif vr == "SQ":
            setattr(dataset, keyword, [])
        else:
            setattr(dataset, keyword, value or None)
    return dataset


def latest(records: Iterable[InstanceRecord]) -> list[InstanceRecord]:
    """The current version of each instance, in the order first met."""
    latest: dict[str, InstanceRecord] = {}
    for record in records:
        held = latest.get(record.sop_instance_uid)
        if held is None or record.version > held.version:
            latest[record.sop_instance_uid] = record
    return list(latest.values())


def _study_values(row: StudyRow, opened: Mapping[str, str]) -> dict[str, str]:
    values = {name: opened.get(name, "") for name in (*PATIENT_ATTRIBUTES, *STUDY_ATTRIBUTES)}
    values["StudyInstanceUID"] = row.study_instance_uid
    if not values["StudyDate"] and row.study_date:
        values["StudyDate"] = row.study_date.strftime("%Y%m%d")
    values["ModalitiesInStudy"] = "\\".join(row.modalities)
    values["NumberOfStudyRelatedInstances"] = str(row.instance_count)
    values["NumberOfStudyRelatedSeries"] = str(row.series_count)
    return values


def _all_match(query: Query, held: Mapping[str, str], keywords: Sequence[str]) -> bool:
    """Whether every key of ``query`` among ``keywords`` matches what is held."""
    for keyword in keywords:
        wanted = query.value(keyword)
        if wanted and not matches(keyword, wanted, held.get(keyword, "")):
            return False
    return True


def _modalities_match(query: Query, held: Mapping[str, str]) -> bool:
    """Whether one of the study's modalities matches the query's Modalities in Study."""
    wanted = query.value("ModalitiesInStudy")
    modalities = held.get("ModalitiesInStudy", "").split("\\")
    return not wanted or any(matches("Modality", wanted, modality) for modality in modalities)


def _answer(query: Query, held: Mapping[str, str]) -> dict[str, str]:
    """The keys the query asked for, with what is held (empty when nothing), and the
    unique keys of its level and the levels above it."""
    answer = {keyword: held.get(keyword, "") for keyword in query.keys}
    for level in LEVELS[1 if not query.patient_root else 0 : LEVELS.index(query.level) + 1]:
        answer[UNIQUE[level]] = held.get(UNIQUE[level], "")
    return answer

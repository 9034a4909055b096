"""PS3.4 C.2.2.2 matching and the index searches a query narrows to."""

from __future__ import annotations

from datetime import date

import pytest

from cluster.archive.find import FindError, Query, date_range, matches, study_filters
from workers.dicom.identity import IdentityKeys
from workers.objects.keys import Pseudonymizer

KEYS = IdentityKeys(Pseudonymizer(b"\x01" * 32))


@pytest.mark.parametrize(
    "keyword, wanted, value, expected",
    [
        ("PatientName", "", "DOE^JANE", True),  # universal
        ("PatientName", "*", "DOE^JANE", True),
        ("PatientName", "DOE*", "DOE^JANE", True),
        ("PatientName", "doe*", "DOE^JANE", True),  # names case-insensitively
        ("PatientName", "D?E^JANE", "DOE^JANE", True),
        ("PatientName", "DOE", "DOE^JANE", False),  # single value: the whole name
        ("PatientName", "DOE^JANE", "DOE^JANE^^", True),  # empty trailing components
        ("PatientName", "[DOE]*", "DOE^JANE", False),  # [ ] are not wildcards in DICOM
        ("PatientName", "[DOE]*", "[DOE]^X", True),
        ("PatientID", "ID1", "id1", False),  # other strings exactly
        ("PatientID", "ID1\\ID2", "ID2", True),  # a list: any of its values
        ("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.4", True),
        ("StudyInstanceUID", "1.2.*", "1.2.4", False),  # no wildcards on UIDs
        ("StudyDate", "20240101-20240131", "20240115", True),
        ("StudyDate", "20240101-20240131", "20240201", False),
        ("StudyDate", "-20240131", "19990101", True),
        ("StudyDate", "20240101-", "20231231", False),
        ("StudyDate", "20240101", "20240101", True),
        ("StudyDate", "20240101-20240131", "", False),  # a range needs a value
        ("StudyTime", "0800-0900", "083015.25", True),
        ("StudyTime", "0800-0900", "090030", True),  # the end of the range is its minute
        ("StudyTime", "0800-0900", "090100", False),
        ("ModalitiesInStudy", "CT\\MR", "MR", True),
    ],
)
def test_matching(keyword: str, wanted: str, value: str, expected: bool) -> None:
    assert matches(keyword, wanted, value) is expected


def test_date_ranges_for_the_index() -> None:
    assert date_range("20240102") == (date(2024, 1, 2), date(2024, 1, 2))
    assert date_range("20240102-") == (date(2024, 1, 2), None)
    assert date_range("-20240102") == (None, date(2024, 1, 2))
    assert date_range("20240101\\20240301") is None  # a list: matched after the index
    with pytest.raises(FindError, match="not a DA value"):
        date_range("2024-13-45x")


def test_a_query_narrows_by_tokens_and_pseudonyms_never_by_values() -> None:
    query = Query(
        "STUDY",
        {"PatientName": "Doe*", "PatientID": "ID7", "PatientBirthDate": "19800101"},
    )
    [filters] = study_filters(query, KEYS)
    assert filters.patient_pseudonym == KEYS.patient_token("ID7")
    assert set(filters.tokens) == {KEYS.birth_date_token("19800101"), KEYS.name_token("DOE")}
    held = KEYS.tokens({"PatientName": "DOELING^ANNA", "PatientBirthDate": "19800101"})
    assert set(filters.tokens) <= set(held)  # a longer family name with that prefix
    assert "ID7" not in repr(filters) and "19800101" not in repr(filters)


def test_wildcards_and_ranges_do_not_narrow_by_token() -> None:
    [filters] = study_filters(
        Query("STUDY", {"PatientName": "*OE", "PatientBirthDate": "1980-1990", "PatientID": "I*"}),
        KEYS,
    )
    assert filters.tokens == () and filters.patient_pseudonym is None


def test_a_list_of_study_uids_is_one_search_each() -> None:
    searches = study_filters(Query("SERIES", {"StudyInstanceUID": "1.2\\1.3"}), KEYS)
    assert [f.study_uid for f in searches] == ["1.2", "1.3"]


def test_levels_are_checked() -> None:
    with pytest.raises(FindError, match="not one of"):
        Query("FRAME", {})
    with pytest.raises(FindError, match="Patient Root"):
        Query("PATIENT", {}, patient_root=False)

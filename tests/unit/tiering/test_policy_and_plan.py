"""The tiering policy file (parsing, and errors that name the rule and the field) and the
decisions and plan it makes, on hand-made studies whose answers are worked out by hand."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.tiering import engine
from cluster.tiering.engine import StudyState, decide
from cluster.tiering.policy import PolicyError, default_policy, parse_policy

NOW = datetime(2027, 6, 1, tzinfo=UTC)

POLICY = """
[tiers.hot]
price_per_gb_month = 0.02
[tiers.warm]
price_per_gb_month = 0.01
storage_class = "REDUCED_REDUNDANCY"
[tiers.cold]
price_per_gb_month = 0.004
codec = "jpeg2000"

[[rules]]
name = "promote on read"
from = ["warm", "cold"]
to = "hot"
read_within_days = 7

[[rules]]
name = "mammograms stay hot two years"
from = "hot"
to = "warm"
modality = ["MG"]
min_age_days = 730

[[rules]]
name = "cold after a year unread"
from = ["hot", "warm"]
to = "cold"
min_age_days = 365
unread_days = 180
min_residency_days = 30
modality = ["CT", "CR", "MR"]

[[rules]]
name = "warm after 90 days"
from = ["hot"]
to = "warm"
unread_days = 90
body_part = "chest"

[holds]
studies = ["9.9.9"]
patients = ["pp-held"]

[[retention]]
name = "screening, 10 years"
modality = "MG"
keep_days = 3650

[[retention]]
name = "everything else, 20 years"
keep_days = 7300
"""


def policy_of(text: str = POLICY) -> engine.Policy:
    return parse_policy(tomllib.loads(text), "test.toml")


def study(
    uid: str = "1.1",
    *,
    tier: str = "hot",
    age_days: int = 400,
    unread_days: int | None = 200,
    resident_days: int = 400,
    modalities: tuple[str, ...] = ("CT",),
    body_parts: tuple[str, ...] = ("CHEST",),
    patient: str = "pp-1",
    size: int = 10**9,
) -> StudyState:
    ingested = NOW - timedelta(days=age_days)
    return StudyState(
        study_instance_uid=uid,
        patient_pseudonym=patient,
        tier=tier,
        study_date=ingested.date(),
        first_ingest_time=ingested,
        last_access_time=None if unread_days is None else NOW - timedelta(days=unread_days),
        tier_since=NOW - timedelta(days=resident_days),
        modalities=modalities,
        body_parts=body_parts,
        instances=100,
        bytes_stored=size,
    )


def test_the_example_policy_parses_as_written() -> None:
    policy = policy_of()
    assert [rule.name for rule in policy.rules] == [
        "promote on read",
        "mammograms stay hot two years",
        "cold after a year unread",
        "warm after 90 days",
    ]
    assert policy.tiers["cold"].codec == "jpeg2000"
    assert policy.tiers["warm"].storage_class == "REDUCED_REDUNDANCY"
    assert policy.rules[3].body_parts == ("CHEST",)  # one text is a list of one, upper-cased
    assert policy.held_studies == {"9.9.9"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('to = "warm"', "rule 1 ('promote on read') to must name a tier"),
        ("min_age_days = -1", "rule 2 ('mammograms stay hot two years') min_age_days"),
        ("unread_dayz = 3", "rule 3 ('cold after a year unread'): unknown field(s) unread_dayz"),
        ('storage_class = "GLACIER"', "[tiers.warm] storage_class must be one of"),
    ],
)
def test_errors_name_the_rule_and_the_field(change: str, message: str) -> None:
    text = {
        'to = "warm"': POLICY.replace('to = "hot"', 'to = "tepid"', 1),
        "min_age_days = -1": POLICY.replace("min_age_days = 730", "min_age_days = -1"),
        "unread_dayz = 3": POLICY.replace("unread_days = 180", "unread_dayz = 3"),
        'storage_class = "GLACIER"': POLICY.replace('"REDUCED_REDUNDANCY"', '"GLACIER"'),
    }[change]
    with pytest.raises(PolicyError) as raised:
        policy_of(text)
    assert message in str(raised.value)
    assert str(raised.value).startswith("test.toml")


def test_other_policy_mistakes_are_refused() -> None:
    # A tier the file leaves out keeps its defaults (no mistake).
    partial = policy_of('[tiers.cold]\ncodec = "jpegls"\n')
    assert partial.tiers["cold"].codec == "jpegls"
    assert partial.tiers["hot"] == default_policy().tiers["hot"]
    with pytest.raises(PolicyError, match="more than one rule is named 'a'"):
        policy_of('[[rules]]\nname = "a"\nto = "cold"\n[[rules]]\nname = "a"\nto = "warm"\n')
    with pytest.raises(PolicyError, match="needs 'to'"):
        policy_of('[[rules]]\nname = "a"\n')
    with pytest.raises(PolicyError, match="needs keep_days"):
        policy_of('[[retention]]\nname = "r"\n')
    with pytest.raises(PolicyError, match="would move nothing"):
        policy_of('[[rules]]\nname = "a"\nfrom = "cold"\nto = "cold"\n')
    with pytest.raises(PolicyError, match="codec must be one of"):
        policy_of('[tiers.cold]\ncodec = "webp"\n[tiers.hot]\n[tiers.warm]\n')


def test_each_rule_decides_what_it_says() -> None:
    policy = policy_of()
    # Old, unread, CT: cold (the first matching rule; "warm after 90 days" comes later).
    assert decide(study(), policy, NOW) == engine.Decision(
        study(), "move", "cold", "cold after a year unread"
    )
    # Too recent in its tier for the cold rule: the next rule that matches, warm.
    moved = decide(study(resident_days=10), policy, NOW)
    assert moved is not None and (moved.to, moved.rule) == ("warm", "warm after 90 days")
    # Read last week while warm: promoted.
    back = decide(study(tier="warm", unread_days=3), policy, NOW)
    assert back is not None and (back.to, back.rule) == ("hot", "promote on read")
    # Read 100 days ago while cold: stays (not within 7 days; no rule moves it down more).
    assert decide(study(tier="cold", unread_days=100), policy, NOW) is None
    # A mammogram under two years old, read recently: stays hot.
    assert decide(study(modalities=("MG",), age_days=500, unread_days=10), policy, NOW) is None
    # Unread 100 days, not chest: no rule.
    assert decide(study(age_days=100, unread_days=100, body_parts=("HEAD",)), policy, NOW) is None
    # Never read: unread since its ingest.
    never = decide(study(age_days=120, unread_days=None), policy, NOW)
    assert never is not None and never.to == "warm"


def test_a_held_study_is_never_moved_down_nor_deleted_but_may_come_up() -> None:
    policy = policy_of()
    assert decide(study("9.9.9"), policy, NOW) is None
    assert decide(study(patient="pp-held", age_days=8000), policy, NOW) is None
    up = decide(study("9.9.9", tier="cold", unread_days=1), policy, NOW)
    assert up is not None and up.to == "hot"


def test_retention_ends_by_the_first_matching_retention() -> None:
    policy = policy_of()
    shredded = decide(study(modalities=("MG",), age_days=3650), policy, NOW)
    assert shredded == engine.Decision(
        study(modalities=("MG",), age_days=3650), "delete", engine.DELETED, "screening, 10 years"
    )
    # A CT of the same age is kept (20 years), and moves by the rules instead.
    kept = decide(study(age_days=3650), policy, NOW)
    assert kept is not None and kept.action == "move"
    gone = decide(study(age_days=7300), policy, NOW)
    assert gone is not None and gone.rule == "everything else, 20 years"
    # Once deleted, a study is left alone: no rule moves it, no retention ends it again.
    assert decide(study(tier=engine.DELETED, age_days=7300), policy, NOW) is None


def test_the_plan_sums_flows_and_prices_the_tiers_before_and_after() -> None:
    policy = policy_of()
    studies = [
        study("a", size=4 * 10**9),  # hot → cold
        study("b", size=2 * 10**9, resident_days=10),  # hot → warm
        study("c", tier="warm", unread_days=1, size=1 * 10**9),  # warm → hot
        study("d", age_days=10, unread_days=1, size=3 * 10**9),  # stays hot
        study("e", modalities=("MG",), age_days=4000, size=5 * 10**9),  # deleted
    ]
    planned = engine.plan(studies, policy, NOW)
    flows = [(f.source, f.to, f.studies, f.bytes_stored) for f in planned.flows]
    assert flows == [
        ("hot", "warm", 1, 2 * 10**9),
        ("hot", "cold", 1, 4 * 10**9),
        ("hot", engine.DELETED, 1, 5 * 10**9),
        ("warm", "hot", 1, 1 * 10**9),
    ]
    assert planned.considered == 5
    # Before: hot 14 GB, warm 1 GB. After: hot 3 + 1 = 4, warm 2, cold 4 (e is deleted).
    assert planned.stored_before == {"hot": 14 * 10**9, "warm": 1 * 10**9}
    assert planned.stored_after == {"hot": 4 * 10**9, "warm": 2 * 10**9, "cold": 4 * 10**9}
    before = engine.monthly_cost(planned.stored_before, policy)
    after = engine.monthly_cost(planned.stored_after, policy)
    assert before == pytest.approx({"hot": 0.28, "warm": 0.01, "cold": 0.0})
    assert after == pytest.approx({"hot": 0.08, "warm": 0.02, "cold": 0.016})


def test_with_no_policy_file_nothing_moves() -> None:
    policy = default_policy()
    assert policy.default_prices and not policy.rules
    assert engine.plan([study(age_days=9000)], policy, NOW).decisions == []


def test_age_is_counted_from_ingest_when_a_study_has_no_date() -> None:
    undated = StudyState(
        "u",
        "pp",
        "hot",
        None,
        datetime(2026, 1, 1, tzinfo=UTC),
        None,
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert undated.age_days(NOW) == (date(2027, 6, 1) - date(2026, 1, 1)).days


@settings(max_examples=300, deadline=None)
@given(
    tier=st.sampled_from(["hot", "warm", "cold"]),
    age_days=st.integers(0, 8000),
    unread_days=st.one_of(st.none(), st.integers(0, 4000)),
    resident_days=st.integers(0, 400),
    modality=st.sampled_from(["CT", "MG", "US", "MR"]),
    body_part=st.sampled_from(["CHEST", "HEAD"]),
)
def test_no_decision_changes_before_the_studys_next_change(
    tier: str,
    age_days: int,
    unread_days: int | None,
    resident_days: int,
    modality: str,
    body_part: str,
) -> None:
    """What the incremental plan relies on: until ``next_change``, ``decide`` answers as
    it does now (so a study not looked at before its due moment is never late)."""
    policy = policy_of()
    one = study(
        tier=tier,
        age_days=min(age_days, resident_days + age_days),
        unread_days=None if unread_days is None else min(unread_days, age_days),
        resident_days=min(resident_days, age_days),
        modalities=(modality,),
        body_parts=(body_part,),
    )
    now = decide(one, policy, NOW)
    due = engine.next_change(one, policy, NOW)
    horizon = due or NOW + timedelta(days=30_000)
    assert horizon > NOW
    step = (horizon - NOW) / 17
    for k in range(17):
        assert decide(one, policy, NOW + step * k) == now
    if due is not None:
        assert decide(one, policy, due - timedelta(microseconds=1)) == now


def test_a_rule_on_the_source_matches_the_door_or_the_calling_ae() -> None:
    policy = policy_of(
        '[[rules]]\nname = "legacy"\nfrom = "hot"\nto = "cold"\n'
        'source = ["dimse:OLD_PACS", "dicomweb"]\n'
        '[[rules]]\nname = "any dimse"\nfrom = "hot"\nto = "warm"\nsource = "DIMSE"\n'
    )
    assert policy.rules[0].sources == ("dimse:OLD_PACS", "dicomweb")
    assert policy.rules[1].sources == ("dimse",)
    base = study(age_days=10, unread_days=1)

    def to(*sources: str) -> str | None:
        decision = decide(replace(base, sources=sources), policy, NOW)
        return None if decision is None else decision.to

    assert to("dimse:OLD_PACS") == "cold"
    assert to("dicomweb", "grpc") == "cold"
    assert to("dimse:CT_1") == "warm"  # the door alone matches any calling AE
    assert to("grpc") is None and to() is None
    with pytest.raises(PolicyError, match=r"rule 1 \('x'\) source must name a door"):
        policy_of('[[rules]]\nname = "x"\nto = "cold"\nsource = "ftp"\n')
    with pytest.raises(PolicyError, match="must name a door"):
        policy_of('[[rules]]\nname = "x"\nto = "cold"\nsource = "grpc:SOMEONE"\n')

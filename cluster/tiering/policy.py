"""The tiering policy: where each tier lives and what it costs, which studies move where,
which are held, and when a study's retention ends. Declared in one TOML file.

    [tiers.hot]
    price_per_gb_month = 0.023
    [tiers.warm]
    price_per_gb_month = 0.0125
    storage_class = "REDUCED_REDUNDANCY"      # MinIO's second parity setting
    [tiers.cold]
    price_per_gb_month = 0.004
    codec = "jpeg2000"                        # re-encoded (and verified) on the way in

    [[rules]]                                 # the first rule that matches a study wins
    name = "warm after 90 days unread"
    from = ["hot"]
    to = "warm"
    min_age_days = 90
    unread_days = 90

    [[rules]]
    name = "promote on read"                  # a read of a cold study brings it back
    from = ["cold"]
    to = "hot"
    read_within_days = 7

    [holds]                                   # legal hold: never moved down, never deleted
    studies = ["1.2.840.113619.2.55.3.1"]
    patients = ["<patient pseudonym>"]

    [[retention]]                             # crypto-shredded past its end (first match)
    name = "adult imaging, 10 years"
    keep_days = 3650

A rule matches a study when every condition it names holds: the study is in one of
``from`` (all tiers when left out), at least ``min_age_days`` old (by study date, or first
ingest when it has none), unread for ``unread_days`` (since its last read, or ingest), or
read within ``read_within_days``; has one of ``modality`` and one of ``body_part`` (when
given), and an instance that came through one of ``source`` (a door: ``dimse``, ``grpc``,
``dicomweb``, or ``dimse:<calling AE title>``); and has been in its tier for
``min_residency_days``. Errors name the rule and the
field, so that an operator fixes the file without guessing.

Why a file and not rows in the catalog: a policy is reviewed and versioned like code
(a lifecycle rule that deleted dcm4chee's nearline copy was a configuration change no one
read), and ``strata tier plan`` shows what it would do before anything moves.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import CODECS, TIERS

# The order tiers go down in: a move to a later one is a move down (never for a held study).
ORDER = {name: rank for rank, name in enumerate(TIERS)}
STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY")  # MinIO's two parity settings


class PolicyError(Exception):
    """A policy that cannot be used; says where (rule and field) and what is allowed."""


@dataclass(frozen=True)
class Tier:
    """Where one tier lives, how it stores, and what a GB of it costs a month."""

    name: str
    price_per_gb_month: float
    storage_class: str = "STANDARD"
    codec: str = ""  # empty: the codec the node writes (config ``codec``)
    # Where it lives (endpoint and bucket) is the node's configuration, not the policy's:
    # ``tier_locations`` (cluster/tiering/locations.py), so that every policy reads the
    # same objects.


@dataclass(frozen=True)
class Rule:
    """A move: studies matching every condition go from one of ``from_tiers`` to ``to``."""

    name: str
    to: str
    from_tiers: tuple[str, ...] = TIERS
    min_age_days: int | None = None
    unread_days: int | None = None
    read_within_days: int | None = None
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    min_residency_days: int = 0
    # Doors ("dimse", "grpc", "dicomweb") or door and calling AE ("dimse:CT_SCANNER_1").
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Retention:
    """Studies matching it are kept ``keep_days`` from their study date, then shredded."""

    name: str
    keep_days: int
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    tiers: Mapping[str, Tier]
    rules: tuple[Rule, ...] = ()
    held_studies: frozenset[str] = frozenset()
    held_patients: frozenset[str] = frozenset()
    retention: tuple[Retention, ...] = ()
    default_prices: bool = field(default=False, compare=False)  # no [tiers] in the file


# What a tier costs a month per GB when the file names no price: list prices of a public
# cloud's standard, infrequent-access and archive-instant classes (US, 2026), a starting
# point that the operator's own figures replace.
DEFAULT_PRICES = {"hot": 0.023, "warm": 0.0125, "cold": 0.004}


def default_policy() -> Policy:
    """Three tiers at list prices, no rules: nothing moves."""
    return Policy(
        {name: Tier(name, price) for name, price in DEFAULT_PRICES.items()},
        default_prices=True,
    )


def warnings(policy: Policy) -> list[str]:
    """Rules that fight each other: a rule that promotes studies read within N days,
    and a rule that moves studies from that tier down again without waiting at least N
    days unread, would move a promoted study straight back."""
    found = []
    for up in policy.rules:
        if up.read_within_days is None or not any(
            ORDER[up.to] < ORDER[tier] for tier in up.from_tiers
        ):
            continue
        for down in policy.rules:
            fights = up.to in down.from_tiers and ORDER[down.to] > ORDER[up.to]
            if fights and (down.unread_days is None or down.unread_days < up.read_within_days):
                found.append(
                    f"rule {down.name!r} may move a study that rule {up.name!r} promoted "
                    f"straight back (give it unread_days of at least {up.read_within_days})"
                )
    return found


def load_policy(path: Path) -> Policy:
    """The policy in ``path``; raises PolicyError naming the rule and field at fault."""
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"policy file {path} is not valid TOML: {error}") from None
    return parse_policy(document, str(path))


def parse_policy(document: Mapping[str, Any], where: str = "policy") -> Policy:
    _only(document, {"tiers", "rules", "holds", "retention"}, where)
    tiers_table = document.get("tiers")
    if tiers_table is None:
        tiers = dict(default_policy().tiers)
    else:
        # A tier the file leaves out keeps its default (price, parity, the node's codec).
        tiers = dict(default_policy().tiers)
        for name, value in _table(tiers_table, f"{where}: [tiers]").items():
            tiers[name] = _tier(name, value, f"{where}: [tiers.{name}]")
    rules = tuple(
        _rule(value, f"{where}: rule {number}")
        for number, value in enumerate(_list(document.get("rules", []), f"{where}: rules"), 1)
    )
    names = [rule.name for rule in rules]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise PolicyError(f"{where}: more than one rule is named {', '.join(map(repr, twice))}")
    holds = _table(document.get("holds", {}), f"{where}: [holds]")
    _only(holds, {"studies", "patients"}, f"{where}: [holds]")
    retention = tuple(
        _retention(value, f"{where}: retention {number}")
        for number, value in enumerate(
            _list(document.get("retention", []), f"{where}: retention"), 1
        )
    )
    return Policy(
        tiers,
        rules,
        frozenset(_strings(holds.get("studies", []), f"{where}: [holds] studies")),
        frozenset(_strings(holds.get("patients", []), f"{where}: [holds] patients")),
        retention,
        default_prices=tiers_table is None,
    )


def _tier(name: str, value: Any, where: str) -> Tier:
    if name not in TIERS:
        raise PolicyError(f"{where}: no such tier (one of {', '.join(TIERS)})")
    table = _table(value, where)
    _only(table, {"price_per_gb_month", "storage_class", "codec"}, where)
    price = table.get("price_per_gb_month", DEFAULT_PRICES[name])
    if not isinstance(price, int | float) or isinstance(price, bool) or price < 0:
        raise PolicyError(f"{where} price_per_gb_month must be a number ≥ 0, not {price!r}")
    storage_class = _text(table.get("storage_class", "STANDARD"), f"{where} storage_class")
    if storage_class not in STORAGE_CLASSES:
        raise PolicyError(
            f"{where} storage_class must be one of {', '.join(STORAGE_CLASSES)}, "
            f"not {storage_class!r}"
        )
    codec = _text(table.get("codec", ""), f"{where} codec")
    if codec and codec not in CODECS:
        raise PolicyError(f"{where} codec must be one of {', '.join(CODECS)}, not {codec!r}")
    return Tier(name, float(price), storage_class=storage_class, codec=codec)


_RULE_FIELDS = {
    "name",
    "from",
    "to",
    "min_age_days",
    "unread_days",
    "read_within_days",
    "modality",
    "body_part",
    "min_residency_days",
    "source",
}


def _rule(value: Any, where: str) -> Rule:
    table = _table(value, where)
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{where} needs a name (text)")
    where = f"{where} ({name!r})"
    _only(table, _RULE_FIELDS, where)
    if "to" not in table:
        raise PolicyError(f"{where} needs 'to', the tier it moves studies to")
    to = _tier_name(table["to"], f"{where} to")
    from_tiers = tuple(
        _tier_name(tier, f"{where} from")
        for tier in _strings(table.get("from", list(TIERS)), f"{where} from")
    )
    if from_tiers == (to,):
        raise PolicyError(f"{where}: from and to are both {to!r}; the rule would move nothing")
    rule = Rule(
        name,
        to,
        tuple(tier for tier in from_tiers if tier != to),
        min_age_days=_days(table, "min_age_days", where),
        unread_days=_days(table, "unread_days", where),
        read_within_days=_days(table, "read_within_days", where),
        modalities=_upper(table.get("modality", []), f"{where} modality"),
        body_parts=_upper(table.get("body_part", []), f"{where} body_part"),
        min_residency_days=_days(table, "min_residency_days", where) or 0,
        sources=_sources(table.get("source", []), f"{where} source"),
    )
    if rule.unread_days is not None and rule.read_within_days is not None:
        raise PolicyError(f"{where}: unread_days and read_within_days cannot both hold")
    return rule


def _retention(value: Any, where: str) -> Retention:
    table = _table(value, where)
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{where} needs a name (text)")
    where = f"{where} ({name!r})"
    _only(table, {"name", "keep_days", "modality", "body_part"}, where)
    keep = _days(table, "keep_days", where)
    if keep is None:
        raise PolicyError(f"{where} needs keep_days, the days a study is kept from its date")
    return Retention(
        name,
        keep,
        _upper(table.get("modality", []), f"{where} modality"),
        _upper(table.get("body_part", []), f"{where} body_part"),
    )


DOORS = ("dimse", "grpc", "dicomweb")


def _sources(value: Any, where: str) -> tuple[str, ...]:
    """Doors, or ``dimse:<calling AE title>``: what the catalog's ``source`` holds."""
    found = []
    for item in _strings(value, where):
        door, _, title = item.strip().partition(":")
        if door.lower() not in DOORS or (title and door.lower() != "dimse"):
            raise PolicyError(
                f"{where} must name a door ({', '.join(DOORS)}) or dimse:<calling AE title>, "
                f"not {item!r}"
            )
        found.append(f"{door.lower()}:{title.strip()}" if title else door.lower())
    return tuple(found)


def _days(table: Mapping[str, Any], key: str, where: str) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyError(f"{where} {key} must be a whole number of days ≥ 0, not {value!r}")
    return value


def _tier_name(value: Any, where: str) -> str:
    if value not in TIERS:
        raise PolicyError(f"{where} must name a tier ({', '.join(TIERS)}), not {value!r}")
    return str(value)


def _upper(value: Any, where: str) -> tuple[str, ...]:
    return tuple(item.strip().upper() for item in _strings(value, where))


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"{where} must be text or a list of text, not {value!r}")
    return list(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{where} must be text, not {value!r}")
    return value


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a table")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list of tables ([[...]])")
    return value


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise PolicyError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {known})")

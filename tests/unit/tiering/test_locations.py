"""The tier_locations file: a tier in a bucket or an S3 endpoint of its own, credentials
from the environment, TLS required off this machine; mistakes named by tier and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.tiering.locations import LocationError, load_locations
from workers.records import StoreSettings

NODE = StoreSettings("127.0.0.1:9000", "node", "node-secret")


def locations(tmp_path: Path, text: str) -> list[tuple[str, StoreSettings, str]]:
    path = tmp_path / "tiers.toml"
    path.write_text(text)
    return [(where.tier, where.store, where.bucket) for where in load_locations(path, NODE)]


def test_a_bucket_of_its_own_and_a_second_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLD_AK", "cold-user")
    monkeypatch.setenv("COLD_SK", "cold-secret")
    found = locations(
        tmp_path,
        '[warm]\nbucket = "warm-ia"\n'
        '[cold]\nendpoint = "archive.example.org:9000"\nbucket = "deep"\nsecure = true\n'
        'access_key_env = "COLD_AK"\nsecret_key_env = "COLD_SK"\n',
    )
    assert found == [
        ("warm", NODE, "warm-ia"),
        (
            "cold",
            StoreSettings("archive.example.org:9000", "cold-user", "cold-secret", True),
            "deep",
        ),
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[freezer]\nbucket = "x"\n', r"\[freezer\]: no such tier"),
        ('[cold]\nbuckt = "x"\n', r"\[cold\]: unknown field\(s\) buckt"),
        (
            '[cold]\nendpoint = "archive.example.org:9000"\naccess_key_env = "A"\n'
            'secret_key_env = "B"\n',
            "needs secure = true",
        ),
        (
            '[cold]\nendpoint = "127.0.0.1:9100"\naccess_key_env = "NOPE_A"\n'
            'secret_key_env = "NOPE_B"\n',
            "the environment has no NOPE_A",
        ),
        ('[cold]\nendpoint = "http://127.0.0.1:9100"\n', "endpoint must be HOST:PORT"),
        ("[cold]\nsecure = true\n", "need an endpoint"),
        ('[warm]\nbucket = "strata-hot"\n', "tiers hot and warm are both in bucket 'strata-hot'"),
    ],
)
def test_mistakes_are_refused_naming_the_tier_and_field(
    tmp_path: Path, text: str, says: str
) -> None:
    with pytest.raises(LocationError, match=says):
        locations(tmp_path, text)

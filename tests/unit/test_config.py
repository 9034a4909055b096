"""Configuration loading and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, load


def test_defaults_are_valid() -> None:
    config = load()
    assert config.host == "127.0.0.1"
    assert config.port == 50051
    assert config.codec == "htj2k"


def test_file_then_environment_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "strata.toml"
    path.write_text('[strata]\nport = 6000\ntier = "warm"\nbatch_max_files = 4\n')
    monkeypatch.setenv("STRATA_BATCH_MAX_FILES", "12")
    config = load(path, tier="cold")
    assert (config.port, config.batch_max_files, config.tier) == (6000, 12, "cold")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"codec": "gif"}, "codec must be one of"),
        ({"tier": "lukewarm"}, "tier must be one of"),
        ({"port": 70000}, "port must be"),
        ({"minio_drives": 2}, "at least 4"),
        ({"max_inflight_bytes": 10}, "max_inflight_bytes"),
        ({"max_concurrent_calls": 0}, "max_concurrent_calls must be at least 1"),
        ({"batch_max_files": "many"}, "batch_max_files must be a whole number"),
        ({"minio_endpoint": "127.0.0.1:9000"}, "minio_access_key"),
    ],
)
def test_bad_values_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(**overrides)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "strata.toml"
    path.write_text("[strata]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown configuration key.*prot"):
        load(path)


def test_example_deployment_config_is_valid() -> None:
    config = load(Path(__file__).parents[2] / "deploy" / "local" / "strata.toml")
    assert config.minio_endpoint == "127.0.0.1:9000"
    assert config.ray_address == "auto"
    assert config.key_file.is_absolute()


def test_codec_policy_by_tier_and_modality(tmp_path: Path) -> None:
    path = tmp_path / "strata.toml"
    path.write_text(
        '[strata]\ncodec = "htj2k"\n'
        '[strata.codec_policy]\ncold = "jpeg2000"\n"hot/CR" = "jpeg2000"\n'
    )
    config = load(path)
    assert config.codec_for("hot", "CT") == "htj2k"
    assert config.codec_for("hot", "CR") == "jpeg2000"
    assert config.codec_for("cold", "CT") == "jpeg2000"
    assert config.modality_codecs("hot") == (("CR", "1.2.840.10008.1.2.4.90"),)


def test_codec_policy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_CODEC_POLICY", "warm=jpeg2000, cold/MR=jpeg2000")
    assert load().codec_for("cold", "MR") == "jpeg2000"


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"lukewarm": "htj2k"}, "must be TIER or TIER/MODALITY"),
        ({"cold": "gif"}, r"codec_policy\['cold'\] must be one of"),
    ],
)
def test_bad_codec_policy_names_the_key(policy: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(codec_policy=policy)

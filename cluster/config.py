"""Strata's configuration: one typed object, loaded once from a TOML file and the environment.

Precedence: defaults < TOML file (``--config`` or ``$STRATA_CONFIG``) < ``STRATA_<KEY>``
environment variables < command-line flags. Every key is documented in README.md.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cluster.security.exposure import exposure_problem

MiB = 1024 * 1024
# The wire limit on one IngestChunk's data. gRPC holds up to about one chunk and one flow
# control window per open stream beyond what the byte budget counts, so the chunk is kept
# small: that memory is per stream, outside the budget (see README, "Bounded memory").
CHUNK_LIMIT = 1 * MiB


class ConfigError(Exception):
    """A configuration value that cannot be used; names the key and what is allowed."""


def _config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))


# Codec names used in configuration, and the lossless transfer syntax each stands for.
CODECS = {
    "htj2k": "1.2.840.10008.1.2.4.201",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",  # Process 14, selection value 1
    "jpeg-lossless-p14": "1.2.840.10008.1.2.4.57",  # Process 14, predictor 4
}


@dataclass(frozen=True)
class Config:
    """Every setting Strata reads. See README.md, "Configuration"."""

    # Front end
    host: str = "127.0.0.1"
    port: int = 50051
    max_file_bytes: int = 1024 * MiB
    max_inflight_bytes: int = 1536 * MiB
    # Ingest streams and retrievals served at once; more are refused RESOURCE_EXHAUSTED.
    # Each open stream may hold about 3 MiB outside the byte budget.
    max_concurrent_calls: int = 100
    # The DIMSE door (0: off). Peers are "AE=HOST:PORT" (a table in TOML): the calling AE
    # titles admitted, each from its host, and where C-MOVE sends and storage commitment
    # reports go. With none, only callers on loopback are admitted. On any address but
    # loopback the door needs TLS (certificate and key) and peers; a CA makes TLS mutual.
    dimse_port: int = 0
    dimse_host: str = "127.0.0.1"
    dimse_ae_title: str = "STRATA"
    dimse_peers: tuple[tuple[str, str], ...] = ()
    dimse_max_associations: int = 10
    dimse_tls_cert: str = ""
    dimse_tls_key: str = ""
    dimse_tls_ca: str = ""
    # Bearer tokens (comma-separated) the gRPC and DICOMweb doors check on every request;
    # with none, one is generated at start-up into <data_dir>/access-token (mode 0600).
    access_tokens: str = ""
    # TLS for the gRPC door; on any address but loopback it needs TLS and access_tokens.
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    # The DICOMweb door (0: off); on any address but loopback it needs TLS and
    # access_tokens.
    http_port: int = 0
    http_host: str = "127.0.0.1"
    http_tls_cert: str = ""
    http_tls_key: str = ""
    # Storage
    data_dir: Path = field(default_factory=lambda: _data_home() / "strata")
    key_file: Path = field(default_factory=lambda: _config_home() / "strata" / "keys.json")
    minio_endpoint: str = ""  # empty: embedded MinIO under data_dir (serve --embedded)
    minio_access_key: str = ""
    minio_secret_key: str = ""
    minio_drives: int = 4
    catalog_bucket: str = "strata-catalog"
    tier: str = "hot"
    # The tiering policy file (TOML: tiers and their prices, move rules, holds, retention;
    # see cluster/tiering/policy.py). Empty: three tiers at list prices and no rules.
    tier_policy: str = ""
    # With a tier_policy: carry its plan out every this many seconds (0: only when asked,
    # `strata tier apply`); a read of a study in a lower tier is checked against the
    # policy's promotion rules within seconds either way.
    tier_apply_interval_s: int = 0
    # Where tiers live when not in the node's MinIO as strata-<tier> (a TOML file: endpoint,
    # bucket, TLS, credentials from the environment; see cluster/tiering/locations.py).
    tier_locations: str = ""
    codec: str = "htj2k"
    # Exceptions to `codec`, keyed "TIER" or "TIER/MODALITY" (e.g. "cold" = "jpeg2000",
    # "hot/CR" = "jpegls"). In TOML a table [strata.codec_policy]; in the environment
    # STRATA_CODEC_POLICY="cold=jpeg2000,hot/CR=jpegls".
    codec_policy: tuple[tuple[str, str], ...] = ()
    # Compute
    ray_address: str = ""  # empty: start a local Ray; "auto": join the running cluster
    # The address every Ray process of this node listens on. Loopback unless this node is
    # part of a multi-machine cluster (then the pod's or host's address, on a private
    # network; Ray's own token authentication is on).
    ray_node_ip: str = "127.0.0.1"
    worker_cpus: int = 0  # 0: all cores Ray sees
    # Instances with at least this many frames are encoded by several workers at once,
    # in runs of fanout_chunk_frames frames (0 turns it off).
    fanout_min_frames: int = 64
    fanout_chunk_frames: int = 32
    fanout_min_bytes: int = 32 * MiB
    batch_max_files: int = 8
    batch_max_bytes: int = 16 * MiB
    # A batch that could leave waits at most this long for the next file of a sender that
    # waits for each answer (a DIMSE association) and was just answered (0 turns it off).
    batch_hold_ms: int = 50
    commit_max_rows: int = 64
    commit_wait_ms: int = 0  # >0: hold a group commit open this long for more rows
    # Group commits go to the catalog's journal; the writer appends the journal to the
    # Delta tables (and folds the study rows) once this many rows wait or the oldest has
    # waited this long, and compacts, checkpoints and vacuums them every this many
    # flushes; versions younger than the retention window stay readable (time travel).
    catalog_flush_rows: int = 100_000
    catalog_flush_interval_s: int = 300
    catalog_maintain_every_flushes: int = 12
    catalog_retention_hours: int = 168
    # Deadlines (seconds). A sender silent this long in the middle of a file is cut off and
    # its budget given back; every remote call and read step has its own deadline.
    idle_timeout_s: int = 30
    read_deadline_s: int = 60
    ingest_deadline_s: int = 600
    commit_deadline_s: int = 60
    # Self-healing: how often the node checks its components, and how often (and how old
    # an object must be) before an object with no catalog row is removed as an orphan.
    watch_interval_s: int = 2
    reconcile_interval_s: int = 600
    orphan_grace_s: int = 900  # >= ingest + commit deadlines when nodes share a bucket

    def validate(self) -> Config:
        """Return self, or raise ConfigError naming the first bad key."""
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, not {self.port}")
        # The names only: which encoders are installed is asked where they are used
        # (``check_codecs``, when a node starts), so that a client command does not load
        # the whole codec stack to read its configuration.
        available = list(CODECS)
        if self.codec not in available:
            raise ConfigError(f"codec must be one of {available}, not {self.codec!r}")
        for key, name in self.codec_policy:
            tier, _, modality = key.partition("/")
            if tier not in TIERS or (modality and not modality.isalnum()):
                raise ConfigError(
                    f"codec_policy key {key!r} must be TIER or TIER/MODALITY with TIER one "
                    f"of {list(TIERS)} (e.g. 'cold' or 'hot/CR')"
                )
            if name not in available:
                raise ConfigError(f"codec_policy[{key!r}] must be one of {available}, not {name!r}")
        if self.tier not in TIERS:
            raise ConfigError(f"tier must be one of 'hot', 'warm', 'cold', not {self.tier!r}")
        if self.max_file_bytes <= 0:
            raise ConfigError("max_file_bytes must be positive")
        if self.max_inflight_bytes < self.max_file_bytes + CHUNK_LIMIT:
            raise ConfigError(
                "max_inflight_bytes must be at least max_file_bytes + 1 MiB (one chunk), so "
                f"that one largest file fits ({self.max_inflight_bytes} < "
                f"{self.max_file_bytes} + 1 MiB)"
            )
        if self.max_concurrent_calls < 1:
            raise ConfigError(
                f"max_concurrent_calls must be at least 1, not {self.max_concurrent_calls}"
            )
        if self.minio_drives < 4:
            raise ConfigError(
                f"minio_drives must be at least 4 for erasure coding, not {self.minio_drives}"
            )
        if self.minio_endpoint and not (self.minio_access_key and self.minio_secret_key):
            raise ConfigError(
                "minio_access_key and minio_secret_key are required with minio_endpoint"
            )
        for name in (
            "batch_max_files",
            "batch_max_bytes",
            "commit_max_rows",
            "fanout_chunk_frames",
            "idle_timeout_s",
            "read_deadline_s",
            "ingest_deadline_s",
            "commit_deadline_s",
            "watch_interval_s",
            "reconcile_interval_s",
            "catalog_flush_rows",
            "catalog_flush_interval_s",
            "catalog_maintain_every_flushes",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if self.catalog_retention_hours < 0:
            raise ConfigError(
                f"catalog_retention_hours must not be negative, not {self.catalog_retention_hours}"
            )
        if self.orphan_grace_s < 0:
            raise ConfigError(f"orphan_grace_s must not be negative, not {self.orphan_grace_s}")
        if self.tier_apply_interval_s < 0:
            raise ConfigError(
                f"tier_apply_interval_s must not be negative, not {self.tier_apply_interval_s}"
            )
        if self.tier_policy:
            from cluster.tiering.policy import PolicyError, load_policy

            try:
                load_policy(Path(self.tier_policy))
            except PolicyError as error:
                raise ConfigError(f"tier_policy: {error}") from None
        if self.tier_locations:
            from cluster.tiering.locations import LocationError, load_locations

            try:
                load_locations(Path(self.tier_locations), None)
            except LocationError as error:
                raise ConfigError(str(error)) from None
        if self.batch_hold_ms < 0:
            raise ConfigError(f"batch_hold_ms must not be negative, not {self.batch_hold_ms}")
        if not 0 <= self.dimse_port < 65536:
            raise ConfigError(f"dimse_port must be 0 (off) or 1..65535, not {self.dimse_port}")
        if not 0 < len(self.dimse_ae_title) <= 16:
            raise ConfigError(
                f"dimse_ae_title must be 1 to 16 characters, not {self.dimse_ae_title!r}"
            )
        if self.dimse_port:
            problem = exposure_problem(
                "DIMSE",
                self.dimse_host,
                {
                    "dimse_tls_cert": self.dimse_tls_cert,
                    "dimse_tls_key": self.dimse_tls_key,
                    "dimse_peers": self.dimse_peers,
                },
            )
            if problem:
                raise ConfigError(problem)
        if not 0 <= self.http_port < 65536:
            raise ConfigError(f"http_port must be 0 (off) or 1..65535, not {self.http_port}")
        if self.http_port:
            problem = exposure_problem(
                "DICOMweb",
                self.http_host,
                {
                    "http_tls_cert": self.http_tls_cert,
                    "http_tls_key": self.http_tls_key,
                    "access_tokens": self.access_tokens,
                },
            )
            if problem:
                raise ConfigError(problem)
        problem = exposure_problem(
            "gRPC",
            self.host,
            {
                "grpc_tls_cert": self.grpc_tls_cert,
                "grpc_tls_key": self.grpc_tls_key,
                "access_tokens": self.access_tokens,
            },
        )
        if problem:
            raise ConfigError(problem)
        if self.worker_cpus < 0:
            raise ConfigError(f"worker_cpus must be 0 (all) or more, not {self.worker_cpus}")
        return self

    def check_codecs(self) -> None:
        """Raise ConfigError when a codec this configuration names is not installed."""
        installed = _available_codecs()
        for name in {self.codec, *(name for _, name in self.codec_policy)}:
            if name not in installed:
                raise ConfigError(f"codec {name!r} is not installed here (installed: {installed})")

    def codec_for(self, tier: str, modality: str = "") -> str:
        """The codec name the policy picks for ``tier`` (and ``modality``)."""
        policy = dict(self.codec_policy)
        return policy.get(f"{tier}/{modality}") or policy.get(tier) or self.codec

    def modality_codecs(self, tier: str) -> tuple[tuple[str, str], ...]:
        """(modality, transfer syntax) exceptions for ``tier``."""
        return tuple(
            (key.split("/", 1)[1], CODECS[name])
            for key, name in self.codec_policy
            if key.startswith(f"{tier}/")
        )


TIERS = ("hot", "warm", "cold")


def _available_codecs() -> list[str]:
    """Codec names whose encoder is installed and registered in workers.codecs.lossless."""
    from workers.codecs.lossless import lossless_transfer_syntaxes

    registered = lossless_transfer_syntaxes()
    return [name for name, uid in CODECS.items() if uid in registered]


def load(path: Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the TOML file, then STRATA_* variables, then ``overrides``."""
    values: dict[str, Any] = {}
    path = path or (Path(os.environ["STRATA_CONFIG"]) if os.environ.get("STRATA_CONFIG") else None)
    if path is not None:
        try:
            document = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"configuration file {path} is not valid TOML: {error}") from None
        values.update(document.get("strata", document))
    known = {f.name: f for f in fields(Config)}
    for name in known:
        env = os.environ.get(f"STRATA_{name.upper()}")
        if env is not None:
            values[name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
    config = Config()
    converted: dict[str, Any] = {}
    for name, value in values.items():
        default = getattr(config, name)
        converted[name] = _convert(name, value, default)
    return replace(config, **converted).validate()


def _convert(name: str, value: Any, default: Any) -> Any:
    if name == "dimse_peers":
        table = _pairs(name, value, "AE=HOST:PORT")
        for ae_title, address in table:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"dimse_peers[{ae_title!r}] must be HOST:PORT, not {address!r}")
            if not 0 < len(ae_title) <= 16:
                raise ConfigError(
                    f"dimse_peers: {ae_title!r} is not an AE title (1 to 16 characters)"
                )
        return table
    if name == "codec_policy":
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ConfigError(f"codec_policy must read KEY=CODEC,..., not {value!r}")
            value = {key.strip(): codec.strip() for key, codec in pairs}
        if not isinstance(value, dict):
            raise ConfigError("codec_policy must be a table of KEY = CODEC")
        return tuple(sorted((str(key), str(codec)) for key, codec in value.items()))
    if isinstance(default, Path):
        return Path(os.path.expanduser(str(value)))
    if isinstance(default, tuple):
        return _pairs(name, value, "KEY=VALUE")
    if isinstance(default, bool):
        return str(value).lower() in ("1", "true", "yes")
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    return str(value)


def _pairs(name: str, value: Any, shape: str) -> tuple[tuple[str, str], ...]:
    """A table (TOML) or ``K=V,K=V`` (environment) as sorted pairs."""
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ConfigError(f"{name} must read {shape},..., not {value!r}")
        value = {key.strip(): item.strip() for key, item in pairs}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a table of {shape.replace('=', ' = ')}")
    return tuple(sorted((str(key), str(item)) for key, item in value.items()))

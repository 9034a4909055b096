"""Starting and stopping a whole Strata node: MinIO (embedded), Ray, catalog writer, gRPC.

``Stack`` is what `strata serve`, `strata demo`, the integration tests and the benchmarks
start, so that they all run the same components the same way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from cluster.admission import ByteBudget
from cluster.catalog import CatalogWriter
from cluster.config import CODECS, Config
from cluster.dispatch import Dispatcher
from cluster.frontend import ArchiveService, CatalogService
from cluster.minio_server import MinioServer, ensure_minio_binary
from cluster.server import start_server
from workers import store
from workers.fanout import FrameFanout
from workers.ingest import PipelineSettings
from workers.keys import create_key_file, load_key_file
from workers.records import StoreSettings

log = logging.getLogger("strata.stack")

CATALOG_ACTOR = "strata-catalog"
NAMESPACE = "strata"
NODE_FILE = "node.json"


class Stack:
    """One Strata node. ``embedded`` also runs MinIO under ``config.data_dir``."""

    def __init__(self, config: Config, *, embedded: bool) -> None:
        self.config = config
        self.embedded = embedded
        self.minio: MinioServer | None = None
        self.port = 0
        self.budget = ByteBudget(config.max_inflight_bytes)
        self._server: Any = None
        self._catalog: Any = None
        self._started_ray = False
        self.store_settings: StoreSettings | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Start every component, in dependency order; stop what started if one fails."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        if self.embedded:
            config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            ensure_minio_binary()
            self.minio = MinioServer(config.data_dir / "minio", drives=config.minio_drives)
            self.minio.start()
            self.store_settings = self.minio.settings
        elif config.minio_endpoint:
            self.store_settings = StoreSettings(
                config.minio_endpoint, config.minio_access_key, config.minio_secret_key
            )
        else:
            raise RuntimeError("minio_endpoint is not set; configure it or use --embedded")
        create_key_file(config.key_file)
        load_key_file(config.key_file)  # fail now, not in the first worker, if it is unusable
        settings = PipelineSettings(
            store=self.store_settings,
            key_file=str(config.key_file),
            tier=config.tier,
            transfer_syntax=CODECS[config.codec_for(config.tier)],
            modality_codecs=config.modality_codecs(config.tier),
            fanout=FrameFanout(
                config.fanout_min_frames, config.fanout_chunk_frames, config.fanout_min_bytes
            ),
        )
        store.ensure_bucket(self.store_settings, store.tier_bucket(config.tier))

        if not ray.is_initialized():
            ray.init(
                address=config.ray_address or None,
                num_cpus=(config.worker_cpus or None) if not config.ray_address else None,
                namespace=NAMESPACE,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"PYTHONHASHSEED": "0"}},
            )
            self._started_ray = True
        worker_cpus = config.worker_cpus or int(
            ray.cluster_resources().get("CPU", os.cpu_count())  # type: ignore[no-untyped-call]
        )

        self._catalog = (
            ray.remote(CatalogWriter)
            .options(name=CATALOG_ACTOR, num_cpus=0, max_concurrency=1000)
            .remote(
                self.store_settings,
                bucket=config.catalog_bucket,
                max_batch=config.commit_max_rows,
                max_wait_s=config.commit_wait_ms / 1000,
            )
        )
        await self._catalog.stats.remote()  # wait until the tables are open
        dispatcher = Dispatcher(
            settings,
            self._catalog,
            worker_cpus=worker_cpus,
            batch_max_files=config.batch_max_files,
            batch_max_bytes=config.batch_max_bytes,
            batch_wait_ms=config.batch_wait_ms,
        )
        archive = ArchiveService(
            dispatcher,
            self._catalog,
            settings,
            self.budget,
            config.max_file_bytes,
            config.catalog_bucket,
        )
        self._server, self.port = await start_server(
            archive, CatalogService(settings, config.catalog_bucket), config.host, config.port
        )
        if self.embedded:
            _write_node_file(config.data_dir, self.address, self.store_settings)
        log.info("strata serving on %s (workers: %d cores)", self.address, worker_cpus)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop in reverse order. Safe to call twice."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._catalog is not None:
            try:
                await self._catalog.close.remote()
            except Exception:
                log.exception("catalog writer did not close cleanly")
            ray.kill(self._catalog)
            self._catalog = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
        if self.minio is not None:
            (self.config.data_dir / NODE_FILE).unlink(missing_ok=True)
            self.minio.stop()
            self.minio = None

    async def catalog_stats(self) -> dict[str, int]:
        result: dict[str, int] = await self._catalog.stats.remote()
        return result


def node_store_settings(config: Config) -> StoreSettings:
    """The object store of the configured node, for tools such as ``strata query``.

    With ``minio_endpoint`` configured, that store; otherwise the embedded MinIO of the
    node running under ``data_dir`` (it records its address in ``node.json``, mode 0600).
    """
    if config.minio_endpoint:
        return StoreSettings(
            config.minio_endpoint, config.minio_access_key, config.minio_secret_key
        )
    path = config.data_dir / NODE_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeError(
            f"no running embedded node under {config.data_dir} ({path} is missing); start one "
            "with `strata serve --embedded` or set minio_endpoint"
        ) from None
    return StoreSettings(**document["store"])


def _write_node_file(data_dir: Path, address: str, settings: StoreSettings) -> None:
    path = data_dir / NODE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"grpc": address, "store": asdict(settings)}, handle)

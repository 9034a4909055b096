"""Starting and stopping a whole Strata node: MinIO (embedded), Ray, catalog writer, gRPC.

``Stack`` is what `strata serve`, `strata demo`, the integration tests and the benchmarks
start, so that they all run the same components the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ray
import ray._private.auto_init_hook
from grpc_health.v1 import health_pb2

from cluster.archive import Archive, Deadlines
from cluster.archive.admission import ByteBudget
from cluster.archive.dispatch import Dispatcher, within
from cluster.catalog import CatalogWriter
from cluster.catalog.maintenance import MaintenancePolicy
from cluster.config import CODECS, Config, ConfigError
from cluster.doors.dimse import DimseDoor, DimseSettings, Peer
from cluster.doors.grpc.server import PortUnavailableError, start_server
from cluster.doors.grpc.servicer import ArchiveService, CatalogService, TieringService
from cluster.doors.web import WebDoor, WebSettings
from cluster.ops.minio import MinioServer, ensure_minio_binary
from cluster.ops.ray_runtime import init_local_ray
from cluster.ops.reconcile import ReconcileReport, remove_orphans
from cluster.security import tokens as access
from cluster.tiering.apply import ApplyProgress, TierApplier, packs_in_motion
from cluster.tiering.engine import Plan
from cluster.tiering.locations import load_locations
from cluster.tiering.policy import Policy, load_policy
from workers.objects import store
from workers.objects.keys import create_key_file, load_key_file
from workers.pipeline.fanout import FrameFanout
from workers.pipeline.ingest import PipelineSettings, warm_up
from workers.records import StoreSettings

log = logging.getLogger("strata.stack")

CATALOG_ACTOR = "strata-catalog"
NAMESPACE = "strata"
NODE_FILE = "node.json"
READ_SETTLE_S = 2.0  # after a read, before the tiering pass that may promote its study


class Stack:
    """One Strata node. ``embedded`` also runs MinIO under ``config.data_dir``."""

    def __init__(self, config: Config, *, embedded: bool) -> None:
        self.config = config
        self.embedded = embedded
        self.minio: MinioServer | None = None
        self.port = 0
        self.budget = ByteBudget(config.max_inflight_bytes, config.max_file_bytes)
        self._server: Any = None
        self._catalog: Any = None
        self._dispatcher: Any = None
        self._archive: Any = None
        self._health: Any = None
        self.dimse: DimseDoor | None = None
        self.web: WebDoor | None = None
        self._keepers: list[asyncio.Task[None]] = []
        self._reconcile_soon = asyncio.Event()
        self._ray_down = ""  # what died, while a Ray restart has not yet succeeded
        self._started_ray = False
        self.store_settings: StoreSettings | None = None
        self.pipeline_settings: PipelineSettings | None = None
        self._worker_cpus = 1
        self._tiering = asyncio.Lock()
        self._tier_policy: Policy | None = None
        self._reads: set[str] = set()  # studies read since the last tiering pass
        self._read_soon = asyncio.Event()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Start every component, in dependency order; stop what started if one fails."""
        self.config.check_codecs()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        # A Ray call while the runtime is being restarted must fail, not start a default
        # Ray of its own (which would listen on every interface).
        # (Ray reads RAY_ENABLE_AUTO_CONNECT once, at import: the flag is set directly.)
        os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
        ray._private.auto_init_hook.enable_auto_connect = False
        holder = _hold_port(config.host, config.port)
        try:
            await self._start_components(holder)
        finally:
            if holder is not None:
                holder.close()

    async def _start_components(self, holder: socket.socket | None) -> None:
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
            max_file_bytes=config.max_file_bytes,
            locations=(
                load_locations(Path(config.tier_locations), self.store_settings)
                if config.tier_locations
                else ()
            ),
        )
        store.ensure_bucket(*settings.location(config.tier))
        self.pipeline_settings = settings

        if not ray.is_initialized():
            init_local_ray(
                address=config.ray_address or None,
                num_cpus=(config.worker_cpus or None) if not config.ray_address else None,
                namespace=NAMESPACE,
                host=config.ray_node_ip,
            )
            self._started_ray = True
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
        worker_cpus = config.worker_cpus or int(resources.get("CPU", os.cpu_count()))
        self._worker_cpus = worker_cpus
        _check_object_store(config.max_inflight_bytes, resources.get("object_store_memory"))

        self._catalog = self._new_catalog_writer()
        # Worker processes started, and the pipeline's libraries loaded in them, while the
        # tables open: a node that says it serves does not spend its first files' time
        # (seconds of CPU per process) starting Ray workers.
        warming = [_warm_up.remote() for _ in range(worker_cpus)]
        await self._catalog.ready.remote()  # wait until the tables are open
        await asyncio.gather(*warming)
        self._dispatcher = Dispatcher(
            settings,
            self._catalog,
            worker_cpus=worker_cpus,
            batch_max_files=config.batch_max_files,
            batch_max_bytes=config.batch_max_bytes,
            batch_hold_s=config.batch_hold_ms / 1000,
            ingest_deadline_s=config.ingest_deadline_s,
            commit_deadline_s=config.commit_deadline_s,
        )
        self._archive = Archive(
            self._dispatcher,
            self._catalog,
            settings,
            self.budget,
            config.max_file_bytes,
            Deadlines(
                idle_s=config.idle_timeout_s,
                read_s=config.read_deadline_s,
                lookup_s=min(10, config.read_deadline_s),
            ),
            max_calls=config.max_concurrent_calls,
        )
        if holder is not None:
            holder.close()  # the server binds it next
        self.tokens = access.for_node(config.access_tokens, config.data_dir)
        self._server, self.port, self._health = await start_server(
            ArchiveService(self._archive),
            CatalogService(lambda: self._archive),
            TieringService(self.apply_tiering, self.plan_tiering),
            config.host,
            config.port,
            self.tokens,
            tls=(config.grpc_tls_cert, config.grpc_tls_key),
        )
        if config.dimse_port:
            self.dimse = DimseDoor(
                self._archive, dimse_settings(config), asyncio.get_running_loop()
            )
            self.dimse.start()
        if config.http_port:
            self.web = WebDoor(self._archive, web_settings(config), self.tokens)
            await self.web.start()
        if self.embedded:
            _write_node_file(config.data_dir, self.address, self.store_settings)
        self._keepers = [
            asyncio.create_task(self._watch(), name="strata-watch"),
            asyncio.create_task(self._reconcile_forever(), name="strata-reconcile"),
        ]
        if config.tier_policy:
            self._tier_policy = load_policy(Path(config.tier_policy))
            self._archive.on_read = self._read_noted
            self._keepers.append(asyncio.create_task(self._tier_forever(), name="strata-tier"))
        log.info("strata serving on %s (workers: %d cores)", self.address, worker_cpus)

    def _new_catalog_writer(self) -> Any:
        # Ray restarts the writer's process whenever it dies (max_restarts=-1); a call in
        # flight then fails rather than being replayed (max_task_retries=0), and the
        # dispatcher retries it against the new process, which reloads the table first.
        return (
            ray.remote(CatalogWriter)
            .options(
                name=CATALOG_ACTOR,
                get_if_exists=True,  # one left by a restart that failed half-way
                num_cpus=0,
                max_concurrency=1000,
                max_restarts=-1,
                max_task_retries=0,
            )
            .remote(
                self.store_settings,
                bucket=self.config.catalog_bucket,
                max_batch=self.config.commit_max_rows,
                max_wait_s=self.config.commit_wait_ms / 1000,
                maintenance=MaintenancePolicy(
                    every_flushes=self.config.catalog_maintain_every_flushes,
                    retention_hours=self.config.catalog_retention_hours,
                ),
                index_path=str(catalog_index_path(self.config)),
                flush_rows=self.config.catalog_flush_rows,
                flush_interval_s=self.config.catalog_flush_interval_s,
            )
        )

    # -- self-healing ---------------------------------------------------------------------

    async def _watch(self) -> None:
        """Notice a dead component and bring it back, for as long as the node runs.

        The catalog writer and Ray's worker processes are restarted by Ray itself. What Ray
        cannot restart is watched here: the embedded MinIO, and Ray's own processes (GCS,
        raylet, agents) when this node started them.
        """
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            try:
                if self.minio is not None and not self.minio.running:
                    await self._heal("the object store (MinIO)", self._restart_minio)
                dead = _dead_ray_processes() if self._started_ray else []
                if dead or self._ray_down:
                    # Set until a restart succeeds, so a failed one is tried again.
                    self._ray_down = self._ray_down or f"the Ray runtime ({', '.join(dead)})"
                    if await self._heal(self._ray_down, self._restart_ray):
                        self._ray_down = ""
            except Exception:
                log.exception("the component watch failed; it runs again shortly")

    async def _heal(self, what: str, restart: Callable[[], Awaitable[None]]) -> bool:
        log.error("%s has stopped; refusing new work and restarting it", what)
        self._archive.unavailable = (
            f"the archive is restarting {what}; nothing was stored for this file, send it "
            "again in a few seconds"
        )
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            await restart()
        except Exception as error:  # noqa: BLE001 - retried by the next watch
            log.error(
                "restarting %s failed (%s: %s); the node stays unavailable and tries again in %d s",
                what,
                type(error).__name__,
                error,
                self.config.watch_interval_s,
            )
            return False
        self._archive.unavailable = None
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._reconcile_soon.set()
        log.warning("%s is back; serving again", what)
        return True

    async def _restart_minio(self) -> None:
        assert self.minio is not None
        await asyncio.to_thread(self.minio.start)  # same port, same drives, same keys

    async def _restart_ray(self) -> None:
        config = self.config
        # The old runtime's handles are useless: drop them, start a new runtime, and hand
        # the new writer to the dispatcher (which answers batches that were lost with it).
        self._dispatcher.runtime_lost()
        if ray.is_initialized():
            ray.shutdown()
        init_local_ray(
            address=None,
            num_cpus=config.worker_cpus or None,
            namespace=NAMESPACE,
            host=config.ray_node_ip,
        )
        self._catalog = self._new_catalog_writer()
        await within(self._catalog.ready.remote(), 120, "the new catalog writer")
        self._dispatcher.reset(self._catalog)
        self._archive.rebind(self._catalog)

    async def _reconcile_forever(self) -> None:
        """Remove orphan objects at start, after every heal, and every interval."""
        while True:
            try:
                await self.reconcile()
            except Exception as error:  # noqa: BLE001 - tried again next interval
                log.error("reconcile failed (%s: %s)", type(error).__name__, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._reconcile_soon.wait(), self.config.reconcile_interval_s
                )
            self._reconcile_soon.clear()

    async def reconcile(self) -> ReconcileReport:
        """One orphan-removal pass over this node's tier bucket."""
        assert self.store_settings is not None
        # Listed before the pass: a copy begun after it is younger than the grace.
        moving = await asyncio.to_thread(
            packs_in_motion, self.store_settings, self.config.catalog_bucket
        )
        assert self.pipeline_settings is not None
        return await remove_orphans(
            *self.pipeline_settings.location(self.config.tier),
            self.config.tier,
            self._catalog,
            self._dispatcher,
            grace=timedelta(seconds=self.config.orphan_grace_s),
            now=datetime.now(UTC),
            in_motion=moving,
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop in reverse order. Safe to call twice."""
        for keeper in self._keepers:
            keeper.cancel()
        self._keepers = []
        if self.dimse is not None:
            await asyncio.to_thread(self.dimse.stop)
            self.dimse = None
        if self.web is not None:
            await self.web.stop()
            self.web = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._catalog is not None:
            try:
                await within(self._catalog.close.remote(), 30, "the catalog writer")
            except Exception:
                log.exception("catalog writer did not close cleanly")
            with contextlib.suppress(Exception):
                ray.kill(self._catalog, no_restart=True)
            self._catalog = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
        if self.minio is not None:
            (self.config.data_dir / NODE_FILE).unlink(missing_ok=True)
            self.minio.stop()
            self.minio = None

    def _read_noted(self, study_instance_uid: str) -> None:
        self._reads.add(study_instance_uid)
        self._read_soon.set()

    async def _tier_forever(self) -> None:
        """Carry the configured policy out every ``tier_apply_interval_s`` (if set), and,
        a few seconds after studies are read, for those studies (a read may promote)."""
        interval = self.config.tier_apply_interval_s
        last_full = time.monotonic()
        while True:
            wait = interval - (time.monotonic() - last_full) if interval else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read_soon.wait(), wait)
            await asyncio.sleep(READ_SETTLE_S)  # reads close together go in one pass
            self._read_soon.clear()
            full = bool(interval) and time.monotonic() - last_full >= interval
            studies, self._reads = (None if full else sorted(self._reads)), set()
            if full:
                last_full = time.monotonic()
            try:
                assert self._tier_policy is not None
                last = None
                async for step in self.apply_tiering(self._tier_policy, studies=studies):
                    last = step
                if last is not None and (last.studies_done or last.studies_failed):
                    log.info(
                        "tiering: %d studies moved, %d failed (%s)",
                        last.studies_done,
                        last.studies_failed,
                        "scheduled" if full else "after reads",
                    )
            except Exception as error:  # noqa: BLE001 - tried again at the next occasion
                log.error("tiering failed (%s: %s)", type(error).__name__, error)

    async def plan_tiering(
        self, policy: Policy, at: datetime | None = None, totals: bool = True
    ) -> Plan:
        """What ``policy`` would do now (or as of ``at``), from the catalog writer's index:
        the studies that are due (``cluster.tiering.due``); changes no study."""
        planned: Plan = await self._catalog.plan_tiering.remote(
            policy, at, None, totals, record=False
        )
        return planned

    async def apply_tiering(
        self, policy: Policy, at: datetime | None = None, studies: list[str] | None = None
    ) -> AsyncIterator[ApplyProgress]:
        """Plan ``policy`` (the studies due, or only ``studies``) and carry the plan out;
        progress after each step. One apply at a time: a second one waits."""
        async with self._tiering:
            assert self.pipeline_settings is not None
            planned: Plan = await self._catalog.plan_tiering.remote(policy, at, studies)
            applier = TierApplier(
                self.pipeline_settings,
                self._catalog,
                self.config.catalog_bucket,
                policy,
                concurrency=self._worker_cpus,
            )
            async for progress in applier.apply(planned.decisions):
                yield progress

    async def flush_catalog(self) -> None:
        """Flush the catalog's journal into the Delta tables and fold the study rows now."""
        await self._catalog.flush_now.remote(raise_errors=True)

    async def catalog_stats(self) -> dict[str, int]:
        result: dict[str, int] = await self._catalog.stats.remote()
        return result

    @property
    def catalog_writer(self) -> Any:
        """The node's catalog writer (a Ray actor handle)."""
        return self._catalog

    def dispatch_stats(self) -> dict[str, int]:
        """Batches and files the workers handled, and the CPU ms they spent in the tasks."""
        return dict(self._dispatcher.stats)


@ray.remote(num_cpus=1)
def _warm_up() -> int:
    """Start one worker process and load the pipeline's libraries in it; its pid."""
    warm_up()
    time.sleep(0.2)  # so that the others start in processes of their own
    return os.getpid()


def web_settings(config: Config) -> WebSettings:
    return WebSettings(
        host=config.http_host,
        port=config.http_port,
        tls_cert=config.http_tls_cert,
        tls_key=config.http_tls_key,
        tokens_configured=bool(access.configured(config.access_tokens)),
    )


def dimse_settings(config: Config) -> DimseSettings:
    """The DIMSE door's settings, from the node's configuration."""
    peers = []
    for ae_title, address in config.dimse_peers:
        host, _, port = address.rpartition(":")
        peers.append(Peer(ae_title, host, int(port)))
    return DimseSettings(
        host=config.dimse_host,
        port=config.dimse_port,
        ae_title=config.dimse_ae_title,
        peers=tuple(peers),
        max_associations=config.dimse_max_associations,
        tls_cert=config.dimse_tls_cert,
        tls_key=config.dimse_tls_key,
        tls_ca=config.dimse_tls_ca,
    )


def catalog_index_path(config: Config) -> Path:
    """The catalog writer's keyed index file. It lives beside the node's data: a writer
    restarted on this machine opens it and catches up instead of rebuilding it."""
    return config.data_dir / "catalog-index" / f"{config.catalog_bucket}.sqlite"


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


def _dead_ray_processes() -> list[str]:
    """Kinds of this node's own Ray processes (GCS, raylet, agents) that have exited."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return []
    return sorted({str(kind) for kind, _ in node.dead_processes()})


def _check_object_store(budget: int, store_bytes: float | None) -> None:
    """Refuse a byte budget that Ray's object store cannot hold with room to spare.

    Files in flight are in the object store; past its size Ray spills them to local disk,
    unencrypted, and a full store makes the front end wait on Ray.
    """
    if store_bytes and budget > store_bytes / 2:
        raise ConfigError(
            f"max_inflight_bytes ({budget} bytes) must be at most half of Ray's object store "
            f"({int(store_bytes)} bytes); lower it, or give Ray more memory"
        )


def _hold_port(host: str, port: int) -> socket.socket | None:
    """Bind the gRPC port now, or raise PortUnavailableError: better before minutes of
    start-up than after. The socket is kept (bound, not listening) until the server binds
    the port, so that none of the processes started meanwhile is given it (MinIO's and
    Ray's take free ports from the same range as a port chosen at random)."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    # As gRPC does: a port in TIME_WAIT is free, one with a listener is not.
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind((host, port))
    except OSError:
        holder.close()
        raise PortUnavailableError(host, port) from None
    return holder

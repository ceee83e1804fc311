"""Wiring and lifecycle of one feedloop server: open, seed, load, serve, drain, close.

    store + registry ─▶ LiveModel (watcher thread) ──┬─▶ ModelProcessClient ─▶ model process (torch)
    GenerationService ─▶ Batcher (dispatcher thread) ┘        │ replies (reader thread)
                                                   GenerationLog (writer thread) ─▶ store
                                                   ShadowScorer (thread) ─▶ model process, store
    FeedbackService ───▶ FeedbackWriter (writer thread) ────────────────────────────▶ store
    ModelAdminService ─▶ registry, store   AuthInterceptor in front of all three
    HttpApi (OpenAI-compatible, optional) ─▶ the same GenerationService and FeedbackService
    Health (NOT_SERVING until a model is loaded and while draining), reflection, /metrics

Shutdown order matters: health goes NOT_SERVING, the gRPC and HTTP servers stop taking calls
and let in-flight ones finish, then the batcher delivers its last replies, the shadow scorer
finishes the batch it is scoring, the model process exits, the feedback writer and the
generation log drain into the store, and only then are the store and registry closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from feedloop.core.checkpoint import MANIFEST
from feedloop.core.errors import CheckpointError, FeedloopError
from feedloop.core.registry import ModelRegistry, open_registry
from feedloop.core.store import ReplayStore, open_store
from feedloop.server.admin import ModelAdminService
from feedloop.server.auth import SUBJECT_PREFIX, Authenticator, AuthInterceptor, load_keys
from feedloop.server.batcher import Batcher
from feedloop.server.config import ServeConfig, is_loopback
from feedloop.server.errors import ServiceError
from feedloop.server.feedback import FeedbackService
from feedloop.server.feedback_writer import FeedbackWriter
from feedloop.server.generation import GenerationService
from feedloop.server.generation_log import GenerationLog
from feedloop.server.http_api import HttpApi, server_ssl_context
from feedloop.server.human_eval import VerdictRecorder
from feedloop.server.live_model import LiveModel
from feedloop.server.metrics import ServerMetrics
from feedloop.server.metrics_http import load_metrics_credentials
from feedloop.server.model_client import ModelProcessClient
from feedloop.server.ratelimit import RateLimiter
from feedloop.server.rpc import add_service
from feedloop.server.shadow import ShadowScorer
from feedloop.v1 import feedloop_pb2 as pb

log = logging.getLogger("feedloop.server")
SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("Generation", "Feedback", "ModelAdmin")
)


class StartupError(FeedloopError):
    """The server cannot start; the message tells the operator what to do."""


def seed_registry(
    registry: ModelRegistry,
    data_dir: Path,
    location: str,
    policy: Path | None = None,
    prompt_template: str = "{keywords}",
) -> None:
    """Give an empty registry a live version: `policy` (a checkpoint, or a Hugging Face model
    directory imported as one), else the default pretrained checkpoint.

    A registry that has versions keeps them: `--policy` never replaces what training made.
    """
    if registry.live() is not None:
        if policy is not None:
            log.warning(
                "--policy %s ignored: the registry at %s already has a live version",
                policy,
                location,
            )
        return
    versions = registry.versions()
    if versions:
        registry.set_live(versions[-1], reason="no live version at server start: newest made live")
        return
    if policy is not None:
        checkpoint = _policy_checkpoint(Path(policy), data_dir, prompt_template)
        registry.publish(checkpoint, reason=f"seed: --policy {policy}", make_live=True)
        return
    from feedloop.core.pretrain import default_checkpoint_dir

    checkpoint = default_checkpoint_dir(data_dir)
    if not (checkpoint / MANIFEST).is_file():
        raise StartupError(
            f"no model to serve: the registry at {location} is empty and there is no default "
            f"checkpoint at {checkpoint}; run `feedloop pretrain` first"
        )
    registry.publish(checkpoint, reason="seed: the default pretrained checkpoint", make_live=True)


def _policy_checkpoint(policy: Path, data_dir: Path, prompt_template: str) -> Path:
    """--policy as a checkpoint directory: as it is, or a Hugging Face model imported."""
    if (policy / MANIFEST).is_file():
        return policy
    if not (policy / "config.json").is_file():
        raise StartupError(
            f"--policy {policy}: neither a feedloop checkpoint (manifest.json) nor a Hugging "
            "Face model directory (config.json, *.safetensors, tokenizer.json)"
        )
    try:
        from feedloop.core.hf_import import import_model_dir
    except ImportError as exc:
        raise StartupError(
            f"--policy {policy} is a Hugging Face model: install the hf extra "
            f"(pip install 'feedloop[hf]'): {exc}"
        ) from exc
    target = data_dir / "imported-policy"
    shutil.rmtree(target, ignore_errors=True)
    try:
        import_model_dir(policy, target, prompt_template=prompt_template)
    except (CheckpointError, ValueError) as exc:
        raise StartupError(f"--policy {policy}: {exc}") from exc
    return target


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class FeedloopServer:
    def __init__(
        self,
        config: ServeConfig,
        *,
        store: ReplayStore | None = None,
        registry: ModelRegistry | None = None,
    ) -> None:
        """store/registry: already-open backends to use (tests); default: open the config's."""
        self.config = config
        self.metrics = ServerMetrics()
        self.store = store
        self.registry = registry
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = 0  # 0 while the HTTP API is off
        self.http_api: HttpApi | None = None
        self.live_model: LiveModel | None = None
        self.generation_log: GenerationLog | None = None
        self.feedback_writer: FeedbackWriter | None = None
        self.shadow_scorer: ShadowScorer | None = None
        self.batcher: Batcher | None = None
        self.model_client: ModelProcessClient | None = None
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._started_at = time.monotonic()
        self._stopped = False

    @property
    def live_version(self) -> str:
        live = self.live_model.live if self.live_model else None
        return live.version if live else ""

    def banner(self) -> str:
        config = self.config
        metrics_host = config.metrics_host or config.host
        http = f" http={config.host}:{self.http_port}" if self.http_api else ""
        return (
            f"feedloop serve: listening grpc={config.host}:{self.grpc_port} "
            f"metrics={metrics_host}:{self.metrics_port} live={self.live_version} "
            f"auth={'on' if config.auth_enabled else 'off'}{http}"
        )

    async def start(self) -> None:
        config = self.config
        if not config.auth_enabled and not is_loopback(config.host):
            raise StartupError(
                f"refusing to serve on {config.host} without auth: set auth_keys_file "
                f"(--auth-keys-file) or bind to 127.0.0.1"
            )
        keys = load_keys(config.auth_keys_file) if config.auth_keys_file else None
        if keys and any(d.startswith(SUBJECT_PREFIX) for d in keys) and not config.tls_client_ca:
            raise StartupError(
                "the auth keys file names certificate subjects, which only mutual TLS "
                "(tls_client_ca) can verify"
            )
        if keys is None:
            log.warning("auth is off: allowed only because %s is a loopback address", config.host)
        if self.store is None:
            self.store = await asyncio.to_thread(open_store, config.store_location)
        if self.registry is None:
            self.registry = await asyncio.to_thread(
                open_registry,
                config.registry_location,
                poll_interval_s=config.registry_poll_interval_s,
                data_dir=config.data_dir,
            )
        await asyncio.to_thread(
            seed_registry,
            self.registry,
            config.data_dir,
            config.registry_location,
            config.policy,
            config.prompt_template,
        )

        loop = asyncio.get_running_loop()
        metrics = self.metrics
        store, registry = self.store, self.registry
        assert store is not None and registry is not None  # opened above
        metrics.storage.watch(store.size_bytes, registry.size_bytes, config.local_volumes())
        self.model_client = ModelProcessClient(metrics, torch_threads=config.torch_threads)
        await asyncio.to_thread(self.model_client.start)
        exploration = config.exploration
        self.live_model = LiveModel(
            self.registry,
            self.model_client,
            metrics,
            keep_versions=config.keep_versions,
            explore_versions=exploration.versions
            if exploration.share > 0 and exploration.version_share > 0
            else 0,
        )
        self.generation_log = GenerationLog(
            self.store,
            metrics,
            capacity=config.generation_buffer_size,
            batch_max=config.write_batch_max,
        )
        self.feedback_writer = FeedbackWriter(
            self.store,
            self.generation_log,
            metrics,
            capacity=config.feedback_queue_size,
            batch_max=config.write_batch_max,
            commit_interval_s=config.feedback_commit_interval_ms / 1000,
            unknown_generation_wait_s=config.unknown_generation_wait_ms / 1000,
        )
        self.feedback_writer.start(loop)
        self.shadow_scorer = ShadowScorer(
            self.live_model,
            self.model_client,
            self.store,
            metrics,
            capacity=config.shadow_queue_size,
            batch_max=config.write_batch_max,
        )
        self.batcher = Batcher(
            self.live_model,
            self.model_client,
            self.generation_log,
            self.shadow_scorer,
            metrics,
            max_batch_size=config.max_batch_size,
            max_queue_delay_ms=config.max_queue_delay_ms,
            max_queue_size=config.max_queue_size,
        )
        self.batcher.start(loop)
        authenticator = Authenticator(keys)
        limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst)
        # With no keys and no rate limit the interceptor would pass every call through: left
        # out, it costs nothing (grpc.aio runs an interceptor chain as coroutines per call).
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if authenticator.enabled or limiter.enabled:
            interceptors.append(AuthInterceptor(authenticator, limiter, metrics))

        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a taken port is an error, not a shared one
            ],
        )
        self._server = server
        generation = GenerationService(
            config,
            self.batcher,
            self.live_model,
            self.generation_log,
            authenticator,
            metrics,
            limiter,
        )
        feedback = FeedbackService(
            self.feedback_writer,
            authenticator,
            metrics,
            max_correction_chars=config.max_correction_chars,
            max_ranking_ids=config.max_candidates,
            limiter=limiter if config.rate_limit_per_event else None,
            max_streams_per_key=config.max_streams_per_key,
            stream_idle_timeout_s=config.stream_idle_timeout_s,
            verdicts=VerdictRecorder(
                self.store,
                self.generation_log,
                self.feedback_writer,
                metrics,
                self.live_model.loaded_versions,
            ),
        )
        admin = ModelAdminService(
            self.registry,
            self.store,
            self.live_model,
            self.batcher,
            metrics,
            started_at=self._started_at,
        )
        for servicer, name in (
            (generation, "Generation"),
            (feedback, "Feedback"),
            (admin, "ModelAdmin"),
        ):
            add_service(server, servicer, name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert and config.tls_key:
                credentials = grpc.ssl_server_credentials(
                    [(_read(config.tls_key), _read(config.tls_cert))],
                    root_certificates=_read(config.tls_client_ca),
                    require_client_auth=config.tls_client_ca is not None,
                )
                self.grpc_port = server.add_secure_port(address, credentials)
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"cannot bind gRPC to {address}: {exc}") from None
        if not self.grpc_port:
            raise StartupError(f"cannot bind gRPC to {address}")
        await server.start()
        if config.http_port is not None:
            self.http_api = HttpApi(
                generation,
                feedback,
                self.live_model,
                authenticator,
                limiter,
                metrics,
                max_body_bytes=config.max_message_bytes,
            )
            try:
                self.http_port = await self.http_api.start(
                    config.host,
                    config.http_port,
                    server_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca),
                    grace_s=config.shutdown_grace_s * 0.8,
                )
            except OSError as exc:
                raise StartupError(
                    f"cannot bind HTTP to {config.host}:{config.http_port}: {exc}"
                ) from None
        metrics_host = config.metrics_host or config.host
        try:
            self.metrics_port = metrics.serve_http(
                metrics_host,
                config.metrics_port,
                ssl_context=server_ssl_context(
                    config.metrics_tls_cert, config.metrics_tls_key, None
                ),
                credentials=(
                    load_metrics_credentials(config.metrics_auth_file)
                    if config.metrics_auth_file
                    else None
                ),
            )
        except OSError as exc:
            raise StartupError(
                f"cannot bind metrics to {metrics_host}:{config.metrics_port}: {exc}"
            ) from None

        try:
            await asyncio.to_thread(self.live_model.load_initial)
        except (FeedloopError, ServiceError) as exc:
            raise StartupError(f"cannot load the live model: {exc}") from None
        # A full garbage collection walks every object that torch, grpc and the model made at
        # start-up (hundreds of thousands): a stall of every thread in the middle of
        # serving. Freezing them moves them out of the collector's view for good.
        gc.collect()
        gc.freeze()
        self.live_model.start_watching()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and close everything (safe to call on a half-started server, and twice)."""
        if self._stopped:
            return
        self._stopped = True
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace_s
        await self.health.enter_graceful_shutdown()
        # In-flight calls get most of the grace; a fifth is kept for draining the writers.
        front_doors = []
        if self._server is not None:
            front_doors.append(self._server.stop(grace_s * 0.8))
        if self.http_api is not None:
            front_doors.append(self.http_api.stop())
        await asyncio.gather(*front_doors)
        # The watcher and the metrics endpoint each take up to a poll interval to notice.
        stopping = [asyncio.to_thread(self.metrics.stop_http)]
        if self.live_model is not None:
            stopping.append(asyncio.to_thread(self.live_model.stop))
        if self.batcher is not None:
            stopping.append(asyncio.to_thread(self.batcher.stop))
        await asyncio.gather(*stopping)
        if self.shadow_scorer is not None:
            await asyncio.to_thread(self.shadow_scorer.stop)
        if self.model_client is not None:
            await asyncio.to_thread(self.model_client.stop)
        remaining_s = max(0.1, deadline - time.monotonic())
        if self.feedback_writer is not None:
            await asyncio.to_thread(self.feedback_writer.stop, remaining_s)
        if self.generation_log is not None:
            remaining_s = max(0.1, deadline - time.monotonic())
            await asyncio.to_thread(self.generation_log.stop, remaining_s)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)

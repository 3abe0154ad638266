"""Assembles the server: store, completion log, registry, engine, servicers, health, reflection,
auth, metrics endpoint; and takes it down in the right order.

The gRPC port is bound before the engine starts, so health checks answer NOT_SERVING during the
engine's start instead of connection refused; generation answers UNAVAILABLE until it is ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from tuneloop.v1 import admin_pb2, admin_pb2_grpc, feedback_pb2, feedback_pb2_grpc, generation_pb2, generation_pb2_grpc

from .adapters import AdapterManager, follow_registry
from .admin import AdminService, monitor_canaries
from .auth import ApiKeyInterceptor
from .completion_log import CompletionLog
from .config import ServerConfig, read_api_keys
from .decider import Decider
from .decoding import DecodeGuardInterceptor
from .domain import CompletionRecord
from .engine import Engine, start_engine
from .errors import EngineUnavailable
from .feedback.service import FeedbackService
from .generation import GenerationService
from .heap import freeze_startup_heap
from .metrics import Metrics
from .model_cache import ensure_default_model
from .registry import Registry, base_model_fingerprint, open_registry
from .servicers import admin as admin_servicer
from .servicers import feedback as feedback_servicer
from .servicers import generation as generation_servicer
from .store import open_store

log = logging.getLogger(__name__)

HEALTH_POLL_S = 1.0


class TuneloopServer:
    def __init__(self, config: ServerConfig, *, engine: Engine | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics(CollectorRegistry())
        self._external_engine = engine  # owned by the caller (tests share one engine across servers)
        self.engine: Engine | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._http: object | None = None
        self.store = open_store(config.store_url)
        journal = None if config.journal_dir == "off" else Path(config.journal_dir)
        self.completion_log = CompletionLog(self.store, self.metrics, journal_dir=journal)
        self.registry: Registry = open_registry(config.registry_url, config.adapter_dir)
        self.feedback = FeedbackService(self.store, self.metrics, completion_log=self.completion_log)
        self.adapters: AdapterManager | None = None
        self.admin: AdminService | None = None
        # Replicas sharing the store elect one to decide canaries; the others follow the registry.
        self.decider = Decider(self.store, self.metrics, config.canary_lease())
        self.generation = GenerationService(
            record=self.completion_log.submit if config.completion_log else _discard,
            metrics=self.metrics,
            default_max_tokens=config.default_max_tokens,
            max_tokens_limit=config.max_tokens_limit,
            durable=self.completion_log.durable if config.completion_log and config.durable_completions else None,
        )

    # -- services --------------------------------------------------------------------------
    def _service_names(self) -> list[str]:
        return [
            generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
            feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
        ]

    def _required_roles(self) -> dict[str, str]:
        return {
            **generation_servicer.REQUIRED_ROLES,
            **feedback_servicer.REQUIRED_ROLES,
            **admin_servicer.REQUIRED_ROLES,
        }

    def _add_servicers(self, server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            generation_servicer.GenerationServicer(self.generation, self.metrics), server
        )
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(
            feedback_servicer.FeedbackServicer(self.feedback, self.metrics), server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            admin_servicer.AdminServicer(self._admin, self.metrics), server
        )

    def _admin(self) -> AdminService:
        if self.admin is None:
            raise EngineUnavailable("the engine is still starting; adapters cannot be managed yet")
        return self.admin

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> int:
        cfg = self.config
        # The decode guard runs innermost, so a request is authenticated before its bytes are judged.
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if cfg.api_keys_file:
            interceptors.append(
                ApiKeyInterceptor(read_api_keys(cfg.api_keys_file), self._required_roles(), self.metrics)
            )
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        interceptors.append(DecodeGuardInterceptor(self.metrics))
        server = grpc.aio.server(interceptors=interceptors, options=options)
        self._add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = self._service_names()
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        for name in ("", *names):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        creds = None
        if cfg.tls:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
                require_client_auth=bool(cfg.tls_client_ca),
            )
        try:
            self.port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:  # grpcio's way of saying the bind failed
            self.port = 0
        if self.port == 0:
            await server.stop(None)
            raise OSError(f"cannot bind gRPC to {address}: is another server using it? Choose another --port")
        # Bound before anything starts, so a failure leaves nothing running.
        if cfg.metrics_port >= 0:
            try:
                httpd, _thread = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.metrics.registry)
            except OSError as exc:
                await server.stop(None)
                raise OSError(
                    f"cannot serve metrics on {cfg.host}:{cfg.metrics_port}: {exc.strerror}; choose another "
                    "--metrics-port, or -1 to turn metrics off"
                ) from None
            self._http = httpd
            self.metrics_port = httpd.server_port
        self._server = server
        self.feedback.start()
        await server.start()
        log.info("gRPC listening on %s:%d%s", cfg.host, self.port, " (TLS)" if cfg.tls else "")
        self._tasks.append(asyncio.create_task(self._bring_up_engine(), name="engine-start"))
        return self.port

    async def _bring_up_engine(self) -> None:
        try:
            model_dir = self.config.model or str(
                await asyncio.to_thread(
                    ensure_default_model, Path(self.config.model_cache_dir) if self.config.model_cache_dir else None
                )
            )
            if self._external_engine is not None:
                engine = self._external_engine
            else:
                engine = await start_engine(self.config, model_dir)
            self.engine = engine
            self.adapters = AdapterManager(
                engine,
                self.registry,
                self.metrics,
                default_adapter=self.config.default_adapter,
                max_lora_rank=self.config.max_lora_rank,
                base_model=await asyncio.to_thread(base_model_fingerprint, model_dir),
            )
            # Default traffic starts on the registry's current version, before the port says SERVING.
            await self.adapters.sync()
            self.admin = AdminService(
                self.adapters, self.registry, self.store, self.metrics, policy=self.config.canary_policy()
            )
            self.generation.attach_engine(engine, self.adapters)
        except Exception:
            log.exception("the engine failed to start; health stays NOT_SERVING")
            self.metrics.engine_healthy.set(0)
            return
        freeze_startup_heap()  # engine, model and modules loaded: keep them out of every collection
        await self._set_serving(True)
        self._ready.set()
        log.info("engine ready; serving")
        self._tasks.append(asyncio.create_task(self._watch_engine(), name="engine-watch"))
        self._tasks.append(
            asyncio.create_task(follow_registry(self.adapters, self.config.registry_poll_s), name="registry-watch")
        )
        # Cancelled at stop, the decider releases its lease so another replica takes over at once.
        self._tasks.append(asyncio.create_task(self.decider.run(), name="canary-decider"))
        self._tasks.append(
            asyncio.create_task(
                monitor_canaries(self.admin, self.config.canary_check_s, self.decider), name="canary-monitor"
            )
        )

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self._service_names()):
            await self._health.set(name, status)
        self.metrics.engine_healthy.set(1 if serving else 0)

    async def _watch_engine(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            assert self.engine is not None
            try:
                await self.engine.check_health()
            except Exception:  # noqa: BLE001 - any failure means the engine cannot serve
                log.error("the inference engine died; health is now NOT_SERVING")
                await self._set_serving(False)
                await self.decider.retire("its inference engine died")
                return

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let running requests finish within `grace`, drain the log, stop the engine."""
        grace = self.config.grace_period_s if grace is None else grace
        await self._health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace)
        # Everything acknowledged or answered is queued: commit it before exiting.
        await self.feedback.close()
        await asyncio.to_thread(self.completion_log.close)
        self.store.close()
        if self._http is not None:
            self._http.shutdown()  # type: ignore[attr-defined]
        if self.engine is not None and self._external_engine is None:
            self.engine.shutdown()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


def _discard(records: Sequence[CompletionRecord]) -> None:
    """Completion sink when the log is turned off."""


async def build_server(config: ServerConfig, engine: Engine | None = None) -> tuple[TuneloopServer, int]:
    """Create and start a server; returns it and the bound port (pass port 0 to pick a free one)."""
    server = TuneloopServer(config, engine=engine)
    port = await server.start()
    return server, port

"""Scripted replicas for the balancing tests: small in-process gRPC servers with the generation
and feedback services and the standard health service, each naming itself in every answer. gRPC's
own balancer, health watch and retries (and HAProxy's) are what those tests exercise, so the
servicers only need to say who answered. No engine, no model."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tuneloop.client.balancing import HEALTH_SERVICE
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Replica(pb_grpc.GenerationServiceServicer, fpb_grpc.FeedbackServiceServicer):
    """A replica that names itself in every answer. `unavailable` makes its calls fail as a dying
    replica's do; `stream_then_fail` sends one delta before failing."""

    name: str
    calls: Counter[str] = field(default_factory=Counter)
    unavailable: bool = False
    stream_then_fail: bool = False
    event_ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _count(self, method: str) -> None:
        with self.lock:
            self.calls[method] += 1

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self._count("Generate")
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: the engine died")
        return pb.GenerateResponse(completions=[pb.Completion(completion_id=f"cmpl-{self.name}", text=self.name)])

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        self._count("GenerateStream")
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: the engine died")
        yield pb.GenerateStreamResponse(completion_id=f"cmpl-{self.name}", text_delta=f"{self.name}-1 ")
        if self.stream_then_fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: the engine died mid-stream")
        yield pb.GenerateStreamResponse(
            completion_id=f"cmpl-{self.name}", completion=pb.Completion(completion_id=f"cmpl-{self.name}", text="")
        )

    def SubmitFeedback(self, request: fpb.FeedbackEvent, context: grpc.ServicerContext) -> fpb.FeedbackAck:
        self._count("SubmitFeedback")
        with self.lock:
            self.event_ids.append(request.event_id)
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: draining")
        return fpb.FeedbackAck(event_id=request.event_id or "fb-server", sequence=1)


@dataclass
class Running:
    replica: Replica
    health: health.HealthServicer
    address: str

    def set_health(self, status: int) -> None:
        self.health.set(HEALTH_SERVICE, status)


@contextmanager
def scripted_replicas() -> Iterator[list[Running]]:
    """Two replicas, "a" and "b", on free loopback ports, both SERVING."""
    started: list[tuple[grpc.Server, Running]] = []
    for name in ("a", "b"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        replica = Replica(name)
        pb_grpc.add_GenerationServiceServicer_to_server(replica, server)
        fpb_grpc.add_FeedbackServiceServicer_to_server(replica, server)
        checker = health.HealthServicer()
        checker.set(HEALTH_SERVICE, SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, Running(replica, checker, f"127.0.0.1:{port}")))
    yield [r for _, r in started]
    for server, _ in started:
        server.stop(grace=None)

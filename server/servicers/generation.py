"""GenerationService servicer: protobuf in, domain call, protobuf out. No logic lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

from ..domain import Candidate, GenerateCall
from ..generation import GenerationService
from ..metrics import Metrics
from .rpc import streaming, unary

SERVICE = "tuneloop.v1.GenerationService"
REQUIRED_ROLES = {
    f"/{SERVICE}/Generate": "generate",
    f"/{SERVICE}/GenerateStream": "generate",
}


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, service: GenerationService, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics

    def _call(self, request: pb.GenerateRequest) -> GenerateCall:
        return GenerateCall.from_pb(request, self.service.default_max_tokens, self.service.max_tokens_limit)

    @unary("Generate")
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        gen = self.service.open(self._call(request))
        done = [item async for item in gen if isinstance(item, Candidate)]
        done.sort(key=lambda c: c.index)
        return pb.GenerateResponse(group_id=gen.group_id, completions=[c.to_pb() for c in done])

    @streaming("GenerateStream")
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        gen = self.service.open(self._call(request))
        async for item in gen:
            if isinstance(item, Candidate):
                yield pb.GenerateStreamResponse(
                    group_id=gen.group_id, index=item.index, completion_id=item.completion_id, completion=item.to_pb()
                )
            else:
                yield pb.GenerateStreamResponse(
                    group_id=gen.group_id,
                    index=item.index,
                    completion_id=item.completion_id,
                    text_delta=item.text,
                    logprobs=[lp.to_pb() for lp in item.logprobs],
                )

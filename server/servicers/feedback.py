"""gRPC FeedbackService: protobuf <-> domain translation only; the rules live in `feedback.py`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc

from ..errors import TuneloopError, status_for
from ..feedback import FeedbackAck, FeedbackBatch, FeedbackEvent
from ..feedback.service import FeedbackService, Outcome
from ..metrics import Metrics
from .rpc import streaming, unary

log = logging.getLogger(__name__)

_SERVICE = "/tuneloop.v1.FeedbackService/"
# The role each RPC needs; read by the server's auth interceptor.
REQUIRED_ROLES: dict[str, str] = {
    _SERVICE + "SubmitFeedback": "feedback",
    _SERVICE + "SubmitFeedbackStream": "feedback",
    _SERVICE + "SubmitFeedbackBatch": "feedback",
}
# Events of one stream queued but not yet acknowledged. Bounds the memory a stream can pin while
# keeping enough events in flight that each commit carries a large batch.
STREAM_WINDOW = 2048


class FeedbackServicer(fpb_grpc.FeedbackServiceServicer):
    def __init__(self, feedback_service: FeedbackService, metrics: Metrics) -> None:
        self._service = feedback_service
        self.metrics = metrics

    @unary("SubmitFeedback")
    async def SubmitFeedback(self, request: fpb.FeedbackEvent, context: grpc.aio.ServicerContext) -> fpb.FeedbackAck:
        ack = await self._service.submit(FeedbackEvent.from_pb(request))
        return ack.to_pb()

    @streaming("SubmitFeedbackStream")
    async def SubmitFeedbackStream(
        self, request_iterator: AsyncIterator[fpb.FeedbackEvent], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fpb.FeedbackAck]:
        # A reader task queues each event as it arrives, so many events of the stream are in one
        # commit; this generator answers them in order as their commits land.
        window: asyncio.Queue[tuple[str, asyncio.Future[FeedbackAck]] | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await window.put((msg.event_id, self._enqueue(msg)))
            finally:
                await window.put(None)

        reader = asyncio.create_task(read())
        try:
            index = 0
            while (item := await window.get()) is not None:
                yield await _stream_ack(index, *item)
                index += 1
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()

    @unary("SubmitFeedbackBatch")
    async def SubmitFeedbackBatch(
        self, request: fpb.SubmitFeedbackBatchRequest, context: grpc.aio.ServicerContext
    ) -> fpb.SubmitFeedbackBatchResponse:
        batch = FeedbackBatch.from_pb(request)
        outcomes = await self._service.submit_batch(batch.events)
        response = fpb.SubmitFeedbackBatchResponse()
        for i, (event, outcome) in enumerate(zip(batch.events, outcomes, strict=True)):
            _ack_pb(i, event.event_id, outcome, into=response.acks)
        return response

    def _enqueue(self, msg: fpb.FeedbackEvent) -> asyncio.Future[FeedbackAck]:
        try:
            return self._service.enqueue(FeedbackEvent.from_pb(msg))
        except Exception as exc:
            failed: asyncio.Future[FeedbackAck] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed


async def _stream_ack(index: int, sent_event_id: str, fut: asyncio.Future[FeedbackAck]) -> fpb.FeedbackAck:
    try:
        outcome: Outcome | Exception = await fut
    except Exception as exc:
        outcome = exc
    return _ack_pb(index, sent_event_id, outcome)


def _ack_pb(
    index: int,
    sent_event_id: str,
    outcome: Outcome | Exception,
    into: RepeatedCompositeFieldContainer[fpb.FeedbackAck] | None = None,
) -> fpb.FeedbackAck:
    """The ack of the event at `index` of a stream or batch: stored, or refused with its status.
    With `into`, it is built in place at the end of that repeated field."""
    if isinstance(outcome, FeedbackAck):
        return outcome.to_pb(stream_index=index, into=into)
    code, message = _status(outcome)
    error = fpb.FeedbackError(code=code.value[0], code_name=code.name, message=message)
    make = fpb.FeedbackAck if into is None else into.add
    return make(event_id=sent_event_id, stream_index=index, error=error)


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if not isinstance(exc, TuneloopError):
        log.error("feedback: unexpected error", exc_info=exc)
    return status_for(exc)

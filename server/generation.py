"""The serving path of one Generate request, independent of gRPC.

validate -> pick adapter version -> render and tokenize the prompt -> stream from the engine ->
record each finished candidate in the completion log and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from .adapters import AdapterManager
from .domain import (
    AdapterRef,
    Candidate,
    CompletionRecord,
    GenerateCall,
    Timings,
    TokenLogprob,
    new_id,
)
from .engine import Engine, EngineRequest, LoadedAdapter
from .errors import EngineUnavailable, InvalidArgument, Unavailable
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """New text of one candidate, as streamed to the caller."""

    index: int
    completion_id: str
    text: str
    logprobs: tuple[TokenLogprob, ...]


@dataclass
class _CandidateState:
    completion_id: str
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    first_token_at: float | None = None


class Generation:
    """One request in flight. Iterate it for `Delta`s and, per candidate, a final `Candidate`."""

    def __init__(self, service: GenerationService, call: GenerateCall) -> None:
        self.service = service
        self.call = call
        self.request_id = new_id("req")
        self.group_id = new_id("grp") if call.sampling.n > 1 else ""
        self.arrival = time.monotonic()

    def __aiter__(self) -> AsyncIterator[Delta | Candidate]:
        return self.service._run(self)


class GenerationService:
    def __init__(
        self,
        *,
        record: Callable[[Sequence[CompletionRecord]], None],
        metrics: Metrics,
        default_max_tokens: int = 128,
        max_tokens_limit: int = 2048,
        durable: Callable[[str, float], Awaitable[bool]] | None = None,
        durable_timeout_s: float = 10.0,
    ) -> None:
        """`durable`: when given, a candidate is answered only once this says its record is on
        disk (`CompletionLog.durable`); the caller never holds a completion a crash could forget."""
        self._record = record
        self._durable = durable
        self._durable_timeout_s = durable_timeout_s
        self._metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self._engine: Engine | None = None
        self._adapters: AdapterManager | None = None

    def attach_engine(self, engine: Engine, adapters: AdapterManager) -> None:
        self._engine = engine
        self._adapters = adapters

    @property
    def ready(self) -> bool:
        return self._engine is not None and not getattr(self._engine, "errored", False)

    def open(self, call: GenerateCall) -> Generation:
        return Generation(self, call)

    def _require_engine(self) -> tuple[Engine, AdapterManager]:
        if self._engine is None or self._adapters is None:
            raise EngineUnavailable("the engine is still starting; retry in a few seconds")
        if getattr(self._engine, "errored", False):
            raise EngineUnavailable("the inference engine has stopped; this server cannot serve until restarted")
        return self._engine, self._adapters

    def _prompt(self, engine: Engine, call: GenerateCall) -> tuple[str, list[int]]:
        if call.input.prompt is not None:
            text = call.input.prompt
        else:
            text = engine.render_chat([{"role": r, "content": c} for r, c in call.input.messages or ()])
        ids = engine.tokenize(text)
        limit = engine.max_model_len
        if len(ids) >= limit:
            raise InvalidArgument(
                f"the prompt is {len(ids)} tokens but the model's context is {limit} tokens; shorten the prompt"
            )
        if len(ids) + call.sampling.max_tokens > limit:
            raise InvalidArgument(
                f"prompt ({len(ids)} tokens) + max_tokens ({call.sampling.max_tokens}) exceeds the model's context "
                f"of {limit} tokens; set sampling.max_tokens to at most {limit - len(ids)} or shorten the prompt"
            )
        return text, ids

    async def _run(self, gen: Generation) -> AsyncIterator[Delta | Candidate]:
        engine, adapters = self._require_engine()
        call = gen.call
        # The lease pins the adapter version for the whole request: a swap that lands meanwhile
        # does not change it, and the version stays loaded until the request ends.
        async with adapters.lease(call.adapter_name, call.adapter_version, call.caller.user_id) as lease:
            prompt_text, prompt_ids = self._prompt(engine, call)
            stream = self._stream(engine, gen, lease.ref, lease.adapter, prompt_text, prompt_ids)
            async with contextlib.aclosing(stream):
                async for item in stream:
                    yield item

    async def _stream(
        self,
        engine: Engine,
        gen: Generation,
        adapter_ref: AdapterRef,
        loaded: LoadedAdapter | None,
        prompt_text: str,
        prompt_ids: list[int],
    ) -> AsyncGenerator[Delta | Candidate, None]:
        call = gen.call
        labels = (adapter_ref.name, adapter_ref.version)
        m = self._metrics
        states = [_CandidateState(new_id("cmpl")) for _ in range(call.sampling.n)]
        submitted_at = time.monotonic()
        engine_queue_s = 0.0
        outcome = "error"
        m.in_flight.labels(*labels).inc()
        try:
            deltas = engine.generate(EngineRequest(gen.request_id, prompt_ids, call.sampling, loaded))
            async with contextlib.aclosing(deltas):
                async for d in deltas:
                    st = states[d.index]
                    now = time.monotonic()
                    if d.queue_s is not None:
                        engine_queue_s = d.queue_s
                    if d.token_ids and st.first_token_at is None:
                        st.first_token_at = now
                    lps = tuple(TokenLogprob(*lp) for lp in d.logprobs or ())
                    st.text.append(d.text)
                    st.token_ids.extend(d.token_ids)
                    st.logprobs.extend(lps)
                    if d.text or lps:
                        yield Delta(d.index, st.completion_id, d.text, lps)
                    if d.finish_reason is not None:
                        timings = Timings(
                            queue_s=(submitted_at - gen.arrival) + engine_queue_s,
                            time_to_first_token_s=(st.first_token_at or now) - gen.arrival,
                            total_s=now - gen.arrival,
                        )
                        cand = Candidate(
                            completion_id=st.completion_id,
                            index=d.index,
                            text="".join(st.text),
                            token_ids=tuple(st.token_ids),
                            logprobs=tuple(st.logprobs) if call.sampling.logprobs else None,
                            finish_reason="length" if d.finish_reason == "length" else "stop",
                            stop_sequence=d.stop_sequence,
                            prompt_tokens=len(prompt_ids),
                            adapter=adapter_ref,
                            timings=timings,
                        )
                        self._finished(gen, cand, prompt_text)
                        if self._durable is not None and not await self._durable(
                            cand.completion_id, self._durable_timeout_s
                        ):
                            raise Unavailable(
                                f"the completion could not be recorded within {self._durable_timeout_s:g} s (the "
                                "store is failing); it was not delivered so that no feedback can refer to a lost "
                                "record; retry"
                            )
                        yield cand
            outcome = "ok"
        except BaseException as exc:
            outcome = "cancelled" if isinstance(exc, (GeneratorExit, asyncio.CancelledError)) else "error"
            raise
        finally:
            m.in_flight.labels(*labels).dec()
            m.generate_requests.labels(*labels, outcome).inc()
            if outcome == "ok":
                m.request_latency.labels(*labels).observe(time.monotonic() - gen.arrival)
                m.queue_time.labels(*labels).observe((submitted_at - gen.arrival) + engine_queue_s)

    def _finished(self, gen: Generation, cand: Candidate, prompt_text: str) -> None:
        labels = (cand.adapter.name, cand.adapter.version)
        m = self._metrics
        m.time_to_first_token.labels(*labels).observe(cand.timings.time_to_first_token_s)
        m.generated_tokens.labels(*labels).inc(len(cand.token_ids))
        if cand.index == 0:
            m.prompt_tokens.labels(*labels).inc(cand.prompt_tokens)
        self._record([_record_of(gen, cand, prompt_text)])


def _record_of(gen: Generation, cand: Candidate, prompt_text: str) -> CompletionRecord:
    call = gen.call
    request = {
        "input": call.input.to_dict(),
        "sampling": call.sampling.to_dict(),
        "adapter": {"name": call.adapter_name, "version": call.adapter_version},
        "caller": {"user_id": call.caller.user_id, "session_id": call.caller.session_id, "tags": call.caller.tags},
    }
    return CompletionRecord(
        completion_id=cand.completion_id,
        group_id=gen.group_id,
        request_id=gen.request_id,
        candidate_index=cand.index,
        request=request,
        prompt_text=prompt_text,
        prompt_token_count=cand.prompt_tokens,
        output_text=cand.text,
        output_token_ids=list(cand.token_ids),
        output_logprobs=[lp.logprob for lp in cand.logprobs] if cand.logprobs is not None else None,
        finish_reason=cand.finish_reason,
        sampling=call.sampling.to_dict(),
        adapter_name=cand.adapter.name,
        adapter_version=cand.adapter.version,
        user_id=call.caller.user_id,
        session_id=call.caller.session_id,
        tags=dict(call.caller.tags),
        queue_s=cand.timings.queue_s,
        time_to_first_token_s=cand.timings.time_to_first_token_s,
        total_s=cand.timings.total_s,
        created_at=time.time(),
    )

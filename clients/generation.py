"""GenerationService: `generate` and `generate_stream`, and the plain types they return.

Requests are built by `build_generate_request`, which sets only the fields the caller gave: the
server tells "unset" from "zero" (proto3 `optional`), so an unset temperature takes the server's
default rather than becoming greedy decoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypedDict, TypeVar

from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1.generation_pb2_grpc import GenerationServiceStub

from ._transport import ServiceMethods
from .errors import assign, invalid_argument

if TYPE_CHECKING:
    from typing_extensions import Unpack


Message = Mapping[str, str] | tuple[str, str]  # {"role": ..., "content": ...} or (role, content)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float  # natural log of the token's probability under the sampling distribution


@dataclass(frozen=True)
class Completion:
    """One generated candidate. Send feedback on `completion_id`."""

    completion_id: str
    index: int  # position among the request's n candidates
    text: str
    finish_reason: str | None  # "stop" (end of sequence or stop string), "length", None if unfinished
    stop_sequence: str | None  # the stop string that ended the text, if one did
    prompt_tokens: int
    completion_tokens: int
    adapter: str  # "base" when no adapter served the request
    adapter_version: str
    queue_s: float  # server-side seconds from arrival until scheduled
    time_to_first_token_s: float
    total_s: float
    logprobs: list[TokenLogprob] = field(default_factory=list)  # empty unless requested


@dataclass(frozen=True)
class GenerateResult:
    """All candidates of one request. `group_id` ties them together when n >= 2 (else None)."""

    group_id: str | None
    completions: list[Completion]

    @property
    def text(self) -> str:
        """The first candidate's text: the whole answer when n == 1."""
        return self.completions[0].text


@dataclass(frozen=True)
class StreamChunk:
    """New text of one candidate. The candidate's last chunk carries its full record in `completion`."""

    index: int
    completion_id: str
    group_id: str | None
    text_delta: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion: Completion | None = None


class GenerateOptions(TypedDict, total=False):
    """The keyword arguments of `generate` and `generate_stream` (see `build_generate_request`)."""

    messages: Sequence[Message] | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    stop: str | Sequence[str] | None
    seed: int | None
    n: int | None
    logprobs: bool
    adapter: str | None
    adapter_version: str | None
    user_id: str | None
    session_id: str | None
    tags: Mapping[str, str] | None


def build_generate_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    n: int | None = None,
    logprobs: bool = False,
    adapter: str | None = None,
    adapter_version: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> pb.GenerateRequest:
    """The request for these arguments, with only the given fields set.

    Exactly one of `prompt` (raw text, no chat template) or `messages` (chat turns, rendered with the
    model's chat template; each a {"role", "content"} dict or a (role, content) tuple) is required.
    Sampling fields left None take the server's defaults; `adapter` None uses the server's default
    adapter and "base" forces the base model; `adapter_version` pins a version. Ranges are checked
    by the server, which owns the limits; this checks only what cannot be encoded.

    Raises:
        InvalidArgumentError: both or neither input given, a malformed message, or a value the
            field's type cannot hold (e.g. a negative max_tokens).
    """
    if (prompt is None) == (messages is None):
        raise invalid_argument("pass exactly one of prompt or messages")
    req = pb.GenerateRequest()
    if prompt is not None:
        assign(req, "prompt", prompt)
    else:
        assert messages is not None
        if isinstance(messages, (str, bytes, Mapping)):
            raise invalid_argument("messages must be a list of {'role', 'content'} dicts or (role, content) tuples")
        turns = [_chat_message(i, m) for i, m in enumerate(messages)]
        if not turns:
            raise invalid_argument("messages is empty; send at least one user message")
        req.chat.messages.extend(turns)

    # Touching `req.sampling` only when something is set keeps the sub-message absent otherwise.
    scalars = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
               "top_k": top_k, "seed": seed, "n": n}  # fmt: skip
    for name, value in scalars.items():
        if value is not None:
            assign(req.sampling, name, value)
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in stops):
            raise invalid_argument(f"stop must be a string or a list of strings, got {stop!r}")
        req.sampling.stop.extend(stops)
    if logprobs:
        req.sampling.logprobs = True

    if adapter is not None or adapter_version is not None:
        assign(req.adapter, "name", adapter or "")
        assign(req.adapter, "version", adapter_version or "")

    if user_id is not None:
        assign(req.caller, "user_id", user_id)
    if session_id is not None:
        assign(req.caller, "session_id", session_id)
    if tags:
        try:
            req.caller.tags.update(tags)
        except (TypeError, ValueError) as exc:
            raise invalid_argument(f"tags must map strings to strings: {exc}") from None
    return req


def _chat_message(i: int, m: Message) -> pb.ChatMessage:
    if isinstance(m, Mapping):
        unknown = set(m) - {"role", "content"}
        if unknown or "role" not in m or "content" not in m:
            raise invalid_argument(f"messages[{i}] must have exactly the keys 'role' and 'content', got {sorted(m)}")
        role, content = m["role"], m["content"]
    elif isinstance(m, tuple) and len(m) == 2:
        role, content = m
    else:
        raise invalid_argument(f"messages[{i}] must be a {{'role', 'content'}} dict or a (role, content) tuple")
    if not isinstance(role, str) or not isinstance(content, str):
        raise invalid_argument(f"messages[{i}] role and content must be strings")
    return pb.ChatMessage(role=role, content=content)


_FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


def _logprobs_from_pb(items: Sequence[pb.TokenLogprob]) -> list[TokenLogprob]:
    return [TokenLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in items]


def completion_from_pb(m: pb.Completion) -> Completion:
    return Completion(
        completion_id=m.completion_id,
        index=m.index,
        text=m.text,
        finish_reason=_FINISH_REASONS.get(m.finish_reason),
        stop_sequence=m.stop_sequence or None,
        prompt_tokens=m.usage.prompt_tokens,
        completion_tokens=m.usage.completion_tokens,
        adapter=m.adapter.name,
        adapter_version=m.adapter.version,
        queue_s=m.timings.queue_s,
        time_to_first_token_s=m.timings.time_to_first_token_s,
        total_s=m.timings.total_s,
        logprobs=_logprobs_from_pb(m.logprobs),
    )


def result_from_pb(m: pb.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        group_id=m.group_id or None,
        completions=[completion_from_pb(c) for c in sorted(m.completions, key=lambda c: c.index)],
    )


def chunk_from_pb(m: pb.GenerateStreamResponse) -> StreamChunk:
    return StreamChunk(
        index=m.index,
        completion_id=m.completion_id,
        group_id=m.group_id or None,
        text_delta=m.text_delta,
        logprobs=_logprobs_from_pb(m.logprobs),
        completion=completion_from_pb(m.completion) if m.HasField("completion") else None,
    )


ResultT = TypeVar("ResultT")
StreamT = TypeVar("StreamT")


class GenerationMethods(ServiceMethods, Generic[ResultT, StreamT]):
    """The generation calls, shared by `Client` (plain results) and `AsyncClient` (awaitables)."""

    def generate(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> ResultT:
        """Generates every candidate and returns them at once.

        `options` are the keyword arguments of `build_generate_request`: messages, max_tokens,
        temperature, top_p, top_k, stop, seed, n, logprobs, adapter, adapter_version, user_id,
        session_id, tags. Raises a `TuneloopError` subclass on failure.
        """
        request = build_generate_request(prompt, **options)
        stub = self._transport.stub(GenerationServiceStub)
        result: ResultT = self._transport.unary(stub.Generate, request, result_from_pb)
        return result

    def generate_stream(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> StreamT:
        """Yields `StreamChunk`s as text is produced; takes the same arguments as `generate`.

        With n >= 2 the candidates' chunks interleave; `chunk.index` tells them apart. Stopping
        the iteration early cancels the request on the server.
        """
        request = build_generate_request(prompt, **options)
        stub = self._transport.stub(GenerationServiceStub)
        chunks: StreamT = self._transport.server_stream(stub.GenerateStream, request, chunk_from_pb)
        return chunks

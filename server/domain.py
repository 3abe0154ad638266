"""Domain types of the serving path.

Servicers translate protobuf to these and back (`from_pb` / `to_pb`); the engine, the store and
the metrics only ever see these. Validation that needs no engine lives here too, so a bad request
is refused before it costs anything.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tuneloop.v1 import generation_pb2 as pb

from .errors import InvalidArgument

BASE = "base"  # adapter name and version reported when no adapter served a request
MAX_N = 8
MAX_STOP_SEQUENCES = 8
MAX_STOP_BYTES = 256
MAX_TAGS = 32
MAX_TAG_BYTES = 256
CHAT_ROLES = ("system", "user", "assistant")


def prompt_sha256(prompt_text: str) -> str:
    """Hex sha256 of the rendered prompt (chat template applied): the one identity of a prompt, for
    "all feedback on prompt P" in the store and for grouping and the held-out split in training."""
    return hashlib.sha256(prompt_text.encode("utf-8")).hexdigest()


def new_id(prefix: str) -> str:
    """A globally unique, time-ordered id: `prefix-` + 12 hex digits of ms time + 20 random hex.

    Time-ordered ids keep the completion table's primary-key index append-mostly.
    """
    return f"{prefix}-{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling settings after defaults are applied. Ranges are checked in `validate`."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: bool = False

    @classmethod
    def from_pb(cls, msg: pb.SamplingParams, default_max_tokens: int) -> SamplingSpec:
        return cls(
            max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
            temperature=msg.temperature if msg.HasField("temperature") else 1.0,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            top_k=msg.top_k if msg.HasField("top_k") else 0,
            stop=tuple(msg.stop),
            seed=msg.seed if msg.HasField("seed") else None,
            n=msg.n if msg.HasField("n") else 1,
            logprobs=msg.logprobs,
        )

    def validate(self, max_tokens_limit: int) -> None:
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidArgument(
                f"sampling.max_tokens must be between 1 and {max_tokens_limit}, got {self.max_tokens}"
            )
        if not 1 <= self.n <= MAX_N:
            raise InvalidArgument(f"sampling.n must be between 1 and {MAX_N}, got {self.n}")
        if not self.temperature >= 0.0:  # also catches NaN
            raise InvalidArgument(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.n > 1 and self.temperature == 0.0:
            raise InvalidArgument(
                "sampling.n > 1 needs sampling: greedy decoding (temperature 0) would give n identical "
                "candidates; set temperature > 0"
            )
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidArgument(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidArgument("stop sequences must not be empty strings")
            if len(s.encode()) > MAX_STOP_BYTES:
                raise InvalidArgument(f"each stop sequence must be at most {MAX_STOP_BYTES} bytes")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass(frozen=True)
class AdapterRef:
    """The adapter version that served a completion (`BASE`/`BASE` for the bare model)."""

    name: str = BASE
    version: str = BASE

    @property
    def is_base(self) -> bool:
        return self.name == BASE

    def to_pb(self) -> pb.AdapterRef:
        return pb.AdapterRef(name=self.name, version=self.version)


@dataclass(frozen=True)
class CallerMeta:
    user_id: str = ""
    session_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: pb.CallerMetadata) -> CallerMeta:
        if len(msg.tags) > MAX_TAGS:
            raise InvalidArgument(f"caller.tags holds at most {MAX_TAGS} entries, got {len(msg.tags)}")
        for k, v in msg.tags.items():
            if not k or len(k.encode()) > MAX_TAG_BYTES or len(v.encode()) > MAX_TAG_BYTES:
                raise InvalidArgument(
                    f"caller.tags keys must be non-empty and keys and values at most {MAX_TAG_BYTES} bytes"
                )
        return cls(user_id=msg.user_id, session_id=msg.session_id, tags=dict(msg.tags))


@dataclass(frozen=True)
class GenerateInput:
    """What to generate from: exactly one of `prompt` or `messages`."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)

    @classmethod
    def from_pb(cls, req: pb.GenerateRequest) -> GenerateInput:
        which = req.WhichOneof("input")
        if which == "prompt":
            if not req.prompt.strip():
                raise InvalidArgument("prompt is empty; send the text to complete")
            return cls(prompt=req.prompt)
        if which == "chat":
            if not req.chat.messages:
                raise InvalidArgument("chat.messages is empty; send at least one user message")
            msgs = []
            for i, m in enumerate(req.chat.messages):
                if m.role not in CHAT_ROLES:
                    raise InvalidArgument(f"chat.messages[{i}].role is {m.role!r}; use one of {', '.join(CHAT_ROLES)}")
                if not m.content.strip():
                    raise InvalidArgument(f"chat.messages[{i}].content is empty")
                msgs.append((m.role, m.content))
            return cls(messages=tuple(msgs))
        raise InvalidArgument("request has no input; set either prompt or chat")

    def to_dict(self) -> dict[str, Any]:
        if self.prompt is not None:
            return {"prompt": self.prompt}
        return {"messages": [{"role": r, "content": c} for r, c in self.messages or ()]}


@dataclass(frozen=True)
class GenerateCall:
    """One validated Generate/GenerateStream request."""

    input: GenerateInput
    sampling: SamplingSpec
    adapter_name: str  # "" = server default
    adapter_version: str  # "" = the adapter's current version
    caller: CallerMeta

    @classmethod
    def from_pb(cls, req: pb.GenerateRequest, default_max_tokens: int, max_tokens_limit: int) -> GenerateCall:
        sampling = SamplingSpec.from_pb(req.sampling, default_max_tokens)
        sampling.validate(max_tokens_limit)
        if req.adapter.version and not req.adapter.name:
            raise InvalidArgument("adapter.version is set without adapter.name; name the adapter to pin")
        return cls(
            input=GenerateInput.from_pb(req),
            sampling=sampling,
            adapter_name=req.adapter.name,
            adapter_version=req.adapter.version,
            caller=CallerMeta.from_pb(req.caller),
        )


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float

    def to_pb(self) -> pb.TokenLogprob:
        return pb.TokenLogprob(token_id=self.token_id, token=self.token, logprob=self.logprob)


@dataclass(frozen=True)
class Timings:
    queue_s: float = 0.0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0

    def to_pb(self) -> pb.Timings:
        return pb.Timings(queue_s=self.queue_s, time_to_first_token_s=self.time_to_first_token_s, total_s=self.total_s)


FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class Candidate:
    """One finished candidate, as returned to the caller and written to the completion log."""

    completion_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str  # "stop" | "length"
    stop_sequence: str
    prompt_tokens: int
    adapter: AdapterRef
    timings: Timings

    def to_pb(self) -> pb.Completion:
        return pb.Completion(
            completion_id=self.completion_id,
            index=self.index,
            text=self.text,
            finish_reason=FINISH_REASONS.get(self.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
            stop_sequence=self.stop_sequence,
            usage=pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=len(self.token_ids)),
            adapter=self.adapter.to_pb(),
            timings=self.timings.to_pb(),
            logprobs=[lp.to_pb() for lp in self.logprobs or ()],
        )


@dataclass(frozen=True)
class CompletionRecord:
    """A served candidate as stored in the completion log (one row per candidate)."""

    completion_id: str
    group_id: str  # shared by the n candidates of one request ("" when n == 1)
    request_id: str
    candidate_index: int
    request: dict[str, Any]  # the request as sent: input, sampling, adapter selector, caller
    prompt_text: str  # the prompt after the chat template was applied
    prompt_token_count: int
    output_text: str
    output_token_ids: list[int]
    output_logprobs: list[float] | None
    finish_reason: str
    sampling: dict[str, Any]
    adapter_name: str
    adapter_version: str
    user_id: str
    session_id: str
    tags: dict[str, str]
    queue_s: float
    time_to_first_token_s: float
    total_s: float
    created_at: float  # unix seconds

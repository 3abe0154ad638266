"""Request validation that needs no engine: pure functions on protobuf input."""

from __future__ import annotations

import math

import pytest

from tuneloop.server.domain import GenerateCall, SamplingSpec, new_id
from tuneloop.server.errors import InvalidArgument, status_for
from tuneloop.v1 import generation_pb2 as pb


def call(**kw: object) -> GenerateCall:
    return GenerateCall.from_pb(pb.GenerateRequest(**kw), default_max_tokens=64, max_tokens_limit=512)


def test_unset_sampling_fields_take_defaults_and_set_ones_are_kept() -> None:
    c = call(prompt="hi")
    assert c.sampling == SamplingSpec(max_tokens=64)
    c = call(prompt="hi", sampling=pb.SamplingParams(temperature=0.0, top_k=5, seed=0, stop=["\n"], logprobs=True))
    assert c.sampling.temperature == 0.0 and c.sampling.top_k == 5 and c.sampling.seed == 0
    assert c.sampling.stop == ("\n",) and c.sampling.logprobs


@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        (pb.SamplingParams(max_tokens=0), "max_tokens"),
        (pb.SamplingParams(max_tokens=513), "max_tokens"),
        (pb.SamplingParams(n=0), "sampling.n"),
        (pb.SamplingParams(n=9), "sampling.n"),
        (pb.SamplingParams(temperature=-1), "temperature"),
        (pb.SamplingParams(temperature=math.nan), "temperature"),
        (pb.SamplingParams(top_p=0), "top_p"),
        (pb.SamplingParams(top_p=1.01), "top_p"),
        (pb.SamplingParams(n=2, temperature=0), "greedy"),
        (pb.SamplingParams(stop=[""]), "stop"),
        (pb.SamplingParams(stop=["x"] * 9), "stop"),
    ],
)
def test_out_of_range_sampling_is_invalid_argument(sampling: pb.SamplingParams, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words) as err:
        call(prompt="hi", sampling=sampling)
    assert status_for(err.value)[0].name == "INVALID_ARGUMENT"


def test_input_rules() -> None:
    with pytest.raises(InvalidArgument, match="no input"):
        call()
    with pytest.raises(InvalidArgument, match="empty"):
        call(prompt="  \n")
    with pytest.raises(InvalidArgument, match=r"messages\[1\].content"):
        call(
            chat=pb.ChatInput(
                messages=[pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="user", content="")]
            )
        )
    c = call(
        chat=pb.ChatInput(
            messages=[pb.ChatMessage(role="system", content="s"), pb.ChatMessage(role="user", content="u")]
        )
    )
    assert c.input.messages == (("system", "s"), ("user", "u"))
    assert c.input.to_dict() == {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}


def test_caller_tags_are_bounded() -> None:
    with pytest.raises(InvalidArgument, match="tags"):
        call(prompt="hi", caller=pb.CallerMetadata(tags={f"k{i}": "v" for i in range(33)}))
    assert call(prompt="hi", caller=pb.CallerMetadata(user_id="u", tags={"a": "b"})).caller.tags == {"a": "b"}


def test_ids_are_unique_and_time_ordered() -> None:
    ids = [new_id("cmpl") for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(i.startswith("cmpl-") and len(i) == 5 + 32 for i in ids)
    assert [i[5:17] for i in ids] == sorted(i[5:17] for i in ids)


def test_unknown_errors_are_internal_without_leaking_details() -> None:
    code, msg = status_for(RuntimeError("secret path /x"))
    assert code.name == "INTERNAL" and "secret" not in msg

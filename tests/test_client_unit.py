"""Unit tests of the Python SDK and the `tuneloop` CLI: error mapping, request building, response
conversion and argument parsing, plus the SDK's wire behaviour (metadata, status mapping,
cancellation) against a small scripted gRPC servicer in this process. No engine, no model."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tuneloop.cli import feedback as cli_feedback
from tuneloop.cli import generate as cli_generate
from tuneloop.cli import main as cli
from tuneloop.cli.feedback import ack_line, event_from_args
from tuneloop.client import (
    AsyncClient,
    Client,
    Comment,
    Completion,
    Correction,
    FeedbackAck,
    FeedbackEvent,
    InvalidArgumentError,
    NotFoundError,
    Preference,
    Rating,
    StreamChunk,
    Thumbs,
    TokenLogprob,
    TuneloopError,
    UnauthenticatedError,
    UnknownError,
)
from tuneloop.client._transport import ChannelConfig
from tuneloop.client.errors import ERROR_CLASSES, error_from_rpc
from tuneloop.client.feedback import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    EventOptions,
    _batches,
    stream_ack_from_pb,
)
from tuneloop.client.generation import (
    GenerateOptions,
    build_generate_request,
    chunk_from_pb,
    completion_from_pb,
    result_from_pb,
)
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

# --- errors -----------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    """Stands in for a failed call: what grpc raises carries code(), details(), trailing_metadata()."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def test_every_status_code_but_ok_has_its_own_exception_class() -> None:
    codes = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]
    assert set(ERROR_CLASSES) == set(codes)
    assert len(set(ERROR_CLASSES.values())) == len(codes)
    for code in codes:
        err = error_from_rpc(FakeRpcError(code, "why"))
        assert type(err) is ERROR_CLASSES[code]
        assert isinstance(err, TuneloopError)
        assert (err.code, err.message, err.status_code) == (code.name, "why", code)


def test_error_keeps_text_trailing_metadata_and_drops_binary() -> None:
    err = error_from_rpc(
        FakeRpcError(
            grpc.StatusCode.NOT_FOUND, "no adapter 'x'", (("field", "adapter"), ("grpc-status-details-bin", b"\x00"))
        )
    )
    assert isinstance(err, NotFoundError)
    assert err.details == {"field": "adapter"}
    assert str(err) == "NOT_FOUND: no adapter 'x'"


def test_rpc_error_without_status_is_unknown() -> None:
    err = error_from_rpc(grpc.RpcError("channel closed"))
    assert isinstance(err, UnknownError) and err.code == "UNKNOWN"


def test_empty_details_get_a_readable_message() -> None:
    assert error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "")).message == "unavailable"


# --- generation requests ----------------------------------------------------------------------


def test_only_given_fields_are_sent() -> None:
    req = build_generate_request("Hello")
    assert req.WhichOneof("input") == "prompt"
    assert not req.HasField("sampling") and not req.HasField("adapter") and not req.HasField("caller")


def test_zero_values_are_sent_as_set() -> None:
    # temperature=0 means greedy; it must reach the server as "set", not as "unset -> default 1.0".
    req = build_generate_request("Hello", temperature=0.0, top_k=0, seed=0)
    for name in ("temperature", "top_k", "seed"):
        assert req.sampling.HasField(name), name
    for name in ("max_tokens", "top_p", "n"):
        assert not req.sampling.HasField(name), name


def test_all_fields_map_to_the_request() -> None:
    req = build_generate_request(
        messages=[{"role": "system", "content": "Be brief."}, ("user", "Hi")],
        max_tokens=8, temperature=0.7, top_p=0.9, top_k=40, stop="\n", seed=3, n=2, logprobs=True,
        adapter="support", adapter_version="v3", user_id="u1", session_id="s1", tags={"feature": "x"},
    )  # fmt: skip
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    s = req.sampling
    assert (s.max_tokens, s.top_k, s.seed, s.n, s.logprobs) == (8, 40, 3, 2, True)
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9)
    assert list(s.stop) == ["\n"]
    assert (req.adapter.name, req.adapter.version) == ("support", "v3")
    assert (req.caller.user_id, req.caller.session_id, dict(req.caller.tags)) == ("u1", "s1", {"feature": "x"})


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((), {}, "exactly one of prompt or messages"),
        (("x",), {"messages": [("user", "y")]}, "exactly one of prompt or messages"),
        ((), {"messages": []}, "messages is empty"),
        ((), {"messages": "hello"}, "must be a list"),
        ((), {"messages": [{"role": "user"}]}, r"messages\[0\] must have exactly"),
        ((), {"messages": [("user",)]}, r"messages\[0\] must be"),
        ((), {"messages": [("user", 3)]}, "must be strings"),
        (("x",), {"max_tokens": -1}, "max_tokens=-1 is not valid"),
        (("x",), {"n": "2"}, "n='2' is not valid"),
        (("x",), {"stop": ["a", 1]}, "stop must be"),
        (("x",), {"tags": {"k": 1}}, "tags must map"),
    ],
)
def test_malformed_input_raises_invalid_argument(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        build_generate_request(*args, **kwargs)


def test_generate_options_list_every_builder_keyword() -> None:
    params = inspect.signature(build_generate_request).parameters
    keyword_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(GenerateOptions.__annotations__) == keyword_only


# --- generation responses ---------------------------------------------------------------------


def _completion_pb(index: int = 0, **kw: Any) -> pb.Completion:
    return pb.Completion(
        completion_id=f"cmpl-{index}", index=index, text=f"text {index}", finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=5, completion_tokens=7), adapter=pb.AdapterRef(name="base", version="base"),
        timings=pb.Timings(queue_s=0.01, time_to_first_token_s=0.05, total_s=0.5), **kw,
    )  # fmt: skip


def test_completion_from_pb() -> None:
    c = completion_from_pb(
        _completion_pb(stop_sequence="", logprobs=[pb.TokenLogprob(token_id=9, token="a", logprob=-0.5)])
    )
    assert c == Completion(
        completion_id="cmpl-0", index=0, text="text 0", finish_reason="length", stop_sequence=None,
        prompt_tokens=5, completion_tokens=7, adapter="base", adapter_version="base", queue_s=0.01,
        time_to_first_token_s=0.05, total_s=0.5, logprobs=[TokenLogprob(token_id=9, token="a", logprob=-0.5)],
    )  # fmt: skip
    stopped = completion_from_pb(pb.Completion(finish_reason=pb.FINISH_REASON_STOP, stop_sequence="\n"))
    assert (stopped.finish_reason, stopped.stop_sequence) == ("stop", "\n")
    assert completion_from_pb(pb.Completion()).finish_reason is None


def test_result_orders_candidates_and_maps_empty_group_to_none() -> None:
    result = result_from_pb(pb.GenerateResponse(group_id="grp-1", completions=[_completion_pb(1), _completion_pb(0)]))
    assert result.group_id == "grp-1"
    assert [c.index for c in result.completions] == [0, 1]
    assert result.text == "text 0"
    assert result_from_pb(pb.GenerateResponse(completions=[_completion_pb()])).group_id is None


def test_stream_chunk_carries_the_completion_only_on_the_last_message() -> None:
    mid = chunk_from_pb(pb.GenerateStreamResponse(index=1, completion_id="cmpl-1", text_delta="he"))
    assert mid == StreamChunk(index=1, completion_id="cmpl-1", group_id=None, text_delta="he")
    last = chunk_from_pb(pb.GenerateStreamResponse(index=1, completion_id="cmpl-1", completion=_completion_pb(1)))
    assert last.completion is not None and last.completion.text == "text 1"


# --- feedback events --------------------------------------------------------------------------


def test_feedback_event_kinds_to_pb() -> None:
    e = FeedbackEvent("alice", Thumbs("c1", up=False), event_id="e1", comment="meh", reasons=["too-long"]).to_pb()
    assert (e.event_id, e.rater_id, e.comment_text, list(e.reason_tags)) == ("e1", "alice", "meh", ["too-long"])
    assert (e.thumbs.completion_id, e.thumbs.value) == ("c1", fpb.THUMB_DOWN)
    assert FeedbackEvent("a", Rating("c1", 4)).to_pb().rating.score == 4
    assert FeedbackEvent("a", Comment("c1"), comment="nice").to_pb().WhichOneof("kind") == "comment"
    assert FeedbackEvent("a", Correction("c1", "better")).to_pb().correction.corrected_text == "better"
    pair = FeedbackEvent("a", Preference("tie", group_id="g1")).to_pb().pairwise
    assert (pair.group_id, pair.first_completion_id, pair.choice) == ("g1", "", fpb.PAIRWISE_CHOICE_TIE)
    unset = FeedbackEvent("a", Thumbs("c1", up=True)).to_pb()
    assert unset.event_id == "" and unset.comment_text == ""  # empty: the server assigns the id


@pytest.mark.parametrize(
    "event, match",
    [
        (FeedbackEvent("a", Preference("best", "c1", "c2")), "choice must be one of"),
        (FeedbackEvent("a", Preference("first", "c1", "c2", group_id="g")), "not both"),
        (FeedbackEvent("a", Preference("first")), "not both"),
        (FeedbackEvent("a", Rating("c1", True)), "rating must be an integer"),
        (FeedbackEvent("a", Rating("c1", -1)), "score=-1 is not valid"),
        (FeedbackEvent("a", Thumbs("c1", up=1)), "Thumbs.up must be"),  # type: ignore[arg-type]
        (FeedbackEvent("a", Thumbs("c1", up=True), reasons="late"), "reasons must be a list"),
        (FeedbackEvent("a", "thumbs"), "kind must be"),  # type: ignore[arg-type]
    ],
)
def test_malformed_feedback_raises_invalid_argument(event: FeedbackEvent, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        event.to_pb()


def test_stream_ack_error_becomes_typed_exception() -> None:
    ack = stream_ack_from_pb(
        fpb.FeedbackAck(
            event_id="e1", stream_index=3, error=fpb.FeedbackError(code=5, code_name="NOT_FOUND", message="no c9")
        )
    )
    assert not ack.ok and isinstance(ack.error, NotFoundError) and ack.error.message == "no c9"
    assert ack.stream_index == 3
    assert stream_ack_from_pb(fpb.FeedbackAck(event_id="e2", sequence=7)).ok


def test_event_options_match_the_feedback_methods() -> None:
    assert set(EventOptions.__annotations__) == {"event_id", "reasons"}


# --- channel settings -------------------------------------------------------------------------


def test_channel_config(tmp_path: Path) -> None:
    assert ChannelConfig(api_key="k1").metadata() == (("authorization", "Bearer k1"),)
    assert ChannelConfig().metadata() == () and not ChannelConfig().uses_tls
    assert ChannelConfig(tls_ca="ca.pem").uses_tls and ChannelConfig(tls=True).credentials() is not None
    with pytest.raises(InvalidArgumentError, match="go together"):
        ChannelConfig(tls_cert="c.pem")
    with pytest.raises(InvalidArgumentError, match="timeout"):
        ChannelConfig(timeout=0)
    with pytest.raises(InvalidArgumentError, match="cannot read tls_ca"):
        Client(tls_ca=str(tmp_path / "missing.pem"))


# --- the SDK over a real channel, against a scripted servicer ----------------------------------


class ScriptedGeneration(pb_grpc.GenerationServiceServicer):
    """Answers with what it received, so tests can see what went over the wire."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        if not auth:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing API key")
        if request.prompt == "fail":
            context.set_trailing_metadata((("field", "adapter.name"),))
            context.abort(grpc.StatusCode.NOT_FOUND, "no adapter named 'nope'")
        return pb.GenerateResponse(completions=[pb.Completion(completion_id="cmpl-1", text=auth)])

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        context.add_callback(self.cancelled.set)  # runs when the call ends, including on cancel
        n = request.sampling.n if request.sampling.HasField("n") else 1
        for word in ("Par", "is"):
            for i in range(n):
                yield pb.GenerateStreamResponse(
                    index=i, completion_id=f"cmpl-{i}", group_id="g" if n > 1 else "", text_delta=word
                )
        if request.prompt == "endless":
            while context.is_active():
                time.sleep(0.01)
                yield pb.GenerateStreamResponse(index=0, completion_id="cmpl-0", text_delta=".")
        for i in range(n):
            yield pb.GenerateStreamResponse(index=i, completion_id=f"cmpl-{i}", completion=pb.Completion(
                completion_id=f"cmpl-{i}", index=i, text="Paris", finish_reason=pb.FINISH_REASON_STOP))  # fmt: skip


class ScriptedFeedback(fpb_grpc.FeedbackServiceServicer):
    batch_sizes: list[int] = []  # events per SubmitFeedbackBatch call, in order; tests clear it

    def SubmitFeedback(self, request: fpb.FeedbackEvent, context: grpc.ServicerContext) -> fpb.FeedbackAck:
        return fpb.FeedbackAck(event_id=request.event_id or "fb-server", sequence=1)

    def SubmitFeedbackBatch(
        self, request: fpb.SubmitFeedbackBatchRequest, context: grpc.ServicerContext
    ) -> fpb.SubmitFeedbackBatchResponse:
        self.batch_sizes.append(len(request.events))
        response = fpb.SubmitFeedbackBatchResponse()
        for i, event in enumerate(request.events):
            if event.rater_id == "ghost":
                error = fpb.FeedbackError(code=5, code_name="NOT_FOUND", message="unknown completion")
                response.acks.add(event_id=event.event_id, stream_index=i, error=error)
            else:
                response.acks.add(event_id=event.event_id, stream_index=i, sequence=i + 1)
        return response


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, ScriptedGeneration]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generation = ScriptedGeneration()
    pb_grpc.add_GenerationServiceServicer_to_server(generation, server)
    fpb_grpc.add_FeedbackServiceServicer_to_server(ScriptedFeedback(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", generation
    server.stop(grace=None)


def test_sync_client_sends_the_key_and_maps_errors(scripted: tuple[str, ScriptedGeneration]) -> None:
    target, _ = scripted
    with Client(target, api_key="k-123", timeout=10) as client:
        assert client.generate("hi").text == "Bearer k-123"
        with pytest.raises(NotFoundError, match="no adapter named 'nope'") as info:
            client.generate("fail")
        assert info.value.details == {"field": "adapter.name"}
    with Client(target) as client, pytest.raises(UnauthenticatedError, match="missing API key"):
        client.generate("hi")


def test_sync_stream_and_early_stop_cancels(scripted: tuple[str, ScriptedGeneration]) -> None:
    target, servicer = scripted
    with Client(target) as client:
        chunks = list(client.generate_stream("x", n=2))
        assert [c.text_delta for c in chunks if c.index == 0] == ["Par", "is", ""]
        assert {c.completion.completion_id for c in chunks if c.completion} == {"cmpl-0", "cmpl-1"}
        servicer.cancelled.clear()
        stream = client.generate_stream("endless")
        for chunk in stream:
            if chunk.text_delta == ".":
                break
        stream.close()  # what a `for` loop's exit does when the generator is garbage-collected
        assert servicer.cancelled.wait(5), "the server kept generating after the caller stopped"


def test_sync_feedback_single_and_bulk(scripted: tuple[str, ScriptedGeneration]) -> None:
    target, _ = scripted
    ScriptedFeedback.batch_sizes.clear()
    with Client(target) as client:
        assert client.thumbs_up("c1", "alice").event_id == "fb-server"
        assert client.prefer("c1", "c2", choice="first", rater_id="alice", event_id="e7").event_id == "e7"
        events = [FeedbackEvent("alice", Rating("c1", 5), event_id="e1"),
                  FeedbackEvent("ghost", Thumbs("c9", up=True), event_id="e2")]  # fmt: skip
        acks = list(client.submit_feedback_bulk(events))
        assert [(a.event_id, a.stream_index, a.ok) for a in acks] == [("e1", 0, True), ("e2", 1, False)]
        assert isinstance(acks[1].error, NotFoundError)
        assert ScriptedFeedback.batch_sizes == [2]  # one batch call
        # Split into calls of at most batch_size, answered in order and indexed over all the events.
        ScriptedFeedback.batch_sizes.clear()
        many = client.submit_feedback_many(events * 3, batch_size=4)
        assert ScriptedFeedback.batch_sizes == [4, 2]
        assert [(a.event_id, a.stream_index, a.ok) for a in many] == [
            (f"e{1 + i % 2}", i, i % 2 == 0) for i in range(6)
        ]
        assert client.submit_feedback_many([]) == [] and ScriptedFeedback.batch_sizes == [4, 2]
        for bad in (0, MAX_BATCH_EVENTS + 1):
            with pytest.raises(InvalidArgumentError, match="batch_size must be an integer from 1 to 1000"):
                client.submit_feedback_many(events, batch_size=bad)


def test_bulk_raises_for_an_event_it_cannot_encode_before_sending_its_batch(
    scripted: tuple[str, ScriptedGeneration],
) -> None:
    target, _ = scripted
    ScriptedFeedback.batch_sizes.clear()

    def events() -> Iterator[FeedbackEvent]:
        yield FeedbackEvent("alice", Rating("c1", 5), event_id="e1")
        yield FeedbackEvent("alice", Rating("c1", 5), event_id="e2")
        yield FeedbackEvent("alice", Preference("best", "c1", "c2"))  # invalid choice

    with Client(target) as client, pytest.raises(InvalidArgumentError, match="choice must be one of"):
        list(client.submit_feedback_bulk(events(), batch_size=2))
    assert ScriptedFeedback.batch_sizes == [2]  # the batch before it was sent; its own was not


def test_bulk_batches_stay_under_the_message_size_limit() -> None:
    # 90 corrections of 60 KB are 5.4 MB: more than one 4 MiB message, far fewer than 1000 events.
    events = [FeedbackEvent(f"r{i}", Correction("c1", "x" * 60_000), event_id=f"e{i}") for i in range(90)]
    batches = list(_batches(events, MAX_BATCH_EVENTS))
    assert len(batches) == 2 and all(request.ByteSize() <= MAX_BATCH_BYTES for request, _ in batches)
    assert [start for _, start in batches] == [0, len(batches[0][0].events)]
    assert [e.event_id for request, _ in batches for e in request.events] == [e.event_id for e in events]


async def test_async_client(scripted: tuple[str, ScriptedGeneration]) -> None:
    target, servicer = scripted
    client = AsyncClient(target, api_key="k-9")  # built outside any call: the channel opens on first use
    async with client:
        assert (await client.generate("hi")).text == "Bearer k-9"
        with pytest.raises(NotFoundError):
            await client.generate("fail")
        texts = [c.text_delta async for c in client.generate_stream("x")]
        assert texts == ["Par", "is", ""]
        servicer.cancelled.clear()
        async for chunk in client.generate_stream("endless"):
            if chunk.text_delta == ".":
                break
        await asyncio.sleep(0)
        assert await asyncio.to_thread(servicer.cancelled.wait, 5)

        async def events():  # type: ignore[no-untyped-def]
            yield FeedbackEvent("alice", Comment("c1"), comment="ok", event_id="e1")

        assert [a.event_id async for a in client.submit_feedback_bulk(events())] == ["e1"]
        assert (await client.rate("c1", 3, "alice")).event_id == "fb-server"
        ScriptedFeedback.batch_sizes.clear()
        many = await client.submit_feedback_many(
            [FeedbackEvent("ghost", Rating("c1", 5), event_id=f"g{i}") for i in range(3)], batch_size=2
        )
        assert [(a.stream_index, type(a.error)) for a in many] == [(i, NotFoundError) for i in range(3)]
        assert ScriptedFeedback.batch_sizes == [2, 1]


# --- CLI --------------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_generate_sends_only_the_flags_given() -> None:
    prompt, options = cli_generate.generate_arguments(_parse("generate", "Hi"))
    assert (prompt, options) == ("Hi", {})
    prompt, options = cli_generate.generate_arguments(_parse(
        "generate", "Hi", "--system", "Be brief.", "--temperature", "0", "--stop", "\n", "--stop", "END",
        "-n", "2", "--logprobs", "--adapter", "support", "--tag", "feature=cli", "--tag", "k=a=b",
    ))  # fmt: skip
    assert prompt is None
    assert options == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "temperature": 0.0, "stop": ["\n", "END"], "n": 2, "logprobs": True, "adapter": "support",
        "tags": {"feature": "cli", "k": "a=b"},
    }  # fmt: skip
    build_generate_request(prompt, **options)  # the options are valid SDK arguments


def test_generate_chat_and_connection_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _, options = cli_generate.generate_arguments(_parse("generate", "--chat", "Hi"))
    assert options == {"messages": [{"role": "user", "content": "Hi"}]}
    args = _parse("generate", "Hi", "--target", "h:1", "--timeout", "2.5", "--tls-ca", "ca.pem")
    assert (args.target, args.timeout, args.tls_ca, args.json) == ("h:1", 2.5, "ca.pem", False)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "Hi", "--timeout", "0"]) == 2
    assert cli.main(["generate", "Hi", "--tag", "novalue", "--target", "127.0.0.1:1"]) == 2
    assert "--tag takes KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["feedback", "prefer", "c1", "--choice", "first", "--rater", "a"]) == 2
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0


def test_failed_call_prints_code_and_exits_1(
    capsys: pytest.CaptureFixture[str], scripted: tuple[str, ScriptedGeneration]
) -> None:
    target, _ = scripted
    assert cli.main(["generate", "fail", "--target", target, "--api-key", "k", "--json"]) == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: no adapter named 'nope'\n"


def test_generate_streams_to_stdout_and_summarises_on_stderr(
    capsys: pytest.CaptureFixture[str], scripted: tuple[str, ScriptedGeneration]
) -> None:
    target, _ = scripted
    assert cli.main(["generate", "x", "-n", "2", "--target", target]) == 0
    out, err = capsys.readouterr()
    assert out == "--- candidate 0 ---\nParis\n--- candidate 1 ---\nParis\n"
    assert err.splitlines()[0] == "group g"
    assert err.splitlines()[1].startswith("cmpl-0 #0: 0+0 tokens, finish stop")


def test_feedback_command_prints_the_ack(
    capsys: pytest.CaptureFixture[str], scripted: tuple[str, ScriptedGeneration]
) -> None:
    target, _ = scripted
    assert cli.main(["feedback", "up", "c1", "--rater", "bob", "--target", target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "event_id": "fb-server", "duplicate": False, "sequence": 1, "superseded_event_id": None,
    }  # fmt: skip
    assert cli.main(["feedback", "rate", "c1", "5", "--rater", "bob", "--event-id", "e5", "--target", target]) == 0
    assert capsys.readouterr().out == "e5: stored (sequence 1)\n"


def test_write_stream_single_candidate() -> None:
    done = Completion("c", 0, "Hello", "stop", None, 1, 2, "base", "base", 0.0, 0.1, 0.2)
    out = io.StringIO()
    chunks = [StreamChunk(0, "c", None, "Hel"), StreamChunk(0, "c", None, "lo", completion=done)]
    assert cli_generate.write_stream(chunks, out) == (None, [done])
    assert out.getvalue() == "Hello\n"
    assert cli_generate.summary_line(done) == (
        "c #0: 1+2 tokens, finish stop, ttft 0.100 s, total 0.20 s, adapter base@base"
    )


def test_feedback_arguments_become_events() -> None:
    def event(*argv: str) -> FeedbackEvent:
        return event_from_args(_parse("feedback", *argv, "--rater", "bob"))

    assert event("up", "c1", "--reason", "clear", "--event-id", "e1") == FeedbackEvent(
        "bob", Thumbs("c1", up=True), event_id="e1", reasons=["clear"]
    )
    assert event("rate", "c1", "4", "--comment", "good").kind == Rating("c1", 4)
    assert event("comment", "c1", "nice").comment == "nice"
    assert event("correct", "c1", "Paris.").kind == Correction("c1", "Paris.")
    assert event("prefer", "--group-id", "g1", "--choice", "second").kind == Preference("second", group_id="g1")


def test_import_lines_become_events() -> None:
    def event(**line: Any) -> FeedbackEvent:
        return cli_feedback.event_from_json(line, "bob")

    assert event(kind="thumbs", completion_id="c1", up=False, event_id="e1", reasons=["rude"]) == FeedbackEvent(
        "bob", Thumbs("c1", up=False), event_id="e1", reasons=["rude"]
    )
    assert event(kind="rating", completion_id="c1", score=4, rater_id="amy").rater_id == "amy"
    assert event(kind="comment", completion_id="c1", comment="Too formal.").comment == "Too formal."
    assert event(kind="correction", completion_id="c1", text="Paris.").kind == Correction("c1", "Paris.")
    assert event(kind="pairwise", choice="tie", group_id="g1").kind == Preference("tie", group_id="g1")
    for line, match in [
        (dict(kind="like", completion_id="c1"), "kind must be one of thumbs, rating"),
        (dict(kind="rating", completion_id="c1"), "missing 1 required positional argument: 'score'"),
        (dict(kind="rating", completion_id="c1", score=4, up=True), r"unknown key\(s\) up for rating"),
        (dict(kind="rating", completion_id="c1", score="4"), "rating must be an integer"),
        (dict(kind="pairwise", choice="first", first_completion_id="c1", group_id="g"), "not both"),
    ]:
        with pytest.raises(ValueError, match=match):
            event(**line)
    with pytest.raises(ValueError, match="no rater_id"):
        cli_feedback.event_from_json({"kind": "rating", "completion_id": "c1", "score": 4}, None)


def test_feedback_import_sends_batches_and_reports_refused_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scripted: tuple[str, ScriptedGeneration]
) -> None:
    target, _ = scripted
    lines = [
        {"kind": "thumbs", "completion_id": "c1", "up": True, "event_id": "i1"},
        {"kind": "rating", "completion_id": "c9", "score": 2, "rater_id": "ghost", "event_id": "i2"},
        {"kind": "pairwise", "choice": "first", "first_completion_id": "c1", "second_completion_id": "c2"},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([json.dumps(lines[0]), "", *map(json.dumps, lines[1:])]) + "\n")
    ScriptedFeedback.batch_sizes.clear()
    argv = ["feedback", "import", str(path), "--rater", "bob", "--target", target, "--batch-size", "2", "--json"]
    assert cli.main(argv) == 1  # one refused
    out, err = capsys.readouterr()
    assert ScriptedFeedback.batch_sizes == [2, 1]
    acks = [json.loads(line) for line in out.splitlines()]
    assert [(a["line"], a["event_id"], "error" in a) for a in acks] == [
        (1, "i1", False), (3, "i2", True), (4, "", False),
    ]  # fmt: skip
    assert "line 3 (i2): NOT_FOUND: unknown completion" in err
    assert err.splitlines()[-1] == "3 events: 2 stored, 0 duplicates, 1 refused"

    path.write_text(json.dumps(lines[0]) + "\n" + '{"kind": "rating"\n' + json.dumps({"kind": "x"}) + "\n")
    ScriptedFeedback.batch_sizes.clear()
    assert cli.main(["feedback", "import", str(path), "--rater", "bob", "--target", target]) == 2
    err = capsys.readouterr().err
    assert "2 bad line(s), nothing sent" in err and "line 2: " in err and "line 3: kind must be one of" in err
    assert ScriptedFeedback.batch_sizes == []


def test_feedback_ack_line() -> None:
    assert ack_line(FeedbackAck("e1", False, 7, "e0")) == "e1: stored (sequence 7), supersedes e0"
    assert ack_line(FeedbackAck("e1", True, 7)) == "e1: already stored (duplicate, nothing written)"


def test_sdk_events_pass_the_servers_validation() -> None:
    from tuneloop.server.feedback import FeedbackEvent as ServerEvent

    events = [
        FeedbackEvent("alice", Thumbs("c1", up=True), event_id="e-1", comment="good", reasons=["clear"]),
        FeedbackEvent("alice", Rating("c1", 5)),
        FeedbackEvent("alice", Comment("c1"), comment="nice"),
        FeedbackEvent("alice", Correction("c1", "Paris.")),
        FeedbackEvent("alice", Preference("second", "c1", "c2")),
        FeedbackEvent("alice", Preference("tie", group_id="g1")),
    ]
    for event in events:
        parsed = ServerEvent.from_pb(event.to_pb())
        parsed.validate()
        assert (parsed.rater_id, parsed.event_id) == ("alice", event.event_id or "")
        assert parsed.comment_text == (event.comment or "")
    assert ServerEvent.from_pb(events[0].to_pb()).thumb_up is True
    assert ServerEvent.from_pb(events[4].to_pb()).choice == "second"


def test_export_kinds_match_the_exporter() -> None:
    from tuneloop.trainer import export

    assert cli_feedback.EXPORT_KINDS == export.EXPORT_KINDS
    assert cli_feedback.EXPORT_FORMATS == export.EXPORT_FORMATS


def test_feedback_export_writes_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from completion_factory import make_completion

    from tuneloop.server.feedback import FeedbackEvent as ServerEvent
    from tuneloop.server.feedback import FeedbackRecord
    from tuneloop.server.store import open_store, prompt_sha256

    url = f"sqlite:///{tmp_path}/store.db"
    assert cli.main(["feedback", "export", "--kind", "ratings", "--store", url]) == 2
    assert "no store at" in capsys.readouterr().err

    store = open_store(url)
    completion = make_completion("Capital of France?", "Paris.")
    store.write_completions([completion])
    event = ServerEvent.from_pb(FeedbackEvent("alice", Rating(completion.completion_id, 4)).to_pb())
    sha = prompt_sha256(completion.prompt_text)
    record = FeedbackRecord(0, event, completion.completion_id, None, sha, time.time())
    with store.feedback_transaction() as tx:
        tx.insert_feedback([record])
    store.close()

    out = tmp_path / "ratings.jsonl"
    assert cli.main(["feedback", "export", "--kind", "ratings", "--store", url, "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row.pop("split") in ("train", "heldout")
    assert row == {"prompt": "Capital of France?", "completion": "Paris.", "rating": 4}
    assert capsys.readouterr().err == f"wrote 1 ratings rows to {out}\n"


def test_serve_parses_its_settings_and_refuses_bad_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "port must be 0-65535, got 70000" in capsys.readouterr().err
    assert cli.main(["serve", "--config", "/nonexistent.toml"]) == 2
    assert "config file /nonexistent.toml" in capsys.readouterr().err


def test_cli_import_stays_light() -> None:
    code = (
        "import sys, tuneloop.cli.main; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vllm', 'transformers', 'sqlalchemy'}); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_the_sdk_depends_only_on_the_api_stubs() -> None:
    import ast

    sdk = Path(__file__).resolve().parents[1] / "clients"
    bad = []
    for path in sorted(sdk.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names if n.startswith("tuneloop.") and not n.startswith(
                ("tuneloop.v1", "tuneloop.client"))]  # fmt: skip
    assert bad == []

"""FeedbackService over gRPC on a real SQLite store: every kind, exactly-once, supersede, validation, streams
and batches."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from completion_factory import make_completion, make_group
from feedback_server import feedback_server

from tuneloop.server.batching import BatchThread
from tuneloop.server.completion_log import CompletionLog
from tuneloop.server.domain import CompletionRecord
from tuneloop.server.feedback import MAX_BATCH_EVENTS, MAX_COMMENT_BYTES, FeedbackEvent
from tuneloop.server.feedback.service import FeedbackService, FeedbackServiceConfig
from tuneloop.server.metrics import Metrics
from tuneloop.server.servicers.feedback import REQUIRED_ROLES
from tuneloop.server.store import Store, open_store, prompt_sha256
from tuneloop.server.store.sql import SqlStore
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc

PROMPT = "How do I fix a flat tyre?"


@dataclass
class Env:
    store: Store
    metrics: Metrics
    stub: fpb_grpc.FeedbackServiceStub
    a: CompletionRecord  # n=1 completion of PROMPT by adapter kind/v1
    pair: list[CompletionRecord]  # an n=2 group of PROMPT by kind/v2
    trio: list[CompletionRecord]  # an n=3 group of PROMPT
    other: CompletionRecord  # a completion of another prompt


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = open_store(f"sqlite:///{tmp_path}/fb.db")
    a = make_completion(PROMPT, "Use a patch kit.", adapter=("kind", "v1"))
    pair = make_group(PROMPT, ["Call a mechanic.", "Replace the tube."], adapter=("kind", "v2"))
    trio = make_group(PROMPT, ["x", "y", "z"])
    other = make_completion("What is 2+2?", "4")
    store.write_completions([a, *pair, *trio, other])
    metrics = Metrics()
    async with feedback_server(store, metrics) as (port, _service):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Env(store, metrics, fpb_grpc.FeedbackServiceStub(channel), a, pair, trio, other)
    store.close()


def thumbs(cid: str, up: bool = True, rater: str = "alice", **kw: object) -> fpb.FeedbackEvent:
    value = fpb.THUMB_UP if up else fpb.THUMB_DOWN
    return fpb.FeedbackEvent(rater_id=rater, thumbs=fpb.ThumbsFeedback(completion_id=cid, value=value), **kw)


def rating(cid: str, score: int, rater: str = "alice", **kw: object) -> fpb.FeedbackEvent:
    return fpb.FeedbackEvent(rater_id=rater, rating=fpb.RatingFeedback(completion_id=cid, score=score), **kw)


def sample(env: Env, name: str, **labels: str) -> float:
    return env.metrics.registry.get_sample_value(name, labels) or 0.0


# --- every kind round-trips ---


async def test_every_kind_is_stored_as_sent(env: Env) -> None:
    cid = env.a.completion_id
    sent = {
        "thumbs": thumbs(cid, comment_text="clear and short", reason_tags=["helpful", "concise"]),
        "rating": rating(cid, 4, comment_text="good"),
        "comment": fpb.FeedbackEvent(
            rater_id="alice", comment=fpb.CommentFeedback(completion_id=cid), comment_text="mention the valve"
        ),
        "correction": fpb.FeedbackEvent(
            rater_id="alice",
            correction=fpb.CorrectionFeedback(completion_id=cid, corrected_text="Use a patch kit, then inflate."),
        ),
        "pairwise": fpb.FeedbackEvent(
            rater_id="alice",
            pairwise=fpb.PairwiseFeedback(
                first_completion_id=env.a.completion_id,
                second_completion_id=env.pair[1].completion_id,
                choice=fpb.PAIRWISE_CHOICE_SECOND,
            ),
        ),
    }
    for kind, msg in sent.items():
        ack = await env.stub.SubmitFeedback(msg)
        assert ack.event_id.startswith("fb-") and not ack.duplicate and ack.sequence > 0
        stored = env.store.get_feedback(ack.event_id)
        assert stored is not None and stored.kind == kind and stored.seq == ack.sequence
        assert stored.event == replace(FeedbackEvent.from_pb(msg), event_id=ack.event_id)
        assert stored.prompt_sha256 == prompt_sha256(PROMPT) and stored.is_current
    assert [r.kind for r in env.store.feedback_since()] == list(sent)
    assert env.store.get_feedback(ack.event_id).second_completion_id == env.pair[1].completion_id


async def test_pairwise_by_group_resolves_candidates_in_index_order(env: Env) -> None:
    msg = fpb.FeedbackEvent(
        event_id="pick-1", rater_id="bob",
        pairwise=fpb.PairwiseFeedback(group_id=env.pair[0].group_id, choice=fpb.PAIRWISE_CHOICE_FIRST),
    )  # fmt: skip
    ack = await env.stub.SubmitFeedback(msg)
    rec = env.store.get_feedback("pick-1")
    assert ack.event_id == "pick-1" and rec is not None
    assert (rec.completion_id, rec.second_completion_id) == (env.pair[0].completion_id, env.pair[1].completion_id)
    assert rec.event.group_id == env.pair[0].group_id and rec.event.choice == "first"
    assert (await env.stub.SubmitFeedback(msg)).duplicate  # re-sent by group: same content
    assert sample(env, "tuneloop_feedback_pairwise_wins_total", adapter="kind", adapter_version="v2") == 1
    assert sample(env, "tuneloop_feedback_pairwise_losses_total", adapter="kind", adapter_version="v2") == 1


# --- exactly once, supersede ---


async def test_resent_event_is_a_duplicate_and_a_reused_id_is_refused(env: Env) -> None:
    msg = thumbs(env.a.completion_id, event_id="client-42")
    first = await env.stub.SubmitFeedback(msg)
    again = await env.stub.SubmitFeedback(msg)
    assert (first.event_id, first.duplicate) == ("client-42", False)
    assert (again.event_id, again.duplicate, again.sequence) == ("client-42", True, first.sequence)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.SubmitFeedback(thumbs(env.a.completion_id, up=False, event_id="client-42"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "client-42" in err.value.details()
    assert env.store.count_feedback() == 1
    assert sample(env, "tuneloop_feedback_events_total", kind="thumbs", value="up") == 1  # duplicates not counted
    assert sample(env, "tuneloop_feedback_thumbs_up_total", adapter="kind", adapter_version="v1") == 1
    assert sample(env, "tuneloop_feedback_rejected_total", reason="event_id_conflict") == 1


async def test_later_thumbs_and_rating_of_a_rater_supersede_earlier_ones(env: Env) -> None:
    cid = env.a.completion_id
    up = await env.stub.SubmitFeedback(thumbs(cid, up=True))
    bob = await env.stub.SubmitFeedback(thumbs(cid, up=True, rater="bob"))
    r1 = await env.stub.SubmitFeedback(rating(cid, 2))
    down = await env.stub.SubmitFeedback(thumbs(cid, up=False))
    r2 = await env.stub.SubmitFeedback(rating(cid, 5))
    assert down.superseded_event_id == up.event_id and r2.superseded_event_id == r1.event_id
    assert not bob.superseded_event_id  # another rater's thumbs stands
    assert env.store.get_feedback(up.event_id).superseded_by == down.event_id
    assert env.store.get_feedback(r1.event_id).superseded_by == r2.event_id
    current = {r.event_id for r in (env.store.get_feedback(a.event_id) for a in (up, bob, r1, down, r2))
               if r and r.is_current}  # fmt: skip
    assert current == {bob.event_id, down.event_id, r2.event_id}
    assert env.store.count_feedback() == 5  # history kept
    assert sample(env, "tuneloop_feedback_rating_sum_total", adapter="kind", adapter_version="v1") == 7


# --- validation: exact status codes and messages ---

BIG = "x" * (MAX_COMMENT_BYTES + 1)


def _invalid_cases(env: Env) -> list[tuple[fpb.FeedbackEvent, grpc.StatusCode, str]]:
    cid = env.a.completion_id
    pw = fpb.PairwiseFeedback
    return [
        (thumbs("cmpl-nope"), grpc.StatusCode.NOT_FOUND, "'cmpl-nope' is not a known completion"),
        (rating(cid, 0), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 5, got 0"),
        (rating(cid, 6), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 5, got 6"),
        (thumbs(cid, rater=""), grpc.StatusCode.INVALID_ARGUMENT, "rater_id is empty"),
        (thumbs(cid, comment_text=BIG), grpc.StatusCode.INVALID_ARGUMENT, f"the limit is {MAX_COMMENT_BYTES}"),
        (fpb.FeedbackEvent(rater_id="a", thumbs=fpb.ThumbsFeedback(completion_id=cid)),
         grpc.StatusCode.INVALID_ARGUMENT, "thumbs.value is unset"),
        (fpb.FeedbackEvent(rater_id="a", correction=fpb.CorrectionFeedback(completion_id=cid, corrected_text=" ")),
         grpc.StatusCode.INVALID_ARGUMENT, "corrected_text is empty"),
        (fpb.FeedbackEvent(rater_id="a", comment=fpb.CommentFeedback(completion_id=cid)),
         grpc.StatusCode.INVALID_ARGUMENT, "non-blank comment_text"),
        (fpb.FeedbackEvent(rater_id="a"), grpc.StatusCode.INVALID_ARGUMENT, "event has no kind"),
        (thumbs(cid, event_id="has space"), grpc.StatusCode.INVALID_ARGUMENT, "event_id must be"),
        (thumbs(cid, reason_tags=[""]), grpc.StatusCode.INVALID_ARGUMENT, "reason tag"),
        (fpb.FeedbackEvent(rater_id="a", pairwise=pw(first_completion_id=cid, choice=fpb.PAIRWISE_CHOICE_FIRST,
                                                     second_completion_id=env.other.completion_id)),
         grpc.StatusCode.INVALID_ARGUMENT, "answer different prompts"),
        (fpb.FeedbackEvent(rater_id="a", pairwise=pw(first_completion_id=cid, second_completion_id=cid,
                                                     choice=fpb.PAIRWISE_CHOICE_FIRST)),
         grpc.StatusCode.INVALID_ARGUMENT, "the same completion"),
        (fpb.FeedbackEvent(rater_id="a", pairwise=pw(first_completion_id=cid, choice=fpb.PAIRWISE_CHOICE_TIE)),
         grpc.StatusCode.INVALID_ARGUMENT, "set both first_completion_id and second_completion_id"),
        (fpb.FeedbackEvent(rater_id="a", pairwise=pw(group_id=env.pair[0].group_id)),
         grpc.StatusCode.INVALID_ARGUMENT, "pairwise.choice is unset"),
        (fpb.FeedbackEvent(rater_id="a", pairwise=pw(group_id=env.trio[0].group_id, choice=fpb.PAIRWISE_CHOICE_FIRST)),
         grpc.StatusCode.INVALID_ARGUMENT, "has 3 candidates"),
        (fpb.FeedbackEvent(rater_id="a", pairwise=pw(group_id="grp-nope", choice=fpb.PAIRWISE_CHOICE_FIRST)),
         grpc.StatusCode.NOT_FOUND, "'grp-nope' is not a known group"),
    ]  # fmt: skip


async def test_invalid_events_get_their_exact_status(env: Env) -> None:
    for msg, code, message in _invalid_cases(env):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.stub.SubmitFeedback(msg)
        assert (err.value.code(), message in err.value.details()) == (code, True), (msg, err.value.details())
    assert env.store.count_feedback() == 0
    assert sample(env, "tuneloop_feedback_rejected_total", reason="rating_out_of_range") == 2
    assert sample(env, "tuneloop_feedback_rejected_total", reason="unknown_completion") == 2


# --- the bulk stream ---


async def test_stream_acks_every_event_in_order_and_goes_on_after_errors(env: Env) -> None:
    cid = env.a.completion_id
    events = [
        thumbs(cid, event_id="s-0"),
        rating(cid, 9, event_id="s-1"),  # invalid
        thumbs("cmpl-nope", event_id="s-2"),  # unknown
        thumbs(cid, event_id="s-0"),  # duplicate of the first, in the same stream
        thumbs(cid, up=False, event_id="s-0"),  # reused id
        thumbs(cid, up=False, event_id="s-5"),  # supersedes s-0
        *[rating(env.pair[i % 2].completion_id, 1 + i % 5, rater=f"r{i}") for i in range(300)],
    ]
    acks = [ack async for ack in env.stub.SubmitFeedbackStream(iter(events))]
    assert [a.stream_index for a in acks] == list(range(len(events)))
    codes = [a.error.code_name for a in acks[:6]]
    assert codes == ["", "INVALID_ARGUMENT", "NOT_FOUND", "", "ALREADY_EXISTS", ""]
    assert acks[1].event_id == "s-1" and "got 9" in acks[1].error.message
    assert acks[3].duplicate and acks[3].sequence == acks[0].sequence
    assert acks[5].superseded_event_id == "s-0"
    assert all(not a.HasField("error") and a.sequence > 0 for a in acks[6:])
    assert env.store.count_feedback() == 2 + 300
    seqs = [a.sequence for a in acks[6:]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 300
    assert len(env.store.feedback_since((0, acks[5].sequence), limit=1000)) == 300
    assert len(env.store.feedback_for_prompt(prompt_sha256(PROMPT))) == 302


# --- the batch call ---


def batch(*events: fpb.FeedbackEvent) -> fpb.SubmitFeedbackBatchRequest:
    return fpb.SubmitFeedbackBatchRequest(events=events)


async def test_batch_answers_every_event_in_order_with_its_own_error(env: Env) -> None:
    cid = env.a.completion_id
    events = [
        thumbs(cid, event_id="b-0"),
        rating(cid, 9, event_id="b-1"),  # invalid
        thumbs("cmpl-nope", event_id="b-2"),  # unknown completion
        thumbs(cid, event_id="b-0"),  # the first again, in the same batch: a duplicate
        thumbs(cid, up=False, event_id="b-0"),  # its id reused for other content
        thumbs(cid, up=False, event_id="b-5"),  # supersedes b-0
        fpb.FeedbackEvent(rater_id="a"),  # no kind
        fpb.FeedbackEvent(rater_id="bob", pairwise=fpb.PairwiseFeedback(
            group_id=env.pair[0].group_id, choice=fpb.PAIRWISE_CHOICE_SECOND)),  # no event id: the server assigns one
        *[rating(env.pair[i % 2].completion_id, 1 + i % 5, rater=f"r{i}") for i in range(300)],
    ]  # fmt: skip
    acks = (await env.stub.SubmitFeedbackBatch(batch(*events))).acks
    assert [a.stream_index for a in acks] == list(range(len(events)))
    codes = [a.error.code_name for a in acks[:8]]
    assert codes == ["", "INVALID_ARGUMENT", "NOT_FOUND", "", "ALREADY_EXISTS", "", "INVALID_ARGUMENT", ""]
    assert [a.error.code for a in acks[1:3]] == [grpc.StatusCode.INVALID_ARGUMENT.value[0], 5]
    assert acks[1].event_id == "b-1" and "got 9" in acks[1].error.message and acks[1].sequence == 0
    assert "'cmpl-nope' is not a known completion" in acks[2].error.message
    assert "b-0" in acks[4].error.message and "event has no kind" in acks[6].error.message
    assert acks[3].duplicate and acks[3].sequence == acks[0].sequence
    assert acks[5].superseded_event_id == "b-0"
    assert acks[7].event_id.startswith("fb-") and env.store.get_feedback(acks[7].event_id) is not None
    stored = [a for a in acks if not a.HasField("error") and not a.duplicate]
    assert len(stored) == 3 + 300 == env.store.count_feedback()
    seqs = [a.sequence for a in stored]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # stored in the order sent
    assert env.store.get_feedback("b-0").superseded_by == "b-5"
    assert sample(env, "tuneloop_feedback_rejected_total", reason="rating_out_of_range") == 1
    assert sample(env, "tuneloop_feedback_rejected_total", reason="event_id_conflict") == 1


async def test_a_batch_sent_again_is_all_duplicates_and_a_changed_event_is_refused(env: Env) -> None:
    cid = env.a.completion_id
    events = [thumbs(cid, event_id="r-1"), rating(cid, 4, event_id="r-2"), thumbs(env.other.completion_id, rater="x",
                                                                                    event_id="r-3")]  # fmt: skip
    first = (await env.stub.SubmitFeedbackBatch(batch(*events))).acks
    again = (await env.stub.SubmitFeedbackBatch(batch(*events))).acks
    assert not any(a.duplicate or a.HasField("error") for a in first)
    assert [(a.event_id, a.duplicate, a.sequence) for a in again] == [(a.event_id, True, a.sequence) for a in first]
    changed = (await env.stub.SubmitFeedbackBatch(batch(events[0], rating(cid, 5, event_id="r-2")))).acks
    assert changed[0].duplicate and changed[1].error.code_name == "ALREADY_EXISTS"
    assert env.store.count_feedback() == 3
    assert sample(env, "tuneloop_feedback_events_total", kind="rating", value="4") == 1  # duplicates not counted


async def test_batch_size_limit(env: Env) -> None:
    cid = env.a.completion_id
    assert len((await env.stub.SubmitFeedbackBatch(batch())).acks) == 0
    over = [rating(cid, 3, rater=f"o{i}") for i in range(MAX_BATCH_EVENTS + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.SubmitFeedbackBatch(batch(*over))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_BATCH_EVENTS} events, got {MAX_BATCH_EVENTS + 1}" in err.value.details()
    assert env.store.count_feedback() == 0  # refused whole
    acks = (await env.stub.SubmitFeedbackBatch(batch(*over[:MAX_BATCH_EVENTS]))).acks
    assert len(acks) == MAX_BATCH_EVENTS and not any(a.HasField("error") for a in acks)
    assert env.store.count_feedback() == MAX_BATCH_EVENTS


async def test_batch_larger_than_the_message_limit_is_resource_exhausted(env: Env) -> None:
    # 4 MiB is gRPC's default receive limit (the server's max_message_bytes); feedback_server keeps it.
    big = [fpb.FeedbackEvent(rater_id=f"r{i}", correction=fpb.CorrectionFeedback(
        completion_id=env.a.completion_id, corrected_text="x" * 60_000)) for i in range(80)]  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.SubmitFeedbackBatch(batch(*big))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert env.store.count_feedback() == 0


async def test_the_sdk_sends_bulk_feedback_in_batches_to_the_real_service(tmp_path: Path) -> None:
    from tuneloop.client import AsyncClient, NotFoundError, Rating
    from tuneloop.client import FeedbackEvent as Event

    store = open_store(f"sqlite:///{tmp_path}/fb.db")
    rec = make_completion()
    store.write_completions([rec])
    events = [Event(f"r{i}", Rating(rec.completion_id if i != 3 else "cmpl-nope", 1 + i % 5), event_id=f"s{i}")
              for i in range(7)]  # fmt: skip
    async with feedback_server(store) as (port, _service), AsyncClient(f"127.0.0.1:{port}") as client:
        acks = await client.submit_feedback_many(events, batch_size=3)
        again = [a async for a in client.submit_feedback_bulk(iter(events))]
    assert [(a.event_id, a.stream_index) for a in acks] == [(f"s{i}", i) for i in range(7)]
    assert isinstance(acks[3].error, NotFoundError) and all(a.ok for i, a in enumerate(acks) if i != 3)
    assert all(a.duplicate for i, a in enumerate(again) if i != 3) and store.count_feedback() == 6
    store.close()


class _CommitGate:
    """Wraps a store so the writer stops after writing a batch and before committing it, until
    released: what a caller sees in between shows whether acks wait for the commit."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.written = threading.Event()
        self.release = threading.Event()
        self.transactions = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @contextmanager
    def feedback_transaction(self) -> Iterator[Any]:
        with self._store.feedback_transaction() as tx:
            yield tx
            self.transactions += 1
            self.written.set()
            assert self.release.wait(30), "the test never released the commit"


async def test_batch_is_acknowledged_only_after_its_commit(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/fb.db")
    rec = make_completion()
    store.write_completions([rec])
    gate = _CommitGate(store)
    events = [rating(rec.completion_id, 1 + i % 5, rater=f"r{i}", event_id=f"e{i}") for i in range(MAX_BATCH_EVENTS)]
    async with feedback_server(gate) as (port, _service):  # type: ignore[arg-type]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = asyncio.ensure_future(fpb_grpc.FeedbackServiceStub(channel).SubmitFeedbackBatch(batch(*events)))
            assert await asyncio.to_thread(gate.written.wait, 30)
            for _ in range(100):  # let anything already answered reach the caller
                await asyncio.sleep(0)
            assert not call.done() and store.count_feedback() == 0  # written, not committed: no answer yet
            gate.release.set()
            acks = (await call).acks
    assert [a.event_id for a in acks] == [e.event_id for e in events]
    assert all(store.get_feedback(a.event_id).seq == a.sequence for a in acks)
    assert gate.transactions == 1  # the whole batch went into one transaction
    store.close()


async def test_required_roles_cover_every_rpc() -> None:
    methods = fpb.DESCRIPTOR.services_by_name["FeedbackService"].methods
    assert REQUIRED_ROLES == {f"/tuneloop.v1.FeedbackService/{m.name}": "feedback" for m in methods}


# --- the domain service without gRPC: interplay with the completion log and a failing store ---


async def test_feedback_on_a_completion_still_queued_in_the_log_is_accepted(tmp_path: Path) -> None:
    store, metrics = open_store(f"sqlite:///{tmp_path}/fb.db"), Metrics()
    log = CompletionLog(store, metrics, flush_interval_s=1.0)  # keeps the record queued for a second
    service = FeedbackService(store, metrics, completion_log=log)
    service.start()
    rec = make_completion()
    log.submit([rec])
    ack = await service.submit(FeedbackEvent(rater_id="u", kind="thumbs", completion_id=rec.completion_id,
                                             thumb_up=True))  # fmt: skip
    assert store.get_feedback(ack.event_id) is not None
    assert await service.close() and log.close(5)


def test_a_heavy_item_is_never_split_and_waits_for_the_next_batch() -> None:
    # What lets a caller's batch go into the group commit as one unit. Items weigh their value.
    batches: list[list[int]] = []
    first, release, done = threading.Event(), threading.Event(), threading.Event()

    def handle(items: list[int]) -> None:
        batches.append(items)
        if items == [1]:  # hold the writer while the rest is queued, so the batches are known
            first.set()
            release.wait(10)
        if sum(map(sum, batches)) == 26:
            done.set()

    writer: BatchThread[int] = BatchThread("t", handle, max_batch=10, weight=lambda item: item)
    writer.put_many([1])
    assert first.wait(10)
    writer.put_many([6, 4, 12, 3])
    release.set()
    assert done.wait(10) and writer.close(10)
    assert batches == [[1], [6, 4], [12], [3]]  # 6+4 fill a batch; 12 goes alone; 3 starts the next


async def test_a_store_that_stays_locked_answers_unavailable(tmp_path: Path) -> None:
    import sqlite3

    from tuneloop.server.feedback import FeedbackAck, InvalidFeedback, StoreUnavailable

    store = SqlStore.open(f"sqlite:///{tmp_path}/fb.db", busy_timeout_s=0.02)
    rec = make_completion()
    store.write_completions([rec])
    service = FeedbackService(store, Metrics(), config=FeedbackServiceConfig(commit_retry_s=0.3))
    service.start()
    blocker = sqlite3.connect(tmp_path / "fb.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    event = FeedbackEvent(rater_id="u", kind="rating", completion_id=rec.completion_id, rating=3, event_id="e1")
    with pytest.raises(StoreUnavailable, match="retry with the same event ids"):
        await service.submit(event)
    blocker.rollback()
    assert not (await service.submit(event)).duplicate  # nothing was half-written
    assert await service.close()
    # A batch fails whole: nothing was stored, and the same batch can be sent again.
    blocker.execute("BEGIN IMMEDIATE")
    service = FeedbackService(store, Metrics(), config=FeedbackServiceConfig(commit_retry_s=0.3))
    service.start()
    second = replace(event, event_id="e2")
    with pytest.raises(StoreUnavailable, match="retry with the same event ids"):
        await service.submit_batch([second, replace(event, rating=9, event_id="bad")])
    blocker.rollback()
    outcomes = await service.submit_batch([second, replace(event, rating=9, event_id="bad")])
    assert isinstance(outcomes[0], FeedbackAck) and not outcomes[0].duplicate
    assert isinstance(outcomes[1], InvalidFeedback)
    assert await service.close()

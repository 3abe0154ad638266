"""Builds CompletionRecords for store and feedback tests (what the serving path would log)."""

from __future__ import annotations

import time

from tuneloop.server.domain import CompletionRecord, new_id


def make_completion(
    prompt: str = "Say something kind.",
    output: str = "You are doing great.",
    *,
    group_id: str = "",
    index: int = 0,
    adapter: tuple[str, str] = ("base", "base"),
    completion_id: str | None = None,
) -> CompletionRecord:
    return CompletionRecord(
        completion_id=completion_id or new_id("cmpl"),
        group_id=group_id,
        request_id=new_id("req"),
        candidate_index=index,
        request={"input": {"prompt": prompt}, "sampling": {"n": 1}},
        prompt_text=prompt,
        prompt_token_count=len(prompt.split()),
        output_text=output,
        output_token_ids=[1, 2, 3],
        output_logprobs=[-0.5, -1.0, -0.25],
        finish_reason="stop",
        sampling={"temperature": 1.0, "n": 1},
        adapter_name=adapter[0],
        adapter_version=adapter[1],
        user_id="user-1",
        session_id="session-1",
        tags={"feature": "test"},
        queue_s=0.001,
        time_to_first_token_s=0.02,
        total_s=0.3,
        created_at=time.time(),
    )


def make_group(prompt: str, outputs: list[str], adapter: tuple[str, str] = ("base", "base")) -> list[CompletionRecord]:
    """The n candidates of one request, sharing a group id."""
    group_id = new_id("grp")
    return [make_completion(prompt, out, group_id=group_id, index=i, adapter=adapter) for i, out in enumerate(outputs)]

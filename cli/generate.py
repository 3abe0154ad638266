"""`tuneloop generate`: stream a completion to the terminal, or print the full result as JSON.

With -n >= 2 candidate 0 streams live under a "--- candidate 0 ---" header and the others are
printed, each under its own header, when the stream ends (interleaved deltas would be unreadable).
A summary per candidate (completion id, tokens, time to first token, adapter version) goes to
stderr, so stdout holds only the generated text.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tuneloop.client.generation import Completion, GenerateOptions, StreamChunk

from .common import UsageError, connect, print_json, read_text_arg


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="generate a completion",
        description="Generate from a prompt and stream the text to stdout as it arrives. A summary goes to "
        "stderr. With -n >= 2, candidate 0 streams and the others print when it ends.",
    )
    p.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or omitted reads standard input")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template)")
    p.add_argument("--system", metavar="TEXT", help="system message; implies --chat")
    p.add_argument("--max-tokens", type=int, metavar="N", help="most new tokens per candidate")
    p.add_argument("--temperature", type=float, metavar="T", help="0 is greedy; server default 1.0")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--stop", action="append", metavar="S", help="stop before S; repeat for several")
    p.add_argument("--seed", type=int, metavar="N", help="random seed for reproducible sampling")
    p.add_argument("-n", type=int, metavar="N", help="number of candidates (1-8)")
    p.add_argument("--logprobs", action="store_true", help="return per-token log-probabilities (see --json)")
    p.add_argument("--adapter", metavar="NAME", help="adapter to use; 'base' forces the base model")
    p.add_argument("--adapter-version", metavar="V", help="pin a version of the adapter")
    p.add_argument("--user-id", metavar="U", help="end user the completion is for")
    p.add_argument("--session-id", metavar="S", help="conversation or session id")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="label stored with the completion; repeatable")
    p.add_argument("--json", action="store_true", help="print the full result as one JSON object; no streaming")
    p.set_defaults(run=run)


def generate_arguments(args: argparse.Namespace) -> tuple[str | None, GenerateOptions]:
    """The SDK arguments for a parsed command line: (prompt, keyword options). Only flags the user
    gave become options, so the server's defaults apply to the rest."""
    text = read_text_arg(args.prompt, "the prompt")
    options: GenerateOptions = {}
    prompt: str | None = text
    if args.chat or args.system is not None:
        prompt = None
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        options["messages"] = [*system, {"role": "user", "content": text}]
    for name in ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n",
                 "adapter", "adapter_version", "user_id", "session_id"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.logprobs:
        options["logprobs"] = True
    if args.tag:
        options["tags"] = _parse_tags(args.tag)
    return prompt, options


def _parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag takes KEY=VALUE, got {item!r}")
        tags[key] = value
    return tags


def run(args: argparse.Namespace) -> int:
    prompt, options = generate_arguments(args)
    with connect(args) as client:
        if args.json:
            print_json(dataclasses.asdict(client.generate(prompt, **options)))
            return 0
        group_id, completions = write_stream(client.generate_stream(prompt, **options), sys.stdout)
    if group_id:
        print(f"group {group_id}", file=sys.stderr)
    for c in completions:
        print(summary_line(c), file=sys.stderr)
    return 0


def write_stream(chunks: Iterable[StreamChunk], out: TextIO) -> tuple[str | None, list[Completion]]:
    """Writes candidate 0's text to `out` as it arrives (flushing each delta), then every other
    candidate under a header. Returns the group id and the finished candidates by index."""
    group_id: str | None = None
    finished: dict[int, Completion] = {}
    labelled = False
    for chunk in chunks:
        group_id = group_id or chunk.group_id
        if chunk.index == 0:
            if not labelled and group_id:  # only an n >= 2 request has a group id
                out.write("--- candidate 0 ---\n")
                labelled = True
            if chunk.text_delta:
                out.write(chunk.text_delta)
                out.flush()
        if chunk.completion is not None:
            finished[chunk.index] = chunk.completion
    first = finished.get(0)
    if first is None or not first.text.endswith("\n"):
        out.write("\n")  # end the streamed line so the shell prompt starts on its own
    for index in sorted(finished):
        if index != 0:
            text = finished[index].text
            out.write(f"--- candidate {index} ---\n{text}" + ("" if text.endswith("\n") else "\n"))
    out.flush()
    return group_id, [finished[i] for i in sorted(finished)]


def summary_line(c: Completion) -> str:
    """One line about a finished candidate, e.g.
    `cmpl-0190... #0: 12+40 tokens, finish length, ttft 0.052 s, total 0.81 s, adapter base@base`."""
    parts = [
        f"{c.prompt_tokens}+{c.completion_tokens} tokens",
        f"finish {c.finish_reason or 'unknown'}" + (f" ({c.stop_sequence!r})" if c.stop_sequence else ""),
        f"ttft {c.time_to_first_token_s:.3f} s",
        f"total {c.total_s:.2f} s",
        f"adapter {c.adapter}@{c.adapter_version}",
    ]
    if c.logprobs:
        parts.append(f"mean logprob {sum(t.logprob for t in c.logprobs) / len(c.logprobs):.3f}")
    return f"{c.completion_id} #{c.index}: " + ", ".join(parts)

"""`tuneloop feedback`: judge a completion by id, import many judgements, or export the stored
feedback as training data.

    tuneloop feedback up|down ID            tuneloop feedback comment ID TEXT
    tuneloop feedback rate ID SCORE         tuneloop feedback correct ID TEXT
    tuneloop feedback prefer ID_A ID_B --choice first|second|tie   (or --group-id G)
    tuneloop feedback import FILE.jsonl [--batch-size N]
    tuneloop feedback export --kind pairs|unpaired|ratings [--store URL] [--out FILE]

The rater defaults to $TUNELOOP_RATER_ID, else the login name.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
from collections import Counter
from typing import Any

from tuneloop.client.errors import InvalidArgumentError
from tuneloop.client.feedback import (
    MAX_BATCH_EVENTS,
    Comment,
    Correction,
    FeedbackAck,
    FeedbackEvent,
    Kind,
    Preference,
    Rating,
    Thumbs,
)

from .common import UsageError, connect, print_json, read_text_arg

ENV_RATER = "TUNELOOP_RATER_ID"
ENV_STORE = "TUNELOOP_STORE_URL"
EXPORT_KINDS = ("pairs", "unpaired", "ratings")  # tuneloop.trainer.export's, not imported: it pulls SQLAlchemy
EXPORT_FORMATS = ("jsonl",)
SQLITE_PREFIX = "sqlite:///"
# `feedback import`: the "kind" of a line, the SDK type it builds, and the keys every line may have.
IMPORT_KINDS: dict[str, type[Kind]] = {
    "thumbs": Thumbs, "rating": Rating, "comment": Comment, "correction": Correction, "pairwise": Preference,
}  # fmt: skip
IMPORT_COMMON_KEYS = ("kind", "rater_id", "event_id", "comment", "reasons")
IMPORT_ERRORS_SHOWN = 10
IMPORT_HELP = """Send feedback events from a JSONL file, one JSON object per line, stored in the order of the
lines (in batch calls of up to --batch-size events). Every line is checked before anything is sent.

  {"kind": "thumbs", "completion_id": "cmpl-...", "up": true}
  {"kind": "rating", "completion_id": "cmpl-...", "score": 4}
  {"kind": "comment", "completion_id": "cmpl-...", "comment": "Too formal."}
  {"kind": "correction", "completion_id": "cmpl-...", "text": "Paris is the capital."}
  {"kind": "pairwise", "choice": "first", "first_completion_id": "cmpl-a", "second_completion_id": "cmpl-b"}
  {"kind": "pairwise", "choice": "tie", "group_id": "grp-..."}

Any line may also have "rater_id" (else --rater), "event_id" (then running the import again is
safe: a stored event is answered as a duplicate), "comment" and "reasons" (a list of short tags).
Refused events are listed on stderr by line number, and the exit status is then 1."""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("feedback", help="send feedback on completions, or export it", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    event = argparse.ArgumentParser(add_help=False)
    event.add_argument("--rater", default=_default_rater(), help=f"who judges (default: ${ENV_RATER} or login name)")
    event.add_argument("--event-id", help="idempotency key: re-sending the same event id is a no-op")
    event.add_argument("--reason", action="append", metavar="TAG", help="short reason label; repeatable")
    event.add_argument("--json", action="store_true", help="print the acknowledgement as JSON")
    with_comment = argparse.ArgumentParser(add_help=False)
    with_comment.add_argument("--comment", metavar="TEXT", help="free-text comment to attach ('-' reads stdin)")
    parents = [event, common]

    def action(name: str, help: str, *extra: argparse.ArgumentParser) -> argparse.ArgumentParser:  # noqa: A002
        a: argparse.ArgumentParser = actions.add_parser(name, parents=[*extra, *parents], help=help, description=help)
        a.add_argument("completion_id", help="the completion's id (printed by `tuneloop generate`)")
        return a

    action("up", "thumbs up a completion", with_comment).set_defaults(run=_send, event_kind=_thumbs_up)
    action("down", "thumbs down a completion", with_comment).set_defaults(run=_send, event_kind=_thumbs_down)
    rate = action("rate", "rate a completion from 1 (worst) to 5 (best)", with_comment)
    rate.add_argument("score", type=int, help="1 to 5")
    rate.set_defaults(run=_send, event_kind=_rating)
    comment = action("comment", "comment on a completion")
    comment.add_argument("comment", metavar="TEXT", help="the comment; '-' reads standard input")
    comment.set_defaults(run=_send, event_kind=_comment)
    correct = action("correct", "send the text you wanted instead of a completion", with_comment)
    correct.add_argument("text", help="the corrected text; '-' reads standard input")
    correct.set_defaults(run=_send, event_kind=_correction)

    prefer = actions.add_parser(
        "prefer", parents=[with_comment, *parents], help="choose between two completions of one prompt",
        description="Choose between two completions of one prompt, named by their ids or by the group id "
        "of an n=2 request (then 'first' is candidate 0).",
    )  # fmt: skip
    prefer.add_argument("first", nargs="?", help="first completion id")
    prefer.add_argument("second", nargs="?", help="second completion id")
    prefer.add_argument("--group-id", help="instead of the ids: the group id of an n=2 request")
    prefer.add_argument("--choice", required=True, choices=("first", "second", "tie"), help="which one is better")
    prefer.set_defaults(run=_send, event_kind=_preference)

    imp = actions.add_parser(
        "import", parents=[common], help="send many feedback events from a JSONL file", description=IMPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    imp.add_argument("file", metavar="FILE", help="JSONL file of events ('-' reads standard input)")
    imp.add_argument("--rater", default=_default_rater(),
                     help=f"rater of lines without rater_id (default: ${ENV_RATER} or login name)")  # fmt: skip
    imp.add_argument("--batch-size", type=int, default=MAX_BATCH_EVENTS, metavar="N",
                     help=f"events per call, 1-{MAX_BATCH_EVENTS} (default: {MAX_BATCH_EVENTS})")  # fmt: skip
    imp.add_argument("--json", action="store_true", help="print every acknowledgement as a JSON line, with its line")
    imp.set_defaults(run=_import)

    export = actions.add_parser(
        "export", help="export stored feedback as training data",
        description="Write the feedback in the store as training examples, one JSON object per line. Reads "
        "the store directly (run it where the store is), not through the server.",
    )  # fmt: skip
    export.add_argument("--kind", required=True, choices=EXPORT_KINDS,
                        help="pairs: chosen/rejected; unpaired: good/bad as KTO trains on them (thumbs, "
                             "ratings 4-5 and 1-2); ratings: scored")  # fmt: skip
    export.add_argument("--format", default="jsonl", choices=EXPORT_FORMATS, help="output format (default: jsonl)")
    export.add_argument("--store", default=os.environ.get(ENV_STORE),
                        help=f"store URL (default: ${ENV_STORE}, else the server's default store)")  # fmt: skip
    export.add_argument("--out", metavar="FILE", help="output file (default: stdout)")
    export.set_defaults(run=_export)


def _default_rater() -> str | None:
    try:
        return os.environ.get(ENV_RATER) or getpass.getuser()
    except (OSError, KeyError):  # no login name (e.g. a container user without a passwd entry)
        return None


def _thumbs_up(a: argparse.Namespace) -> Kind:
    return Thumbs(a.completion_id, up=True)


def _thumbs_down(a: argparse.Namespace) -> Kind:
    return Thumbs(a.completion_id, up=False)


def _rating(a: argparse.Namespace) -> Kind:
    return Rating(a.completion_id, a.score)


def _comment(a: argparse.Namespace) -> Kind:
    return Comment(a.completion_id)


def _correction(a: argparse.Namespace) -> Kind:
    return Correction(a.completion_id, read_text_arg(a.text, "the corrected text"))


def _preference(a: argparse.Namespace) -> Kind:
    if a.group_id is None and (a.first is None or a.second is None):
        raise UsageError("prefer needs two completion ids, or --group-id")
    if a.group_id is not None and a.first is not None:
        raise UsageError("prefer takes two completion ids or --group-id, not both")
    return Preference(a.choice, first_completion_id=a.first, second_completion_id=a.second, group_id=a.group_id)


def event_from_args(a: argparse.Namespace) -> FeedbackEvent:
    """The event a parsed feedback action describes (its kind comes from `a.event_kind`)."""
    if not a.rater:
        raise UsageError(f"no rater: pass --rater or set ${ENV_RATER}")
    comment = None if a.comment is None else read_text_arg(a.comment, "the comment")
    return FeedbackEvent(a.rater, a.event_kind(a), event_id=a.event_id, comment=comment, reasons=a.reason or ())


def _send(args: argparse.Namespace) -> int:
    """The `run` of every feedback action but export: submit the event, print the acknowledgement."""
    event = event_from_args(args)
    with connect(args) as client:
        ack = client.submit_feedback(event)
    if args.json:
        print_json(ack_to_dict(ack))
    else:
        print(ack_line(ack))
    return 0


def ack_to_dict(ack: FeedbackAck) -> dict[str, Any]:
    d: dict[str, Any] = {"event_id": ack.event_id, "duplicate": ack.duplicate, "sequence": ack.sequence,
                         "superseded_event_id": ack.superseded_event_id}  # fmt: skip
    if ack.stream_index is not None:
        d["stream_index"] = ack.stream_index
    if ack.error is not None:
        d["error"] = {"code": ack.error.code, "message": ack.error.message}
    return d


def ack_line(ack: FeedbackAck) -> str:
    if ack.duplicate:
        return f"{ack.event_id}: already stored (duplicate, nothing written)"
    line = f"{ack.event_id}: stored (sequence {ack.sequence})"
    if ack.superseded_event_id:
        line += f", supersedes {ack.superseded_event_id}"
    return line


def event_from_json(obj: Any, default_rater: str | None) -> FeedbackEvent:
    """The event one line of a `feedback import` file describes; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    kind_name = obj.get("kind")
    kind_type = IMPORT_KINDS.get(kind_name) if isinstance(kind_name, str) else None
    if kind_type is None:
        raise ValueError(f"kind must be one of {', '.join(IMPORT_KINDS)}, got {kind_name!r}")
    allowed = {f.name for f in dataclasses.fields(kind_type)}
    unknown = set(obj) - allowed - set(IMPORT_COMMON_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} for {kind_name}; "
                         f"it takes {', '.join(sorted(allowed))}")  # fmt: skip
    try:
        kind = kind_type(**{k: v for k, v in obj.items() if k in allowed})
    except TypeError as exc:  # a required key is missing
        raise ValueError(f"{kind_name}: {exc}") from None
    rater = obj.get("rater_id", default_rater)
    if not rater:
        raise ValueError(f"no rater_id, and no --rater or ${ENV_RATER}")
    reasons = obj.get("reasons") or ()
    event = FeedbackEvent(rater, kind, event_id=obj.get("event_id"), comment=obj.get("comment"), reasons=reasons)
    try:
        event.to_pb()  # what the SDK would refuse to send, found before anything is sent
    except InvalidArgumentError as exc:
        raise ValueError(exc.message) from None
    return event


def read_import_file(path: str, default_rater: str | None) -> tuple[list[FeedbackEvent], list[int]]:
    """The events of a JSONL file and the line number of each; UsageError lists bad lines."""
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    events: list[FeedbackEvent] = []
    line_numbers: list[int] = []
    errors: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(event_from_json(json.loads(line), default_rater))
            line_numbers.append(number)
        except ValueError as exc:  # json.JSONDecodeError is one too
            errors.append(f"line {number}: {exc}")
    if errors:
        more = f"\n  ... and {len(errors) - IMPORT_ERRORS_SHOWN} more" if len(errors) > IMPORT_ERRORS_SHOWN else ""
        shown = "\n  ".join(errors[:IMPORT_ERRORS_SHOWN])
        raise UsageError(f"{path}: {len(errors)} bad line(s), nothing sent:\n  {shown}{more}")
    return events, line_numbers


def _import(args: argparse.Namespace) -> int:
    """Send a JSONL file's events in batches; report refused ones by line."""
    if not 1 <= args.batch_size <= MAX_BATCH_EVENTS:
        raise UsageError(f"--batch-size must be 1-{MAX_BATCH_EVENTS}, got {args.batch_size}")
    events, line_numbers = read_import_file(args.file, args.rater)
    outcomes: Counter[str] = Counter()
    with connect(args) as client:
        for ack in client.submit_feedback_bulk(events, batch_size=args.batch_size):
            line = line_numbers[ack.stream_index or 0]
            outcomes["refused" if ack.error else "duplicate" if ack.duplicate else "stored"] += 1
            if args.json:
                print_json({"line": line, **ack_to_dict(ack)})
            if ack.error is not None:
                print(f"line {line} ({ack.event_id or 'no event id'}): {ack.error.code}: {ack.error.message}",
                      file=sys.stderr)  # fmt: skip
    print(f"{len(events)} events: {outcomes['stored']} stored, {outcomes['duplicate']} duplicates, "
          f"{outcomes['refused']} refused", file=sys.stderr)  # fmt: skip
    return 1 if outcomes["refused"] else 0


def _export(args: argparse.Namespace) -> int:
    # The store and the exporter (the trainer's data layer); importing them only here keeps the other
    # commands free of SQLAlchemy.
    from tuneloop.server.config import ServerConfig  # noqa: PLC0415
    from tuneloop.server.store import open_store  # noqa: PLC0415
    from tuneloop.trainer.export import export  # noqa: PLC0415

    # ServerConfig resolves an unset URL to the server's default ($TUNELOOP_HOME/tuneloop.db).
    url = ServerConfig(store_url=args.store or "").store_url
    # Opening a store creates it: refuse a missing SQLite file rather than export an empty new one
    # (the default path depends on the working directory).
    if url.startswith(SQLITE_PREFIX) and not os.path.exists(url[len(SQLITE_PREFIX) :]):
        raise UsageError(f"no store at {url[len(SQLITE_PREFIX) :]}; pass --store or set ${ENV_STORE}")
    try:
        store = open_store(url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        if args.out is None:
            rows = export(store, args.kind, sys.stdout, format=args.format)
        else:
            with open(args.out, "w", encoding="utf-8") as out:
                rows = export(store, args.kind, out, format=args.format)
    finally:
        store.close()
    print(f"wrote {rows} {args.kind} rows to {args.out or 'stdout'}", file=sys.stderr)
    return 0

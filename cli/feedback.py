"""`tuneloop feedback`: judge a completion by id, or export the stored feedback as training data.

    tuneloop feedback up|down ID            tuneloop feedback comment ID TEXT
    tuneloop feedback rate ID SCORE         tuneloop feedback correct ID TEXT
    tuneloop feedback prefer ID_A ID_B --choice first|second|tie   (or --group-id G)
    tuneloop feedback export --kind pairs|unpaired|ratings [--store URL] [--out FILE]

The rater defaults to $TUNELOOP_RATER_ID, else the login name.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from tuneloop.client.feedback import (
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

    export = actions.add_parser(
        "export", help="export stored feedback as training data",
        description="Write the feedback in the store as training examples, one JSON object per line. Reads "
        "the store directly (run it where the store is), not through the server.",
    )  # fmt: skip
    export.add_argument("--kind", required=True, choices=EXPORT_KINDS,
                        help="pairs: chosen/rejected; unpaired: thumbs-style good/bad; ratings: scored")  # fmt: skip
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

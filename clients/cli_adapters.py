"""`tuneloop adapters`: operate the served adapter versions through the server's admin API.

    tuneloop adapters status [NAME]                       versions, traffic shares, live feedback
    tuneloop adapters promote NAME VERSION                route default traffic to VERSION
    tuneloop adapters rollback NAME [--to VERSION]        back to the version served before
    tuneloop adapters canary NAME VERSION --share 0.1     sticky share of traffic to VERSION
    tuneloop adapters canary NAME --share 0               end the canary
    tuneloop adapters unload NAME VERSION                 free a version that serves nothing

`tuneloop adapters list|show` read the registry directory itself (no server needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
from typing import Any

from .admin import AdapterInfo
from .cli_common import connect, print_json


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("adapters", help="list, promote, roll back and canary adapter versions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON")
    parents = [out, common]

    status = actions.add_parser("status", parents=parents, help="live state of every adapter (or one)")
    status.add_argument("name", nargs="?", default="")
    status.set_defaults(run=lambda a: _show(a, lambda c: c.list_adapters(a.name)))

    promote = actions.add_parser("promote", parents=parents, help="route default traffic to a version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.set_defaults(run=lambda a: _show(a, lambda c: [c.promote(a.name, a.version)]))

    rollback = actions.add_parser("rollback", parents=parents, help="return to the version served before")
    rollback.add_argument("name")
    rollback.add_argument("--to", default="", metavar="VERSION", help="a specific earlier version")
    rollback.set_defaults(run=lambda a: _show(a, lambda c: [c.rollback(a.name, a.to)]))

    canary = actions.add_parser("canary", parents=parents, help="start, change or end a canary")
    canary.add_argument("name")
    canary.add_argument("version", nargs="?", default="")
    canary.add_argument("--share", type=float, required=True, help="share of default traffic, 0 to 1 (0 ends it)")
    canary.add_argument("--manual", action="store_true", help="report the sequential test but do not act on it")
    canary.set_defaults(
        run=lambda a: _show(a, lambda c: [c.set_canary(a.name, a.version, a.share, auto_decide=not a.manual)])
    )

    unload = actions.add_parser("unload", parents=parents, help="unload a version that serves no traffic")
    unload.add_argument("name")
    unload.add_argument("version")
    unload.set_defaults(run=lambda a: _show(a, lambda c: [c.unload(a.name, a.version)]))

    # Registry reads, served by the trainer package (no server needed); listed here for --help.
    actions.add_parser("list", help="versions in the registry directory (reads the files)", add_help=False)
    actions.add_parser("show", help="one version's manifest from the registry directory", add_help=False)


def _show(args: argparse.Namespace, call: Any) -> int:
    with connect(args) as client:
        adapters: list[AdapterInfo] = call(client)
    if args.json:
        print_json([dataclasses.asdict(a) for a in adapters])
        return 0
    if not adapters:
        print("no adapters in the server's registry yet: the base model serves every request")
    for a in adapters:
        print(format_adapter(a))
    return 0


def format_adapter(a: AdapterInfo) -> str:
    lines = [f"{a.name}: current {a.current_version or 'base'}"
             + (f", canary {a.canary_version} at {a.canary_share:.0%}" if a.canary_version else "")]  # fmt: skip
    if a.canary is not None:
        c = a.canary
        lines.append(f"  canary test: {c.decision} (LLR {c.llr:+.2f}, {c.wins} for / {c.losses} against, "
                     f"{'auto' if c.auto_decide else 'manual'})")  # fmt: skip
    for v in a.versions:
        up_total = v.thumbs_up + v.thumbs_down
        up = f"{v.thumbs_up / up_total:.0%} up of {up_total}" if up_total else "no thumbs"
        created = dt.datetime.fromtimestamp(v.created_at).strftime("%Y-%m-%d %H:%M") if v.created_at else "?"
        flags = " ".join(
            x for x in (v.role, "loaded" if v.loaded else "", v.status if v.status != "accepted" else "") if x
        )
        pairwise = f"pairwise {v.pairwise_wins}-{v.pairwise_losses}"
        share = f"share {v.traffic_share:4.0%}"
        lines.append(f"  {v.version:>5} {created} {share} {up}, {v.ratings} ratings, {pairwise} {flags}".rstrip())
        if v.refusal:
            lines.append(f"        refused: {v.refusal}")
    return "\n".join(lines)

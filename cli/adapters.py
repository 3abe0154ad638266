"""`tuneloop adapters`: operate the served adapter versions through the server's admin API.

    tuneloop adapters status [NAME]                       versions, traffic shares, live feedback
    tuneloop adapters promote NAME VERSION                route default traffic to VERSION
    tuneloop adapters rollback NAME [--to VERSION]        back to the version served before
    tuneloop adapters canary NAME VERSION --share 0.1     sticky share of traffic to VERSION
    tuneloop adapters canary NAME --share 0               end the canary
    tuneloop adapters unload NAME VERSION                 free a version that serves nothing

    tuneloop adapters list [NAME]                         versions in the registry
    tuneloop adapters show NAME [VERSION]                 one version's manifest

`list` and `show` read the registry itself (its directory, or the object store --registry-url
names; no server needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
import time
from typing import Any

from tuneloop.client.admin import AdapterInfo
from tuneloop.server.registry import DEFAULT_CHANNEL, Registry, default_registry_dir, open_registry

from .common import connect, print_json


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

    # Registry reads: the files themselves, no server needed.
    p.add_argument("--registry-dir", default="", help="registry directory (default $TUNELOOP_HOME/adapters)")
    p.add_argument("--registry-url", default="", help=REGISTRY_URL_HELP)
    ls = actions.add_parser("list", help="versions in the registry directory, with status and gate metrics")
    ls.add_argument("name", nargs="?", default="", help="only this adapter")
    ls.add_argument("--json", action="store_true", help="one JSON object per version")
    ls.set_defaults(run=_list)
    show = actions.add_parser("show", help="one version's manifest from the registry directory (default: current)")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default="")
    show.add_argument("--full", action="store_true", help="include the per-pair data snapshot")
    show.set_defaults(run=_show_version)
    for sp in (ls, show):
        sp.add_argument("--registry-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("--registry-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


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


# -- registry reads --------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))


REGISTRY_URL_HELP = (
    "shared registry on an object store, e.g. s3://BUCKET/PREFIX (default $TUNELOOP_REGISTRY_URL; empty: the "
    "directory); endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
)


def registry_location(args: argparse.Namespace) -> str:
    """The registry URL the flags or the server's variable name, else "" (the directory)."""
    return str(args.registry_url or os.environ.get("TUNELOOP_REGISTRY_URL", ""))


def _registry(args: argparse.Namespace) -> Registry:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return open_registry(registry_location(args), args.registry_dir)


def _list(args: argparse.Namespace) -> int:
    registry, only, as_json = _registry(args), args.name, args.json
    names = [only] if only else registry.names()
    rows = []
    for name in names:
        current = registry.channel(name, DEFAULT_CHANNEL)
        canary = registry.canary(name)
        for v in registry.versions(name):
            m = v.manifest.get("metrics", {})
            rows.append({
                "name": name, "version": v.version, "current": v.version == current,
                "canary_share": canary.share if canary and canary.version == v.version else None, "status": v.status,
                "parent": v.parent_version, "algorithm": v.manifest.get("algorithm"),
                "created_at": v.manifest.get("created_at"), "accuracy": m.get("accuracy"),
                "kl_per_token": m.get("kl_per_token"),
                "pairs": v.manifest.get("data_snapshot", {}).get("train_pairs"),
            })  # fmt: skip
        for version, reason in registry.corrupt_versions(name):
            print(f"warning: {name}/{version} is corrupt and skipped: {reason}", file=sys.stderr)
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no adapter versions in {registry_location(args) or args.registry_dir or default_registry_dir()}")
        return 0
    header = ("NAME", "VERSION", "STATUS", "PARENT", "ALGO", "PAIRS", "ACCURACY", "KL/TOKEN", "CREATED")
    table = [header] + [
        (
            r["name"],
            r["version"] + (" *" if r["current"] else f" ~{r['canary_share']:.0%}" if r["canary_share"] else ""),
            r["status"],
            _fmt(r["parent"]),
            _fmt(r["algorithm"]),
            _fmt(r["pairs"]),
            _fmt(r["accuracy"]),
            _fmt(r["kl_per_token"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])) if r["created_at"] else "-",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print("(* = current, ~N% = canary on N% of default traffic)")
    return 0


def _show_version(args: argparse.Namespace) -> int:
    v, full = _registry(args).resolve(args.name, args.version), args.full
    manifest = dict(v.manifest)
    snap = manifest.get("data_snapshot")
    if isinstance(snap, dict) and not full:
        snap = dict(snap)
        n_events = len(snap.pop("event_ids", []))
        snap.pop("pairs", None)
        snap["event_count"] = n_events
        manifest["data_snapshot"] = snap
    metrics = manifest.get("metrics")
    if isinstance(metrics, dict) and not full:
        manifest["metrics"] = {k: val for k, val in metrics.items() if k != "loss_curve"}
    extra = {"report": str(v.path / "report.md")} if (v.path / "report.md").is_file() else {}
    out = {"path": str(v.path), "rank": v.rank, "kind": v.kind, **manifest, **extra}
    print(json.dumps(out, indent=2, sort_keys=True, default=str))
    return 0

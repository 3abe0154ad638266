"""Writes the Grafana dashboard deploy/grafana/dashboards/tuneloop.json.

    python deploy/grafana/build_dashboard.py          # rewrite the JSON after editing this file
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is out of date

The dashboard is generated so every panel is built the same way (data source variable, adapter
filter, legends) and the PromQL lives in a few helpers instead of hundreds of lines of JSON.
tests/test_deploy_files.py checks the JSON is current and that every metric it names is exported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).parent / "dashboards" / "tuneloop.json"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Series labelled by adapter version are filtered by the dashboard's adapter selector.
ADAPTER_FILTER = 'adapter=~"$adapter"'
BY_VERSION = "adapter, adapter_version"
VERSION_LEGEND = "{{adapter}}@{{adapter_version}}"
# The window feedback ratios are computed over: feedback arrives slowly, so per-scrape rates are noise.
WINDOW = "$window"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = "__auto"


def rate(metric: str, by: str, filtered: bool = True) -> str:
    """Per-second rate of a counter summed by `by`."""
    sel = f"{{{ADAPTER_FILTER}}}" if filtered else ""
    return f"sum by ({by}) (rate({metric}{sel}[$__rate_interval]))"


def quantile(q: float, histogram: str, by: str = BY_VERSION) -> str:
    """The q-quantile of a histogram per `by` (adapter version by default; "" for one overall line)."""
    sel = f"{{{ADAPTER_FILTER}}}" if "adapter" in by else ""
    group = ", ".join(["le", by]) if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{sel}[$__rate_interval])))"


def mean(sum_counter: str, count_counter: str) -> str:
    """sum / count per adapter version over the feedback window (e.g. the mean rating)."""

    def inc(metric: str) -> str:
        return f"sum by ({BY_VERSION}) (increase({metric}{{{ADAPTER_FILTER}}}[{WINDOW}]))"

    return f"{inc(sum_counter)} / ({inc(count_counter)} > 0)"


def share(part: str, other: str, by: str = BY_VERSION) -> str:
    """part / (part + other) per `by` over the feedback window, both counters.

    A version seen on one side only has no series on the other; `or ... * 0` fills it with 0 so the
    version shows as 0 or 1 instead of vanishing (the same fill as the recording rules in alerts.yml).
    """

    def inc(metric: str) -> str:
        return f"sum by ({by}) (increase({metric}{{{ADAPTER_FILTER}}}[{WINDOW}]))"

    p = f"({inc(part)} or {inc(other)} * 0)"
    o = f"({inc(other)} or {inc(part)} * 0)"
    return f"{p} / (({p} + {o}) > 0)"


def panel(
    title: str,
    queries: list[Query],
    unit: str,
    description: str,
    kind: str = "timeseries",
    width: int = 12,
    height: int = 8,
    max_value: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if max_value is not None:
        defaults.update(min=0, max=max_value)
    if kind == "timeseries":
        defaults["custom"] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": _options(kind),
        "targets": [
            {"datasource": DATASOURCE, "refId": chr(ord("A") + i), "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(queries)
        ],
    }


def _options(kind: str) -> dict[str, Any]:
    if kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    return {
        "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def stat(title: str, expr: str, unit: str, description: str) -> dict[str, Any]:
    return panel(title, [Query(expr, "")], unit, description, kind="stat", width=4, height=4)


def serving() -> list[dict[str, Any]]:
    return [
        stat(
            "Requests/s",
            "sum(rate(tuneloop_requests_total[$__rate_interval]))",
            "reqps",
            "RPCs answered per second, all methods and codes.",
        ),
        stat(
            "Non-OK share",
            'sum(rate(tuneloop_requests_total{code!="OK"}[$__rate_interval])) '
            "/ sum(rate(tuneloop_requests_total[$__rate_interval]))",
            "percentunit",
            "Share of RPCs answered with a status other than OK.",
        ),
        stat(
            "p95 time to first token",
            quantile(0.95, "tuneloop_time_to_first_token_seconds", by=""),
            "s",
            "All adapter versions together.",
        ),
        stat("In flight", "sum(tuneloop_requests_in_flight)", "short", "Generation requests being served now."),
        stat(
            "Engine",
            "min(tuneloop_engine_healthy)",
            "bool_yes_no",
            "Yes while the vLLM engine serves; No while it starts or after it died (gRPC health NOT_SERVING).",
        ),
        stat(
            "Completion log queue",
            "sum(tuneloop_completion_log_queue_depth)",
            "short",
            "Completions waiting to be written to the store.",
        ),
        panel(
            "Request rate by code",
            [Query(rate("tuneloop_requests_total", "code", filtered=False), "{{code}}")],
            "reqps",
            "RPCs per second by gRPC status code, all methods.",
        ),
        panel(
            "Generate outcomes by adapter version",
            [
                Query(
                    rate("tuneloop_generate_requests_total", f"{BY_VERSION}, outcome"), VERSION_LEGEND + " {{outcome}}"
                )
            ],
            "reqps",
            "Finished Generate/GenerateStream requests per second by adapter version and outcome.",
        ),
        panel(
            "Time to first token p50 / p95 by adapter version",
            [
                Query(quantile(0.5, "tuneloop_time_to_first_token_seconds"), VERSION_LEGEND + " p50"),
                Query(quantile(0.95, "tuneloop_time_to_first_token_seconds"), VERSION_LEGEND + " p95"),
            ],
            "s",
            "Arrival to first generated token.",
        ),
        panel(
            "Request latency p50 / p95 by adapter version",
            [
                Query(quantile(0.5, "tuneloop_request_latency_seconds"), VERSION_LEGEND + " p50"),
                Query(quantile(0.95, "tuneloop_request_latency_seconds"), VERSION_LEGEND + " p95"),
            ],
            "s",
            "Arrival to the request's last token.",
        ),
        panel(
            "Queue time p95 by adapter version",
            [Query(quantile(0.95, "tuneloop_queue_time_seconds"), VERSION_LEGEND)],
            "s",
            "Arrival until the engine scheduled the request: grows when the engine is saturated.",
        ),
        panel(
            "Tokens/s by adapter version",
            [
                Query(rate("tuneloop_generated_tokens_total", BY_VERSION), VERSION_LEGEND + " generated"),
                Query(rate("tuneloop_prompt_tokens_total", BY_VERSION), VERSION_LEGEND + " prompt"),
            ],
            "short",
            "Generated tokens (all candidates) and prompt tokens processed per second.",
        ),
        panel(
            "In flight by adapter version",
            [Query(f"sum by ({BY_VERSION}) (tuneloop_requests_in_flight{{{ADAPTER_FILTER}}})", VERSION_LEGEND)],
            "short",
            "Generation requests being served now.",
        ),
    ]


def completion_log() -> list[dict[str, Any]]:
    return [
        panel(
            "Completion log queue depth",
            [Query("sum by (instance) (tuneloop_completion_log_queue_depth)", "{{instance}}")],
            "short",
            "Completions waiting to be written. A queue that only grows means the store is too slow.",
        ),
        panel(
            "Completion log writes and errors",
            [
                Query("sum(rate(tuneloop_completion_log_written_total[$__rate_interval]))", "records written/s"),
                Query("sum(rate(tuneloop_completion_log_write_errors_total[$__rate_interval]))", "failed batches/s"),
                Query(quantile(0.95, "tuneloop_completion_log_batch_seconds", by=""), "batch commit p95 (s)"),
            ],
            "short",
            "Records committed per second, failed batch writes per second, and p95 batch commit time.",
        ),
    ]


def feedback() -> list[dict[str, Any]]:
    return [
        panel(
            "Feedback rate by kind",
            [Query(rate("tuneloop_feedback_events_total", "kind", filtered=False), "{{kind}}")],
            "reqps",
            "Accepted feedback events per second: thumbs, rating, comment, correction, pairwise.",
        ),
        panel(
            "Feedback rejected by reason",
            [Query(rate("tuneloop_feedback_rejected_total", "reason", filtered=False), "{{reason}}")],
            "reqps",
            "Refused feedback events per second by reason.",
        ),
        panel(
            "Thumbs-up ratio by adapter version ($window)",
            [Query(share("tuneloop_feedback_thumbs_up_total", "tuneloop_feedback_thumbs_down_total"), VERSION_LEGEND)],
            "percentunit",
            "Thumbs up / (up + down) over the window, per adapter version.",
            max_value=1,
        ),
        panel(
            "Mean rating by adapter version ($window)",
            [Query(mean("tuneloop_feedback_rating_sum_total", "tuneloop_feedback_rating_count_total"), VERSION_LEGEND)],
            "short",
            "Mean 1-5 rating over the window, per adapter version.",
            max_value=5,
        ),
        panel(
            "Pairwise win rate by adapter version ($window)",
            [
                Query(
                    share("tuneloop_feedback_pairwise_wins_total", "tuneloop_feedback_pairwise_losses_total"),
                    VERSION_LEGEND,
                )
            ],
            "percentunit",
            "Share of pairwise choices won by completions of each version.",
            max_value=1,
        ),
    ]


def training() -> list[dict[str, Any]]:
    return [
        panel(
            "Training runs by outcome",
            [Query("sum by (outcome) (increase(tuneloop_trainer_runs_total[1h]))", "{{outcome}}")],
            "short",
            "Training runs finished in the last hour, by outcome.",
        ),
        panel(
            "Last training loss",
            [Query("tuneloop_trainer_last_loss")],
            "short",
            "Final loss of the latest training run.",
        ),
        stat(
            "Since last successful run",
            "time() - max(tuneloop_trainer_last_success_timestamp_seconds > 0)",
            "s",
            "Time since the trainer last completed a run.",
        ),
    ]


def adapters() -> list[dict[str, Any]]:
    return [
        panel(
            "Traffic share by adapter version",
            [
                Query(
                    'sum by (adapter, adapter_version) (tuneloop_adapter_traffic_share{adapter=~"$adapter"})',
                    "{{adapter}} {{adapter_version}}",
                )
            ],
            "percentunit",
            "Share of each adapter's default traffic per version (a canary shows here).",
            max_value=1,
        ),
        panel(
            "Swaps and refusals",
            [
                Query("sum by (outcome) (increase(tuneloop_adapter_swaps_total[1h]))", "swap {{outcome}}"),
                Query(
                    "sum by (adapter, adapter_version) (increase(tuneloop_adapter_refused_total[1h]))",
                    "refused {{adapter}} {{adapter_version}}",
                ),
                Query(
                    "sum by (adapter, decision) (increase(tuneloop_canary_decisions_total[1h]))",
                    "canary {{adapter}} {{decision}}",
                ),
                Query("sum by (outcome) (increase(tuneloop_fast_path_folds_total[1h]))", "fast path {{outcome}}"),
            ],
            "short",
            "Default-traffic switches, versions refused at load, automatic canary decisions, and fast-path weight "
            "reloads (a version folded into the base weights), per hour.",
        ),
        panel(
            "Publish to first served p50 / max",
            [
                Query(
                    "histogram_quantile(0.5, sum by (le) (rate(tuneloop_publish_to_first_served_seconds_bucket[1h])))",
                    "p50",
                ),
                Query(
                    "histogram_quantile(1.0, sum by (le) (rate(tuneloop_publish_to_first_served_seconds_bucket[1h])))",
                    "max",
                ),
            ],
            "s",
            "From a version's channel move in the registry to its first served request.",
        ),
        panel(
            "Serving version",
            [Query("tuneloop_serving_version_info", "{{adapter}} {{version}} canary {{canary}}")],
            "short",
            "The version serving each adapter's default traffic, and its canary.",
            kind="table",
        ),
    ]


def layout(sections: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Rows of panels flowed left to right, 24 grid units wide; assigns ids and positions."""
    out: list[dict[str, Any]] = []
    y = 0
    for title, panels in sections:
        out.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            }
        )
        y += 1
        x = row_height = 0
        for p in panels:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                x, y, row_height = 0, y + row_height, 0
            p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
            x, row_height = x + w, max(row_height, h)
            out.append(p)
        y += row_height
    for i, p in enumerate(out, 1):
        p["id"] = i
    return out


def templating() -> list[dict[str, Any]]:
    windows = ["1h", "6h", "1d", "7d"]
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
        },
        {
            "name": "adapter",
            "label": "Adapter",
            "type": "query",
            "datasource": DATASOURCE,
            "definition": "label_values(tuneloop_generate_requests_total, adapter)",
            "query": {"query": "label_values(tuneloop_generate_requests_total, adapter)", "refId": "adapters"},
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "refresh": 2,
            "sort": 1,
            "current": {"text": ["All"], "value": ["$__all"]},
        },
        {
            "name": "window",
            "label": "Feedback window",
            "type": "custom",
            "query": ",".join(windows),
            "current": {"text": "6h", "value": "6h"},
            "options": [{"text": w, "value": w, "selected": w == "6h"} for w in windows],
        },
    ]


def dashboard() -> dict[str, Any]:
    return {
        "uid": "tuneloop",
        "title": "tuneloop",
        "description": "Serving, completion log, feedback per adapter version, and training.",
        "tags": ["tuneloop", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": templating()},
        "annotations": {"list": []},
        "panels": layout(
            [
                ("Serving", serving()),
                ("Completion log", completion_log()),
                ("Adapters", adapters()),
                ("Feedback", feedback()),
                ("Training", training()),
            ]
        ),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

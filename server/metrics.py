"""Every Prometheus metric the server exports, in one class.

The registry is injectable so tests get a fresh one; adapter name and version are separate labels,
never joined into one string, so PromQL can aggregate over either.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Latency buckets sized for CPU and GPU serving alike: 5 ms to 2 min.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_ADAPTER = ("adapter", "adapter_version")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # --- serving ---
        self.requests = Counter(
            "tuneloop_requests", "RPCs answered, by method and gRPC status code.", ("method", "code"), registry=r
        )
        self.generate_requests = Counter(
            "tuneloop_generate_requests",
            "Generate/GenerateStream requests finished, by adapter version and outcome.",
            (*_ADAPTER, "outcome"),
            registry=r,
        )
        self.in_flight = Gauge(
            "tuneloop_requests_in_flight", "Generation requests being served now.", _ADAPTER, registry=r
        )
        self.time_to_first_token = Histogram(
            "tuneloop_time_to_first_token_seconds",
            "Arrival to first generated token, per candidate.",
            _ADAPTER,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "tuneloop_request_latency_seconds",
            "Arrival to last token of the request.",
            _ADAPTER,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "tuneloop_queue_time_seconds",
            "Arrival until the engine scheduled the request.",
            _ADAPTER,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("tuneloop_prompt_tokens", "Prompt tokens processed.", _ADAPTER, registry=r)
        self.generated_tokens = Counter(
            "tuneloop_generated_tokens", "Tokens generated (all candidates).", _ADAPTER, registry=r
        )
        self.engine_healthy = Gauge("tuneloop_engine_healthy", "1 while the engine serves, else 0.", registry=r)
        # --- completion log ---
        self.log_queue_depth = Gauge(
            "tuneloop_completion_log_queue_depth", "Completions waiting to be written to the store.", registry=r
        )
        self.log_journal_records = Gauge(
            "tuneloop_completion_log_journal_records",
            "Completions spilled to the local journal while the store was failing, not yet in the store.",
            registry=r,
        )
        self.log_written = Counter(
            "tuneloop_completion_log_written", "Completion records committed to the store.", registry=r
        )
        self.log_write_errors = Counter(
            "tuneloop_completion_log_write_errors", "Failed batch writes to the completion log.", registry=r
        )
        self.log_lag = Histogram(
            "tuneloop_completion_log_lag_seconds",
            "From a completion being served to its record being committed: the window in which a crash of the "
            "server loses the record of a completion its caller holds.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.log_batch_seconds = Histogram(
            "tuneloop_completion_log_batch_seconds",
            "Time to commit one batch of completion records.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # --- feedback ---
        self.feedback_events = Counter(
            "tuneloop_feedback_events",
            "Feedback events accepted, by kind (thumbs, rating, comment, correction, pairwise) and value.",
            ("kind", "value"),
            registry=r,
        )
        self.feedback_rejected = Counter(
            "tuneloop_feedback_rejected", "Feedback events refused, by reason.", ("reason",), registry=r
        )
        self.thumbs_up = Counter("tuneloop_feedback_thumbs_up", "Thumbs up per adapter version.", _ADAPTER, registry=r)
        self.thumbs_down = Counter(
            "tuneloop_feedback_thumbs_down", "Thumbs down per adapter version.", _ADAPTER, registry=r
        )
        self.rating_sum = Counter("tuneloop_feedback_rating_sum", "Sum of 1-5 ratings.", _ADAPTER, registry=r)
        self.rating_count = Counter("tuneloop_feedback_rating_count", "Number of ratings.", _ADAPTER, registry=r)
        self.pairwise_wins = Counter(
            "tuneloop_feedback_pairwise_wins",
            "Pairwise choices won by a completion of this version.",
            _ADAPTER,
            registry=r,
        )
        self.pairwise_losses = Counter(
            "tuneloop_feedback_pairwise_losses",
            "Pairwise choices lost by a completion of this version.",
            _ADAPTER,
            registry=r,
        )

        # --- adapters: swaps, canary, rollback ---
        self.swaps = Counter(
            "tuneloop_adapter_swaps",
            "Default-traffic switches to a new adapter version, by outcome (ok, refused).",
            ("outcome",),
            registry=r,
        )
        self.adapter_refused = Counter(
            "tuneloop_adapter_refused",
            "Adapter versions refused at load (bad files, base model, rank, probe).",
            _ADAPTER,
            registry=r,
        )
        self.adapter_fallback = Gauge(
            "tuneloop_adapter_serving_fallback",
            "1 while an adapter serves an older version of its current channel because this server refuses the "
            "version current points at (see tuneloop_adapter_refused).",
            ("adapter",),
            registry=r,
        )
        self.serving_version = Info(
            "tuneloop_serving_version",
            "The version serving default traffic for each adapter name, and its canary.",
            ("adapter",),
            registry=r,
        )
        self.traffic_share = Gauge(
            "tuneloop_adapter_traffic_share",
            "Share of an adapter name's default traffic routed to each version.",
            _ADAPTER,
            registry=r,
        )
        self.publish_to_first_served = Histogram(
            "tuneloop_publish_to_first_served_seconds",
            "From a version's channel move in the registry to the first request it served.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.folds = Counter(
            "tuneloop_fast_path_folds",
            "Weight reloads of the fast path, by outcome (folded: a version into the base weights; unfolded: back "
            "to the bare base; failed).",
            ("outcome",),
            registry=r,
        )
        self.fold_seconds = Histogram(
            "tuneloop_fast_path_fold_seconds",
            "Wall time new requests were held by a fast-path weight reload (the reload, and waiting for the "
            "running requests it could not preempt).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fold_preempted = Counter(
            "tuneloop_fast_path_preempted",
            "Running requests a fast-path weight reload preempted and continued on the new weights.",
            registry=r,
        )
        self.folded = Gauge(
            "tuneloop_fast_path_folded",
            "1 for the adapter version folded into the engine's weights (served with no per-token LoRA cost).",
            _ADAPTER,
            registry=r,
        )
        self.canary_decisions = Counter(
            "tuneloop_canary_decisions",
            "Automatic canary outcomes (promoted, rolled_back, promote_failed).",
            ("adapter", "decision"),
            registry=r,
        )
        self.canary_decider = Gauge(
            "tuneloop_canary_decider",
            "1 while this replica holds the canary-decider lease (runs the canary test and acts on it), else 0.",
            registry=r,
        )
        self.canary_decider_handovers = Counter(
            "tuneloop_canary_decider_handovers",
            "Changes of this replica's hold on the canary-decider lease: acquired (a new fencing token), released "
            "(clean shutdown), lost (a renewal failed or another replica took over).",
            ("change",),
            registry=r,
        )

    def rpc_done(self, method: str, code: str) -> None:
        self.requests.labels(method, code).inc()

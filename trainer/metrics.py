"""The trainer's Prometheus metrics, in one class (registry injectable for tests)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# A round is minutes on a CPU, seconds on a GPU.
_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
PPO_FIGURES = (
    "score", "kl", "kl_per_token", "entropy", "non_score_reward", "kl_coef", "approx_kl", "clip_fraction",
    "value_clip_fraction", "policy_loss", "value_loss", "ratio",
)  # fmt: skip
OUTCOMES = ("published", "rejected", "skipped", "refused", "duplicate", "failed")


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.runs = Counter(
            "tuneloop_trainer_runs",
            "Training rounds finished, by outcome: " + ", ".join(OUTCOMES) + ".",
            ("outcome",),
            registry=r,
        )
        for outcome in OUTCOMES:  # export zeros so rate() works before the first failure
            self.runs.labels(outcome)
        self.run_duration = Histogram(
            "tuneloop_trainer_run_duration_seconds",
            "Wall time of a round that trained (build, train, gate, publish).",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.last_loss = Gauge("tuneloop_trainer_last_loss", "Training loss of the last optimizer step.", registry=r)
        self.heldout_accuracy = Gauge(
            "tuneloop_trainer_heldout_accuracy", "Held-out preference accuracy of the last candidate.", registry=r
        )
        self.kl = Gauge(
            "tuneloop_trainer_kl_per_token", "Estimated KL(candidate || reference), nats per sampled token.", registry=r
        )
        self.nll_increase = Gauge(
            "tuneloop_trainer_nll_increase_per_token",
            "Reference NLL per token of the last candidate's samples minus that of the reference's own samples.",
            registry=r,
        )
        self.gate_failures = Counter(
            "tuneloop_trainer_gate_failures", "Gate checks failed by candidates, by check.", ("check",), registry=r
        )
        self.examples = Gauge(
            "tuneloop_trainer_examples",
            "Training examples used by the last round: pairs, plus thumbs and ratings for algorithms that learn "
            "from them.",
            registry=r,
        )
        # One gauge per standard PPO figure, set every iteration (a labelled family: one name to graph).
        self.ppo = Gauge(
            "tuneloop_trainer_ppo",
            "The last PPO iteration's figures, by name: " + ", ".join(PPO_FIGURES) + ".",
            ("figure",),
            registry=r,
        )
        self.ppo_iterations = Counter("tuneloop_trainer_ppo_iterations", "PPO iterations run.", registry=r)
        self.last_success = Gauge(
            "tuneloop_trainer_last_success_timestamp_seconds",
            "Unix time of the last round that published an accepted adapter.",
            registry=r,
        )

    def ppo_iteration(self, stats: object) -> None:
        for name in PPO_FIGURES:
            self.ppo.labels(name).set(float(getattr(stats, name)))
        self.ppo_iterations.inc()

    def gate_checked(self, nll_increase: float, failed_checks: list[str]) -> None:
        self.nll_increase.set(nll_increase)
        for check in failed_checks:
            self.gate_failures.labels(check).inc()

    def run_finished(self, outcome: str, seconds: float | None = None) -> None:
        self.runs.labels(outcome).inc()
        if seconds is not None:
            self.run_duration.observe(seconds)
        if outcome == "published":
            self.last_success.set(time.time())

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics; returns the bound port (pass 0 for any free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

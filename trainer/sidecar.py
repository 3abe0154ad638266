"""The sidecar: watch the feedback, and run a round when enough new examples arrived.

A round starts when at least N new usable examples arrived since the last round, or every T
minutes if at least M did. An example is a pair; for an algorithm that also learns from thumbs
and ratings (the reward model, PPO through it), each of those counts too, so a deployment whose
users only leave thumbs still trains; KTO counts its labelled thumbs and ratings alone. With
`--algo auto` each poll first picks the algorithm from the feedback at hand (`trainer/choose.py`)
and counts what that algorithm would train on; the log says which it picked and why.

The registry is the only state: "new" means an example with a feedback event that no published
version (accepted or rejected) trained on, and "last round" is the newest version's `created_at`,
so a restarted sidecar picks up exactly where the last one stopped.

While a version the sidecar published is on trial as a canary, no round starts: the next round
trains on top of whatever the live test decides (the canary promoted, or `current` kept).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tuneloop.server.registry import Registry

from .algos import ALGORITHMS
from .config import SidecarConfig, TrainerConfig
from .dataset import count_new_examples
from .metrics import TrainerMetrics
from .runner import FeedbackSource, RoundResult, data_digest, pick_algorithm, round_data, run_round, seen_event_ids

log = logging.getLogger(__name__)


def should_run(new: int, seconds_since_last: float, cfg: SidecarConfig, unit: str = "pairs") -> tuple[bool, str]:
    """The trigger rule, pure. `new`: new examples (`unit` names them in the reason).
    `seconds_since_last`: since the last round, or since the sidecar started when no round ever ran
    (so a fresh sidecar waits for N examples or T minutes, and does not train at once on the first
    handful of events)."""
    if new >= cfg.min_new_pairs:
        return True, f"{new} new {unit} >= min_new_pairs {cfg.min_new_pairs}"
    due = seconds_since_last >= cfg.interval_minutes * 60
    if due and new >= cfg.min_new_pairs_periodic:
        return True, f"interval reached with {new} new {unit} >= {cfg.min_new_pairs_periodic}"
    return False, f"{new} new {unit}; waiting"


@dataclass
class Sidecar:
    cfg: TrainerConfig
    source: FeedbackSource
    registry: Registry
    metrics: TrainerMetrics
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._started = self.clock()
        self._last_attempt: float | None = None
        self._skipped_digest: str | None = None
        self._waiting_on: tuple[str, float] | None = None

    @staticmethod
    def _target(cfg: TrainerConfig) -> str:
        """The registry name a round publishes to (the reward model's for --algo reward); --algo auto
        picks among policy algorithms, which all publish to the adapter's name."""
        return ALGORITHMS[cfg.algo].target_name(cfg)

    def _last_round_time(self, target: str) -> float | None:
        times = [float(v.manifest.get("created_at", 0.0)) for v in self.registry.versions(target)]
        if self._last_attempt is not None:
            times.append(self._last_attempt)
        return max(times) if times else None

    def tick(self) -> RoundResult | None:
        """Check once; run a round if the rule says so. Returns the round's result, if any."""
        canary = self.registry.canary(self.cfg.adapter)
        if canary is not None:
            if self._waiting_on != (canary.version, canary.started_at):
                self._waiting_on = (canary.version, canary.started_at)
                log.info(
                    "sidecar: %s %s is a canary at %.0f%% of default traffic; the next round waits for its "
                    "live verdict (promoted or rolled back)",
                    self.cfg.adapter,
                    canary.version,
                    canary.share * 100,
                )
            return None
        self._waiting_on = None
        completions, feedback = self.source.load()
        cfg, choice = pick_algorithm(self.cfg, completions, feedback)
        dataset, pointwise = round_data(cfg, completions, feedback)
        digest = f"{cfg.algo}:{data_digest(dataset.snapshot()['digest'], pointwise)}"
        if digest == self._skipped_digest:
            return None  # nothing changed since a round found this data unusable
        target = self._target(cfg)
        new, unit = count_new_examples(dataset, pointwise, seen_event_ids(self.registry, target))
        last = self._last_round_time(target)
        go, why = should_run(new, self.clock() - (self._started if last is None else last), self.cfg.sidecar, unit)
        if not go:
            log.debug("sidecar: %s", why)
            return None
        if choice is not None:
            log.info("sidecar: --algo auto picked %s: %s", cfg.algo, choice["reason"])
        log.info("sidecar: starting a %s round: %s", cfg.algo, why)
        self._last_attempt = self.clock()
        # The rows are loaded already: hand the round its data rather than have it read the store again.
        result = run_round(
            cfg, self.source, self.registry, metrics=self.metrics, dataset=dataset, pointwise=pointwise, choice=choice
        )
        self._skipped_digest = digest if result.outcome in ("skipped", "refused") else None
        return result

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set. A failing poll (store down) is logged and retried."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive a store outage
                log.exception("sidecar: poll failed; retrying in %.0f s", self.cfg.sidecar.poll_seconds)
            stop.wait(self.cfg.sidecar.poll_seconds)

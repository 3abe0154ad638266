"""One training round: build the dataset, train, gate, publish.

A round is identified by its run key: a hash of the base model, the parent (served) version, the
algorithm and its settings, and the data snapshot. The key goes into the manifest, so a round
restarted after a crash finds its own earlier publish and does not publish it twice; one that died
before publishing simply trains again (the same seed and data give the same adapter).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tuneloop.server.errors import FailedPrecondition, NotFound
from tuneloop.server.registry import DEFAULT_CHANNEL, POLICY, AdapterVersion, Registry, base_model_fingerprint

from .accounting import COUNTS
from .algos import ALGORITHMS, RoundInputs
from .algos.base import FeedbackSource
from .choose import choose_algorithm, feedback_counts
from .config import AUTO, TrainerConfig
from .dataset import PointwiseDataset, PreferenceDataset, build_dataset, build_pointwise
from .distributed import DataParallel
from .metrics import TrainerMetrics
from .rows import CompletionRow, FeedbackRow

log = logging.getLogger(__name__)


class BaseModelMismatch(FailedPrecondition):
    """The served adapter was trained on another base model than the one this trainer loads."""


def succeeded(outcome: str) -> bool:
    """A round ended as it should, whatever it decided; "failed" and "refused" did not."""
    return outcome not in ("failed", "refused")


@dataclass
class RoundResult:
    outcome: str  # one of metrics.OUTCOMES
    reason: str = ""
    algorithm: str = ""  # the algorithm the round ran (with --algo auto, the one picked)
    version: str | None = None
    parent_version: str | None = None
    train_pairs: int = 0
    heldout_pairs: int = 0
    # Thumbs and ratings, for algorithms that learn from them (uses_pointwise); None otherwise.
    train_judgements: int | None = None
    heldout_judgements: int | None = None
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    routed: str = ""  # where a published version's traffic comes from ("current", "canary at 10%")

    @property
    def succeeded(self) -> bool:
        """Whether `trainer once` exits 0: a gate's rejection or a skip is a round that worked."""
        return succeeded(self.outcome)

    def summary(self) -> str:
        """The one line a run logs."""
        parts = [f"outcome={self.outcome}"]
        if self.algorithm:
            parts.append(f"algo={self.algorithm}")
        if self.version:
            parts.append(f"version={self.version}")
        if self.routed:
            parts.append(f"serving={self.routed.replace(' ', '_')}")
        parts.append(f"parent={self.parent_version or 'base'}")
        parts.append(f"pairs={self.train_pairs}+{self.heldout_pairs}")
        if self.train_judgements is not None:
            parts.append(f"judgements={self.train_judgements}+{self.heldout_judgements}")
        for k in (
            "first_loss", "last_loss", "accuracy", "served_accuracy", "reward_auc", "kl", "kl_per_token", "distinct_2",
            "nll_increase_per_token",
        ):  # fmt: skip
            v = self.metrics.get(k)
            if isinstance(v, float):
                parts.append(f"{k}={v:.4f}")
        parts.append(f"seconds={self.seconds:.1f}")
        if self.reason:
            parts.append(f"reason={self.reason!r}")
        return "trainer round: " + " ".join(parts)


def served_version(registry: Registry, name: str) -> AdapterVersion | None:
    try:
        return registry.resolve(name)
    except NotFound:
        return None


def run_key(base_model: str, parent: str | None, cfg: TrainerConfig, data_digest: str) -> str:
    material = {
        "base_model": base_model,
        "parent": parent,
        "algo": cfg.algo,
        "hyperparameters": ALGORITHMS[cfg.algo].settings(cfg),
        "gate": asdict(cfg.gate),
        "data": data_digest,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def round_data(
    cfg: TrainerConfig, completions: Sequence[CompletionRow], feedback: Sequence[FeedbackRow]
) -> tuple[PreferenceDataset, PointwiseDataset | None]:
    """The round's pairs, and its thumbs and ratings when its algorithm learns from them
    (`uses_pointwise`), narrowed to what the algorithm trains on (`training_data`)."""
    algorithm = ALGORITHMS[cfg.algo]
    pairs = build_dataset(completions, feedback, cfg.data)
    pointwise = build_pointwise(completions, feedback, cfg.data) if algorithm.uses_pointwise else None
    return algorithm.training_data(cfg, pairs, pointwise)


def pick_algorithm(
    cfg: TrainerConfig, completions: Sequence[CompletionRow], feedback: Sequence[FeedbackRow]
) -> tuple[TrainerConfig, dict[str, Any] | None]:
    """With `--algo auto`, the config with the algorithm `choose_algorithm` picks for this feedback,
    and the choice as the manifest records it; any other `--algo` comes back as it is, with None."""
    if cfg.algo != AUTO:
        return cfg, None
    counts = feedback_counts(
        build_dataset(completions, feedback, cfg.data),
        build_pointwise(completions, feedback, cfg.data),
        cfg.kto.kto_ratings_as_labels,
    )
    algo, reason = choose_algorithm(counts, cfg.auto)
    return replace(cfg, algo=algo), {"rule": AUTO, "picked": algo, "reason": reason, "counts": asdict(counts)}


def data_digest(pairs_digest: str, pointwise: PointwiseDataset | None) -> str:
    """What a run trained on, for its key: the pairs, and the thumbs and ratings when it uses them."""
    if pointwise is None:
        return pairs_digest  # unchanged for pair-only algorithms: their run keys stay what they were
    split = {"train": sorted(e.event_id for e in pointwise.train),
             "heldout": sorted(e.event_id for e in pointwise.heldout)}  # fmt: skip
    return hashlib.sha256(json.dumps({"pairs": pairs_digest, "pointwise": split}, sort_keys=True).encode()).hexdigest()


def seen_event_ids(registry: Registry, name: str) -> set[str]:
    """Feedback events any earlier round (accepted or rejected) trained on: its pairs' events, and
    the thumbs and ratings of a round that learned from them."""
    seen: set[str] = set()
    for v in registry.versions(name):
        seen.update(v.manifest.get("data_snapshot", {}).get("event_ids", []))
        seen.update(v.manifest.get("pointwise_snapshot", {}).get("event_ids", []))
    return seen


def check_base_model(served: AdapterVersion | None, base_id: str) -> None:
    if served is not None and served.base_model != base_id:
        raise BaseModelMismatch(
            f"adapter {served.name} {served.version} (served) was trained on base model {served.base_model!r}, "
            f"but this trainer loads {base_id!r}; point --model-dir at the served base model"
        )


def _finish_interrupted(
    registry: Registry, cfg: TrainerConfig, name: str, key: str, parent: str | None
) -> RoundResult | None:
    """A version with this run key exists: the round already ran. If it was accepted but the crash
    came before it was routed (its canary started, or `current` moved), do that now; never publish
    it again, and never restart a canary that already had its verdict."""
    for v in registry.versions(name):
        if v.manifest.get("run_key") != key:
            continue
        reason = f"this data and config were already trained as {v.version} ({v.status})"
        if v.status == "accepted" and registry.channel(name) == parent:
            if publish_mode(cfg, v.kind) == "current":
                registry.set_channel(name, DEFAULT_CHANNEL, v.version)
                reason += "; moved 'current' to it, finishing an interrupted publish"
            elif registry.canary(name) is None and not any(
                e.get("version") == v.version for e in registry.canary_log(name)
            ):
                registry.start_canary(name, v.version, cfg.canary_share)
                reason += "; started its canary, finishing an interrupted publish"
        return RoundResult("duplicate", reason=reason, version=v.version, parent_version=parent)
    return None


def publish_mode(cfg: TrainerConfig, kind: str) -> str:
    """A reward model is never served, so it has no canary: it becomes `current` at once."""
    return cfg.publish if kind == POLICY else "current"


def route_published(registry: Registry, cfg: TrainerConfig, name: str, version: str, kind: str) -> str:
    """Send an accepted version its first traffic, the way `cfg.publish` says; returns how."""
    if publish_mode(cfg, kind) == "current":
        registry.set_channel(name, DEFAULT_CHANNEL, version)
        return "current"
    registry.start_canary(name, version, cfg.canary_share)
    return f"canary at {cfg.canary_share:.0%}"


def run_round(
    cfg: TrainerConfig,
    source: FeedbackSource,
    registry: Registry,
    *,
    metrics: TrainerMetrics | None = None,
    dataset: PreferenceDataset | None = None,
    pointwise: PointwiseDataset | None = None,
    choice: dict[str, Any] | None = None,
    parallel: DataParallel | None = None,
) -> RoundResult:
    """Build, train, gate and publish once. Never raises for a round that cannot or should not
    train (too little data, another base model): those come back as outcomes with a reason.

    `dataset` and `pointwise`, when given, are `round_data` of the source's rows (the sidecar has
    them already). With `--algo auto` the round picks its algorithm first (`pick_algorithm`), or
    the caller did and passes the resolved `cfg` with its `choice`; the manifest records it.

    `parallel`: this is rank 0 of a torchrun launch (`trainer/parallel_round.py`); the algorithm
    trains with the other ranks."""
    start = time.perf_counter()
    metrics = metrics or TrainerMetrics()
    counts: dict[str, int] = {}
    try:
        if cfg.algo == AUTO:
            completions, feedback = source.load()
            cfg, choice = pick_algorithm(cfg, completions, feedback)
            dataset, pointwise = round_data(cfg, completions, feedback)
            log.info("trainer round: --algo auto picked %s: %s", cfg.algo, (choice or {}).get("reason", ""))
        result = _run(cfg, source, registry, dataset, pointwise, metrics, counts, choice, parallel)
    except BaseModelMismatch as exc:
        result = RoundResult("refused", reason=str(exc))
    except FailedPrecondition as exc:  # cannot run as configured (e.g. PPO with no accepted reward
        # model): the summary line says why; a traceback would read like a bug
        result = RoundResult("failed", reason=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a round must not take the sidecar down; the reason is logged
        log.exception("trainer round failed")
        result = RoundResult("failed", reason=f"{type(exc).__name__}: {exc}")
    result.train_pairs = counts.get("train", result.train_pairs)
    result.heldout_pairs = counts.get("heldout", result.heldout_pairs)
    if "train_judgements" in counts:
        result.train_judgements, result.heldout_judgements = counts["train_judgements"], counts["heldout_judgements"]
    result.seconds = time.perf_counter() - start
    result.algorithm = cfg.algo
    trained = result.outcome in ("published", "rejected")
    metrics.run_finished(result.outcome, result.seconds if trained else None)
    log.info("%s", result.summary())
    return result


def _run(
    cfg: TrainerConfig,
    source: FeedbackSource,
    registry: Registry,
    dataset: PreferenceDataset | None,
    pointwise: PointwiseDataset | None,
    metrics: TrainerMetrics,
    counts: dict[str, int],
    choice: dict[str, Any] | None,
    parallel: DataParallel | None,
) -> RoundResult:
    algorithm = ALGORITHMS[cfg.algo]
    if dataset is None or (algorithm.uses_pointwise and pointwise is None):
        dataset, pointwise = round_data(cfg, *source.load())
    n_train, n_held = len(dataset.train), len(dataset.heldout)
    counts["train"], counts["heldout"] = n_train, n_held
    # A thumb or a rating is an example too for an algorithm that learns from them: a team whose
    # users leave only thumbs has no pairs, and the reward model still learns from what it has.
    ex_train, ex_held, unit = n_train, n_held, "pairs"
    if pointwise is not None:
        counts["train_judgements"], counts["heldout_judgements"] = len(pointwise.train), len(pointwise.heldout)
        ex_train, ex_held = n_train + len(pointwise.train), n_held + len(pointwise.heldout)
        unit = "pairs, thumbs and ratings"
    if ex_train < cfg.min_train_pairs or ex_held < cfg.min_heldout_pairs:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(dataset.dropped.items())) or "none"
        return RoundResult(
            "skipped",
            reason=f"too few usable {unit}: {ex_train} train (need {cfg.min_train_pairs}), {ex_held} held-out "
            f"(need {cfg.min_heldout_pairs}); dropped: {dropped}",
            train_pairs=n_train,
            heldout_pairs=n_held,
        )
    model_dir = cfg.resolved_model_dir()
    base_id = base_model_fingerprint(model_dir)
    name = algorithm.target_name(cfg)
    served = served_version(registry, name)
    check_base_model(served, base_id)
    parent = served.version if served else None
    snapshot = dataset.snapshot()
    key = run_key(base_id, parent, cfg, data_digest(snapshot["digest"], pointwise))
    done = _finish_interrupted(registry, cfg, name, key, parent)
    if done is not None:
        done.train_pairs, done.heldout_pairs = n_train, n_held
        return done

    tokens_before = COUNTS.copy()
    candidate = algorithm.train(
        RoundInputs(cfg, dataset, source, model_dir, served, registry, metrics, pointwise, parallel)
    )
    # Compute on equal terms across algorithms (a PPO round's include the reward round it ran).
    tokens = COUNTS.since(tokens_before)
    candidate.metrics.update(tokens_forward=tokens.forward, tokens_backward=tokens.backward)
    verdict = candidate.verdict
    metrics.examples.set(ex_train)
    manifest = {
        "kind": candidate.kind,
        "parent_version": parent,
        "base_model": base_id,
        "base_model_dir": str(model_dir),
        "algorithm": cfg.algo,
        **({} if choice is None else {"algorithm_choice": choice}),
        "hyperparameters": algorithm.settings(cfg),
        "data_snapshot": {**snapshot, "builder": asdict(cfg.data)},
        **(
            {}
            if pointwise is None
            else {
                "pointwise_snapshot": {
                    "event_ids": sorted(e.event_id for e in pointwise.examples),
                    "dropped": dict(pointwise.dropped),
                }
            }
        ),
        "metrics": candidate.metrics,
        "gate": {**verdict.to_dict(), "thresholds": asdict(cfg.gate)},
        "run_key": key,
        "publish": {"mode": cfg.publish, "canary_share": cfg.canary_share},
        **candidate.manifest,
    }
    work = Path(cfg.work_dir) if cfg.work_dir else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="candidate-", dir=work) as tmp:
        candidate.save(Path(tmp))
        published = registry.publish(name, Path(tmp), manifest, accepted=verdict.passed, channel=None)
    routed = route_published(registry, cfg, name, published.version, candidate.kind) if verdict.passed else ""
    return RoundResult(
        "published" if verdict.passed else "rejected",
        reason="; ".join(f"{c}: {f}" for c, f in zip(verdict.failed_checks, verdict.failures, strict=True)),
        version=published.version,
        parent_version=parent,
        train_pairs=n_train,
        heldout_pairs=n_held,
        metrics=candidate.metrics,
        routed=routed,
    )

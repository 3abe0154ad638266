"""`--algo auto`: which algorithm a round runs, picked from the feedback at hand. Pure functions.

The rule, in order:
  1. no usable feedback                                                  -> dpo (the default; the round skips)
  2. many ratings (auto_ppo_min_ratings) with varied values (auto_ppo_min_rating_values distinct)
     making most of the judgements (auto_ppo_min_rating_share)            -> ppo: graded feedback is what a
     reward model learns most from, and PPO then optimises it
  3. preference pairs make at least auto_min_pair_share of the pairs plus the labelled thumbs and
     ratings that are in no pair                                         -> dpo: the direct comparison
  4. otherwise (mostly unpaired thumbs and ratings)                      -> kto: it needs no second reply
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import AutoConfig
from .dataset import PointwiseDataset, PreferenceDataset, kto_label
from .rows import CORRECTION, PAIRWISE, RATING, THUMBS


@dataclass(frozen=True)
class FeedbackCounts:
    """What a round has to train on, as the rule reads it."""

    pairs: int  # usable preference pairs, every source (choices, corrections, rating gaps, thumbs up vs down)
    unpaired: int  # thumbs and ratings KTO can label, on replies that are in no pair
    choices: int  # pairs from pairwise choices and corrections
    thumbs: int  # usable thumbs
    ratings: int  # usable ratings
    rating_values: int  # distinct values among the ratings

    @property
    def judgements(self) -> int:
        """Thumbs, ratings, pairwise choices and corrections: the feedback events behind the data."""
        return self.thumbs + self.ratings + self.choices


def feedback_counts(
    pairs: PreferenceDataset, pointwise: PointwiseDataset, ratings_as_labels: bool = True
) -> FeedbackCounts:
    """Count a round's pairs and judgements (train and held-out alike)."""
    paired = {c for p in pairs.pairs for c in (p.chosen_completion_id, p.rejected_completion_id) if c}
    examples = pointwise.examples
    ratings = [e.value for e in examples if e.kind == RATING]
    return FeedbackCounts(
        pairs=len(pairs.pairs),
        unpaired=sum(
            1 for e in examples if e.completion_id not in paired and kto_label(e, ratings_as_labels) is not None
        ),
        choices=sum(1 for p in pairs.pairs if p.source in (PAIRWISE, CORRECTION)),
        thumbs=sum(1 for e in examples if e.kind == THUMBS),
        ratings=len(ratings),
        rating_values=len(set(ratings)),
    )


def choose_algorithm(counts: FeedbackCounts, cfg: AutoConfig | None = None) -> tuple[str, str]:
    """The algorithm for a round with this feedback, and why (for the log and the manifest)."""
    cfg = cfg or AutoConfig()
    if counts.pairs + counts.judgements == 0:
        return "dpo", "no usable feedback yet"
    rating_share = counts.ratings / counts.judgements if counts.judgements else 0.0
    if (
        counts.ratings >= cfg.auto_ppo_min_ratings
        and counts.rating_values >= cfg.auto_ppo_min_rating_values
        and rating_share >= cfg.auto_ppo_min_rating_share
    ):
        return "ppo", (
            f"{counts.ratings} ratings with {counts.rating_values} distinct values, {rating_share:.0%} of the "
            f"judgements (>= {cfg.auto_ppo_min_ratings}, {cfg.auto_ppo_min_rating_values} and "
            f"{cfg.auto_ppo_min_rating_share:.0%}): a reward model, then PPO"
        )
    usable = counts.pairs + counts.unpaired
    if usable == 0:
        return "dpo", "no pairs, and no thumbs or ratings KTO could label"
    pair_share = counts.pairs / usable
    mix = f"{counts.pairs} pairs and {counts.unpaired} unpaired thumbs and ratings"
    if pair_share >= cfg.auto_min_pair_share:
        return "dpo", f"{mix}: pairs are {pair_share:.0%} (>= auto_min_pair_share {cfg.auto_min_pair_share:.0%})"
    return "kto", f"{mix}: pairs are {pair_share:.0%} (< auto_min_pair_share {cfg.auto_min_pair_share:.0%})"

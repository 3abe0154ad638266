"""Small real-model fixtures for the trainer tests: a toy preference task the base model can learn
in a few steps (friendly answers over curt ones), as rows the dataset builder reads."""

from __future__ import annotations

from tuneloop.server.domain import prompt_sha256
from tuneloop.trainer.config import DatasetConfig, DPOConfig, GateConfig, TrainerConfig
from tuneloop.trainer.rows import PAIRWISE, CompletionRow, FeedbackRow, PreferencePair

QUESTIONS = [
    "How do I boil an egg?", "What is the capital of France?", "Tell me about cats.", "How can I learn Python?",
    "What causes rain?", "Any tip for better sleep?", "Why is the sky blue?", "Recommend a book.",
    "How do plants grow?", "What is jazz?", "How do I make tea?", "What is a comet?",
]  # fmt: skip
GOOD = "I'd be glad to help! Here is a friendly answer."
BAD = "No. Figure it out yourself."


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def toy_pairs(n: int, *, flip: bool = False, offset: int = 0) -> list[PreferencePair]:
    out = []
    for q in QUESTIONS[offset : offset + n]:
        p = chat_prompt(q)
        chosen, rejected = (BAD, GOOD) if flip else (GOOD, BAD)
        out.append(PreferencePair(p, prompt_sha256(p), chosen, rejected, PAIRWISE, (q,), ("r",), "", ""))
    return out


def toy_rows(
    questions: list[str], *, tag: str = "", rater_prefix: str = "r"
) -> tuple[list[CompletionRow], list[FeedbackRow]]:
    comps, feedback = [], []
    for i, q in enumerate(questions):
        good = CompletionRow(f"{tag}g{i}", chat_prompt(q), GOOD)
        bad = CompletionRow(f"{tag}b{i}", chat_prompt(q), BAD)
        comps += [good, bad]
        feedback.append(
            FeedbackRow(
                f"{tag}e{i}", PAIRWISE, f"{rater_prefix}{i % 3}", good.completion_id,
                other_completion_id=bad.completion_id, choice=good.completion_id, created_at=float(i),
            )
        )  # fmt: skip
    return comps, feedback


class ListSource:
    """A FeedbackSource over rows held in memory (the store's adapter is tested separately)."""

    def __init__(self, completions: list[CompletionRow], feedback: list[FeedbackRow]) -> None:
        self.completions, self.feedback = completions, feedback

    def load(self) -> tuple[list[CompletionRow], list[FeedbackRow]]:
        return list(self.completions), list(self.feedback)


def tiny_dpo(**kw: object) -> DPOConfig:
    base: dict[str, object] = dict(
        batch_size=4, epochs=1, learning_rate=2e-3, max_completion_tokens=24, max_prompt_tokens=48, seed=3
    )
    base.update(kw)
    return DPOConfig(**base)  # type: ignore[arg-type]


def tiny_config(registry_dir: str, model_dir: str, **kw: object) -> TrainerConfig:
    base: dict[str, object] = dict(
        adapter="toy", model_dir=model_dir, registry_dir=registry_dir, min_train_pairs=4, min_heldout_pairs=2,
        progress=False, data=DatasetConfig(heldout_fraction=0.34), dpo=tiny_dpo(), publish="current",
        # publish="current": these tests are about rounds; the default canary publish has its own.
        # The toy task moves the adapter far on purpose (a few steps at lr 2e-3): loose KL and NLL
        # bounds let these tests exercise publishing; tests/test_trainer_gate.py tests the bounds.
        gate=GateConfig(
            eval_prompts=2, samples_per_prompt=2, sample_max_tokens=8, max_kl_per_token=5.0, min_diversity_ratio=0.3,
            max_nll_increase_per_token=5.0,
        ),
    )  # fmt: skip
    base.update(kw)
    return TrainerConfig(**base)  # type: ignore[arg-type]

"""Where one PPO iteration's time goes, on the real model.

Rolls out `--prompts` x `--samples` replies of `--new-tokens` tokens from a LoRA policy, scores
them with a reward model, runs the reference and value passes and the PPO updates (the loop of
`tuneloop trainer --algo ppo`, `trainer/ppo.py`), and prints each part's seconds and tokens per
second for the iterations after a warm-up one. Reward model and critic are fresh (untrained):
their scores do not change the work.

    .venv/bin/python bench/ppo_step.py [--iterations 3] [--prompts 16] [--samples 2] [--new-tokens 48]

The last line is `ppo_iteration_seconds: X`.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import torch

from tuneloop.server.model_cache import ensure_default_model
from tuneloop.trainer.config import ComputeConfig, DPOConfig, PPOConfig, RewardConfig
from tuneloop.trainer.model import build_policy, load_base_model, load_tokenizer, prepare_compute
from tuneloop.trainer.ppo import RewardScorer, train_ppo
from tuneloop.trainer.reward_model import build_reward_model, reward_scores

PROMPTS = Path(__file__).resolve().parent / "data" / "closed_loop_prompts.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3, help="measured iterations (after one warm-up)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    model_dir = ensure_default_model()
    compute = ComputeConfig(dtype=args.dtype)
    device, dtype = prepare_compute(compute)
    tok = load_tokenizer(model_dir)
    texts = [t for t in PROMPTS.read_text().splitlines() if t and not t.startswith("#")]
    # Rendered as the server renders chat input, then tokenized (apply_chat_template's own
    # tokenize=True returns an encoding mapping in current transformers, not a list of ids).
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    prompts = [tuple(tok(r, add_special_tokens=False)["input_ids"]) for r in rendered]
    policy = build_policy(load_base_model(model_dir, device, dtype), DPOConfig())
    rc = RewardConfig()
    reward_model = build_reward_model(model_dir, rc, compute, device, dtype, tok.pad_token_id).eval()
    critic = build_reward_model(model_dir, rc, compute, device, dtype, tok.pad_token_id)
    scorer = RewardScorer(
        lambda seqs: reward_scores(reward_model, seqs, pad_id=tok.pad_token_id, device=device, dtype=dtype), 0.0, 1.0
    )
    cfg = PPOConfig(
        ppo_iterations=args.iterations + 1, ppo_prompts_per_iteration=args.prompts,
        ppo_samples_per_prompt=args.samples, ppo_max_new_tokens=args.new_tokens, ppo_kl_ceiling=1e9,
        ppo_max_minutes=1e6,
    )  # fmt: skip
    result = train_ppo(policy, critic, scorer, tok, prompts, cfg, reference="base", device=device, dtype=dtype)
    its = result.iterations[1:]
    replies = args.prompts * args.samples
    tokens = statistics.fmean(s.reply_tokens for s in its) * replies
    parts = {
        "rollout (generate)": statistics.fmean(s.rollout_seconds for s in its),
        "reward-model scoring": statistics.fmean(s.score_seconds for s in its),
        "old-policy, reference and value passes": statistics.fmean(s.reference_seconds for s in its),
        "PPO updates (policy + critic)": statistics.fmean(s.update_seconds for s in its),
    }
    total = sum(parts.values())
    print(
        f"dtype={str(dtype).removeprefix('torch.')} threads={torch.get_num_threads()} replies={replies} "
        f"reply tokens/iteration={tokens:.0f} epochs={cfg.ppo_epochs} minibatch={cfg.ppo_minibatch_size}"
    )
    for name, sec in parts.items():
        print(f"{name:42s} {sec:7.2f} s  {sec / total:5.1%}  {tokens / sec:8.0f} reply tokens/s")
    print(f"ppo_iteration_seconds: {total:.2f}")


if __name__ == "__main__":
    main()

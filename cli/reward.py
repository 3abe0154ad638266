"""`tuneloop reward score`: what a published reward model thinks of some replies, so a person
can see what it learned."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

from tuneloop.server.errors import FailedPrecondition, InvalidArgument
from tuneloop.server.registry import REWARD, base_model_fingerprint, open_registry

from .adapters import REGISTRY_URL_HELP, registry_location


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "reward", help="score replies with a published reward model",
        description="Use a published reward model (trained with `--algo reward`).",
    )  # fmt: skip
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    score = actions.add_parser(
        "score",
        help="Score replies to a prompt: the raw reward, its z-score on the training data's scale, the "
        "chance of a thumbs up, and the most likely rating.",
    )
    score.add_argument("--prompt", required=True, help="The user's message (the chat template is applied).")
    score.add_argument(
        "--completion", action="append", required=True, help="A reply to score (repeat to compare several)."
    )
    score.add_argument("--adapter", default="default", help="Policy adapter whose reward model to use.")
    score.add_argument("--version", default="", help="Reward model version (default: its current one).")
    score.add_argument("--registry-dir", default="", help="Registry directory (default $TUNELOOP_HOME/adapters).")
    score.add_argument("--registry-url", default="", help=REGISTRY_URL_HELP[0].upper() + REGISTRY_URL_HELP[1:] + ".")
    score.add_argument("--model-dir", default="", help="Base model directory (default: the built-in SmolLM2).")
    score.add_argument("--json", action="store_true", help="One JSON object per reply.")
    score.set_defaults(run=score_replies)


def score_replies(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from tuneloop.trainer.algos.reward import reward_name  # noqa: PLC0415 - torch-heavy imports after parsing
    from tuneloop.trainer.config import ComputeConfig, TrainerConfig  # noqa: PLC0415
    from tuneloop.trainer.dpo import encode_completion  # noqa: PLC0415
    from tuneloop.trainer.model import load_tokenizer, prepare_compute  # noqa: PLC0415
    from tuneloop.trainer.reward_model import load_reward_model, reward_scores  # noqa: PLC0415

    if not args.prompt.strip() or not all(c.strip() for c in args.completion):
        raise InvalidArgument("--prompt and every --completion must be non-empty")
    registry = open_registry(registry_location(args), args.registry_dir)
    version = registry.resolve(reward_name(args.adapter), args.version)
    if version.kind != REWARD:
        raise InvalidArgument(f"{version.name}@{version.version} is a {version.kind} adapter, not a reward model")
    model_dir = TrainerConfig(model_dir=args.model_dir).resolved_model_dir()
    base_id = base_model_fingerprint(model_dir)
    if version.base_model != base_id:
        raise FailedPrecondition(
            f"{version.name}@{version.version} was trained on {version.base_model!r}, not {base_id!r}; pass --model-dir"
        )
    compute = ComputeConfig()
    device, dtype = prepare_compute(compute)
    tok = load_tokenizer(model_dir)
    model = load_reward_model(model_dir, version.path, compute, device, dtype, tok.pad_token_id)
    hp = version.manifest.get("hyperparameters", {})
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
    )
    max_p = int(hp.get("reward_max_prompt_tokens", 256))
    prompt = tuple(tok(prompt_text, add_special_tokens=False)["input_ids"][-max_p:])
    max_c = int(hp.get("reward_max_completion_tokens", 256))
    seqs = [(prompt, encode_completion(tok, c, max_c)) for c in args.completion]
    rewards = reward_scores(model, seqs, pad_id=tok.pad_token_id, device=device, dtype=dtype).tolist()
    scale = version.manifest.get("reward_scale", {})
    mean, std = float(scale.get("mean", 0.0)), float(scale.get("std", 1.0)) or 1.0
    anchor = float(scale.get("thumbs_anchor", 0.0))
    thresholds = [float(t) for t in scale.get("rating_thresholds", [])]
    rows = []
    for text, r in zip(args.completion, rewards, strict=True):
        cum = [1 / (1 + math.exp(-(t - r))) for t in thresholds] + [1.0]
        probs = [cum[0]] + [cum[k] - cum[k - 1] for k in range(1, len(cum))]
        rows.append({
            "completion": text, "reward": r, "z": (r - mean) / std, "p_thumbs_up": 1 / (1 + math.exp(-(r - anchor))),
            "likely_rating": 1 + max(range(len(probs)), key=probs.__getitem__) if thresholds else None,
        })  # fmt: skip
    print(f"reward model {version.name}@{version.version}", file=sys.stderr)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"reward {row['reward']:+.3f}  z {row['z']:+.2f}  P(thumbs up) {row['p_thumbs_up']:.2f}  "
                f"likely rating {row['likely_rating'] or '-'}  {row['completion'][:60]!r}"
            )
    return 0

"""Time one DPO optimizer step: our trainer against TRL's DPOTrainer, on the same batch.

The batch is fixed: 8 pairs whose prompt + completion is 256 tokens each (64 + 192), made from a
seeded word list and the chat template, so every run sees the same tokens. Both trainers get the
same base model and the same LoRA config, and both start from the same seeded adapter, so their
first-step losses agree (log 2 when the adapter starts at zero, as LoRA does).

The two trainers' steps alternate (one of TRL's, then one of ours), so load from other processes
on a shared machine falls on both alike. What is compared is each trainer's own recipe for a run:
ours computes the reference log-probs once per run (timed and printed separately, not per step)
and runs in bf16 where the CPU has bf16 math; TRL runs with its defaults on this device
(`--trl-dtype` picks its precision).

    python bench/dpo_step.py [--steps 3] [--warmup 1] [--dtype auto|float32|bfloat16] [--trl-dtype ...]

The last line is `dpo_speedup_vs_trl: X` = TRL seconds per step / ours.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from tuneloop.server.domain import prompt_sha256  # noqa: E402
from tuneloop.server.model_cache import ensure_default_model  # noqa: E402
from tuneloop.trainer.config import ComputeConfig  # noqa: E402
from tuneloop.trainer.config import DPOConfig as OurDPOConfig  # noqa: E402
from tuneloop.trainer.dpo import collate_pairs, dpo_step, score_pairs, tokenize_pair  # noqa: E402
from tuneloop.trainer.model import (  # noqa: E402
    build_policy,
    load_base_model,
    load_tokenizer,
    lora_config,
    resolve_device,
    resolve_dtype,
)
from tuneloop.trainer.rows import PreferencePair  # noqa: E402

PAIRS, PROMPT_TOKENS, COMPLETION_TOKENS = 8, 64, 192
WORDS = (
    "the a model answer question river light garden quickly slowly bright calm storm paper window "
    "friend music travel simple careful kind honest clear patient help explain because therefore "
    "morning evening city mountain ocean story idea reason example detail"
).split()


def _text_of_tokens(tokenizer: object, rng: random.Random, n_tokens: int) -> str:
    """Random words cut to exactly `n_tokens` tokens (decode of the cut ids)."""
    words = " ".join(rng.choice(WORDS) for _ in range(n_tokens * 2))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:n_tokens]  # type: ignore[operator]
    return tokenizer.decode(ids)  # type: ignore[attr-defined]


def fixed_pairs(tokenizer: object) -> list[PreferencePair]:
    rng = random.Random(1234)

    def templated(user: str) -> str:
        return tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )

    # The chat template (with its default system prompt) costs some tokens; the user text gets the rest.
    overhead = len(tokenizer(templated(""), add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    pairs = []
    for i in range(PAIRS):
        prompt = templated(_text_of_tokens(tokenizer, rng, PROMPT_TOKENS - overhead))
        # One token of each completion is its EOS.
        chosen = _text_of_tokens(tokenizer, rng, COMPLETION_TOKENS - 1)
        rejected = _text_of_tokens(tokenizer, rng, COMPLETION_TOKENS - 1)
        ph = prompt_sha256(prompt)
        pairs.append(PreferencePair(prompt, ph, chosen, rejected, "bench", (f"e{i}",), ("r",), "", ""))
    return pairs


class OurTrainer:
    """Our trainer set up on the batch; `step()` runs and times one optimizer step."""

    def __init__(
        self, model_dir: Path, pairs: list[PreferencePair], cfg: OurDPOConfig, compute: ComputeConfig
    ) -> None:
        device = resolve_device(compute.device)
        self.cfg, self.dtype = cfg, resolve_dtype(compute.dtype, device)
        tok = load_tokenizer(model_dir)
        self.model = build_policy(load_base_model(model_dir, device, self.dtype, compute.attn_implementation), cfg)
        items = [tokenize_pair(tok, p, cfg.max_prompt_tokens, cfg.max_completion_tokens) for p in pairs]
        t0 = time.perf_counter()
        kw = {"pad_id": tok.pad_token_id, "device": device, "dtype": self.dtype}
        self.ref_c, self.ref_r = score_pairs(self.model, items, mode="base", **kw)
        self.ref_seconds = time.perf_counter() - t0  # once per run, not per step
        self.batch = collate_pairs(items, tok.pad_token_id).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        self.model.train()
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self) -> None:
        t0 = time.perf_counter()
        log = dpo_step(self.model, self.optimizer, [(self.batch, self.ref_c, self.ref_r)], self.cfg, self.dtype)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(log.loss)


def run_trl_interleaved(
    model_dir: Path, pairs: list[PreferencePair], cfg: OurDPOConfig, steps: int, dtype: str, ours: OurTrainer
) -> dict:
    """TRL's DPOTrainer for `steps` steps; after each of its steps, one of ours runs (untimed for
    TRL), so both trainers see the same background load on a shared machine."""
    from datasets import Dataset  # noqa: PLC0415 - TRL and datasets are bench/test-only dependencies
    from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: PLC0415
    from trl import DPOConfig, DPOTrainer  # noqa: PLC0415

    class Interleave(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, *a: object, **k: object) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, *a: object, **k: object) -> None:
            self.times.append(time.perf_counter() - self._t)
            ours.step()

    tok = load_tokenizer(model_dir)
    bf16 = dtype == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if bf16 else torch.float32)
    data = Dataset.from_list(
        [{"prompt": p.prompt_text, "chosen": p.chosen_text, "rejected": p.rejected_text} for p in pairs]
    )
    timer = Interleave()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, use_cpu=True, bf16=bf16, per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=cfg.learning_rate, beta=cfg.beta, max_length=None,
            logging_steps=1, report_to=[], save_strategy="no", seed=cfg.seed, dataloader_num_workers=0,
            max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=lora_config(cfg),
            callbacks=[timer],
        )
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "dtype": dtype,
        "losses": [h["loss"] for h in logged],
        "times": timer.times,
        "tokens": int(logged[0].get("num_tokens", 0)) if logged else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="Timed optimizer steps per trainer.")
    ap.add_argument("--warmup", type=int, default=1, help="Untimed first steps per trainer.")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="Our precision.")
    ap.add_argument("--trl-dtype", choices=("float32", "bfloat16"), default="float32", help="TRL's precision.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model()
    cfg = OurDPOConfig(
        batch_size=PAIRS,
        max_prompt_tokens=4 * PROMPT_TOKENS,
        max_completion_tokens=4 * COMPLETION_TOKENS,
    )
    pairs = fixed_pairs(load_tokenizer(model_dir))
    ours = OurTrainer(model_dir, pairs, cfg, ComputeConfig(dtype=args.dtype))
    trl = run_trl_interleaved(model_dir, pairs, cfg, args.warmup + args.steps, args.trl_dtype, ours)
    ours_s = statistics.median(ours.times[args.warmup :])
    trl_s = statistics.median(trl["times"][args.warmup :])
    print(
        f"ours: dtype={str(ours.dtype).removeprefix('torch.')} tokens/batch={int(ours.batch.attention_mask.sum())} "
        f"reference pass (once per run)={ours.ref_seconds:.2f}s step={ours_s:.2f}s "
        f"steps={[round(t, 2) for t in ours.times]} losses={[round(x, 4) for x in ours.losses]}"
    )
    print(
        f"trl:  dtype={trl['dtype']} tokens/batch={trl['tokens']} step={trl_s:.2f}s "
        f"steps={[round(t, 2) for t in trl['times']]} losses={[round(x, 4) for x in trl['losses']]}"
    )
    print(f"threads={args.threads} pairs={PAIRS} tokens/sequence={PROMPT_TOKENS + COMPLETION_TOKENS} (steps alternate)")
    print(f"dpo_speedup_vs_trl: {trl_s / ours_s:.2f}")


if __name__ == "__main__":
    main()

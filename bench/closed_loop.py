"""The whole loop, end to end: does tuneloop make the model better on a preference nobody tuned for?

The server and the trainer sidecar run as separate processes. Simulated users, through the
public gRPC API only, draw prompts from bench/data/closed_loop_prompts.txt (everyday frustrations
and mixed topics), ask for n=2 candidates, and choose the one their preference scores higher:
`--preference sentiment` (the default) is VADER compound sentiment; `--preference emoji` rewards a
surface property (emoji and other symbols in the reply), the kind a policy can satisfy by no
longer answering. The sidecar trains a DPO adapter whenever enough new pairs arrived; its
evaluation gate decides whether it is published; it publishes straight to `current`
(`--publish current`: these users choose between two answers of one version, which is no evidence
for a canary's live test), the server hot-swaps it in and the users' next requests are served by it.

Then, on the 64 held-out prompts (topics never used for feedback), completions served by each
accepted version (rejected ones too, pinned, so what the gate stopped can be read) are compared
with the base model's: the mean preference score, distinct-2 relative to the base, a KL estimate
(the served log-probabilities of each sampled completion minus the base model's log-probabilities
of the same tokens, computed with transformers here), and coherence: the base model's per-token
NLL of each version's samples (the base's own samples set the baseline), beside a few samples.

    .venv/bin/python bench/closed_loop.py [--preference sentiment|emoji] [--choices 512]

Writes bench/out/closed_loop[-emoji]/{report.md,reward.png,samples.json}; the last lines are
`nll_increase_per_token: X` (the last accepted version's per-token NLL under the base minus the
base's own) and `closed_loop_reward_gain: X` (its mean score minus the base's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from procs import start, stop, wait_port, wait_serving
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.gate import distinct_n
from tuneloop.v1 import admin_pb2 as apb
from tuneloop.v1 import admin_pb2_grpc as apb_grpc
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "data" / "closed_loop_prompts.txt"
ADAPTER = "default"
NEW_TOKENS = 64
CONCURRENCY = 16
vader = SentimentIntensityAnalyzer()


def load_prompts() -> tuple[list[str], list[str]]:
    train, held, target = [], [], None
    for line in PROMPTS.read_text().splitlines():
        if line.startswith("## held-out"):
            target = held
        elif line and not line.startswith("#"):
            (held if target is held else train).append(line)
    return train, held


def compound(text: str) -> float:
    return vader.polarity_scores(text)["compound"]


def emoji_count(text: str) -> float:
    """Emoji and other symbols: the surface property a policy can maximise by not answering."""
    return float(sum(1 for ch in text if unicodedata.category(ch)[0] == "S"))


PREFERENCES: dict[str, Callable[[str], float]] = {"sentiment": compound, "emoji": emoji_count}
SCORE_NAMES = {"sentiment": "VADER compound", "emoji": "emoji and symbols per reply"}
score = compound  # set from --preference in main()


def chat(prompt: str) -> pb.ChatInput:
    return pb.ChatInput(messages=[pb.ChatMessage(role="user", content=prompt)])


# --------------------------------------------------------------------------- users
@dataclass
class Choice:
    version: str
    chosen: float
    rejected: float


def user_turn(
    gen: pb_grpc.GenerationServiceStub, fb: fpb_grpc.FeedbackServiceStub, prompt: str, seed: int, user: str
) -> Choice:
    r = gen.Generate(
        pb.GenerateRequest(
            chat=chat(prompt),
            sampling=pb.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, n=2, seed=seed),
            caller=pb.CallerMetadata(user_id=user),
        ),
        timeout=600,
    )
    a, b = r.completions
    sa, sb = score(a.text), score(b.text)
    choice = (
        fpb.PAIRWISE_CHOICE_TIE if sa == sb else fpb.PAIRWISE_CHOICE_FIRST if sa > sb else fpb.PAIRWISE_CHOICE_SECOND
    )
    fb.SubmitFeedback(
        fpb.FeedbackEvent(rater_id=user, pairwise=fpb.PairwiseFeedback(group_id=r.group_id, choice=choice)), timeout=60
    )
    return Choice(a.adapter.version, max(sa, sb), min(sa, sb))


# --------------------------------------------------------------------------- evaluation
@dataclass
class Eval:
    version: str
    mean_score: float
    distinct2: float
    kl: float
    kl_per_token: float
    nll_per_token: float  # under the base model
    texts: list[str]


def sample_heldout(
    gen: pb_grpc.GenerationServiceStub, prompts: list[str], version: str, samples: int, name: str = ADAPTER
) -> list[pb.Completion]:
    """`samples` seeded completions per prompt from `name@version` pinned (or the bare base model)."""
    adapter = pb.AdapterSelector(name="base") if version == "base" else pb.AdapterSelector(name=name, version=version)

    def one(i: int) -> list[pb.Completion]:
        r = gen.Generate(
            pb.GenerateRequest(
                chat=chat(prompts[i]),
                adapter=adapter,
                sampling=pb.SamplingParams(
                    max_tokens=NEW_TOKENS, temperature=1.0, n=samples, seed=7_000 + i, logprobs=True
                ),
            ),
            timeout=600,
        )
        return list(r.completions)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return [c for cs in pool.map(one, range(len(prompts))) for c in cs]


class BaseScorer:
    """Log-probabilities of given completions under the base model (transformers, CPU)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprob(self, prompt: str, token_ids: list[int]) -> float:
        torch = self.torch
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = self.tok.encode(text, add_special_tokens=False)
        ids = torch.tensor([prompt_ids + token_ids])
        with torch.no_grad():
            logits = self.model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(token_ids)[:, None])
        return float(lp.sum())


def evaluate(version: str, comps: list[pb.Completion], prompts: list[str], samples: int, scorer: BaseScorer) -> Eval:
    texts = [c.text for c in comps]
    kls, base_lp, tokens = [], 0.0, 0
    for i, c in enumerate(comps):
        ids = [lp.token_id for lp in c.logprobs]
        if ids:
            served = sum(lp.logprob for lp in c.logprobs)
            lp = scorer.logprob(prompts[i // samples], ids)
            kls.append(served - lp)
            base_lp += lp
            tokens += len(ids)
    return Eval(
        version,
        statistics.fmean(score(t) for t in texts),
        distinct_n([t.split() for t in texts], 2),
        statistics.fmean(kls),
        sum(kls) / tokens,
        -base_lp / tokens,
        texts,
    )


# The PPO round's budget for the 30 minutes the whole loop has on 2 cores (users ~4 min, reward
# model ~10, evaluation ~3): 8 minutes of PPO, at a learning rate that moves the policy within
# them (at the default 2e-4, 5 iterations moved it 0.03 nats/token). `--trainer-arg` overrides.
PPO_ARGS = ["--ppo-max-minutes", "8", "--ppo-learning-rate", "5e-4"]


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preference", choices=sorted(PREFERENCES), default="sentiment", help="what the users prefer")
    ap.add_argument("--algo", choices=("dpo", "ppo"), default="dpo", help="DPO, or a reward model then PPO")
    ap.add_argument("--choices", type=int, default=512, help="pairwise choices the users make (at most 512)")
    ap.add_argument(
        "--round-pairs",
        type=int,
        default=512,
        help="choices per training round (the trainer starts at 90%% of them as usable pairs: ties are not pairs)",
    )
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2, help="held-out samples per prompt and version")
    ap.add_argument("--out", type=Path, default=None, help="report directory (default bench/out/closed_loop[-PREF])")
    ap.add_argument("--trainer-arg", action="append", default=[], help="extra flag for `tuneloop trainer run`")
    args = ap.parse_args()
    global score
    score = PREFERENCES[args.preference]
    if args.out is None:
        suffix = ("" if args.preference == "sentiment" else f"-{args.preference}") + (
            "" if args.algo == "dpo" else f"-{args.algo}"
        )
        args.out = HERE / "out" / f"closed_loop{suffix}"
    t_start = time.time()

    from tuneloop.server.model_cache import ensure_default_model

    model_dir = ensure_default_model()
    home = Path(tempfile.mkdtemp(prefix="tuneloop-loop-"))
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNELOOP_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "2"}
    store_url = f"sqlite:///{home}/tuneloop.db"
    server_log, trainer_log = args.out / "server.log", args.out / "trainer.log"
    server = start([sys.executable, "-m", "tuneloop.server.main", "--port", "0", "--metrics-port", "-1",
                    "--model", str(model_dir), "--max-model-len", "1024", "--max-tokens-limit", "512",
                    "--store-url", store_url], server_log, env)  # fmt: skip
    trainer = None
    try:
        port = wait_port(server_log, server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel)
        gen, fb, admin = (
            pb_grpc.GenerationServiceStub(channel),
            fpb_grpc.FeedbackServiceStub(channel),
            apb_grpc.AdminServiceStub(channel),
        )
        print(f"server ready in {time.time() - t_start:.0f} s", flush=True)
        # One round (the default): the sidecar starts once every choice is in and trains on all the
        # usable pairs, however many ties the preference made. More rounds: each starts on the pair
        # count alone, so each sees about --round-pairs choices.
        one_round = args.choices <= args.round_pairs
        min_pairs = 1 if one_round else int(args.round_pairs * 0.9)
        trainer_cmd = [sys.executable, "-m", "tuneloop.cli", "trainer", "run", "--store-url", store_url,
                       "--model-dir", str(model_dir), "--min-new-pairs", str(min_pairs),
                       "--min-new-pairs-periodic", str(min_pairs), "--poll-seconds", "5", "--metrics-port", "0",
                       "--no-progress", "--interval-minutes", "1000", "--epochs", str(args.epochs),
                       "--batch-size", str(args.batch_size), "--max-completion-tokens", str(NEW_TOKENS),
                       "--publish", "current", "--algo", args.algo,
                       *(PPO_ARGS if args.algo == "ppo" else []), *args.trainer_arg]  # fmt: skip
        if not one_round:
            trainer = start(trainer_cmd, trainer_log, env)

        train_prompts, held = load_prompts()
        rng = random.Random(0)
        choices: list[Choice] = []
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            jobs = [(rng.choice(train_prompts), i, f"user-{i % 97}") for i in range(args.choices)]
            for c in pool.map(lambda j: user_turn(gen, fb, *j), jobs):
                choices.append(c)
                if len(choices) % 64 == 0:
                    served = sorted({x.version for x in choices[-64:]})
                    print(
                        f"{len(choices)} choices ({time.time() - t_start:.0f} s), last 64 served by {served}",
                        flush=True,
                    )

        if one_round:
            trainer = start(trainer_cmd, trainer_log, env)
        # Wait for the trainer to finish the rounds those choices started and the server to serve them.
        expected_rounds = max(1, args.choices // args.round_pairs)
        # A PPO round trains a reward model first, then runs PPO for up to --ppo-max-minutes.
        deadline = time.time() + (20 if args.algo == "dpo" else 60) * 60
        while time.time() < deadline:
            state = admin.ListAdapters(apb.ListAdaptersRequest()).adapters
            versions = state[0].versions if state else []
            if len(versions) >= expected_rounds and (
                not versions or state[0].current_version == _last_accepted(versions)
            ):
                break
            if trainer is None or trainer.poll() is not None:
                raise RuntimeError(f"trainer exited; see {trainer_log}")
            time.sleep(5)
        stop(trainer)
        trainer = None
        state = admin.ListAdapters(apb.ListAdaptersRequest()).adapters
        versions = list(state[0].versions) if state else []
        print(
            f"rounds done ({time.time() - t_start:.0f} s): " + ", ".join(f"{v.version} {v.status}" for v in versions),
            flush=True,
        )

        scorer = BaseScorer(model_dir)
        evals = [evaluate("base", sample_heldout(gen, held, "base", args.samples), held, args.samples, scorer)]
        for v in versions:
            # Rejected versions too (pinned): what the gate stopped is worth reading.
            evals.append(
                evaluate(v.version, sample_heldout(gen, held, v.version, args.samples), held, args.samples, scorer)
            )
        registry = AdapterRegistry(home / "adapters")
        failed = {v.version: registry.get(ADAPTER, v.version).manifest["gate"]["failed_checks"] for v in versions}
        if args.algo == "ppo":
            rm = registry.resolve(f"{ADAPTER}-reward").manifest["metrics"]
            print(f"reward model: held-out accuracy {rm['accuracy']:.3f}, trained in {rm['train_seconds']:.0f} s")
        report(args, choices, versions, evals, failed, time.time() - t_start)
    finally:
        if trainer is not None:
            stop(trainer)
        stop(server)


def _last_accepted(versions: Sequence[apb.VersionState]) -> str:
    accepted = [v.version for v in versions if v.status == "accepted"]
    return accepted[-1] if accepted else ""


def report(
    args: argparse.Namespace,
    choices: list[Choice],
    versions: list[apb.VersionState],
    evals: list[Eval],
    failed_checks: dict[str, list[str]],
    elapsed: float,
) -> None:
    base = evals[0]
    by_version = {v.version: v for v in versions}
    accepted = [e for e in evals[1:] if by_version[e.version].status == "accepted"]
    # What users get: the last accepted version, or the base model when the gate stopped them all.
    last = accepted[-1] if accepted else base
    lines = [
        f"# tuneloop closed loop: users prefer {args.preference}",
        "",
        f"{len(choices)} pairwise choices by simulated users ({SCORE_NAMES[args.preference]} picks the preferred "
        f"candidate), a training round every {args.round_pairs} new pairs, published straight to `current`; "
        f"{len(held_prompts())} held-out prompts x {args.samples} samples per version; {elapsed / 60:.1f} min in all.",
        "",
        "| version | gate | held-out mean score | gain vs base | distinct-2 / base | KL/token to base "
        "| base NLL/token | NLL increase | gate: accuracy | gate: KL/token | gate: NLL increase | gate: failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in evals:
        v = by_version.get(e.version)
        m = dict(v.metrics) if v is not None else {}

        def g(key: str, m: dict[str, float] = m) -> str:
            return f"{m[key]:.3f}" if key in m else "-"

        failed = ", ".join(failed_checks.get(e.version, []))
        lines.append(
            f"| {e.version} | {v.status if v else '-'} | {e.mean_score:+.3f} | {e.mean_score - base.mean_score:+.3f} "
            f"| {e.distinct2 / base.distinct2:.3f} | {e.kl_per_token:.3f} | {e.nll_per_token:.3f} "
            f"| {e.nll_per_token - base.nll_per_token:+.3f} | {g('accuracy')} | {g('kl_per_token')} "
            f"| {g('nll_increase_per_token')} | {failed or '-'} |"
        )
    lines += ["", "## Samples on held-out prompts", ""]
    prompts = held_prompts()
    for i in range(0, min(len(prompts), 4 * 9), 9):  # a few prompts, spread over the held-out set
        lines.append(f"**{prompts[i]}**")
        lines.append("")
        for e in evals:
            text = " ".join(e.texts[i * args.samples].split())[:240]
            lines.append(f"- {e.version}: {text}")
        lines.append("")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "samples.json").write_text(json.dumps({e.version: e.texts[:16] for e in evals}, indent=1))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(evals))
    colors = ["tab:blue" if e is base or by_version[e.version].status == "accepted" else "tab:red" for e in evals]
    ax.plot(xs, [e.mean_score for e in evals], color="0.6", zorder=1)
    ax.scatter(xs, [e.mean_score for e in evals], c=colors, zorder=2)
    ax.set_xticks(xs, [e.version for e in evals])
    ax.set_xlabel("version (red: rejected by the gate)")
    ax.set_ylabel(f"held-out mean {SCORE_NAMES[args.preference]}")
    ax.set_title("reward per round")
    ax2.bar(xs, [e.nll_per_token - base.nll_per_token for e in evals], color=colors)
    ax2.axhline(0.3, color="0.4", ls="--", lw=1)
    ax2.set_xticks(xs, [e.version for e in evals])
    ax2.set_ylabel("NLL/token under the base, minus the base's")
    ax2.set_title("coherence cost")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.suptitle(f"tuneloop closed loop: users prefer {args.preference}")
    fig.tight_layout()
    fig.savefig(args.out / "reward.png", dpi=120)
    print("publish_path: current (trainer --publish current)")
    if args.algo == "ppo" and accepted:
        m = by_version[accepted[-1].version].metrics
        print(
            "time split: "
            + ", ".join(f"{k.removeprefix('ppo_').removesuffix('_seconds')} {m[k]:.0f} s" for k in sorted(m)
                        if k.startswith("ppo_") and k.endswith("_seconds"))
        )  # fmt: skip
    print(f"accepted_versions: {len(accepted)} of {len(evals) - 1}")
    print(f"distinct2_ratio: {last.distinct2 / base.distinct2:.3f}")
    print(f"kl_to_base: {last.kl:.3f}")
    print(f"nll_increase_per_token: {last.nll_per_token - base.nll_per_token:.3f}")
    print(f"closed_loop_reward_gain: {last.mean_score - base.mean_score:.3f}")


def held_prompts() -> list[str]:
    return load_prompts()[1]


if __name__ == "__main__":
    main()

"""The whole loop, end to end: does tuneloop make the model better on a preference nobody tuned for?

The server and the trainer sidecar run as separate processes. Simulated users, through the
public gRPC API only, draw prompts from bench/data/closed_loop_prompts.txt (everyday frustrations
and mixed topics), ask for n=2 candidates, and choose the one with the higher VADER compound
sentiment as their pairwise preference. The sidecar trains a DPO adapter whenever enough new
pairs arrived; its evaluation gate decides whether it is published; the server hot-swaps it in
and the users' next requests are served by it.

Then, on the 64 held-out prompts (topics never used for feedback), completions served by each
published version are compared with the base model's: mean VADER compound, distinct-2 relative
to the base, and a KL estimate (the served log-probabilities of each sampled completion minus
the base model's log-probabilities of the same tokens, computed with transformers here).

    .venv/bin/python bench/closed_loop.py [--choices 512] [--round-pairs 256]

Writes bench/out/closed_loop/{report.md,reward.png}; the last line is
`closed_loop_reward_gain: X` (mean compound of the last published version minus the base's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

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


def chat(prompt: str) -> pb.ChatInput:
    return pb.ChatInput(messages=[pb.ChatMessage(role="user", content=prompt)])


# --------------------------------------------------------------------------- processes
def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_port(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(r"gRPC on [^:]+:(\d+)", log.read_text())
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        time.sleep(0.5)
    raise RuntimeError("server did not bind in time")


def wait_serving(channel: grpc.Channel, timeout: float = 300) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(1)
    raise RuntimeError("engine did not become ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    sa, sb = compound(a.text), compound(b.text)
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
    mean_compound: float
    distinct2: float
    kl: float
    kl_per_token: float
    texts: list[str]


def sample_heldout(
    gen: pb_grpc.GenerationServiceStub, prompts: list[str], version: str, samples: int
) -> list[pb.Completion]:
    adapter = (
        pb.AdapterSelector(name="base") if version == "base" else pb.AdapterSelector(name=ADAPTER, version=version)
    )

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
    kls, tokens = [], 0
    for i, c in enumerate(comps):
        ids = [lp.token_id for lp in c.logprobs]
        if ids:
            served = sum(lp.logprob for lp in c.logprobs)
            kls.append(served - scorer.logprob(prompts[i // samples], ids))
            tokens += len(ids)
    mean_compound = statistics.fmean(compound(t) for t in texts)
    return Eval(
        version,
        mean_compound,
        distinct_n([t.split() for t in texts], 2),
        statistics.fmean(kls),
        sum(kls) / tokens,
        texts,
    )


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--out", type=Path, default=HERE / "out" / "closed_loop")
    ap.add_argument("--trainer-arg", action="append", default=[], help="extra flag for `tuneloop trainer run`")
    args = ap.parse_args()
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
        trainer = start([sys.executable, "-m", "tuneloop.trainer.cli", "run", "--store-url", store_url,
                         "--model-dir", str(model_dir), "--min-new-pairs", str(int(args.round_pairs * 0.9)),
                         "--poll-seconds", "5", "--metrics-port", "0", "--no-progress",
                         # Rounds start on the pair count alone, so each round sees --round-pairs choices.
                         "--interval-minutes", "1000", "--epochs", str(args.epochs),
                         "--batch-size", str(args.batch_size), "--max-completion-tokens", str(NEW_TOKENS),
                         *args.trainer_arg],
                        trainer_log, env)  # fmt: skip

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

        # Wait for the trainer to finish the rounds those choices started and the server to serve them.
        expected_rounds = args.choices // args.round_pairs
        deadline = time.time() + 20 * 60
        while time.time() < deadline:
            state = admin.ListAdapters(apb.ListAdaptersRequest()).adapters
            versions = state[0].versions if state else []
            if len(versions) >= expected_rounds and (
                not versions or state[0].current_version == _last_accepted(versions)
            ):
                break
            if trainer.poll() is not None:
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
            if v.status == "accepted":
                evals.append(
                    evaluate(v.version, sample_heldout(gen, held, v.version, args.samples), held, args.samples, scorer)
                )
        report(args, choices, versions, evals, time.time() - t_start)
    finally:
        if trainer is not None:
            stop(trainer)
        stop(server)


def _last_accepted(versions: Sequence[apb.VersionState]) -> str:
    accepted = [v.version for v in versions if v.status == "accepted"]
    return accepted[-1] if accepted else ""


def report(
    args: argparse.Namespace, choices: list[Choice], versions: list[apb.VersionState], evals: list[Eval], elapsed: float
) -> None:
    base, last = evals[0], evals[-1]
    lines = [
        "# tuneloop closed loop",
        "",
        f"{len(choices)} pairwise choices by simulated users (VADER compound picks the preferred candidate), "
        f"a training round every {args.round_pairs} new pairs; {len(held_prompts())} held-out prompts x "
        f"{args.samples} samples per version; {elapsed / 60:.1f} min in all.",
        "",
        "| version | gate | held-out mean compound | gain vs base | distinct-2 | distinct-2 / base "
        "| KL to base (nats/completion) | KL/token | gate: held-out accuracy | gate: KL/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_version = {v.version: v for v in versions}
    for e in evals:
        gain = e.mean_compound - base.mean_compound
        v = by_version.get(e.version)
        gate = (
            f"{v.metrics['accuracy']:.3f} | {v.metrics['kl_per_token']:.3f}"
            if v is not None and {"accuracy", "kl_per_token"} <= set(v.metrics)
            else "- | -"
        )
        lines.append(
            f"| {e.version} | {v.status if v else '-'} | {e.mean_compound:+.3f} | {gain:+.3f} "
            f"| {e.distinct2:.3f} | {e.distinct2 / base.distinct2:.3f} | {e.kl:.2f} | {e.kl_per_token:.3f} | {gate} |"
        )
    rejected = [v.version for v in versions if v.status != "accepted"]
    if rejected:
        lines.append(f"\nRejected by the gate: {', '.join(rejected)}.")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "samples.json").write_text(json.dumps({e.version: e.texts[:16] for e in evals}, indent=1))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(evals)), [e.mean_compound for e in evals], marker="o")
    ax.set_xticks(range(len(evals)), [e.version for e in evals])
    ax.set_xlabel("round (served version)")
    ax.set_ylabel("held-out mean VADER compound")
    ax.set_title("tuneloop closed loop: reward per round")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "reward.png", dpi=120)
    print(f"distinct2_ratio: {last.distinct2 / base.distinct2:.3f}")
    print(f"kl_to_base: {last.kl:.3f}")
    print(f"closed_loop_reward_gain: {last.mean_compound - base.mean_compound:.3f}")


def held_prompts() -> list[str]:
    return load_prompts()[1]


if __name__ == "__main__":
    main()

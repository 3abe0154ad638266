"""DPO, KTO or a reward model + PPO? All three trained from one mixed feedback log, measured side by side.

Simulated users leave the feedback real users leave, through the public gRPC API only: on some
requests they ask for two candidates and pick one (pairwise), on others they read one reply and give
it a thumb, on others a 1-5 rating. Every judgement comes from one oracle (`sentiment`: VADER
compound, the users like warm replies; `readability`: Flesch reading ease from pyphen's syllable
counts, the users like short plain sentences), with a little noise, and thumbs and ratings are
relative to what the users have been seeing (above the median reply is a thumb up; the quintiles
of what they saw are the 1-5 scale).

The log is collected once per oracle. Then each method trains from the same log (or its first N
events, for the learning curve), each through `tuneloop trainer once --algo dpo|kto|ppo` as its
own process, into one registry, and each version is served pinned by the same `tuneloop serve` for
evaluation on held-out prompts (topics never used for feedback), beside the base model. Per method:
training wall-clock seconds and peak resident memory (the trainer process, from wait4), forward
and backward tokens (the trainer's own count, `trainer/accounting.py`), how many of the logged
events it could use (the manifest's data snapshot; PPO: its reward model's), the held-out oracle
gain over the base model, KL per token to the base (served log-probabilities minus the base
model's, transformers here) and distinct-2 relative to the base.

    .venv/bin/python bench/compare_algorithms.py [--events 512] [--curve 64,128,256]
        [--oracles sentiment,readability] [--other-events 256] [--ppo-iterations 5]

Default sizes (they fit 60 minutes on 2 cores): 512 events from the VADER users with a learning
curve at 64, 128 and 256 of them, and 256 from the readability users. The reward model trains
with the trainer's defaults (chosen on this log: see RewardConfig in trainer/config.py).

Writes bench/out/compare/{results.json,table.md,frontier.png,learning_curve.png,events-*.jsonl};
ends with `gain_<algo>: X` (VADER gain at --events) per method, then `algorithms_compared: N`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import grpc
from closed_loop import BaseScorer, chat, compound, load_prompts, sample_heldout
from procs import start, stop, wait_port, wait_serving

from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.gate import distinct_n
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
ALGOS = ("dpo", "kto", "ppo")
KINDS = ("pairwise", "thumbs", "rating")
NEW_TOKENS = 64
CONCURRENCY = 16
NOISE = 0.1  # judgement noise, in standard deviations of the oracle's scores


# --------------------------------------------------------------------------- oracles
@cache
def _hyphenator() -> Any:
    import pyphen

    return pyphen.Pyphen(lang="en_US")


def reading_ease(text: str) -> float:
    """Flesch reading ease: 206.835 - 1.015 words/sentence - 84.6 syllables/word (syllables from
    pyphen's hyphenation points). Higher is plainer; a reply with no words scores 0."""
    words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)
    if not words:
        return 0.0
    sentences = max(1, len(re.findall(r"[.!?]+(?:\s|$)", text)))
    syllables = sum(len(_hyphenator().positions(w.lower())) + 1 for w in words)
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)


ORACLES: dict[str, tuple[Callable[[str], float], str]] = {
    "sentiment": (compound, "VADER compound"),
    "readability": (reading_ease, "Flesch reading ease"),
}


# --------------------------------------------------------------------------- the feedback log
@dataclass
class Event:
    event_id: str
    kind: str
    prompt: str
    completion_ids: list[str]
    scores: list[float]
    label: str  # "first"/"second"/"tie", "up"/"down", or "1".."5"


def _request(gen: pb_grpc.GenerationServiceStub, prompt: str, n: int, seed: int, user: str) -> pb.GenerateResponse:
    return gen.Generate(
        pb.GenerateRequest(
            chat=chat(prompt),
            sampling=pb.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, n=n, seed=seed),
            caller=pb.CallerMetadata(user_id=user),
        ),
        timeout=600,
    )


def judge(kind: str, scores: list[float], noise: list[float], quintiles: list[float], median: float) -> str:
    """A user's judgement of replies with oracle `scores`, as they perceive them (plus `noise`):
    the better of two, a thumb up above the `median` reply they have seen, or the quintile of what
    they have seen it falls in as a 1-5 rating."""
    seen = [s + e for s, e in zip(scores, noise, strict=True)]
    if kind == "pairwise":
        return "tie" if seen[0] == seen[1] else "first" if seen[0] > seen[1] else "second"
    if kind == "thumbs":
        return "up" if seen[0] > median else "down"
    return str(1 + sum(seen[0] > q for q in quintiles))


def collect(
    gen: pb_grpc.GenerationServiceStub,
    fb: fpb_grpc.FeedbackServiceStub,
    oracle: str,
    events: int,
    mix: tuple[float, float, float],
    prompts: list[str],
) -> list[Event]:
    """`events` feedback events from users judging by `oracle`, sent through the API; returned in order."""
    score = ORACLES[oracle][0]
    rng = random.Random(f"compare-{oracle}")
    plan = [(rng.choices(KINDS, weights=mix)[0], rng.choice(prompts), f"user-{i % 97}") for i in range(events)]

    def ask(i: int) -> pb.GenerateResponse:
        kind, prompt, user = plan[i]
        return _request(
            gen, prompt, 2 if kind == "pairwise" else 1, 100_000 * (1 + list(ORACLES).index(oracle)) + i, user
        )

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        replies = list(pool.map(ask, range(events)))
    scores = [[score(c.text) for c in r.completions] for r in replies]
    # Users judge a single reply against what they have been seeing: quintiles of the single replies.
    singles = sorted(s[0] for (kind, _, _), s in zip(plan, scores, strict=True) if kind != "pairwise")
    sd = statistics.pstdev(singles) if len(singles) > 1 else 1.0
    quintiles = statistics.quantiles(singles, n=5) if len(singles) > 1 else [0.0] * 4
    median = statistics.median(singles) if singles else 0.0
    log: list[Event] = []
    for i, ((kind, prompt, _user), cs, ss) in enumerate(zip(plan, replies, scores, strict=True)):
        noise = [rng.gauss(0.0, NOISE * sd) for _ in ss]
        log.append(
            Event(
                f"{oracle}-{i:04d}",
                kind,
                prompt,
                [c.completion_id for c in cs.completions],
                ss,
                judge(kind, ss, noise, quintiles, median),
            )
        )

    def send(i: int) -> None:
        e, rater = log[i], plan[i][2]
        if e.kind == "pairwise":
            choice = {"first": fpb.PAIRWISE_CHOICE_FIRST, "second": fpb.PAIRWISE_CHOICE_SECOND}.get(
                e.label, fpb.PAIRWISE_CHOICE_TIE
            )
            body = {"pairwise": fpb.PairwiseFeedback(group_id=replies[i].group_id, choice=choice)}
        elif e.kind == "thumbs":
            thumb = fpb.THUMB_UP if e.label == "up" else fpb.THUMB_DOWN
            body = {"thumbs": fpb.ThumbsFeedback(completion_id=e.completion_ids[0], value=thumb)}
        else:
            body = {"rating": fpb.RatingFeedback(completion_id=e.completion_ids[0], score=int(e.label))}
        fb.SubmitFeedback(fpb.FeedbackEvent(event_id=e.event_id, rater_id=rater, **body), timeout=60)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(send, range(events)))
    return log


def store_with(db: Path, keep: set[str], out: Path) -> str:
    """A copy of the server's store holding only the feedback events `keep` (every completion stays:
    PPO rolls out on the prompts users sent, which a team has many more of than judgements)."""
    out.unlink(missing_ok=True)
    with sqlite3.connect(db) as src, sqlite3.connect(out) as dst:
        src.backup(dst)  # consistent while the server writes
        dst.execute("CREATE TEMP TABLE keep (event_id TEXT PRIMARY KEY)")
        dst.executemany("INSERT INTO keep VALUES (?)", [(e,) for e in keep])
        dst.execute("DELETE FROM feedback WHERE event_id NOT IN (SELECT event_id FROM keep)")
    return f"sqlite:///{out}"


# --------------------------------------------------------------------------- training
@dataclass
class Run:
    oracle: str
    algo: str
    events: int
    name: str
    outcome: str = ""
    version: str = ""
    gate_passed: bool = False
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    tokens_forward: int = 0
    tokens_backward: int = 0
    events_used: int = 0
    used_by_kind: dict[str, int] = field(default_factory=dict)
    gain: float = float("nan")
    kl_per_token: float = float("nan")
    distinct2_ratio: float = float("nan")
    mean_score: float = float("nan")
    note: str = ""


def train(
    run: Run, store_url: str, env: dict[str, str], model_dir: Path, args: argparse.Namespace, kind_of: dict[str, str]
) -> None:
    """One `tuneloop trainer once` process: its wall clock and peak memory (wait4), then its manifest."""
    cmd = [sys.executable, "-m", "tuneloop.cli", "trainer", "once", "--algo", run.algo, "--adapter", run.name,
           "--store-url", store_url, "--model-dir", str(model_dir), "--publish", "current", "--no-progress",
           "--min-train-pairs", "1", "--min-heldout-pairs", "1", "--max-completion-tokens", str(NEW_TOKENS),
           "--ppo-iterations", str(args.ppo_iterations), "--ppo-max-minutes", str(args.ppo_max_minutes),
           *args.trainer_arg]  # fmt: skip
    log = args.out / f"trainer-{run.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    run.seconds = time.perf_counter() - t0
    run.peak_rss_mb = usage.ru_maxrss / 1024  # KiB on Linux
    registry = AdapterRegistry(Path(env["TUNELOOP_HOME"]) / "adapters")
    versions = registry.versions(run.name) if run.name in registry.names() else []
    if not versions:  # the round's own reason, from its summary line
        # the reason is repr()-quoted: in double quotes when it holds a single one
        reasons = re.findall(r"outcome=(\w+) .*?reason=(['\"])(.*)\2$", log.read_text(), re.MULTILINE)
        run.outcome = f"no version ({reasons[-1][0]})" if reasons else f"no version (exit {proc.returncode})"
        run.note = reasons[-1][2] if reasons else f"see {log}"
        return
    v = versions[-1]
    run.version, run.gate_passed = v.version, v.status == "accepted"
    run.outcome = "published" if run.gate_passed else "rejected by the gate"
    m = v.manifest["metrics"]
    run.tokens_forward, run.tokens_backward = int(m.get("tokens_forward", 0)), int(m.get("tokens_backward", 0))
    data = v.manifest
    if run.algo == "ppo":  # what the policy learns from is what its reward model learnt from
        rm = v.manifest["reward_model"]
        data = registry.get(rm["name"], rm["version"]).manifest
    used = set(data["data_snapshot"]["event_ids"]) | set(data.get("pointwise_snapshot", {}).get("event_ids", []))
    run.events_used = len(used)
    run.used_by_kind = dict(Counter(kind_of.get(e, "other") for e in used))
    if not run.gate_passed:
        run.note = ", ".join(v.manifest["gate"].get("failed_checks", []))


# --------------------------------------------------------------------------- evaluation
@dataclass
class Held:
    mean_score: float
    kl_per_token: float
    distinct2: float


def evaluate(
    gen: pb_grpc.GenerationServiceStub, name: str, version: str, prompts: list[str], samples: int,
    score: Callable[[str], float], scorer: BaseScorer,
) -> Held:  # fmt: skip
    comps = sample_heldout(gen, prompts, version, samples, name=name)
    kl, tokens = 0.0, 0
    for i, c in enumerate(comps):
        ids = [lp.token_id for lp in c.logprobs]
        if ids:
            kl += sum(lp.logprob for lp in c.logprobs) - scorer.logprob(prompts[i // samples], ids)
            tokens += len(ids)
    texts = [c.text for c in comps]
    return Held(
        statistics.fmean(score(t) for t in texts), kl / max(tokens, 1), distinct_n([t.split() for t in texts], 2)
    )


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=512, help="feedback events in the VADER users' log")
    ap.add_argument("--other-events", type=int, default=256, help="feedback events in each other oracle's log")
    ap.add_argument(
        "--curve", default="64,128,256", help="learning-curve sizes below --events (VADER only); '' for none"
    )
    ap.add_argument("--algos", default=",".join(ALGOS), help="methods trained on the full logs")
    ap.add_argument("--curve-algos", default=",".join(ALGOS), help="methods the learning curve trains")
    ap.add_argument(
        "--oracles", default="sentiment,readability", help=f"users' oracles, of {sorted(ORACLES)}; sentiment first"
    )
    ap.add_argument("--mix", default="1,1,1", help="weights of pairwise choices, thumbs and ratings in the log")
    ap.add_argument("--held-prompts", type=int, default=32, help="held-out prompts per evaluation (at most 64)")
    ap.add_argument("--samples", type=int, default=2, help="samples per held-out prompt and version")
    ap.add_argument("--ppo-iterations", type=int, default=5, help="PPO iterations per run")
    ap.add_argument("--ppo-max-minutes", type=float, default=6.0, help="PPO's wall-clock budget per run")
    ap.add_argument("--trainer-arg", action="append", default=[], help="extra flag for every `tuneloop trainer once`")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "compare")
    args = ap.parse_args()
    oracles = [o for o in args.oracles.split(",") if o]
    if unknown := [o for o in oracles if o not in ORACLES]:
        ap.error(f"unknown oracle(s) {unknown}; choose from {sorted(ORACLES)}")
    curve = sorted({int(x) for x in args.curve.split(",") if x} - {args.events})
    if any(not 0 < n < args.events for n in curve):
        ap.error("--curve sizes must be between 0 and --events")
    algos = [a for a in args.algos.split(",") if a]
    curve_algos = [a for a in args.curve_algos.split(",") if a]
    if unknown := sorted(set(algos + curve_algos) - set(ALGOS)):
        ap.error(f"unknown method(s) {unknown}; choose from {list(ALGOS)}")
    size = {o: args.events if o == "sentiment" else args.other_events for o in oracles}
    mix = tuple(float(x) for x in args.mix.split(","))  # three weights, checked next
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        ap.error("--mix takes three non-negative weights: pairwise,thumbs,rating")
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    from tuneloop.server.model_cache import ensure_default_model

    model_dir = ensure_default_model()
    home = Path(tempfile.mkdtemp(prefix="tuneloop-compare-"))
    env = {**os.environ, "TUNELOOP_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "2"}
    db = home / "tuneloop.db"
    server_log = args.out / "server.log"
    server = start([sys.executable, "-m", "tuneloop.server.main", "--port", "0", "--metrics-port", "-1",
                    "--model", str(model_dir), "--max-model-len", "1024", "--max-tokens-limit", "512",
                    "--store-url", f"sqlite:///{db}"], server_log, env)  # fmt: skip

    def elapsed() -> str:
        return f"{(time.time() - t_start) / 60:.1f} min"

    runs: list[Run] = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{wait_port(server_log, server)}")
        wait_serving(channel)
        gen, fb = pb_grpc.GenerationServiceStub(channel), fpb_grpc.FeedbackServiceStub(channel)
        train_prompts, held = load_prompts()
        held = held[: args.held_prompts]
        logs: dict[str, list[Event]] = {}
        for oracle in oracles:
            logs[oracle] = collect(gen, fb, oracle, size[oracle], mix, train_prompts)
            with (args.out / f"events-{oracle}.jsonl").open("w") as f:
                f.writelines(json.dumps(asdict(e)) + "\n" for e in logs[oracle])
            kinds = Counter(e.kind for e in logs[oracle])
            print(f"[{elapsed()}] {oracle}: {size[oracle]} events logged ({dict(kinds)})", flush=True)

        plan = [(o, a, size[o]) for o in oracles for a in algos]
        plan += [("sentiment", a, n) for n in curve for a in curve_algos if "sentiment" in oracles]
        for oracle, algo, n in plan:
            run = Run(oracle, algo, n, f"cmp-{oracle}-{algo}-{n}")
            url = store_with(db, {e.event_id for e in logs[oracle][:n]}, home / f"{run.name}.db")
            train(run, url, env, model_dir, args, {e.event_id: e.kind for e in logs[oracle]})
            runs.append(run)
            print(f"[{elapsed()}] {run.name}: {run.outcome} {run.version} in {run.seconds:.0f} s, "
                  f"{run.events_used}/{n} events used {run.note}", flush=True)  # fmt: skip

        scorer = BaseScorer(model_dir)
        base = {o: evaluate(gen, "base", "base", held, args.samples, ORACLES[o][0], scorer) for o in oracles}
        for run in runs:
            if not run.version:
                continue
            h = evaluate(gen, run.name, run.version, held, args.samples, ORACLES[run.oracle][0], scorer)
            b = base[run.oracle]
            run.mean_score, run.gain = h.mean_score, h.mean_score - b.mean_score
            run.kl_per_token, run.distinct2_ratio = h.kl_per_token, h.distinct2 / b.distinct2
        print(f"[{elapsed()}] evaluated {sum(1 for r in runs if r.version)} versions", flush=True)
    finally:
        stop(server)

    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "minutes": (time.time() - t_start) / 60,
        "base": {o: asdict(b) for o, b in base.items()},
        "runs": [asdict(r) for r in runs],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = render_table(runs, args)
    (args.out / "table.md").write_text(table)
    print(table)
    plot(runs, args.out)
    for algo in ALGOS:
        full = [r for r in runs if r.oracle == "sentiment" and r.algo == algo and r.events == args.events]
        if full:
            print(f"gain_{algo}: {full[0].gain:.3f}")
    print(f"bench minutes: {(time.time() - t_start) / 60:.1f}")
    print(f"algorithms_compared: {len({r.algo for r in runs if r.version})}")


def render_table(runs: list[Run], args: argparse.Namespace) -> str:
    lines = [
        "| oracle | method | events | gate | train s | peak RSS MB | fwd tokens | bwd tokens "
        "| events used | used by kind | held-out gain | KL/token | distinct-2 / base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r.oracle, r.events, ALGOS.index(r.algo))):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.used_by_kind.items())) or "-"
        gate = "passed" if r.gate_passed else (r.outcome + (f" ({r.note})" if r.note else ""))
        lines.append(
            f"| {r.oracle} | {r.algo} | {r.events} | {gate} | {r.seconds:.0f} | {r.peak_rss_mb:.0f} "
            f"| {r.tokens_forward:,} | {r.tokens_backward:,} | {r.events_used} of {r.events} | {kinds} "
            f"| {r.gain:+.3f} | {r.kl_per_token:.3f} | {r.distinct2_ratio:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dpo": "tab:blue", "kto": "tab:orange", "ppo": "tab:green"}
    oracles = sorted({r.oracle for r in runs})
    fig, axes = plt.subplots(1, len(oracles), figsize=(5.5 * len(oracles), 4.2), squeeze=False)
    for ax, oracle in zip(axes[0], oracles, strict=True):
        for algo in ALGOS:
            rs = sorted(
                (r for r in runs if r.oracle == oracle and r.algo == algo and r.version), key=lambda r: r.events
            )
            ax.scatter([r.kl_per_token for r in rs], [r.gain for r in rs], color=colors[algo], label=algo.upper(), s=40)
            for r in rs:
                ax.annotate(
                    str(r.events), (r.kl_per_token, r.gain), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel("KL per token to the base model (nats)")
        ax.set_ylabel(f"held-out gain in {ORACLES[oracle][1]}")
        ax.set_title(f"users prefer {oracle}: gain vs KL (labels: feedback events)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for algo in ALGOS:
        rs = sorted(
            (r for r in runs if r.oracle == "sentiment" and r.algo == algo and r.version), key=lambda r: r.events
        )
        ax.plot([r.events for r in rs], [r.gain for r in rs], "o-", color=colors[algo], label=algo.upper())
    ax.set_xscale("log", base=2)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("feedback events in the log (mixed pairs, thumbs, ratings)")
    ax.set_ylabel(f"held-out gain in {ORACLES['sentiment'][1]}")
    ax.set_title("learning curve: users prefer sentiment")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

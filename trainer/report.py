"""A round's short report beside its adapter: a few lines of figures and a PNG a person can read
at a glance (`tuneloop adapters show` prints where they are)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gate import GateMetrics
    from .ppo import PPOResult


def write_ppo_report(out: Path, result: PPOResult, gate: GateMetrics, *, reward: str) -> None:
    """report.md and report.png (reward-model score and KL per iteration) into `out`."""
    its = result.iterations
    lines = [
        f"# PPO round against reward model {reward}",
        "",
        f"{len(its)} iterations in {result.seconds / 60:.1f} min; stopped: {result.stop_reason}.",
        f"Gate: reward gain {gate.reward_gain or 0.0:+.3f} on held-out prompts, KL {gate.kl_per_token:.3f} "
        f"nats/token, NLL increase {gate.nll_increase_per_token:+.3f}, distinct-2 {gate.distinct_2:.3f} "
        f"(reference {gate.reference_distinct_2:.3f}).",
        "",
        "| iteration | score | KL/token | entropy | clip fraction | approx KL | policy loss | value loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in its:
        lines.append(
            f"| {s.iteration} | {s.score:+.3f} | {s.kl_per_token:.3f} | {s.entropy:.2f} | {s.clip_fraction:.3f} "
            f"| {s.approx_kl:.4f} | {s.policy_loss:+.4f} | {s.value_loss:.4f} |"
        )
    lines += ["", "![reward and KL per iteration](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

    import matplotlib  # noqa: PLC0415 - only rounds that write a picture pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [s.iteration for s in its]
    ax.plot(xs, [s.score for s in its], marker="o", color="tab:blue", label="reward-model score")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("mean reward-model score", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [s.kl_per_token for s in its], marker="s", color="tab:red", label="KL/token")
    ax2.set_ylabel("KL to reference (nats/token)", color="tab:red")
    ax.set_title(f"PPO against {reward}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)

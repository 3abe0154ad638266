"""Training algorithms behind one seam (`base.Algorithm`); `--algo` picks one by name."""

from __future__ import annotations

from .base import Algorithm, Candidate, RoundInputs
from .dpo import DPO
from .kto import KTO
from .ppo import PPO
from .reward import Reward

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (DPO(), KTO(), Reward(), PPO())}

__all__ = ["ALGORITHMS", "Algorithm", "Candidate", "RoundInputs"]

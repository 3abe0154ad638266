"""LoRA adapters as arithmetic on weights: the dense update an adapter adds, and an adapter that is
the difference of two others. Used to fold the served version into the base weights and still
serve every other path exactly (server/fast_path.py).

A peft LoRA on module m adds  ΔW_m = s · B_m A_m  (A_m: [r, in], B_m: [out, r], s = alpha / r, or
alpha / sqrt(r) with rsLoRA; Hu et al. 2021, Eq. 3). With version V folded (W' = W + ΔV):
- the bare base is W' + (−ΔV): a LoRA with A_V and −s_V B_V;
- another version C is W' + ΔC − ΔV: one LoRA of rank r_C + r_V with A = [A_C; A_V] and
  B = [s_C B_C, −s_V B_V] at scale 1 (its alpha equals its rank).
Both are exact in real arithmetic; only the rounding of the folded weights to the engine's dtype
differs from the LoRA path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class NotFoldable(ValueError):
    """The adapter uses a feature whose update is not a plain s · B A on linear weights."""


@dataclass(frozen=True)
class Lora:
    """One adapter's factors per module (the module's name in the base checkpoint)."""

    config: dict[str, object]
    rank: int
    scale: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])


def read_lora(path: str | Path) -> Lora:
    """Read a peft LoRA directory; raises NotFoldable for what folding cannot express."""
    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    for feature in ("rank_pattern", "alpha_pattern"):
        if config.get(feature):
            raise NotFoldable(f"{feature} is set (per-module ranks are not folded)")
    if config.get("use_dora"):
        raise NotFoldable("DoRA adapters rescale weights; their update is not s · B A")
    tensors = load_file(str(path / WEIGHTS))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise NotFoldable(f"it carries a tensor that is not a LoRA factor: {key}")
            continue
        module = key.removeprefix(_PREFIX).split(".lora_A.")[0]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise NotFoldable(f"{key} has no lora_B partner")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise NotFoldable(f"{module}: factors of shape {tuple(a.shape)} and {tuple(b.shape)} are not rank {rank}")
        factors[module] = (a.float(), b.float())
    if not factors:
        raise NotFoldable("it has no LoRA factors")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return Lora(config, rank, scale, factors)


def weight_deltas(lora: Lora) -> dict[str, torch.Tensor]:
    """The dense update per base weight name ("<module>.weight"): s · B A, float32 [out, in]."""
    return {f"{module}.weight": lora.scale * (b @ a) for module, (a, b) in lora.factors.items()}


def write_difference(plus: Lora | None, minus: Lora, out: Path) -> int:
    """Write the adapter that turns weights with `minus` folded in into weights with `plus`
    (the bare base when `plus` is None); returns its rank. Modules only one side adapts get zero
    factors on the other side."""
    rank = minus.rank + (plus.rank if plus is not None else 0)
    tensors: dict[str, torch.Tensor] = {}
    modules = set(minus.factors) | (set(plus.factors) if plus is not None else set())
    for module in sorted(modules):
        parts_a: list[torch.Tensor] = []
        parts_b: list[torch.Tensor] = []
        # `plus` is not None when `minus` leaves the module alone.
        owner = minus.factors.get(module) or plus.factors[module]  # type: ignore[union-attr]
        in_dim, out_dim = owner[0].shape[1], owner[1].shape[0]
        for lora, sign in ((plus, 1.0), (minus, -1.0)):
            if lora is None:
                continue
            if module in lora.factors:
                a, b = lora.factors[module]
                parts_a.append(a)
                parts_b.append(sign * lora.scale * b)
            else:  # this side leaves the module alone
                parts_a.append(torch.zeros(lora.rank, in_dim))
                parts_b.append(torch.zeros(out_dim, lora.rank))
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = torch.cat(parts_a, 0).contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = torch.cat(parts_b, 1).contiguous()
    config = dict(minus.config)
    config.update(
        r=rank,
        lora_alpha=rank,  # scale 1: the scales are already inside B
        use_rslora=False,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        lora_dropout=0.0,
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return rank

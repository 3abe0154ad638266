"""Loading the base model with a LoRA adapter, device and dtype aware, and scoring completions.

Which weights play which role in one round:
  "default"  the adapter being trained (fresh, or a copy of the served one when rounds chain)
  "served"   the adapter now served, loaded read-only when there is one: the chained reference,
             and the model the candidate must beat at the gate
  base       any of them disabled
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tuneloop.server.hardware import fastest_dtype

from .config import ComputeConfig, DPOConfig
from .losses import completion_positions, gathered_token_logps, sum_by_row

log = logging.getLogger(__name__)

TRAINED, SERVED = "default", "served"


def resolve_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(preference: str, device: torch.device) -> torch.dtype:
    """The trainer's dtype: the same hardware-aware choice the server makes (server/hardware.py)."""
    name = fastest_dtype(preference, device.type)
    if preference == "auto" and name == "float16":
        return torch.float32  # a GPU without bf16: fp16 training would need loss scaling; fp32 is safe
    return getattr(torch, name)


def prepare_compute(cfg: ComputeConfig) -> tuple[torch.device, torch.dtype]:
    """Apply the thread setting and resolve the device and dtype an algorithm runs in."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    return device, resolve_dtype(cfg.dtype, device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast when computing in bf16, else nothing (fp32 stays exact)."""
    if dtype == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {model_dir} has no EOS token; completions could not be terminated")
    return tok


def load_base_model(
    model_dir: Path, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """The frozen base model in `dtype`, on `device` (a local directory only: nothing is downloaded)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
    )
    model.to(device)  # type: ignore[arg-type] # transformers' decorated .to loses its signature
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lora_config(cfg: DPOConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_policy(
    base: PreTrainedModel, cfg: DPOConfig, *, served_adapter: Path | None = None, init_from_served: bool = False
) -> PeftModel:
    """Wrap `base` with the trainable adapter "default" (and the read-only "served" one if given).

    With `init_from_served` the trainable adapter starts as a copy of the served one (chained
    rounds), so its LoRA shape comes from the served adapter's config; otherwise it is a fresh
    adapter from `cfg`, initialised from `cfg.seed` so the same seed gives the same adapter.
    """
    torch.manual_seed(cfg.seed)
    if init_from_served:
        if served_adapter is None:
            raise ValueError("init_from_served needs served_adapter")
        model = PeftModel.from_pretrained(base, str(served_adapter), adapter_name=TRAINED, is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(cfg), adapter_name=TRAINED)
    if served_adapter is not None:
        model.load_adapter(str(served_adapter), adapter_name=SERVED, is_trainable=False)
        model.set_adapter(TRAINED)
    # peft casts every LoRA input to the adapter's float32 and back; autocast already runs the
    # LoRA matmuls in the compute dtype, so those casts are pure copies (a quarter of a bf16 step).
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # type: ignore[assignment] # nn.Module's typed __setattr__
    return model


@contextlib.contextmanager
def adapter_mode(model: PeftModel, which: str) -> Iterator[None]:
    """Run `model` as the base ("base"), the served adapter (SERVED) or the trained one (TRAINED)."""
    if which == TRAINED:
        yield
    elif which == "base":
        with model.disable_adapter():
            yield
    elif which == SERVED:
        if SERVED not in model.peft_config:
            raise ValueError("no served adapter is loaded in this model")
        model.set_adapter(SERVED)
        try:
            yield
        finally:
            # set_adapter also flips requires_grad: switching back makes the trained one trainable again.
            model.set_adapter(TRAINED)
    else:
        raise ValueError(f"unknown adapter mode {which!r}")


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Summed log-probs of each sequence's completion tokens.

    Only the positions that predict a completion token go through the LM head: the vocabulary
    projection and log-softmax (49k wide for SmolLM2) are skipped for prompt and padding tokens.

    Args:
        model:           a causal LM or a PeftModel over one.
        input_ids:       (N, T) prompt + completion tokens, right-padded.
        attention_mask:  (N, T) 1 on real tokens.
        completion_mask: (N, T) 1 on completion tokens.
        dtype:           compute dtype; bf16 runs under autocast.

    Returns:
        (N,) float32 sums of log p(completion token | everything before it).
    """
    # Any: a transformers causal LM (get_decoder, get_output_embeddings), which torch types as Module.
    lm: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    device = input_ids.device
    rows, cols = completion_positions(completion_mask)
    with autocast(device, dtype):
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        states = hidden.last_hidden_state[rows, cols]  # (K, H)
        logits = lm.get_output_embeddings()(states)  # (K, V)
    token_logps = gathered_token_logps(logits, input_ids[rows, cols + 1])
    return sum_by_row(token_logps, rows, input_ids.shape[0])

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tuneloop.server.hardware import fastest_dtype

from .accounting import count_tokens
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
    count_tokens(model)
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


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> tuple[int, ...]:
    """The prompt is the chat-templated text as served; the end of a long prompt is kept because
    it holds the question being answered."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:])


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> tuple[int, ...]:
    """Completion tokens, ended with EOS unless the text had to be cut (a cut answer did not end)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max_tokens:
        return (*ids, tokenizer.eos_token_id)
    return tuple(ids[:max_tokens])


def collate_sequences(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, completion) token lists -> input_ids, attention_mask, completion_mask, each (N, T),
    right-padded to the longest sequence."""
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor((*p, *c))
        attn[i, :n] = 1
        comp[i, len(p) : n] = 1
    return ids, attn, comp


def sequence_logps(
    model: torch.nn.Module,
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(N,) summed completion log-probs of N (prompt, completion) sequences as one batch, on `device`
    (with grad if enabled: the training steps call it too)."""
    ids, attn, comp = collate_sequences(seqs, pad_id)
    return completion_logps(model, ids.to(device), attn.to(device), comp.to(device), dtype=dtype)


@torch.no_grad()
def score_sequences(
    model: PeftModel,
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mode: str,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 16,
) -> torch.Tensor:
    """(S,) summed completion log-probs of (prompt, completion) sequences under one adapter mode,
    in eval mode (no dropout) and without grad; on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with adapter_mode(model, mode):
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                out.append(sequence_logps(model, chunk, pad_id=pad_id, device=device, dtype=dtype).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)

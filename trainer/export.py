"""Dataset export: the trainer's own training data, as JSONL in the common preference formats.

- "pairs"    {prompt, chosen, rejected, split}: the preference format of DPO (arXiv 2305.18290, and
             TRL's "preference" datasets). Exactly the pairs `build_dataset` gives the trainer (same
             sources, dedupe, contradiction handling, rating gaps, per-rater cap); `split` says
             whether the trainer trains on the pair ("train") or holds it out for the gate.
- "unpaired" {prompt, completion, label, split}: exactly the examples `--algo kto` trains on at its
             defaults (TRL's "unpaired preference" format): each thumb (label true for up), and
             each rating of 4-5 (true) or 1-2 (false); a 3 is neither.
- "ratings"  {prompt, completion, rating, split}: one 1-5 rating each, as the reward model reads them.

Both pointwise kinds come from `build_pointwise`, the reward model's source. Superseded events are
left out everywhere. `prompt` is the prompt as the model saw it (chat template applied).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal, TextIO

from tuneloop.server.store import Store

from .config import DatasetConfig
from .dataset import build_dataset, build_pointwise, kto_examples, kto_label
from .rows import RATING
from .source import StoreSource

ExportKind = Literal["pairs", "unpaired", "ratings"]
EXPORT_KINDS: tuple[ExportKind, ...] = ("pairs", "unpaired", "ratings")
EXPORT_FORMATS = ("jsonl",)


def export_rows(store: Store, kind: str, config: DatasetConfig | None = None) -> Iterator[dict[str, object]]:
    """The `kind` dataset of every feedback row in `store`, one JSON-ready dict per row.

    Raises ValueError naming the choices for an unknown kind.
    """
    if kind not in EXPORT_KINDS:
        raise ValueError(f"unknown export kind {kind!r}; choose one of {', '.join(EXPORT_KINDS)}")
    cfg = config or DatasetConfig()
    completions, feedback = StoreSource(store).load()
    if kind == "pairs":
        ds = build_dataset(completions, feedback, cfg)
        for split, pairs in (("train", ds.train), ("heldout", ds.heldout)):
            for p in pairs:
                yield {"prompt": p.prompt_text, "chosen": p.chosen_text, "rejected": p.rejected_text, "split": split}
        return
    pw = build_pointwise(completions, feedback, cfg)
    if kind == "unpaired":
        pw = kto_examples(pw)  # the trainer's own labels: thumbs, and ratings at either end
    for split, examples in (("train", pw.train), ("heldout", pw.heldout)):
        for e in examples:
            if kind == "unpaired":
                label = kto_label(e) is True
                yield {"prompt": e.prompt_text, "completion": e.completion_text, "label": label, "split": split}
            elif kind == "ratings" and e.kind == RATING:
                yield {"prompt": e.prompt_text, "completion": e.completion_text, "rating": int(e.value),
                       "split": split}  # fmt: skip


def export(
    store: Store, kind: str, out: TextIO, *, format: str = "jsonl", config: DatasetConfig | None = None
) -> int:
    """Writes the `kind` dataset ("pairs", "unpaired" or "ratings") built from every feedback row
    of `store` to `out`, one JSON object per line; returns the number of rows written.

    Raises ValueError naming the choices for an unknown kind or format.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    n = 0
    for row in export_rows(store, kind, config):
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    return n

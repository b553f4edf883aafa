"""Every registered PEFT method, from its default config and the training batches its config says
its initialisation reads, on a tiny transformers causal LM: it applies, trains a strict subset of
the parameters (only the adapter's where the method is LoRA-like), keeps the base model's outputs
at initialisation where its config promises that (``KEEPS_OUTPUT_AT_INIT``) and otherwise gives
finite outputs, and a loss whose backward reaches only trainable parameters. A new method is
covered by registering it."""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from algorithms.peft import config as C
from algorithms.peft.registry import PEFT
from algorithms.registry import discriminator_value
from tests.unit.peft.helpers import lm_batch, tiny_llama

BATCH = 16


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("peft-contract") / "llama", layers=6)  # OwLore samples 5 blocks


@pytest.mark.parametrize("config_cls", list(PEFT), ids=lambda c: c.__name__)
def test_applies_from_defaults_to_a_tiny_causal_lm(config_cls: type[C.PeftBase], llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    ref = copy.deepcopy(model)
    total = sum(p.numel() for p in model.parameters())
    cfg = PEFT.config(discriminator_value(config_cls, "name"))
    n_init = cfg.init_batches_needed(BATCH)
    batches = [lm_batch(100 + i, n=BATCH) for i in range(n_init)] or None

    handle = PEFT.build(cfg, model, batches, task_type="causal_lm")

    trainable = {n: p for n, p in handle.model.named_parameters() if p.requires_grad}
    assert 0 < sum(p.numel() for p in trainable.values()) < total
    if isinstance(cfg, C.LoRABase):
        assert all("lora_" in n for n in trainable), sorted(trainable)
    probe = lm_batch(7)
    with torch.no_grad():
        out = handle.model(**probe).logits
        assert torch.isfinite(out).all()
        if cfg.KEEPS_OUTPUT_AT_INIT:
            torch.testing.assert_close(out, ref(**probe).logits, atol=1e-5, rtol=1e-5)
    handle.model.train()
    handle.model(**probe).loss.backward()
    grads = {n for n, p in handle.model.named_parameters() if p.grad is not None}
    assert grads and grads <= set(trainable)
    assert all(torch.isfinite(trainable[n].grad).all() for n in grads)  # type: ignore[arg-type]


def test_every_spec_method_is_registered() -> None:
    from typing import get_args

    union = get_args(C.PeftConfig)[0]
    assert {discriminator_value(c, "name") for c in get_args(union)} == set(PEFT.names())

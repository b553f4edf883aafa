"""An adapter saved by a run loads with peft.PeftModel.from_pretrained and gives the same outputs."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from algorithms.peft.registry import apply
from tests.unit.peft.helpers import hooked_step, lm_batch, tiny_llama

pytestmark = pytest.mark.slow  # about 30 s on the 2-core dev box (EVA/CorDA inits, 8 save/load rounds)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"), layers=2)


def _train(handle, steps: int = 3) -> None:  # type: ignore[no-untyped-def]
    opt = torch.optim.AdamW(handle.param_groups(handle.model, 5e-2))
    for step in range(steps):
        hooked_step(handle, opt, step, lm_batch(step))


CASES = [
    ("lora", {}),
    ("lora_pro", {}),
    ("lora_ggpo", {"rho": 0.1}),
    ("allora", {}),
    ("lora_sb", {"init_samples": 4}),
    ("corda", {"init_batches": 2}),
    ("eva", {"init_batches": 2}),
]


@pytest.mark.parametrize(("name", "hp"), CASES, ids=[c[0] for c in CASES])
def test_saved_adapter_reloads_with_same_outputs(llama_dir: Path, tmp_path: Path, name: str,
                                                  hp: dict) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    batches = [lm_batch(10 + i, n=4) for i in range(2)]
    handle = apply(name, model, r=4, task_type="causal_lm", batches=batches, **hp)
    _train(handle)
    handle.model.eval()
    probe = lm_batch(99)
    with torch.no_grad():
        expected = handle.model(input_ids=probe["input_ids"]).logits
    out = handle.save_adapter(handle.model, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists()
    fresh = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        got = loaded(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_merged_save_loads_as_plain_model(llama_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    handle = apply("lora_sb", model, r=4, merge_adapter=True, task_type="causal_lm",
                   init_samples=4, batches=[lm_batch(5)])
    _train(handle)
    handle.model.eval()
    probe = lm_batch(99)
    with torch.no_grad():
        expected = handle.model(input_ids=probe["input_ids"]).logits
    out = handle.save_adapter(handle.model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe["input_ids"]).logits, expected,
                                   atol=1e-4, rtol=1e-4)
    # the handle's model is untouched by the merged save
    with torch.no_grad():
        torch.testing.assert_close(handle.model(input_ids=probe["input_ids"]).logits, expected)

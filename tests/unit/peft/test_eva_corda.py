"""EVA and CorDA come from HF peft: check that our configuration produces what the papers define,
recomputed here from the layer inputs collected with a forward hook."""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from algorithms.peft.registry import apply
from tests.unit.peft.helpers import lm_batch, tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"), layers=2)


def _inputs(model: torch.nn.Module, layer: torch.nn.Module, batches: list[dict], per_sequence: bool
            ) -> list[torch.Tensor]:  # type: ignore[type-arg]
    xs: list[torch.Tensor] = []
    h = layer.register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1]).detach()))
    with torch.no_grad():
        for b in batches:
            if per_sequence:
                for j in range(len(b["input_ids"])):
                    model(input_ids=b["input_ids"][j:j + 1])
            else:
                model(**b)
    h.remove()
    return xs


def test_eva_a_spans_the_top_input_directions(llama_dir: Path) -> None:
    """EVA: each A's rows are the top-r right singular vectors of the layer's (centred) inputs."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    batches = [lm_batch(10 + i, n=8, t=16) for i in range(4)]
    layer: Any = model.get_submodule("model.layers.0.self_attn.q_proj")
    X = torch.cat(_inputs(model, layer, batches, per_sequence=False)).double()
    _, _, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    handle = apply("eva", model, r=4, task_type="causal_lm", batches=batches, init_batches=4, rho=1.0)
    layer = handle.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    A = layer.lora_A["default"].weight.detach().double()
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=A.dtype), atol=1e-5, rtol=0)
    overlap = float((Vh[:4] @ A.T).pow(2).sum() / 4)  # 1 = the same subspace
    assert overlap > 0.95, overlap  # peft's incremental PCA over the batches, not an exact SVD
    assert float(layer.lora_B["default"].weight.abs().max()) == 0.0  # B = 0: the model is unchanged
    assert handle.param_counts()[0] > 0


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_adapter_is_the_context_weighted_svd_part(llama_dir: Path, mode: str) -> None:
    """CorDA: with C the layers' input covariance, the adapter s B A is the top-r (IPM) or
    bottom-r (KPM) part of the SVD of W C, times C^-1; the base keeps the residual, so the model's
    output is unchanged at initialisation. (peft scales each sequence's inputs by |max| and adds
    1% of C's mean diagonal before inverting.)"""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    ref = copy.deepcopy(model).eval()
    batches = [lm_batch(10 + i, n=8, t=16) for i in range(2)]
    layer: Any = model.get_submodule("model.layers.0.self_attn.q_proj")
    W0 = layer.weight.detach().double().clone()
    xs = [x.double() / x.max().abs().double() for x in _inputs(model, layer, batches, per_sequence=True)]
    C: torch.Tensor = torch.stack([x.T @ x for x in xs]).mean(0)
    C = C + 0.01 * torch.diag(C).mean() * torch.eye(len(C), dtype=C.dtype)
    U, S, Vh = torch.linalg.svd(W0 @ C)
    sel = slice(0, 4) if mode == "ipm" else slice(-4, None)
    expected = U[:, sel] @ torch.diag(S[sel]) @ Vh[sel] @ torch.linalg.inv(C)

    handle = apply("corda", model, r=4, alpha=8, task_type="causal_lm", batches=batches, init_batches=2,
                   mode=mode)
    adapted: Any = handle.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    A, B = (adapted.lora_A["default"].weight.detach().double(), adapted.lora_B["default"].weight.detach().double())
    delta = adapted.scaling["default"] * B @ A
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(adapted.get_base_layer().weight.double() + delta, W0, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(handle.model(**batches[0]).logits, ref(**batches[0]).logits,
                                   atol=1e-5, rtol=1e-5)

"""Merging PEFT (LoRA) adapters: the merged model is the base plus the merged adapter deltas, with
each delta computed by peft itself (``get_delta_weight``) as the reference."""

import copy

import pytest
import torch
from torch import nn

from algorithms.merging.ties import ties_state_dicts

from ._models import make_merger

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _base() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _adapted(base: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA starts B at zero: give the adapter a delta
            nn.init.normal_(p, std=0.1)
    return model


def _deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """{dense weight name: delta}, by peft's own get_delta_weight."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            dense = name.removeprefix("base_model.model.") + ".weight"
            out[dense] = mod.get_delta_weight("default").detach()
    return out


def test_task_arithmetic_on_adapters_adds_their_deltas_to_the_shared_base() -> None:
    base = _base()
    a, b = _adapted(base, 1), _adapted(base, 2)
    merged = make_merger("task_arithmetic", scaling=0.5).merge([a, b])  # no base given: the shared frozen one
    da, db = _deltas(a), _deltas(b)
    assert len(da) == 2 * len(TARGETS)
    b_sd, m_sd = base.state_dict(), merged.state_dict()
    assert m_sd.keys() == b_sd.keys()  # a dense model of the base's architecture
    for k, w0 in b_sd.items():
        expect = w0 + 0.5 * (da[k] + db[k]) if k in da else w0
        torch.testing.assert_close(m_sd[k], expect, atol=1e-6, rtol=1e-6, msg=k)
    ids = torch.randint(0, 32, (2, 8))
    a.eval()
    with torch.no_grad():  # and the same adapter merged with itself at scaling 1/2 is that adapter
        same = make_merger("task_arithmetic", scaling=0.5).merge([a, copy.deepcopy(a)])
        torch.testing.assert_close(same(input_ids=ids).logits, a(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_ties_and_average_on_adapters_merge_the_deltas() -> None:
    base = _base()
    models = [_adapted(base, s) for s in (1, 2, 3)]
    deltas = [_deltas(m) for m in models]
    b_sd = {k: v.detach() for k, v in base.state_dict().items()}
    sds = [{k: (v + d[k] if k in d else v) for k, v in b_sd.items()} for d in deltas]
    merged = make_merger("ties", density=0.3, scaling=1.0).merge(models)
    expect = ties_state_dicts(sds, b_sd, density=0.3, scaling=1.0)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, expect[k].to(v.dtype), atol=1e-6, rtol=1e-6, msg=k)
    avg = make_merger("average").merge(models).state_dict()
    for k, w0 in b_sd.items():
        expect_k = w0 + sum(d[k] for d in deltas) / 3 if k in deltas[0] else w0
        torch.testing.assert_close(avg[k], expect_k, atol=1e-6, rtol=1e-6, msg=k)


def test_adapters_on_different_bases_need_an_explicit_base() -> None:
    a = _adapted(_base(), 1)
    other = _base()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    b = _adapted(other, 2)
    with pytest.raises(ValueError, match="different base"):
        make_merger("task_arithmetic").merge([a, b])
    with pytest.raises(ValueError, match="every input"):
        make_merger("average").merge([a, _base()])


def test_pleas_on_adapter_models_merges_their_dense_equivalents() -> None:
    """PLeaS sees base + delta of each adapter; an adapter merged with its twin gives it back."""
    base = _base()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    a = _adapted(base, 1).eval()
    ids = torch.randint(0, 32, (8, 16))
    merged = make_merger("pleas", ridge=0.0).merge([a, copy.deepcopy(a)], data=[ids])
    assert not hasattr(merged, "peft_config")
    new = torch.randint(0, 32, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=new).logits, a(input_ids=new).logits, atol=2e-5, rtol=1e-5)

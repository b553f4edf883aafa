"""PLeaS on Llama-family transformers: residual stream, attention heads and MLP units."""

import copy

import pytest
import torch
from torch import nn

from algorithms.merging.pleas_transformer import fold_norms

from ._models import make_merger, permuted_llama, tiny_llama

pytest.importorskip("transformers")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def test_folding_the_norms_keeps_the_function() -> None:
    model = tiny_llama(0)
    ids = torch.randint(0, 32, (3, 12))
    folded = fold_norms(model)
    torch.testing.assert_close(_logits(folded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    assert all(torch.all(p == 1) for n, p in folded.named_parameters() if n.endswith("norm.weight"))


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query and plain multi-head attention
@pytest.mark.parametrize("target_width", [1.0, 1.5])
def test_transformer_and_its_permuted_copy_merge_back_to_it(kv_heads: int, target_width: float) -> None:
    """Residual stream, MLP units, kv heads (with their query heads) and value dimensions all
    randomly permuted: the matching must undo every permutation and the least-squares layers must
    give back the original function on token sequences never seen while merging."""
    model = tiny_llama(0, kv_heads=kv_heads)
    copy_ = permuted_llama(model, seed=3)
    fit, new = torch.randint(0, 32, (8, 16)), torch.randint(0, 32, (4, 20))
    merger = make_merger("pleas", ridge=0.0, target_width=target_width)
    merged = merger.merge([model, copy_], data=[fit])
    torch.testing.assert_close(_logits(merged, new), _logits(model, new), atol=2e-5, rtol=1e-5)
    assert merged.config.intermediate_size == round(target_width * 24)  # type: ignore[union-attr]
    assert max(merger.layer_errors_) < 1e-10
    # the residual permutation: copy_'s unit i is model's unit p[i]
    gen = torch.Generator().manual_seed(3)
    p = torch.randperm(16, generator=gen)
    res = merger.named_matches_["residual"]
    assert torch.equal(p[res.pairs_b], res.pairs_a)


def test_propagate_refits_on_the_merged_models_own_inputs() -> None:
    """On a permuted copy the merged model's own inputs are the ideal ones: still exact. On two
    different models, the refit of the output layer is the least-squares optimum on the merged
    model's actual features, so its logits are closer to the ensemble's than without refitting."""
    model = tiny_llama(0)
    fit, new = torch.randint(0, 32, (8, 16)), torch.randint(0, 32, (4, 20))
    merged = make_merger("pleas", ridge=0.0, propagate=True).merge([model, permuted_llama(model)], data=[fit])
    torch.testing.assert_close(_logits(merged, new), _logits(model, new), atol=2e-5, rtol=1e-5)
    # different models: the refitted output layer is the least-squares optimum on the merged
    # model's own features, so it beats the non-refitted one's output layer on those features
    other = tiny_llama(5)
    ensemble = (_logits(model, fit) + _logits(other, fit)) / 2
    prop = make_merger("pleas", ridge=0.0, propagate=True).merge([model, other], data=[fit])
    plain = make_merger("pleas", ridge=0.0).merge([model, other], data=[fit])
    feats: list[torch.Tensor] = []
    handle = prop.lm_head.register_forward_hook(lambda m, a, o: feats.append(a[0]))  # type: ignore[union-attr]
    _logits(prop, fit)
    handle.remove()
    with torch.no_grad():
        gap_prop = float(((prop.lm_head(feats[0]) - ensemble) ** 2).sum())  # type: ignore[operator]
        gap_plain = float(((plain.lm_head(feats[0]) - ensemble) ** 2).sum())  # type: ignore[operator]
    assert gap_prop < gap_plain


def test_data_free_transformer_merge_uses_random_tokens() -> None:
    model = tiny_llama(0)
    merged = make_merger("pleas", data_free=True, ridge=0.0, noise_samples=16, input_shape=[16]).merge(
        [model, permuted_llama(model)]
    )
    new = torch.randint(0, 32, (4, 20))
    torch.testing.assert_close(_logits(merged, new), _logits(model, new), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "hparams", "needs_base"),
    [
        ("average", {}, False),
        ("task_arithmetic", {"scaling": 0.5}, True),
        ("ties", {"density": 1.0, "scaling": 1.0}, True),  # a disjoint *mean*: lambda 1
        ("atlas", {"steps": 0, "init": 0.5}, True),
        ("pleas", {"ridge": 0.0}, False),
    ],
)
def test_identical_transformers_merge_to_the_model(name: str, hparams: dict, needs_base: bool) -> None:
    model = tiny_llama(0)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 32, (4, 16))
    merged = make_merger(name, **hparams).merge([model, twin], base=tiny_llama(7) if needs_base else None, data=[ids])
    new = torch.randint(0, 32, (3, 10))
    torch.testing.assert_close(_logits(merged, new), _logits(model, new), atol=2e-5, rtol=1e-5)


def test_different_transformers_merge_and_unsupported_cases_are_refused() -> None:
    a, b = tiny_llama(0), tiny_llama(5)
    ids = torch.randint(0, 32, (8, 16))
    merged = make_merger("pleas", target_width=0.5).merge([a, b], data=[ids])
    assert merged.config.intermediate_size == 12  # type: ignore[union-attr]
    assert _logits(merged, ids).shape == (8, 16, 32)
    tied = tiny_llama(0)
    tied.lm_head.weight = tied.model.embed_tokens.weight  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="tied"):
        make_merger("pleas").merge([tied, copy.deepcopy(tied)], data=[ids])

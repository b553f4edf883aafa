"""LISA / OwLore: exactly the sampled blocks (plus the non-block parts) are trained."""

import collections
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import AutoModelForCausalLM

from algorithms.peft.config import LISAConfig, OwLoreConfig
from algorithms.peft.layerwise import find_blocks
from algorithms.peft.registry import apply
from tests.unit.peft.helpers import hooked_step, lm_batch, tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"), layers=4)


def _changed_blocks(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> tuple[set[int], set[str]]:
    blocks, others = set(), set()
    for n, p in model.named_parameters():
        if not torch.equal(before[n], p.detach()):
            if ".layers." in n:
                blocks.add(int(n.split(".layers.")[1].split(".")[0]))
            else:
                others.add(n)
    return blocks, others


@pytest.mark.parametrize("name", ["lisa", "owlore"])
def test_exactly_the_sampled_layers_train(llama_dir: Path, name: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    extra = {"rank": 4, "update_proj_gap": 1} if name == "owlore" else {}
    handle = apply(name, model, n_layers=2, interval=2, seed=1, **extra)
    opt = torch.optim.AdamW(handle.param_groups(handle.model, 1e-2))
    non_block = {n for n, _ in model.named_parameters() if ".layers." not in n}
    seen = []
    for step in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        hooked_step(handle, opt, step, lm_batch(step))
        active = handle.active  # type: ignore[attr-defined]
        assert len(active) == 2
        blocks, others = _changed_blocks(model, before)
        assert blocks == set(active)
        assert others == non_block
        seen.append(tuple(active))
    assert seen[0] == seen[1] and seen[2] == seen[3]  # resampled only every `interval` steps


def successive_sampling_law(p: list[float], k: int) -> dict[frozenset[int], float]:
    """P(the k-subset drawn) when k items are drawn one by one without replacement, each draw
    proportional to p among the items left (OwLore's and numpy.random.choice's rule)."""
    law: dict[frozenset[int], float] = {}
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        law[frozenset(order)] = law.get(frozenset(order), 0.0) + prob
    return law


def block_outlier_ratios(blocks: Any, tau: float) -> list[float]:
    """OWL's ratio per block, weights only: fraction of its linear weights above tau * their mean."""
    out = []
    for block in blocks:
        w = torch.cat([m.weight.detach().abs().flatten() for m in block.modules()
                       if isinstance(m, torch.nn.Linear)]).double()
        out.append(float((w > tau * w.mean()).double().mean()))
    return out


@pytest.fixture(scope="module")
def llama8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama8"), layers=8)


def test_owlore_samples_blocks_by_outlier_ratio_without_replacement(llama8_dir: Path) -> None:
    """Defaults (5 blocks every 50 steps) on 8 blocks with planted outliers: the probabilities are
    the normalised outlier ratios, and the drawn 5-subsets follow the successive-sampling law
    (chi-square over all 56 subsets, 4000 periods, fixed seed). LISA's uniform sampler, run
    through the same statistic, is rejected: the tolerance is one a uniform draw fails."""
    model = AutoModelForCausalLM.from_pretrained(str(llama8_dir))
    blocks: Any = find_blocks(model)
    with torch.no_grad():  # outlier columns: 1, 1, 2, 2, 3, 3, 4, 4 of them
        for b, cols in enumerate([1, 1, 2, 2, 3, 3, 4, 4]):
            blocks[b].mlp.down_proj.weight[:, :cols] = 50.0
    ratios = block_outlier_ratios(blocks, 7.0)
    handle = apply("owlore", model, outlier_threshold=7.0)
    assert (handle.n_layers, handle.interval) == (5, 50)  # type: ignore[attr-defined]
    law_p = [r / sum(ratios) for r in ratios]
    torch.testing.assert_close(handle.probs.double(), torch.tensor(law_p, dtype=torch.float64), rtol=1e-5, atol=0)  # type: ignore[attr-defined]

    law = successive_sampling_law(law_p, 5)
    cells = sorted(law, key=sorted)
    n = 4000

    def p_value(draws: list[list[int]]) -> float:
        counts = collections.Counter(frozenset(d) for d in draws)
        assert all(len(d) == 5 and len(set(d)) == 5 for d in draws)  # without replacement
        observed = np.array([counts[c] for c in cells], dtype=float)
        expected = np.array([law[c] for c in cells]) * n
        return float(scipy.stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)

    assert p_value([handle.sample(k) for k in range(n)]) > 1e-3  # type: ignore[attr-defined]
    lisa = apply("lisa", AutoModelForCausalLM.from_pretrained(str(llama8_dir)), n_layers=5, seed=0)
    assert p_value([lisa.sample(k) for k in range(n)]) < 1e-6  # type: ignore[attr-defined]


def test_layerwise_defaults_are_the_authors() -> None:
    lisa, owlore = LISAConfig(name="lisa"), OwLoreConfig(name="owlore")
    assert (lisa.n_layers, lisa.interval) == (2, 20)
    assert (owlore.n_layers, owlore.interval) == (5, 50)
    assert (owlore.rank, owlore.update_proj_gap, owlore.scale) == (256, 100, 1.0)


def test_sampling_is_a_function_of_the_period(llama_dir: Path) -> None:
    """A run restored mid-period trains the same blocks as the run it continues."""
    torch.manual_seed(0)
    a = apply("lisa", AutoModelForCausalLM.from_pretrained(str(llama_dir)), n_layers=2, interval=3, seed=5)
    periods = []
    for step in range(12):
        a.on_step_start(step, a.model)
        periods.append(tuple(a.active))  # type: ignore[attr-defined]
    assert len(set(periods)) > 1  # it does resample
    b = apply("lisa", AutoModelForCausalLM.from_pretrained(str(llama_dir)), n_layers=2, interval=3, seed=5)
    b.on_step_start(7, b.model)  # restored at step 7 (period 2)
    assert tuple(b.active) == periods[7]  # type: ignore[attr-defined]
    # trainable from the start: the count logged before step 0 is the real one
    c = apply("lisa", AutoModelForCausalLM.from_pretrained(str(llama_dir)), n_layers=2, interval=3, seed=5)
    assert tuple(c.active) == periods[0]  # type: ignore[attr-defined]


def test_owlore_update_is_galore_adam_on_the_sampled_matrix(llama_dir: Path) -> None:
    """First step: Adam's m_hat / sqrt(v_hat) = sign(low), so W -= lr * scale * P sign(P^T G)
    (or sign(G P) P^T), with P from the gradient's SVD (GaLore's projector as the oracle)."""
    from galore_torch.galore_projector import GaLoreProjector

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    lr, rank, scale = 1e-2, 4, 0.25
    handle = apply("owlore", model, n_layers=1, interval=10, rank=rank, scale=scale)
    opt = torch.optim.AdamW(handle.param_groups(handle.model, lr), weight_decay=0.0, eps=1e-12)
    handle.on_step_start(0, handle.model)
    handle.model(**lm_batch(0)).loss.backward()
    blk = handle.blocks[handle.active[0]]  # type: ignore[attr-defined]
    mats = {n: p for n, p in blk.named_parameters() if p.dim() == 2}
    before = {n: p.detach().clone() for n, p in mats.items()}
    grads = {n: p.grad.detach().clone() for n, p in mats.items()}  # type: ignore[union-attr]
    opt.step()
    for n, p in mats.items():
        oracle = GaLoreProjector(rank=rank, update_proj_gap=10, scale=1.0, proj_type="std")
        direction = oracle.project_back(torch.sign(oracle.project(grads[n], 0)))
        torch.testing.assert_close(p.detach(), before[n] - lr * scale * direction, atol=1e-6, rtol=1e-5)
        assert p.grad is None  # the optimizer's own update skipped it
        state = opt.state[p]
        assert state["owlore_step"] == 1 and min(state["owlore_exp_avg"].shape) == rank
    # the moments are in the optimizer's state dict (checkpointed with it)
    assert any("owlore_exp_avg" in s for s in opt.state_dict()["state"].values())

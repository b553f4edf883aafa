"""PLeaS (Nasery et al. 2024): matching, the closed-form least-squares step, and the merged model."""

import numpy as np
import pytest
import torch
from torch import nn

from algorithms.merging.pleas_lstsq import least_squares, solve_grouped
from algorithms.merging.pleas_match import correlation, match_units
from workers.tasks.digits import build_cnn, build_mlp

from ._models import digits_cnn, digits_mlp, make_merger, permuted_copy

# name -> (builder, one example's input shape); the built-in digits task's models take (1, 8, 8)
BUILDERS = {
    "mlp": (lambda: digits_mlp(), (64,)),
    "cnn_pool": (lambda: digits_cnn(), (64,)),
    "digits_task_mlp": (lambda: build_mlp([24, 16]), (1, 8, 8)),
    "digits_task_cnn": (lambda: build_cnn([4, 6], 12), (1, 8, 8)),
}


def _live_model(arch: str) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A random model of ``arch`` whose every hidden unit is active on about half of the inputs.

    Least squares identifies a weight only on the span of its inputs: a ReLU unit that never fires
    on the data has no identifiable outgoing weights (the minimum-norm solution zeroes them). Random
    inits do produce such units, so each hidden unit's bias is shifted to centre its pre-activation
    at the median over reference inputs, making the exact-recovery property well posed."""
    builder, shape = BUILDERS[arch]
    model = builder()
    assert isinstance(model, nn.Sequential)
    x = torch.randn(1000, *shape)
    layers = [m for m in model if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        for layer in layers[:-1]:
            h = x
            for leaf in model:
                h = leaf(h)
                if leaf is layer:
                    break
            per_unit = h.movedim(1, -1).reshape(-1, h.shape[1])
            assert layer.bias is not None
            layer.bias -= per_unit.median(dim=0).values
    return model, shape


def _permutations_of(model: nn.Sequential, seed: int = 1) -> list[torch.Tensor]:
    """The unit permutations ``permuted_copy`` applies (it draws them in this order)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [m for m in model if isinstance(m, nn.Linear | nn.Conv2d)]
    return [torch.randperm(layer.weight.shape[0], generator=gen) for layer in layers[:-1]]


# ---- the whole merge ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("target_width", [1.0, 1.5])
def test_model_and_its_permuted_copy_merge_back_to_the_model(arch: str, target_width: float) -> None:
    """Matching must find the hidden permutation exactly (every unit merged with its image), and the
    least-squares layers must reproduce the original function on inputs never seen while merging."""
    torch.manual_seed(0)
    model, shape = _live_model(arch)
    copy_ = permuted_copy(model, seed=1)
    x_fit, x_new = torch.randn(400, *shape), torch.randn(200, *shape)
    merger = make_merger("pleas", ridge=0.0, target_width=target_width)
    merged = merger.merge([model, copy_], data=[(x_fit, torch.zeros(400))])
    with torch.no_grad():
        torch.testing.assert_close(merged(x_new), model(x_new), atol=2e-5, rtol=1e-5)
    for match, perm in zip(merger.matches_, _permutations_of(model), strict=False):
        # copy_'s unit i is model's unit perm[i]: the pair (a, b) must satisfy perm[b] == a
        assert torch.equal(perm[match.pairs_b], match.pairs_a)
    if target_width == 1.0:  # same size: the merged weights are the model's own (A's unit order)
        for (name, p), q in zip(merged.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["mlp", "digits_task_cnn"])
def test_width_two_keeps_both_models_side_by_side_and_is_the_ensemble(arch: str) -> None:
    """target_width=2 merges no pair: the A-only units must see only A-only (and raw) inputs, so the
    merged model computes both models exactly and its output layer fits the mean of their logits."""
    torch.manual_seed(0)
    (a, shape), (b, _) = _live_model(arch), _live_model(arch)
    x_fit, x_new = torch.randn(500, *shape), torch.randn(200, *shape)
    merger = make_merger("pleas", ridge=0.0, target_width=2.0)
    merged = merger.merge([a, b], data=[x_fit])
    assert all(len(m.pairs_a) == 0 for m in merger.matches_[:-1])
    with torch.no_grad():
        torch.testing.assert_close(merged(x_new), (a(x_new) + b(x_new)) / 2, atol=2e-5, rtol=1e-5)


def test_merged_width_follows_target_width() -> None:
    torch.manual_seed(0)
    a, b = digits_mlp(32, 24), digits_mlp(32, 24)
    for tw, widths in [(1.0, (32, 24)), (1.25, (40, 30)), (0.5, (16, 12))]:
        merged = make_merger("pleas", target_width=tw).merge([a, b], data=[torch.randn(300, 64)])
        linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
        assert tuple(lin.out_features for lin in linears[:-1]) == widths
        assert linears[-1].out_features == 10
        assert merged(torch.randn(3, 64)).shape == (3, 10)


def test_each_layer_fit_is_no_worse_than_permute_then_average() -> None:
    """Weight averaging after the same permutations (Git Re-Basin / ZipIt style) is a feasible point
    of every layer's least-squares problem, so the least-squares error can only be lower."""
    torch.manual_seed(0)
    a, b = digits_mlp(32, 24), digits_mlp(32, 24)
    x = torch.randn(600, 64)
    merger = make_merger("pleas", ridge=0.0)
    merger.merge([a, b], data=[x])
    la = [m for m in a if isinstance(m, nn.Linear)]
    lb = [m for m in b if isinstance(m, nn.Linear)]
    ins_a, ins_b, prev = x, x, None
    for j, (layer_a, layer_b) in enumerate(zip(la, lb, strict=True)):
        m = merger.matches_[j]
        in_a = torch.arange(64) if prev is None else prev.pairs_a
        in_b = torch.arange(64) if prev is None else prev.pairs_b
        xin = ins_a if prev is None else (ins_a[:, in_a] + ins_b[:, in_b]) / 2
        with torch.no_grad():
            out_a, out_b = layer_a(ins_a), layer_b(ins_b)
            target = (out_a[:, m.pairs_a] + out_b[:, m.pairs_b]) / 2
            w = (layer_a.weight[m.pairs_a][:, in_a] + layer_b.weight[m.pairs_b][:, in_b]) / 2
            bias = (layer_a.bias[m.pairs_a] + layer_b.bias[m.pairs_b]) / 2
            avg_err = float(((xin @ w.T + bias - target) ** 2).sum() / (target**2).sum())
        assert merger.layer_errors_[j] <= avg_err + 1e-9, (j, merger.layer_errors_[j], avg_err)
        if j > 0:
            assert merger.layer_errors_[j] < 0.9 * avg_err  # and here strictly better
        ins_a, ins_b, prev = torch.relu(out_a), torch.relu(out_b), m


def test_propagate_fits_on_the_merged_models_own_inputs() -> None:
    torch.manual_seed(0)
    a, _ = _live_model("mlp")
    x, x_new = torch.randn(400, 64), torch.randn(100, 64)
    merged = make_merger("pleas", ridge=0.0, propagate=True).merge([a, permuted_copy(a)], data=[x])
    with torch.no_grad():
        torch.testing.assert_close(merged(x_new), a(x_new), atol=2e-5, rtol=1e-5)


def test_data_free_uses_noise_inputs_and_needs_a_shape_when_it_cannot_infer_one() -> None:
    torch.manual_seed(0)
    a, _ = _live_model("mlp")
    merged = make_merger("pleas", data_free=True, ridge=0.0).merge([a, permuted_copy(a)])
    x_new = torch.rand(100, 64)  # not the noise it was fitted on
    with torch.no_grad():
        torch.testing.assert_close(merged(x_new), a(x_new), atol=2e-5, rtol=1e-5)
    cnn, _ = _live_model("cnn_pool")
    with pytest.raises(ValueError, match="input_shape"):
        make_merger("pleas", data_free=True).merge([cnn, permuted_copy(cnn)])
    merged = make_merger("pleas", data_free=True, input_shape=[64], ridge=0.0).merge([cnn, permuted_copy(cnn)])
    with torch.no_grad():
        torch.testing.assert_close(merged(x_new), cnn(x_new), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs data"):
        make_merger("pleas").merge([a, permuted_copy(a)])


def test_inputs_are_not_modified_and_unsupported_models_are_refused() -> None:
    torch.manual_seed(0)
    a, b = digits_mlp(), digits_mlp()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    make_merger("pleas").merge([a, b], data=[torch.randn(100, 64)])
    for m, s in zip((a, b), before, strict=True):
        for k, v in m.state_dict().items():
            assert torch.equal(v, s[k])
    with pytest.raises(ValueError, match="exactly 2"):
        make_merger("pleas").merge([a, b, digits_mlp()], data=[torch.randn(10, 64)])
    norm = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="LayerNorm"):
        make_merger("pleas").merge([norm, norm], data=[torch.randn(10, 4)])


# ---- step 1: matching ---------------------------------------------------------------------------


def test_correlation_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(50, 4, generator=gen), torch.randn(50, 3, generator=gen)
    expect = np.corrcoef(fa.numpy().T, fb.numpy().T)[:4, 4:]
    np.testing.assert_allclose(correlation(fa, fb).numpy(), expect, atol=1e-6)


def test_partial_matching_merges_the_best_aligned_pairs() -> None:
    """B's units 0-2 are noisy copies of A's units 2, 0, 1 (in decreasing fidelity) and unit 3 is
    unrelated: the merged pairs are taken from the most correlated, the rest kept side by side."""
    gen = torch.Generator().manual_seed(0)
    fa = torch.randn(2000, 4, generator=gen)
    noise = torch.randn(2000, 4, generator=gen)
    fb = torch.stack([fa[:, 2] + 0.1 * noise[:, 0], fa[:, 0] + 0.5 * noise[:, 1],
                      fa[:, 1] + 1.0 * noise[:, 2], noise[:, 3]], 1)  # fmt: skip
    full = match_units(fa, fb, 4)
    pairs = set(zip(full.pairs_a.tolist(), full.pairs_b.tolist(), strict=True))
    assert pairs >= {(2, 0), (0, 1), (1, 2)}
    six = match_units(fa, fb, 6)  # 2 pairs merged: the two best aligned
    assert sorted(zip(six.pairs_a.tolist(), six.pairs_b.tolist(), strict=True)) == [(0, 1), (2, 0)]
    assert sorted(six.only_a.tolist()) == [1, 3] and sorted(six.only_b.tolist()) == [2, 3]
    assert six.width == 6 and six.groups().tolist() == [0, 0, 1, 1, 2, 2]
    eight = match_units(fa, fb, 8)
    assert len(eight.pairs_a) == 0 and eight.width == 8
    three = match_units(fa, fb, 3)  # below the inputs' width: the 3 best pairs, nothing kept apart
    assert sorted(zip(three.pairs_a.tolist(), three.pairs_b.tolist(), strict=True)) == [(0, 1), (1, 2), (2, 0)]
    with pytest.raises(ValueError, match="outside"):
        match_units(fa, fb, 9)


# ---- step 2: least squares reaches the optimum ---------------------------------------------------


def _normal_residual(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray | None, lam: float) -> float:
    """|| (D^T D + Lam) [W^T; b] - D^T Y || / || D^T Y ||, D = [X, 1], Lam = lam on the weights only."""
    d = np.hstack([x, np.ones((len(x), 1))]) if b is not None else x
    sol = np.vstack([w.T, b[None]]) if b is not None else w.T
    reg = np.eye(d.shape[1]) * lam
    if b is not None:
        reg[-1, -1] = 0.0
    return float(np.linalg.norm((d.T @ d + reg) @ sol - d.T @ y) / np.linalg.norm(d.T @ y))


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
@pytest.mark.parametrize("fit_bias", [True, False])
def test_least_squares_solves_the_normal_equations(ridge: float, fit_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 20, dtype=torch.float64)
    y = torch.randn(300, 7, generator=gen, dtype=torch.float64)
    w, b = least_squares(x, y, ridge=ridge, fit_bias=fit_bias)
    xn = x.numpy()
    lam = ridge * float(np.mean(np.sum(xn**2, axis=0)))
    assert _normal_residual(xn, y.numpy(), w.numpy(), None if b is None else b.numpy(), lam) < 1e-10
    if ridge == 0.0:  # and it is numpy's least-squares solution
        d = np.hstack([xn, np.ones((300, 1))]) if fit_bias else xn
        ref = np.linalg.lstsq(d, y.numpy(), rcond=None)[0]
        np.testing.assert_allclose(w.numpy(), ref[:20].T, atol=1e-10)


def test_rank_deficient_least_squares_is_the_minimum_norm_optimum() -> None:
    """Dead units (constant-zero columns) and duplicated columns: the normal equations still hold and
    the solution is the pseudo-inverse's, so a dead input gets zero weight."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    x[:, 2] = 0.0
    x[:, 5] = x[:, 0]
    y = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    w, b = least_squares(x, y, ridge=0.0, fit_bias=False)
    assert b is None
    assert _normal_residual(x.numpy(), y.numpy(), w.numpy(), None, 0.0) < 1e-10
    np.testing.assert_allclose(w.numpy(), (np.linalg.pinv(x.numpy()) @ y.numpy()).T, atol=1e-10)
    assert torch.all(w[:, 2] == 0) or float(w[:, 2].abs().max()) < 1e-12


def test_grouped_least_squares_is_optimal_within_its_allowed_entries() -> None:
    """Shared outputs see every input; A-only outputs see shared and A-only inputs, B-only outputs
    shared and B-only ones. Each group's solution satisfies its own normal equations, and the
    forbidden entries are exactly zero."""
    gen = torch.Generator().manual_seed(0)
    in_groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    out_groups = torch.tensor([0, 0, 1, 2, 2])
    x = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(400, 5, generator=gen, dtype=torch.float64)
    w, b = solve_grouped(x, y, in_groups, out_groups, ridge=0.0, fit_bias=True)
    assert b is not None
    assert torch.all(w[2][in_groups == 2] == 0) and torch.all(w[3:][:, in_groups == 1] == 0)
    for g in (0, 1, 2):
        rows = (out_groups == g).nonzero().flatten()
        cols = torch.ones(8, dtype=torch.bool) if g == 0 else (in_groups == 0) | (in_groups == g)
        xs = x[:, cols].numpy()
        assert _normal_residual(xs, y[:, rows].numpy(), w[rows][:, cols].numpy(), b[rows].numpy(), 0.0) < 1e-10

"""GaLore against the galore-torch package (the oracle), run side by side for 20 steps."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch

from algorithms.optimizers.galore import GaLore
from algorithms.optimizers.projection import galore_side, project, svd_basis, transfer_moments_
from tests.unit.optimizers.helpers import TwoLayer, batches, max_diff, train

galore_torch = pytest.importorskip("galore_torch")


def oracle(model: TwoLayer, **h: Any) -> torch.optim.Optimizer:
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    lr, wd = h.pop("lr"), h.pop("weight_decay")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return galore_torch.GaLoreAdamW([{"params": rest}, {"params": mats, **h}], lr=lr, weight_decay=wd)


@pytest.mark.parametrize(("proj_type", "gap"), [("std", 200), ("std", 5), ("reverse_std", 4), ("left", 3),
                                                ("right", 6), ("full", 7)])
def test_matches_galore_torch_for_20_steps(proj_type: str, gap: int) -> None:
    ref, ours = TwoLayer(), TwoLayer()
    h: dict[str, Any] = dict(rank=4, update_proj_gap=gap, scale=0.25, proj_type=proj_type)
    ref_opt = oracle(ref, lr=1e-2, weight_decay=0.01, **h)
    # with refreshes inside the 20 steps, galore-torch keeps the moments as they are
    ours_opt = GaLore(ours.parameters(), lr=1e-2, weight_decay=0.01, moments_on_change="keep", **h)
    data = batches(20)
    train(ref, ref_opt, data)
    train(ours, ours_opt, data)
    assert max_diff(ref, ours) < 1e-5
    start = TwoLayer()
    assert max_diff(start, ours) > 1e-2  # it did move


def test_projected_moments_differ_from_kept_ones_after_a_refresh() -> None:
    a, b = TwoLayer(), TwoLayer()
    data = batches(8)
    train(a, GaLore(a.parameters(), lr=1e-2, rank=4, update_proj_gap=3, moments_on_change="keep"), data)
    train(b, GaLore(b.parameters(), lr=1e-2, rank=4, update_proj_gap=3, moments_on_change="project"), data)
    assert max_diff(a, b) > 1e-6


@pytest.mark.parametrize("side", ["right", "left", "full"])
def test_moment_transfer_is_a_change_of_coordinates(side: str) -> None:
    """Gradients inside a subspace: moments accumulated in one basis and carried into another basis
    of the same subspace equal the moments accumulated in the new basis directly (first moment
    exactly; second moment exactly when the bases differ by signs and a permutation)."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 4))
    v, _ = torch.linalg.qr(torch.randn(10, 4))
    grads = [u @ torch.randn(4, 4) @ v.T for _ in range(5)]  # all in span(u) x span(v)
    old = svd_basis(grads[0], 4, side)  # type: ignore[arg-type]
    rot, _ = torch.linalg.qr(torch.randn(4, 4))
    perm = torch.eye(4)[[2, 0, 3, 1]] * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]

    Basis = tuple[torch.Tensor, torch.Tensor | None]

    def rebase(basis: Basis, q: torch.Tensor) -> Basis:
        p, p2 = basis
        if side == "right":
            return q @ p, None
        if side == "left":
            return p @ q, None
        assert p2 is not None
        return p @ q, q @ p2

    for q, exact_v in ((rot, False), (perm, True)):
        new = rebase(old, q)
        low_old = torch.stack([project(g, old[0], side, old[1]) for g in grads])  # type: ignore[arg-type]
        low_new = torch.stack([project(g, new[0], side, new[1]) for g in grads])  # type: ignore[arg-type]
        m_old, v_old = low_old.sum(0), (low_old**2).sum(0)
        m_new, v_new = low_new.sum(0), (low_new**2).sum(0)
        m, v = m_old.clone(), v_old.clone()
        transfer_moments_(m, v, side, old, new)  # type: ignore[arg-type]
        assert torch.allclose(m, m_new, atol=1e-5)
        if exact_v:
            assert torch.allclose(v, v_new, atol=1e-5)


def test_state_is_weights_only_serialisable_and_resumes_exactly() -> None:
    data = batches(12)
    full, part = TwoLayer(), TwoLayer()
    opt_full = GaLore(full.parameters(), lr=1e-2, rank=4, update_proj_gap=4, proj_type="full")
    train(full, opt_full, data)
    opt_part = GaLore(part.parameters(), lr=1e-2, rank=4, update_proj_gap=4, proj_type="full")
    train(part, opt_part, data[:6])
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = TwoLayer()
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = GaLore(resumed.parameters(), lr=1e-2, rank=4, update_proj_gap=4, proj_type="full")
    opt_resumed.load_state_dict(copy.deepcopy(ckpt["opt"]))
    train(resumed, opt_resumed, data[6:])
    assert max_diff(full, resumed) == 0.0


def test_one_dimensional_and_opted_out_parameters_get_plain_adam() -> None:
    model = TwoLayer()
    ref = copy.deepcopy(model)
    opt = GaLore([{"params": list(model.parameters()), "low_rank": False}], lr=1e-2, eps=1e-6)
    train(model, opt, batches(5))
    # galore-torch's AdamW without projection is Adam with eps outside the bias correction
    ref_opt = oracle(ref, lr=1e-2, weight_decay=0.0)
    ref_opt.param_groups[1].pop("rank", None)
    train(ref, ref_opt, batches(5))
    assert max_diff(model, ref) < 1e-6
    assert all("proj" not in s for s in opt.state.values())


def test_side_choice() -> None:
    assert galore_side((8, 4), "std") == "right" and galore_side((4, 8), "std") == "left"
    assert galore_side((8, 4), "reverse_std") == "left" and galore_side((4, 4), "reverse_std") == "left"
    with pytest.raises(ValueError):
        galore_side((4, 4), "diagonal")

"""Average, task arithmetic, TIES and aTLAS against hand-computed values and their defining rules."""

import pytest
import torch
from torch import nn

from algorithms.merging.atlas import AtlasMerger
from algorithms.merging.base import MergeContext
from algorithms.merging.ties import ties_state_dicts, trim_top_magnitude

from ._models import assert_same_state, digits_mlp, make_merger, state_of


class Pair(nn.Module):
    """Two named parameter tensors, for hand-computed examples."""

    def __init__(self, a: list[float], b: list[float]) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.register_buffer("steps", torch.tensor(7))  # an integer buffer: copied, never averaged


@pytest.mark.parametrize(
    ("name", "hparams", "needs_base"),
    [
        ("average", {}, False),
        ("task_arithmetic", {"scaling": 1.0 / 3.0}, True),
        ("ties", {"density": 1.0}, True),
        ("atlas", {"steps": 0, "init": "mean"}, True),  # 1/3 of three equal task vectors
        ("pleas", {"ridge": 0.0}, False),
    ],
)
def test_merging_identical_models_returns_the_model(name: str, hparams: dict, needs_base: bool) -> None:
    torch.manual_seed(0)
    model, base = digits_mlp(), digits_mlp()
    x = torch.randn(300, 64)
    copies = [model, digits_mlp(), digits_mlp()] if name != "pleas" else [model, digits_mlp()]
    for c in copies[1:]:
        c.load_state_dict(model.state_dict())
    before = [state_of(m) for m in copies]
    merged = make_merger(name, **hparams).merge(copies, base=base if needs_base else None, data=[x])
    assert merged is not model
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
    if name != "pleas":  # pleas refits the layers: the same function, weights equal up to round-off
        assert_same_state(state_of(merged), state_of(model), atol=1e-6)
    for m, s in zip(copies, before, strict=True):
        assert_same_state(state_of(m), s)  # inputs untouched


def test_average_by_hand_weighted_and_integer_buffers_copied() -> None:
    m1, m2 = Pair([1.0, 2.0], [0.0]), Pair([3.0, -2.0], [4.0])
    out = make_merger("average").merge([m1, m2])
    torch.testing.assert_close(out.a, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out.b, torch.tensor([2.0]))
    out = make_merger("average", weights=[1.0, 3.0]).merge([m1, m2])  # normalised to 1/4, 3/4
    torch.testing.assert_close(out.a, torch.tensor([2.5, -1.0]))
    torch.testing.assert_close(out.b, torch.tensor([3.0]))
    steps = out.get_buffer("steps")
    assert steps.item() == 7 and steps.dtype == torch.int64


def test_task_arithmetic_by_hand() -> None:
    base = Pair([1.0, 1.0], [0.0])
    m1, m2 = Pair([2.0, 0.0], [1.0]), Pair([1.0, 3.0], [-3.0])
    out = make_merger("task_arithmetic", scaling=0.5).merge([m1, m2], base=base)
    # tau1 = [1, -1 | 1], tau2 = [0, 2 | -3]; base + 0.5 * (tau1 + tau2)
    torch.testing.assert_close(out.a, torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(out.b, torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="needs a base"):
        make_merger("task_arithmetic").merge([m1, m2])


def test_ties_hand_computed_example() -> None:
    base = {"w": torch.ones(4)}
    taus = [[3.0, -1.0, 0.5, -4.0], [-2.0, -2.0, 1.0, 1.0], [1.0, 3.0, -0.2, -0.1]]
    sds = [{"w": base["w"] + torch.tensor(t)} for t in taus]
    # trim (top 2 of 4 by magnitude): [3,0,0,-4], [-2,-2,0,0], [1,3,0,0]
    # elect: sign([2, 1, 0, -4]) = [+, +, 0, -]; disjoint mean: [(3+1)/2, 3, 0, -4]
    out = ties_state_dicts(sds, base, density=0.5, scaling=0.5, trim_scope="tensor")
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 1.0, 1.0, 1.0]) + 0.5 * torch.tensor([2.0, 3.0, 0.0, -4.0]))
    # the same through the merger, on modules
    m_base = Pair([1.0, 1.0], [1.0, 1.0])
    mods = [Pair(t[:2], t[2:]) for t in ([4.0, 0.0, 1.5, -3.0], [-1.0, -1.0, 2.0, 2.0], [2.0, 4.0, 0.8, 0.9])]
    merged = make_merger("ties", density=0.5, scaling=0.5, trim_scope="global").merge(mods, base=m_base)
    torch.testing.assert_close(merged.a, torch.tensor([2.0, 2.5]))
    torch.testing.assert_close(merged.b, torch.tensor([1.0, -1.0]))


def test_ties_trim_scope_global_versus_tensor() -> None:
    tau = {"a": torch.tensor([5.0, 4.0]), "b": torch.tensor([0.2, -0.1])}
    glob = trim_top_magnitude(tau, 0.5, "global")
    per = trim_top_magnitude(tau, 0.5, "tensor")
    torch.testing.assert_close(glob["a"], torch.tensor([5.0, 4.0]))
    torch.testing.assert_close(glob["b"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(per["a"], torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(per["b"], torch.tensor([0.2, 0.0]))


def _teacher_problem() -> tuple[nn.Module, nn.Module, list[nn.Module], torch.Tensor]:
    """A base MLP, a teacher, and two 'fine-tuned' models whose task vectors point at the teacher
    but overshoot or undershoot it: m1 moved the hidden layers 4x as far (coefficient 1/4 undoes
    it), m2 moved the output layer half as far (coefficient 2). With these block-wise coefficients
    base + sum_t Lambda_t tau_t is exactly the teacher; no single scalar (task arithmetic) is."""
    torch.manual_seed(0)
    base, teacher = digits_mlp(16, 16), digits_mlp(16, 16)
    m1, m2 = digits_mlp(16, 16), digits_mlp(16, 16)
    tb, tt = base.state_dict(), teacher.state_dict()
    m1.load_state_dict({k: tb[k] + (4.0 * (tt[k] - tb[k]) if k in HIDDEN else 0.0) for k in tb})
    m2.load_state_dict({k: tb[k] + (0.5 * (tt[k] - tb[k]) if k not in HIDDEN else 0.0) for k in tb})
    return base, teacher, [m1, m2], torch.randn(256, 64)


HIDDEN = {"1.weight", "1.bias", "3.weight", "3.bias"}


def _batches(x: torch.Tensor, y: torch.Tensor | None = None) -> list:
    return [x[i : i + 64] if y is None else (x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]


def _task_arithmetic(base: nn.Module, models: list[nn.Module], lam: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The oracle: base + sum_t lam_t[block] * (theta_t - base), per block, in float64 from the state
    dicts (lam_t a scalar, or one per block)."""
    bs = {k: v.double() for k, v in base.state_dict().items()}
    sds = [{k: v.double() for k, v in m.state_dict().items()} for m in models]
    return {k: bs[k] + sum(lam[t][k].double() * (sds[t][k] - bs[k]) for t in range(len(sds))) for k in bs}


def _assert_moved_where_it_matters(merger: AtlasMerger, base: nn.Module, models: list[nn.Module]) -> None:
    """A coefficient moved off zero iff its task vector is non-zero on its block (on a zero block
    its gradient, hence its AdamW step, is zero); one shared by all blocks (blockwise=False) moved."""
    bs = base.state_dict()
    for k, c in merger.coefficients_.items():
        for t, m in enumerate(models):
            if merger.blockwise and torch.equal(m.state_dict()[k], bs[k]):
                assert c[t] == 0.0, (k, t, c)
            else:
                assert abs(float(c[t])) > 0.01, (k, t, c)


@pytest.mark.parametrize("init", ["zero", "mean"])
def test_atlas_at_zero_steps_starts_where_init_says(init: str) -> None:
    """Non-zero task vectors: 'zero' (the authors' start, the default) is exactly the base, 'mean'
    is base + mean_t tau_t."""
    torch.manual_seed(0)
    base = digits_mlp(16, 16)
    bs = base.state_dict()
    models = [digits_mlp(16, 16) for _ in range(2)]
    for m in models:
        m.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in bs.items()})
    merger = make_merger("atlas", steps=0) if init == "zero" else make_merger("atlas", steps=0, init="mean")
    merged = merger.merge(models, base=base).state_dict()
    if init == "zero":
        for k, v in bs.items():
            assert torch.equal(merged[k], v), k
        assert all(not c.any() for c in merger.coefficients_.values())
    else:
        half = {k: torch.tensor(0.5) for k in bs}
        for k, v in _task_arithmetic(base, models, [half, half]).items():
            torch.testing.assert_close(merged[k].double(), v, atol=1e-6, rtol=1e-6, msg=k)


def test_atlas_one_coefficient_per_task_is_learned_task_arithmetic() -> None:
    """blockwise=False: one coefficient lambda_t per task vector, shared by every block, and the
    merged model is task arithmetic with those weights (m1's vector overshoots the teacher 4x on
    the hidden layers, m2's undershoots the output layer: the two learned weights differ)."""
    base, teacher, models, x = _teacher_problem()
    with torch.no_grad():
        probs = torch.softmax(teacher(x), dim=-1)
    merger = make_merger("atlas", steps=60, lr=0.05, blockwise=False)
    merged = merger.merge(models, base=base, data=[(x, probs)]).state_dict()
    lam = merger.coefficients_["1.weight"]
    for c in merger.coefficients_.values():
        assert torch.equal(c, lam)
    assert lam.abs().min() > 0.05 and abs(float(lam[0] - lam[1])) > 0.05, lam
    scalars = [{k: lam[t] for k in merged} for t in range(2)]
    for k, v in _task_arithmetic(base, models, scalars).items():
        torch.testing.assert_close(merged[k].double(), v, atol=1e-6, rtol=1e-6, msg=k)


def test_atlas_recovers_the_blockwise_optimum() -> None:
    """Soft targets from the teacher: the cross-entropy's unique minimiser over the coefficients is
    the teacher's (1/4 on m1's hidden blocks, 2 on m2's output block); aTLAS must find it from zero,
    and the merged model must be exactly base + sum_t coef[t, block] * tau_t[block] with these
    distinct per-block coefficients. No weight decay: it would pull the optimum towards zero."""
    base, teacher, models, x = _teacher_problem()
    with torch.no_grad():
        probs = torch.softmax(teacher(x), dim=-1)
    merger = make_merger("atlas", steps=300, lr=0.1, weight_decay=0.0)
    merged = merger.merge(models, base=base, data=[(x, probs)])
    coef = merger.coefficients_
    for block in HIDDEN:
        assert abs(float(coef[block][0]) - 0.25) < 0.02, (block, coef[block])
    for block in ("5.weight", "5.bias"):
        assert abs(float(coef[block][1]) - 2.0) < 0.02, (block, coef[block])
    per_block = [{k: coef[k][t] for k in coef} for t in range(2)]
    buffers_free = merged.state_dict()
    for k, v in _task_arithmetic(base, models, per_block).items():
        torch.testing.assert_close(buffers_free[k].double(), v, atol=1e-6, rtol=1e-6, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(merged(x), -1), probs, atol=5e-3, rtol=0.0)


def test_atlas_with_a_callers_loss_function() -> None:
    """A task's own loss (here: squared error to the teacher's logits, whose minimiser is again the
    teacher) is used through the swapped weights."""
    base, teacher, models, x = _teacher_problem()
    with torch.no_grad():
        target = teacher(x)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    merger = make_merger("atlas", MergeContext(loss_fn=loss_fn), steps=300, lr=0.1, weight_decay=0.0)
    merger.merge(models, base=base, data=[(x, target)])
    assert abs(float(merger.coefficients_["1.weight"][0]) - 0.25) < 0.02
    assert abs(float(merger.coefficients_["5.weight"][1]) - 2.0) < 0.02


@pytest.mark.parametrize("blockwise", [True, False])
@pytest.mark.parametrize("unlabelled", [False, True])
def test_atlas_moves_the_coefficients_from_zero_and_lowers_its_objective(unlabelled: bool, blockwise: bool) -> None:
    """Hard labels (cross-entropy) or no labels (prediction entropy), default optimiser settings:
    a few steps move the coefficients off zero and give a lower objective, measured on the merged
    model, than the start, which is the base."""
    base, teacher, models, x = _teacher_problem()
    y = teacher(x).argmax(1).detach()
    merger = make_merger("atlas", steps=20, unlabelled=unlabelled, blockwise=blockwise)
    merged = merger.merge(models, base=base, data=_batches(x) if unlabelled else _batches(x, y))

    def objective(model: nn.Module, n: int = len(x)) -> float:
        with torch.no_grad():
            logits = model(x[:n])
        if unlabelled:
            logp = torch.log_softmax(logits, -1)
            return float(-(logp.exp() * logp).sum(-1).mean())
        return float(nn.functional.cross_entropy(logits, y[:n]))

    assert merger.losses_[0] == pytest.approx(objective(base, 64), rel=1e-5)  # first step: the base
    _assert_moved_where_it_matters(merger, base, models)
    assert objective(merged) < objective(base) - 0.01


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_atlas_weight_decay_is_decoupled(weight_decay: float) -> None:
    """AdamW, as the authors: m2's task vector is zero on the hidden blocks, so their coefficient
    gets no gradient and only the decoupled decay moves it, c <- c (1 - lr wd) per step, from the
    'mean' start 1/2 (Adam with an L2 term would step by about lr instead)."""
    base, teacher, models, x = _teacher_problem()
    y = teacher(x).argmax(1).detach()
    merger = make_merger("atlas", steps=10, lr=0.01, weight_decay=weight_decay, init="mean")
    merger.merge(models, base=base, data=_batches(x, y))
    expect = 0.5 * (1.0 - 0.01 * weight_decay) ** 10
    for block in HIDDEN:
        assert float(merger.coefficients_[block][1]) == pytest.approx(expect, rel=1e-6), block


def test_atlas_keeps_a_bf16_model_in_bf16() -> None:
    """A bf16 base and inputs: the coefficients are fitted with the model in bf16 (bf16 batches
    would not go through a float32 copy) and the merged weights are bf16, equal to the composition
    computed in float64 up to bf16 rounding."""
    base, teacher, models, x = _teacher_problem()
    y = teacher(x).argmax(1).detach()
    base, models = base.to(torch.bfloat16), [m.to(torch.bfloat16) for m in models]
    merger = make_merger("atlas", steps=5, lr=0.05)
    merged = merger.merge(models, base=base, data=_batches(x.to(torch.bfloat16), y))
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert all(c.dtype == torch.float32 for c in merger.coefficients_.values())
    _assert_moved_where_it_matters(merger, base, models)
    coef = merger.coefficients_
    per_block = [{k: coef[k][t] for k in coef} for t in range(2)]
    sd = merged.state_dict()
    for k, v in _task_arithmetic(base, models, per_block).items():
        torch.testing.assert_close(sd[k].double(), v, atol=4e-3, rtol=2e-2, msg=k)
    assert merged(x[:4].to(torch.bfloat16)).dtype == torch.bfloat16


def test_mismatched_models_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        make_merger("average").merge([digits_mlp(16, 16), digits_mlp(32, 16)])

"""LoRA-SB: the initial adapter is the best rank-r approximation of the approximated first full
step, dW = -init_lr * sign(sum of the per-sample gradients) (the authors') or -init_lr * mean
gradient; the reference takes the gradients one sample at a time on an untouched copy."""

import copy

import pytest
import torch

from algorithms.peft.registry import apply
from tests.unit.peft.helpers import TinyMLP, mlp_batch


def per_sample_gradients(model: TinyMLP, batches: list[dict[str, torch.Tensor]], n: int) -> list[torch.Tensor]:
    """Sum over the first n samples of d loss(sample) / dW for fc1 and fc2 (one backward each)."""
    xs = torch.cat([b["x"] for b in batches])[:n]
    ys = torch.cat([b["labels"] for b in batches])[:n]
    for i in range(n):
        model(x=xs[i : i + 1], labels=ys[i : i + 1])["loss"].backward()
    grads = [lin.weight.grad.clone() for lin in (model.fc1, model.fc2) if lin.weight.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def best_rank_r(dW: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dW)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize(("init_update", "n_samples"), [("sign", 20), ("sign", 32), ("gradient", 20)])
def test_initial_update_is_best_rank_r_of_first_step(init_update: str, n_samples: int) -> None:
    """20 samples: the second batch of 16 is cut after 4 samples."""
    torch.manual_seed(0)
    model = TinyMLP()
    ref = copy.deepcopy(model)
    batches = [mlp_batch(0), mlp_batch(1), mlp_batch(2)]
    r, init_lr = 2, 0.05
    handle = apply("lora_sb", model, r=r, alpha=16.0, target_modules=["fc1", "fc2"], init_samples=n_samples,
                   init_update=init_update, init_lr=init_lr, batches=batches)
    summed = per_sample_gradients(ref, batches, n_samples)
    for pair, lin, g in zip(handle.pairs, [ref.fc1, ref.fc2], summed, strict=True):  # type: ignore[attr-defined]
        if init_update == "sign":
            assert float(g.abs().min()) > 1e-6 * float(g.abs().max())  # no sign decided by rounding
            dW = -init_lr * torch.sign(g)
        else:
            dW = -init_lr * g / n_samples
        core = pair.layer.lora_A["default"]
        delta = pair.scaling * pair.layer.lora_B["default"].weight @ core.weight
        torch.testing.assert_close(delta, best_rank_r(dW, r), atol=1e-6, rtol=1e-4)
        # the merged model starts from W0 + that update
        torch.testing.assert_close(pair.base_weight, lin.weight)
    # only the r x r cores are trained
    trainable = [n for n, p in handle.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(n.endswith(".R") for n in trainable)
    assert handle.param_counts()[0] == 2 * r * r


def test_default_follows_the_authors_and_short_batches_warn() -> None:
    """Default: 170 samples and the sign; 2 batches of 16 hold fewer, which is said and used."""
    torch.manual_seed(0)
    model = TinyMLP()
    ref = copy.deepcopy(model)
    batches = [mlp_batch(0), mlp_batch(1)]
    with pytest.warns(UserWarning, match="init_samples is 170 but the init batches hold 32"):
        handle = apply("lora_sb", model, r=2, target_modules=["fc1"], init_lr=0.1, batches=batches)
    g = per_sample_gradients(ref, batches, 32)[0]
    pair = handle.pairs[0]  # type: ignore[attr-defined]
    delta = pair.scaling * pair.layer.lora_B["default"].weight @ pair.layer.lora_A["default"].weight
    torch.testing.assert_close(delta, best_rank_r(-0.1 * torch.sign(g), 2), atol=1e-6, rtol=1e-4)


def test_training_moves_only_the_core() -> None:
    torch.manual_seed(0)
    handle = apply("lora_sb", TinyMLP(), r=2, target_modules=["fc1"], init_samples=16, batches=[mlp_batch(0)])
    before = {n: p.detach().clone() for n, p in handle.model.state_dict().items()}
    opt = torch.optim.AdamW(handle.param_groups(handle.model, 1e-2))
    handle.model(**mlp_batch(1))["loss"].backward()
    opt.step()
    after = handle.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.endswith(".R")}

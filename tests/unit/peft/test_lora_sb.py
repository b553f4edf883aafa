"""LoRA-SB: the initial adapter is the best rank-r approximation of the first full-gradient step."""

import copy

import torch

from algorithms.peft.registry import apply
from tests.unit.peft.helpers import TinyMLP, mlp_batch


def test_initial_update_is_best_rank_r_of_first_step() -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    ref = copy.deepcopy(model)
    batches = [mlp_batch(0), mlp_batch(1)]
    r, init_lr = 2, 0.05
    handle = apply("lora_sb", model, r=r, alpha=16.0, target_modules=["fc1", "fc2"],
                   init_batches=2, init_lr=init_lr, batches=batches)
    # the full gradient, computed independently on an untouched copy
    for b in batches:
        (ref(**b)["loss"] / 2).backward()
    for pair, lin in zip(handle.pairs, [ref.fc1, ref.fc2], strict=True):  # type: ignore[attr-defined]
        assert lin.weight.grad is not None
        U, S, Vh = torch.linalg.svd(-init_lr * lin.weight.grad)
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        core = pair.layer.lora_A["default"]
        delta = pair.scaling * pair.layer.lora_B["default"].weight @ core.weight
        torch.testing.assert_close(delta, best, atol=1e-6, rtol=1e-4)
        # the merged model starts from W0 + that update
        torch.testing.assert_close(pair.base_weight, lin.weight)
    # only the r x r cores are trained
    trainable = [n for n, p in handle.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(n.endswith(".R") for n in trainable)
    assert handle.param_counts()[0] == 2 * r * r


def test_training_moves_only_the_core() -> None:
    torch.manual_seed(0)
    handle = apply("lora_sb", TinyMLP(), r=2, target_modules=["fc1"], init_batches=1,
                   batches=[mlp_batch(0)])
    before = {n: p.detach().clone() for n, p in handle.model.state_dict().items()}
    opt = torch.optim.AdamW(handle.param_groups(handle.model, 1e-2))
    handle.model(**mlp_batch(1))["loss"].backward()
    opt.step()
    after = handle.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.endswith(".R")}

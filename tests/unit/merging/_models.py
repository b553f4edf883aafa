"""Small models shared by the merging tests."""

import copy

import torch
from torch import nn


def digits_mlp(h1: int = 32, h2: int = 24) -> nn.Sequential:
    """The built-in digits MLP's layout."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


def digits_cnn(c1: int = 8, c2: int = 12, hidden: int = 20) -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def permuted_copy(model: nn.Sequential, seed: int = 1) -> nn.Sequential:
    """The same function with the units of every hidden layer randomly permuted."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    layers = [m for m in out if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        for cur, nxt in zip(layers[:-1], layers[1:], strict=True):
            d = cur.weight.shape[0]
            p = torch.randperm(d, generator=gen)
            cur.weight.copy_(cur.weight[p])
            assert cur.bias is not None
            cur.bias.copy_(cur.bias[p])
            if isinstance(nxt, nn.Linear) and nxt.in_features != d:  # Linear after Flatten of conv maps
                s = nxt.in_features // d
                nxt.weight.copy_(nxt.weight.view(nxt.out_features, d, s)[:, p].reshape(nxt.out_features, -1))
            else:
                nxt.weight.copy_(nxt.weight[:, p])
    return out


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0.0 if atol == 0.0 else 1e-6, msg=k)

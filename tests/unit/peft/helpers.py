"""Small models shared by the PEFT tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TinyMLP(nn.Module):
    """x -> fc2(tanh(fc1(x))); MSE loss against ``labels`` when given (HF-style output dict)."""

    def __init__(self, d_in: int = 12, d_hidden: int = 10, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.fc2(torch.tanh(self.fc1(x)))
        res = {"logits": out}
        if labels is not None:
            res["loss"] = ((out - labels) ** 2).mean()
        return res


def mlp_batch(seed: int = 0, n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 12, generator=g), "labels": torch.randn(n, 3, generator=g)}


def tiny_llama(path: Path, layers: int = 4) -> Path:
    from workers.tasks.pretrained import save_tiny_llama

    return save_tiny_llama(path, hidden_size=32, num_layers=layers, num_heads=4,
                           intermediate_size=48, tokenizer_from=None, vocab_size=64)


def lm_batch(seed: int = 0, n: int = 4, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def hooked_step(handle, opt, step: int, batch: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    """One optimizer step with the PEFT handle's hooks where the worker loop calls them."""
    handle.on_step_start(step, handle.model)
    loss = handle.model(**batch)["loss"]
    handle.before_backward(step, handle.model)
    loss.backward()
    handle.after_backward(step, handle.model)
    opt.step()
    opt.zero_grad(set_to_none=True)

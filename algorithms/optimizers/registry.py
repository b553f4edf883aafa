"""Optimizer registry (seed by the lead with torch's adamw and sgd; the optimizer family extends it)."""

from collections.abc import Callable, Iterable
from typing import Any

import torch

from algorithms.optimizers.config import AdamWConfig, OptimizerBase, SGDConfig

Builder = Callable[..., torch.optim.Optimizer]
_REGISTRY: dict[str, Builder] = {}


def register(name: str, builder: Builder) -> None:
    if name in _REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    _REGISTRY[name] = builder


def build(name: str, params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](params, **hparams)


def build_from_config(cfg: OptimizerBase, params: Iterable[Any]) -> torch.optim.Optimizer:
    return build(cfg.name, params, **cfg.model_dump(exclude={"name"}))


def _adamw(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    AdamWConfig(name="adamw", **h)
    return torch.optim.AdamW(params, lr=h["lr"], betas=tuple(h.get("betas", (0.9, 0.999))),
                             eps=h.get("eps", 1e-8), weight_decay=h.get("weight_decay", 0.0))


def _sgd(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    SGDConfig(name="sgd", **h)
    return torch.optim.SGD(params, lr=h["lr"], momentum=h.get("momentum", 0.0),
                           nesterov=h.get("nesterov", False), weight_decay=h.get("weight_decay", 0.0))


register("adamw", _adamw)
register("sgd", _sgd)

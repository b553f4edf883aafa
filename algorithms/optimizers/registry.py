"""Optimizer registry: ``build(name, params, **hparams)`` and ``build_from_config(cfg, params)``.

Hyperparameters are validated by the pydantic model of that optimizer (``config.py``) before the
optimizer is built, so ``build`` refuses what the spec would refuse. Closure-based optimizers
(``needs_closure = True``: sam, adazo_sam, lorenza) take the worker loop's
``forward_backward(backward: bool) -> loss`` in ``step``.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch

from algorithms.optimizers import config as C

Builder = Callable[..., torch.optim.Optimizer]
_REGISTRY: dict[str, Builder] = {}


def register(name: str, builder: Builder) -> None:
    if name in _REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    _REGISTRY[name] = builder


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](params, **hparams)


def build_from_config(cfg: C.OptimizerBase, params: Iterable[Any]) -> torch.optim.Optimizer:
    return build(cfg.name, params, **cfg.model_dump(exclude={"name"}))


def _validated(cls: type[C.OptimizerBase], name: str, h: dict[str, Any]) -> dict[str, Any]:
    return cls(name=name, **h).model_dump(exclude={"name"})


def _adamw(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    c = _validated(C.AdamWConfig, "adamw", h)
    return torch.optim.AdamW(params, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"],
                             weight_decay=c["weight_decay"])


def _sgd(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    c = _validated(C.SGDConfig, "sgd", h)
    return torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"], nesterov=c["nesterov"],
                           weight_decay=c["weight_decay"])


def _galore(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    from algorithms.optimizers.galore import GaLore

    return GaLore(params, **_validated(C.GaLoreConfig, "galore", h))


def _dct(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    from algorithms.optimizers.dct import DCT

    return DCT(params, **_validated(C.DCTConfig, "dct", h))


def _adazo_sam(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    from algorithms.optimizers.adazo_sam import AdaZoSAM

    return AdaZoSAM(params, **_validated(C.AdaZoSAMConfig, "adazo_sam", h))


def _lorenza(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    from algorithms.optimizers.lorenza import Lorenza

    return Lorenza(params, **_validated(C.LorenzaConfig, "lorenza", h))


def _sam(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    from algorithms.optimizers.sam import SAM

    return SAM(params, **_validated(C.SAMConfig, "sam", h))


def _lamb(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    from algorithms.optimizers.library import lamb

    return lamb(params, **_validated(C.LambConfig, "lamb", h))


def _diffgrad(params: Iterable[Any], **h: Any) -> torch.optim.Optimizer:
    from algorithms.optimizers.library import diffgrad

    return diffgrad(params, **_validated(C.DiffGradConfig, "diffgrad", h))


register("adamw", _adamw)
register("sgd", _sgd)
register("galore", _galore)
register("dct", _dct)
register("adazo_sam", _adazo_sam)
register("lorenza", _lorenza)
register("sam", _sam)
register("lamb", _lamb)
register("diffgrad", _diffgrad)

"""Optimizer registry: config class -> builder of a ``torch.optim.Optimizer`` over ``params``.

``OPTIMIZERS.build(cfg, params)`` builds from the spec's validated config; ``build(name, params,
**fields)`` from a name and fields (validated once, by the config). Builders pass the config's
fields on: defaults and bounds live in ``config.py``. Closure-based optimizers (their config's
``NEEDS_CLOSURE``: sam, adazo_sam, lorenza) take the worker loop's
``forward_backward(backward: bool) -> loss`` in ``step``.
"""

from collections.abc import Iterable
from typing import Any

import torch

from algorithms.optimizers import config as C
from algorithms.registry import Registry, fields_of

Params = Iterable[Any]
OPTIMIZERS: Registry[C.OptimizerBase, torch.optim.Optimizer] = Registry("optimizer", C.OptimizerBase)
build = OPTIMIZERS.build_named
names = OPTIMIZERS.names


@OPTIMIZERS.register(C.AdamWConfig)
def _adamw(cfg: C.AdamWConfig, params: Params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register(C.SGDConfig)
def _sgd(cfg: C.SGDConfig, params: Params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@OPTIMIZERS.register(C.GaLoreConfig)
def _galore(cfg: C.GaLoreConfig, params: Params) -> torch.optim.Optimizer:
    from algorithms.optimizers.galore import GaLore

    return GaLore(params, **fields_of(cfg))


@OPTIMIZERS.register(C.DCTConfig)
def _dct(cfg: C.DCTConfig, params: Params) -> torch.optim.Optimizer:
    from algorithms.optimizers.dct import DCT

    return DCT(params, **fields_of(cfg))


@OPTIMIZERS.register(C.AdaZoSAMConfig)
def _adazo_sam(cfg: C.AdaZoSAMConfig, params: Params) -> torch.optim.Optimizer:
    from algorithms.optimizers.adazo_sam import AdaZoSAM

    return AdaZoSAM(params, **fields_of(cfg))


@OPTIMIZERS.register(C.LorenzaConfig)
def _lorenza(cfg: C.LorenzaConfig, params: Params) -> torch.optim.Optimizer:
    from algorithms.optimizers.lorenza import Lorenza

    return Lorenza(params, **fields_of(cfg))


@OPTIMIZERS.register(C.SAMConfig)
def _sam(cfg: C.SAMConfig, params: Params) -> torch.optim.Optimizer:
    from algorithms.optimizers.sam import SAM

    return SAM(params, **fields_of(cfg))


@OPTIMIZERS.register(C.LambConfig)
def _lamb(cfg: C.LambConfig, params: Params) -> torch.optim.Optimizer:
    from algorithms.optimizers.library import lamb

    return lamb(params, **fields_of(cfg))


@OPTIMIZERS.register(C.DiffGradConfig)
def _diffgrad(cfg: C.DiffGradConfig, params: Params) -> torch.optim.Optimizer:
    from algorithms.optimizers.library import diffgrad

    return diffgrad(params, **fields_of(cfg))

"""Gradient coding against stragglers (Tandon et al. 2017; Krishnan et al. 2023).

Hyperparameters live in :mod:`algorithms.coding.config` (no torch). The code itself is loaded
lazily, so that importing the config does not import torch::

    from algorithms.coding import build, decode_gradient
    code = build("cyclic_repetition", n_workers=8, n_stragglers=2)
    full = decode_gradient(code, {worker: coded_grad, ...})   # any n - s workers
"""

from typing import Any

_LAZY = {
    "build": "algorithms.coding.registry",
    "CODES": "algorithms.coding.registry",
    "known": "algorithms.coding.registry",
    "decode_gradient": "algorithms.coding.decode",
    "decode_job": "algorithms.coding.decode",
    "UndecodableError": "algorithms.coding.base",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'algorithms.coding' has no attribute {name!r}")

"""LAMB and diffGrad, taken from ``pytorch-optimizer`` (wrapped, not rewritten), configured to the
papers' rules.

- LAMB (You et al., ICLR 2020, arXiv 1904.00962, Algorithm 2): ``r = m_hat / (sqrt(v_hat) + eps)``,
  ``u = r + wd * x``, ``x -= lr * phi(||x||) / ||u|| * u`` with ``phi(z) = min(z, 10)`` per tensor.
  ``pytorch_optimizer.Lamb`` with ``weight_decouple=False`` (decay inside ``u``, as in the paper)
  and ``adam_debias=True`` (no extra ``1/(1-beta1^t)`` on the step; the trust ratio sets its size).
  It leaves the bias correction out of ``r`` ("v3 without bias correction"): with
  ``weight_decay=0`` the trust ratio makes that exactly the paper's step up to where ``eps`` sits
  (``eps`` vs ``eps sqrt(1-beta2^t)``); with weight decay the balance between ``r`` and ``wd x`` differs
  early in training by the factor ``sqrt(1-beta2^t)/(1-beta1^t)``.
- diffGrad (Dubey et al., IEEE TNNLS 2019, arXiv 1909.11015): Adam whose step is multiplied
  elementwise by the friction ``xi = sigmoid(|g_{t-1} - g_t|)`` (``g_0 = 0``), with the authors' code's
  numerics (step ``lr sqrt(1-beta2^t)/(1-beta1^t)``, ``eps`` added to ``sqrt(v)``) and L2 weight decay
  added to the gradient (``weight_decouple=False``), as in the paper's code. The library adds 1e-15
  to ``v`` under the square root, which only matters for coordinates with ``|g| < ~1e-6``.
"""

from collections.abc import Iterable
from typing import Any

import torch


def lamb(params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
         weight_decay: float = 0.0) -> torch.optim.Optimizer:
    from pytorch_optimizer import Lamb

    return Lamb(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,  # type: ignore[arg-type]
                weight_decouple=False, adam_debias=True)


def diffgrad(params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
             weight_decay: float = 0.0) -> torch.optim.Optimizer:
    from pytorch_optimizer import DiffGrad

    return DiffGrad(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,  # type: ignore[arg-type]
                    weight_decouple=False)

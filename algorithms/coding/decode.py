"""Ray-free decoding helpers for a parameter server (the piece ``workers/`` calls).

Usage in a parameter-server step with a one-shot code::

    code = CODES.build(cfg, n_workers)
    # worker i computes  sum_j code.B[i, j] * grad(part j)   (see ``code.parts(i)``)
    arrived = {}                                  # worker -> coded gradient (flat tensor)
    ...  # ray.wait until len(arrived) >= n - s, put results in `arrived`
    full = decode_gradient(code, arrived)         # sum over all parts of their gradients

and with a sequential code, after ``code.complete(round, alive)`` reports job ``j`` decodable::

    full = decode_job(code, j, results)           # results: (round, worker, slot) -> tensor

Both raise :class:`UndecodableError` when what arrived does not determine the gradient. The
result is the *sum* of the part gradients; divide by the number of samples (or parts) for a
mean. Decoding weights are computed in float64 and applied in the gradients' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from algorithms.coding.base import GradientCode, SequentialCode, TaskKey, UndecodableError


def decode_gradient(code: GradientCode, arrived: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Full gradient ``sum_j g_j`` from the coded gradients of the workers in ``arrived``."""
    if not arrived:
        raise UndecodableError("no coded gradient arrived")
    a = code.decode(list(arrived))
    out: torch.Tensor | None = None
    for w, g in arrived.items():
        if a[w] == 0:
            continue
        term = g * float(a[w])
        out = term if out is None else out + term
    if out is None:  # every weight zero: only happens for a zero code
        raise UndecodableError("decoding weights are all zero")
    return out


def decode_job(code: SequentialCode, job: int, results: Mapping[TaskKey, torch.Tensor]) -> torch.Tensor:
    """Full gradient of ``job`` from task results keyed by ``(round, worker, slot)``."""
    weights = code.job_weights(job)
    missing = [k for k in weights if k not in results]
    if missing:
        raise UndecodableError(f"job {job}: results for {missing[:4]} were not kept")
    out: torch.Tensor | None = None
    for k, w in weights.items():
        term = results[k] * w
        out = term if out is None else out + term
    assert out is not None
    return out


def unit_weights(code: GradientCode | SequentialCode) -> bool:
    """True when every encoding coefficient is 0 or 1 (fractional repetition, uncoded): coded
    messages are then plain sums and decoding picks 0/1 weights, so float32 messages lose
    nothing. Codes with real coefficients (cyclic repetition) amplify rounding by the condition
    number of the survivors' rows: encode and decode those in float64."""
    base = getattr(code, "code", code)  # a sequential code wraps a one-shot code
    B = getattr(base, "B", None)
    if B is None:
        return False
    return bool(((B == 0) | (B == 1)).all())

"""Every registered gradient code, from its default config on 6 workers: with no stragglers, the
decoded gradient is the sum of every data part's gradient (each part a known vector here)."""

import pytest
import torch

from algorithms.coding import CODES, decode_gradient, decode_job
from algorithms.coding import config as C


@pytest.mark.parametrize("config_cls", list(CODES), ids=lambda c: c.__name__)
def test_decodes_the_full_gradient_without_stragglers(config_cls: type[C.CodeBase]) -> None:
    n, n_jobs = 6, 3
    cfg = CODES.config(str(config_cls.model_fields["scheme"].annotation.__args__[0]))
    cfg.validate_for(n)
    code = CODES.build(cfg, n, n_jobs)
    gen = torch.Generator().manual_seed(0)
    if not cfg.SEQUENTIAL:
        part_grads = torch.randn(code.n_parts, 5, generator=gen, dtype=torch.float64)
        arrived = {w: sum(float(code.B[w, j]) * part_grads[j] for j in code.parts(w)) for w in range(n)}
        torch.testing.assert_close(decode_gradient(code, arrived), part_grads.sum(0))
        return
    part_grads = torch.randn(n_jobs, len(code.part_fractions), 5, generator=gen, dtype=torch.float64)
    results: dict[tuple[int, int, int], torch.Tensor] = {}
    decoded: dict[int, torch.Tensor] = {}
    for r in range(n_jobs + code.delay):
        tasks = code.assign(r)
        for w in range(n):
            for slot, task in enumerate(tasks[w]):
                results[(r, w, slot)] = sum(c * part_grads[task.job, p] for p, c in task.coeffs)
        for job in code.complete(r, list(range(n))):
            decoded[job] = decode_job(code, job, results)
    assert sorted(decoded) == list(range(n_jobs)) and code.overdue() == []
    for job in range(n_jobs):
        torch.testing.assert_close(decoded[job], part_grads[job].sum(0))

"""The Triton Gram kernel against a float64 Gram and the bmm path.

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1`` has to be set before
Triton compiles anything, hence the subprocess); on a CUDA machine the compiled kernel is checked
the same way and through the rules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algorithms.aggregation import base, gram_kernel
from algorithms.aggregation.registry import build

ROOT = Path(__file__).resolve().parents[3]
needs_triton = pytest.mark.skipif(gram_kernel.triton is None, reason="Triton is not installed")

# (n, d, centered): n across the tile sizes 16/32/64, d across tiles, spans and ragged ends
CASES = [(1, 300, False), (5, 40_000, False), (5, 40_000, True), (16, 16_384, True), (17, 129, False),
         (33, 20_000, True), (64, 1_000, False), (3, 0, True)]


def float64_gram(x: torch.Tensor, centered: bool) -> torch.Tensor:
    x = x.double()
    if centered:
        x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def check_cases(device: str) -> None:
    """Every case: the kernel within fp32 rounding of float64, and of the bmm path."""
    g = torch.Generator().manual_seed(0)
    for n, d, centered in CASES:
        wide = torch.randn(n, d + 7, generator=g) * 3 + 1  # an offset mean makes centring matter
        x = wide[:, 5:5 + d].to(device)  # a column slice: row stride d + 7, as the rules' blocks
        got = gram_kernel.gram_triton(x, centered).cpu()
        want = float64_gram(x.cpu(), centered)
        scale = float(want.abs().max()) if d else 1.0
        assert got.shape == (n, n) and got.dtype == torch.float64, (n, d)
        err = float((got - want).abs().max()) / scale
        assert err < 1e-5, (n, d, centered, err)
        with_bmm = base.gram(x.cpu(), centered)  # CPU tensors take the bmm path
        assert float((got - with_bmm).abs().max()) / scale < 1e-5, (n, d, centered)
    half = (torch.randn(7, 5_000, generator=g)).to(device, torch.bfloat16)
    got = gram_kernel.gram_triton(half, True).cpu()
    want = float64_gram(half.float().cpu(), True)
    assert float((got - want).abs().max()) / float(want.abs().max()) < 1e-5


@needs_triton
def test_kernel_under_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    code = "from tests.unit.aggregation.test_gram_kernel import check_cases; check_cases('cpu'); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_cpu_tensors_take_the_bmm_path() -> None:
    assert not gram_kernel.available(torch.zeros(4, 8))


needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and gram_kernel.triton is not None),
                                reason="needs a CUDA GPU and Triton")


@needs_cuda
def test_compiled_kernel_on_cuda() -> None:
    check_cases("cuda")


@needs_cuda
@pytest.mark.parametrize("rule", ["flag", "krum", "multi_krum", "geometric_median", "bulyan"])
def test_rules_agree_with_and_without_the_kernel(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 3_000_000, generator=g) + torch.randn(3_000_000, generator=g)).cuda()
    agg = build(rule, f=3, chunk=1 << 20)
    with_kernel = agg(x)
    monkeypatch.setattr(gram_kernel, "ENABLED", False)
    without = agg(x)
    cos = torch.nn.functional.cosine_similarity(with_kernel, without, dim=0)
    assert float(cos) > 1 - 1e-6
    assert float((with_kernel - without).norm() / without.norm()) < 1e-4

"""The Triton kernels (raw and centred Gram, linear combination) against float64 and torch's bmm/matmul
paths.

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

from algorithms.aggregation import base, row_kernels
from tests.unit.aggregation.hopper import compile_for_hopper, needs_hopper_compiler

ROOT = Path(__file__).resolve().parents[3]
needs_triton = pytest.mark.skipif(row_kernels.triton is None, reason="Triton is not installed")

# (n, d, span): n across one block (<= 8 rows, padded), several blocks and a ragged last block;
# d across tiles, stretches and ragged ends
CASES = [(1, 300, 1024), (2, 40_000, 1024), (5, 40_000, 2048), (8, 16_384, 1024), (9, 129, 1024),
         (16, 100_000, 4096), (17, 5_000, 1024), (33, 20_000, 2048), (64, 1_000, 1024), (3, 0, 1024),
         (16, 70_000, row_kernels.SPAN)]


def check_centred(x: torch.Tensor, span: int) -> None:
    """The centred Gram (every row minus the rows' mean, as it is loaded) within fp32 rounding of float64
    for the same centre, and its distances within fp32 rounding of torch's centred path."""
    n, d = x.shape
    center = row_kernels.mean_triton(x)
    assert center.shape == (d,) and torch.allclose(center.cpu().double(), x.cpu().double().mean(0), atol=1e-4)
    got = row_kernels.gram_triton(x, span=span, center=center).cpu()
    y = x.cpu().double() - center.cpu().double()
    want = y @ y.T
    scale = want.diagonal().sqrt()
    rel = (got - want).abs() / (scale[:, None] * scale[None, :]).clamp_min(1e-30)
    assert torch.equal(got, got.T) and float(rel.max()) < 1e-5, (n, d, span, float(rel.max()))
    if n > 1 and d:
        d2_kernel = base.distances_from_gram(got)
        d2_torch = base.distances_from_gram(base.gram(x.cpu(), centered=True))
        assert float((d2_kernel - d2_torch).abs().max()) <= 1e-5 * float(d2_torch.max()), (n, d)


def check_cases(device: str) -> None:
    """Every case: the kernels within fp32 rounding of float64, and of the bmm path."""
    g = torch.Generator().manual_seed(0)
    for n, d, span in CASES:
        wide = torch.randn(n, d + 7, generator=g) * 3 + 1
        wide[0] *= 50.0  # rows of very different norms, as under a scaled attack
        x = wide[:, 5:5 + d].to(device)  # a column slice: row stride d + 7, as the rules' blocks
        got = row_kernels.gram_triton(x, span=span).cpu()
        want = x.cpu().double() @ x.cpu().double().T
        assert got.shape == (n, n) and got.dtype == torch.float64, (n, d)
        assert torch.equal(got, got.T), (n, d)
        scale = want.diagonal().sqrt()
        rel = (got - want).abs() / (scale[:, None] * scale[None, :]).clamp_min(1e-30)  # per entry, as cosines
        assert float(rel.max()) < 1e-5, (n, d, span, float(rel.max()))
        with_bmm = base.gram(x.cpu(), centered=False)  # CPU tensors take the bmm path
        assert float(((got - with_bmm).abs() / (scale[:, None] * scale[None, :]).clamp_min(1e-30)).max()) < 1e-5
        if device == "cuda" or n * d <= 400_000:  # the interpreter is slow: there, the smaller cases
            check_centred(x, span)
        coef = torch.randn(n, generator=g, dtype=torch.float64)
        for block in (256, 2048):
            value = row_kernels.combine_triton(coef, x, block=block).cpu()
            want_v = coef @ x.cpu().double()
            bound = coef.abs() @ x.cpu().double().abs()  # the sum's own scale, per coordinate
            assert value.shape == (d,) and value.dtype == x.dtype, (n, d)
            assert bool(((value.double() - want_v).abs() <= 5e-6 * bound + 1e-30).all()), (n, d, block)
    half = (torch.randn(7, 5_000, generator=g)).to(device, torch.bfloat16)
    got = row_kernels.gram_triton(half, span=1024).cpu()
    want = half.float().cpu().double() @ half.float().cpu().double().T
    assert float((got - want).abs().max()) / float(want.abs().max()) < 1e-5


@needs_triton
def test_kernel_under_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    code = "from tests.unit.aggregation.test_row_kernels import check_cases; check_cases('cpu'); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@needs_hopper_compiler
@pytest.mark.parametrize("center,mask_cols", [(False, False), (True, False), (True, True)])
def test_gram_kernel_compiles_for_hopper(center: bool, mask_cols: bool, tmp_path: Path) -> None:
    signature = {"x_ptr": "*fp32", "c_ptr": "*fp32", "out_ptr": "*fp32", "block_a_ptr": "*i32", "block_b_ptr": "*i32",
                 "n": "i32", "length": "i32", "stride_row": "i32", "pairs": "i32"}
    constants = {"RB": 8, "BLOCK": row_kernels.BLOCK, "SPAN": row_kernels.SPAN, "MASK_ROWS": True,
                 "MASK_COLS": mask_cols, "CENTER": center}
    assert " LOCAL:0 " in compile_for_hopper(row_kernels._kernel, signature, constants, tmp_path)  # no spills


def test_cpu_tensors_take_torchs_path() -> None:
    assert not row_kernels.available(torch.zeros(4, 8))
    assert not row_kernels.available(torch.zeros(row_kernels.MAX_ROWS + 1, 8))


needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and row_kernels.triton is not None),
                                reason="needs a CUDA GPU and Triton")


@needs_cuda
def test_compiled_kernel_on_cuda() -> None:
    check_cases("cuda")


@needs_cuda
@pytest.mark.parametrize("n", [2, 4, 16])
def test_flag_agrees_with_and_without_the_kernel(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(n, 3_000_000, generator=g) + torch.randn(3_000_000, generator=g)).cuda()
    # the registry needs pydantic (the spec's models), which a bare GPU image may lack: the kernels' own
    # checks above run there without it
    registry = pytest.importorskip("algorithms.aggregation.registry")
    agg = registry.build("flag", f=(n - 1) // 4, chunk=1 << 20)
    with_kernel = agg(x)
    monkeypatch.setattr(row_kernels, "ENABLED", False)
    without = agg(x)
    cos = torch.nn.functional.cosine_similarity(with_kernel, without, dim=0)
    assert float(cos) > 1 - 1e-6
    assert float((with_kernel - without).norm() / without.norm()) < 1e-4


@pytest.mark.skipif(not (torch.cuda.device_count() > 1 and row_kernels.triton is not None),
                    reason="needs two CUDA GPUs and Triton")
def test_kernels_run_on_the_tensors_gpu_not_the_current_one() -> None:
    g = torch.Generator().manual_seed(2)
    cpu = torch.randn(5, 100_000, generator=g)
    coef = torch.randn(5, generator=g, dtype=torch.float64)
    torch.cuda.set_device(0)
    x = cpu.to("cuda:1")
    got = row_kernels.gram_triton(x)
    assert got.device == x.device
    torch.testing.assert_close(got.cpu(), cpu.double() @ cpu.double().T, rtol=1e-5, atol=1e-3)
    value = row_kernels.combine_triton(coef, x)
    torch.testing.assert_close(value.cpu().double(), coef @ cpu.double(), rtol=1e-5, atol=1e-4)

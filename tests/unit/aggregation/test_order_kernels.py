"""The order-statistic kernels (median, trimmed mean, Bulyan's step) and the torch paths of the rules,
bit for bit against the numpy references of tests/unit/aggregation/refs.py, on inputs full of ties
(small integers), NaNs and infinities.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` has to be set before Triton
compiles anything, hence the subprocess); there, :func:`row_kernels.available` is also made to accept
CPU tensors, so that the rules' own dispatch to the kernels (the plan passed to Bulyan's, the centred
Gram of its statistic) runs too. On a CUDA machine the compiled kernels are checked the same way, and
every rule with the kernels against the same rule with them switched off.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from algorithms.aggregation import base, order_kernels, row_kernels
from algorithms.aggregation.base import Rule
from algorithms.aggregation.coordinate import Median, TrimmedMean
from algorithms.aggregation.krum import Bulyan
from tests.unit.aggregation import refs
from tests.unit.aggregation.hopper import compile_for_hopper, needs_hopper_compiler

ROOT = Path(__file__).resolve().parents[3]
NS = [3, 4, 5, 15, 16, 17]
needs_triton = pytest.mark.skipif(order_kernels.triton is None, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and order_kernels.triton is not None),
                                reason="needs a CUDA GPU and Triton")


def tied_rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32, specials: bool = True) -> torch.Tensor:
    """``[n, d]`` drawn from a dozen values (ties everywhere; small integers, and values whose sums and
    quotients round, so that the order of the additions and the division show), a column slice of a
    wider tensor (row stride ``d + 9``, as the rules' blocks); with ``specials``, a few NaNs and
    infinities, and a stretch of columns that are NaN in most rows."""
    g = torch.Generator().manual_seed(seed)
    big = 1e7 + 1 if dtype == torch.float32 else 1000.5  # exact in the dtype, and a sum with 0.1 rounds
    pool = torch.tensor([-3, -2, -1, 0, 1, 2, 3, 0.1, -1 / 3, 7 / 3, big, 1e-4], dtype=torch.float64).to(dtype)
    wide = pool[torch.randint(0, len(pool), (n, d + 9), generator=g)]
    if specials:
        for value, count in ((float("nan"), d // 15 + 1), (float("inf"), d // 40 + 1), (-float("inf"), d // 40 + 1)):
            wide.view(-1)[torch.randint(0, n * (d + 9), (count,), generator=g)] = value
        wide[: (n + 1) // 2, 20:24] = float("nan")  # NaN reaches the median there
    return wide[:, 4:4 + d]


def same_bits(got: torch.Tensor, want: np.ndarray) -> bool:
    """Equal to the bit where a number, NaN where NaN (its payload is not part of the definitions)."""
    got_np = got.cpu().numpy()
    if got_np.shape != want.shape or got_np.dtype != want.dtype:
        return False
    nan = np.isnan(want)
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
    return bool((np.isnan(got_np) == nan).all()
                and (got_np[~nan].view(bits) == want[~nan].view(bits)).all())


def bulyan_cases(n: int) -> list[tuple[int, list[int]]]:
    """(f, selected rows) pairs for ``n`` rows: the f that Bulyan allows (n >= 4f + 3), and a kernel-level
    one with a bigger trim; the rows in a scrambled order (the step must not depend on it)."""
    g = torch.Generator().manual_seed(n)
    cases = []
    for f in sorted({max(0, (n - 3) // 4), (n - 1) // 4}):
        theta = n - 2 * f
        if 2 * f < theta:
            cases.append((f, torch.randperm(n, generator=g)[:theta].tolist()))
    return cases


def check_kernels(device: str) -> None:
    """Every kernel, every n of NS, d over several blocks and a ragged end: equal to the reference."""
    for n in NS:
        d = 2 * order_kernels.block_for(n) + 37
        x = tied_rows(n, d, seed=n)
        xn = x.numpy()
        xd = x.to(device)
        assert same_bits(order_kernels.median_triton(xd), refs.exact_median(xn)), ("median", n)
        for f in sorted({1, (n - 1) // 2}):
            got = order_kernels.trimmed_mean_triton(xd, f)
            assert same_bits(got, refs.exact_trimmed_mean(xn, f)), ("trimmed_mean", n, f)
        for f, rows in bulyan_cases(n):
            got = order_kernels.bulyan_triton(xd, torch.tensor(rows), f)
            assert same_bits(got, refs.exact_bulyan_step(xn, rows, f)), ("bulyan", n, f, rows)
    half = tied_rows(16, 300, seed=99, dtype=torch.float16)  # every operation rounds to fp16
    hn = half.numpy()
    assert same_bits(order_kernels.median_triton(half.to(device)), refs.exact_median(hn))
    assert same_bits(order_kernels.trimmed_mean_triton(half.to(device), 3), refs.exact_trimmed_mean(hn, 3))
    rows = list(range(2, 12))
    assert same_bits(order_kernels.bulyan_triton(half.to(device), torch.tensor(rows), 3),
                     refs.exact_bulyan_step(hn, rows, 3))
    assert order_kernels.median_triton(torch.zeros(5, 0, device=device)).shape == (0,)


def check_rules_through_the_kernels() -> None:
    """The rules dispatching to the kernels (CPU tensors let in) against the same rules on torch's path:
    the same bits for the order statistics (Bulyan: the same selection from the centred Gram kernel,
    which is within fp32 rounding of torch's)."""
    real_available, real_gram = row_kernels.available, row_kernels.gram_triton

    def on_any_device(t: torch.Tensor) -> bool:
        return t.dim() == 2 and 0 < t.shape[0] <= row_kernels.MAX_ROWS and t.dtype == torch.float32

    for n, f in ((5, 1), (11, 2), (16, 3)):
        g = torch.Generator().manual_seed(n)
        x = tied_rows(n, 600, seed=3 * n, specials=False) + torch.randn(n, 600, generator=g)
        classes: list[type[Rule]] = [Median, TrimmedMean] + ([Bulyan] if n >= 4 * f + 3 else [])
        rules = [cls(f, chunk=256) for cls in classes]  # blocks of 256 and a ragged one
        row_kernels.available = on_any_device  # type: ignore[assignment]
        # a shorter stretch per program than on a GPU: the interpreter walks it one tile at a time
        row_kernels.gram_triton = functools.partial(real_gram, span=1024)  # type: ignore[assignment]
        try:
            with_kernels = [rule(x) for rule in rules]
            centred = base.gram(x, centered=True)
        finally:
            row_kernels.available, row_kernels.gram_triton = real_available, real_gram  # type: ignore[assignment]
        for rule, value in zip(rules, with_kernels, strict=True):
            assert torch.equal(value, rule(x)), (rule.name, n, f)
        want = base.gram(x, centered=True)
        scale = want.diagonal().sqrt()
        assert float(((centred - want).abs() / (scale[:, None] * scale[None, :])).max()) < 1e-5, n


@needs_triton
def test_kernels_under_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    code = ("from tests.unit.aggregation.test_order_kernels import check_kernels, check_rules_through_the_kernels; "
            "check_kernels('cpu'); check_rules_through_the_kernels(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("n", NS)
def test_torch_paths_match_the_references(n: int) -> None:
    """The rules on CPU (torch's sort, the ordered mean) against the references, ties and NaNs included."""
    x = tied_rows(n, 300, seed=10 + n)
    xn = x.numpy()
    assert same_bits(Median().apply(None, x)[0], refs.exact_median(xn))
    for f in sorted({1, (n - 1) // 2}):
        assert same_bits(TrimmedMean(f).apply(None, x)[0], refs.exact_trimmed_mean(xn, f)), f
    for f, rows in bulyan_cases(n):
        value, mass = Bulyan(f).apply(torch.tensor(rows), x, with_mass=True)
        assert same_bits(value, refs.exact_bulyan_step(xn, rows, f)), (f, rows)
        assert mass is not None and mass.shape == (n,)
    half = x.to(torch.float16)
    assert same_bits(TrimmedMean(1).apply(None, half)[0], refs.exact_trimmed_mean(half.numpy(), 1))
    wide = x.double()
    assert same_bits(Bulyan(0).apply(torch.arange(n), wide)[0], refs.exact_bulyan_step(wide.numpy(), list(range(n)), 0))


def test_bulyan_window_on_ties_and_nans() -> None:
    """theta = 5, f = 1: the 3 values nearest the median stay, found by dropping two ends."""
    def step(values: list[float]) -> float:
        x = torch.tensor(values).reshape(-1, 1)
        return float(Bulyan(1).apply(torch.arange(len(values)), x)[0])

    assert step([2.0, 3.0, 4.0, 6.0, 20.0]) == 3.0  # 20 goes, then 2 and 6 are as far from 4: 6 goes
    assert step([20.0, 6.0, 4.0, 3.0, 2.0]) == 3.0  # the rows' order does not matter
    assert step([1.0, 2.0, 3.0, 7.0, float("nan")]) == 2.0  # the NaN goes first, then 7
    assert np.isnan(step([float("nan")] * 3 + [1.0, 1.0]))  # a NaN median gives NaN


@pytest.mark.parametrize("n", range(1, 19))
def test_network_sorts_every_zero_one_input(n: int) -> None:
    """A comparator network sorts everything iff it sorts every 0/1 input (Knuth's 0-1 principle)."""
    wires = np.array(list(itertools.product((0, 1), repeat=n)), dtype=np.int8).T
    for i, j in order_kernels.network(n):
        assert 0 <= i < j < n
        wires[i], wires[j] = np.minimum(wires[i], wires[j]), np.maximum(wires[i], wires[j])
    assert (np.diff(wires, axis=0) >= 0).all()


def test_network_sizes() -> None:
    assert [len(order_kernels.network(n)) for n in (1, 2, 16, 64)] == [0, 1, 63, 543]


@needs_cuda
def test_compiled_kernels_on_cuda() -> None:
    check_kernels("cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,f", [(5, 0), (16, 3), (17, 3), (64, 15)])
def test_rules_agree_with_and_without_the_kernels(n: int, f: int, dtype: torch.dtype,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bits with the kernels and with torch's sort on the GPU: the median and the trimmed mean
    as whole rules (torch's path in blocks, with a ragged one), Bulyan's step for a given selection.
    bf16 is checked here only: numpy has no bf16 for a reference, and Triton's interpreter truncates
    fp32 to bf16 where the GPU rounds to nearest even, as torch does."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randint(-4, 5, (n, 1_000_003), generator=g).to(dtype) * 0.5).cuda()
    x[0, :1000] = float("nan")
    selection = torch.randperm(n, generator=g)[:n - 2 * f]

    def both(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with_kernels = fn()
        monkeypatch.setattr(row_kernels, "ENABLED", False)
        without = fn()
        monkeypatch.setattr(row_kernels, "ENABLED", True)
        return with_kernels, without

    chunk = 1 << 18
    pairs = {"median": both(lambda: Median(f, chunk=chunk)(x)),
             "trimmed_mean": both(lambda: TrimmedMean(max(f, 1), chunk=chunk)(x)),
             "bulyan step": both(lambda: Bulyan(f).apply(selection, x)[0])}
    for name, (with_kernels, without) in pairs.items():
        assert with_kernels.dtype == without.dtype == dtype, name
        assert torch.equal(with_kernels.isnan(), without.isnan()), name
        assert torch.equal(with_kernels.nan_to_num(), without.nan_to_num()), name


@needs_cuda
def test_bulyan_selects_the_same_rows_from_the_gram_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The centred Gram from the kernels (mean pass + Gram pass) and from bmm: the same selection, and the
    whole rule then gives the same bits (the kernels apply it to all of d at once, torch in blocks)."""
    g = torch.Generator().manual_seed(7)
    n, d = 16, 3_000_001
    x = (torch.randn(d, generator=g) + torch.rand(n, 1, generator=g) * torch.randn(n, d, generator=g)).cuda()
    rule = Bulyan(3, chunk=1 << 20)

    def statistic() -> torch.Tensor:
        total = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for s, e in base.chunks(d, rule.chunk):
            part = rule.stats(x[:, s:e])
            assert part is not None
            total += part
        return total

    with_kernels, value = statistic(), rule(x)
    monkeypatch.setattr(row_kernels, "ENABLED", False)
    assert torch.equal(rule.plan(with_kernels, n), rule.plan(statistic(), n))
    assert torch.equal(value, rule(x))


@needs_hopper_compiler
@pytest.mark.parametrize("kind,n,f,dtype,mask", [
    ("median", 16, 0, "fp32", False), ("trimmed_mean", 16, 3, "fp32", False), ("bulyan", 10, 3, "fp32", False),
    ("median", 17, 0, "bf16", True), ("bulyan", 10, 3, "fp16", True)])
def test_kernels_compile_for_hopper_without_spills(kind: str, n: int, f: int, dtype: str, mask: bool,
                                                   tmp_path: Path) -> None:
    kernel = {"median": order_kernels._median_kernel, "trimmed_mean": order_kernels._trimmed_mean_kernel,
              "bulyan": order_kernels._bulyan_kernel}[kind]
    signature = {"x_ptr": f"*{dtype}"} | ({"rows_ptr": "*i64"} if kind == "bulyan" else {})
    signature |= {"out_ptr": f"*{dtype}", "length": "i32", "stride_row": "i32"}
    constants: dict[str, Any] = {"N": n, "NET": order_kernels.network(n)} | ({"F": f} if kind != "median" else {})
    constants |= {"BLOCK": order_kernels.block_for(n), "MASK": mask}
    assert " LOCAL:0 " in compile_for_hopper(kernel, signature, constants, tmp_path)  # no register spills

"""Aggregation time on one GPU: every rule at n = 16 workers, d = 25M and 100M coordinates.

Times ``rule(grads[n, d])`` (fp32, on the device, synchronised) for every rule of
``algorithms.aggregation`` (f = 3), plus ``flag`` with one IRLS iteration as the authors' code does.

``--ref-path DIR`` also times the Flag authors' reference implementation
(github.com/hamidralmasi/FlagAggregator, a checkout outside the repo) on the same gradients, side by
side, and the cosine between its aggregate and ours (one IRLS iteration, same r). It needs only
torch and numpy: the checkout's ``aggregators/flag.py`` and ``aggregators/center_algorithms*.py``
are loaded as they are, with three shims applied from outside (their code is not modified): a
stand-in for the package ``__init__`` (which imports their whole framework), a stub ``pandas`` if
it is not installed (imported, unused), and an ``open`` that discards the CSV rows the reference
appends to fixed paths under /home/data. Its cost includes what the reference does on every call:
a random ``d x r`` start drawn on the CPU, a QR of it, an SVD of the ``d x n`` weighted matrix.

Launched with ``torchrun --nproc_per_node 2`` (two GPUs), it first times the collectives of the
same sizes: the ``all_reduce`` a plain mean needs, the all-to-all + all-gather of the shard
exchange (``workers/exchange.py``'s robust reduce-scatter) and the all-gather of the gather
exchange; then rank 0 times the rules. Run alone, it says that the collectives were not measured.

    python bench/gpu_aggregation.py --ref-path .ref/FlagAggregator
    torchrun --nproc_per_node 2 bench/gpu_aggregation.py --ref-path .ref/FlagAggregator
    python bench/gpu_aggregation.py --quick --device cpu [--ref-path ...]   # a smoke test
    python bench/gpu_aggregation.py --gram-sweep --sizes 25e6 100e6          # the kernels' settings vs torch

``--gram bmm`` times the rules with torch's path instead of the Triton kernels of
``algorithms.aggregation.row_kernels`` and ``order_kernels`` (cuBLAS bmm for the Gram, matmul for the
combination, torch's sort for the order statistics; same GPU, same rows).

``--order-stats`` times the order-statistic rules (median, trimmed mean, Bulyan; f = 3) with the
kernels and with torch's path, checks that both give the same bits, and prints each against the
all-reduce of the same size: measured under ``torchrun`` on 2 GPUs, otherwise the figure recorded in
bench/RESULTS.md (2 x H200) for 25M and 100M, or ``--allreduce-ms``. Then Bulyan's parts (the
centred Gram, the plan on the CPU, the coordinate step) and each kernel alone, in GB/s of rows read.
``--order-sweep`` times the kernels' launch settings. These modes import no pydantic, scipy or Ray:

    python bench/gpu_aggregation.py --order-stats --sizes 25e6 100e6 --reps 10
    torchrun --nproc_per_node 2 bench/gpu_aggregation.py --order-stats --sizes 25e6 100e6 --reps 10
    python bench/gpu_aggregation.py --order-sweep --sizes 25e6 100e6
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import itertools
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.aggregation import order_kernels, row_kernels  # noqa: E402
from algorithms.aggregation.base import Rule, chunks  # noqa: E402
from algorithms.aggregation.coordinate import Median, TrimmedMean  # noqa: E402
from algorithms.aggregation.krum import Bulyan  # noqa: E402

RULES: list[tuple[str, dict[str, Any]]] = [
    ("mean", {}), ("median", {"f": 3}), ("trimmed_mean", {"f": 3}), ("krum", {"f": 3}),
    ("multi_krum", {"f": 3}), ("bulyan", {"f": 3}), ("geometric_median", {"f": 3}),
    ("flag", {"f": 3}), ("flag", {"f": 3, "max_iter": 1}),
]


# The order-statistic rules, their goals (x the all-reduce of the same size, on one H200) and the all-reduce
# recorded in bench/RESULTS.md (`torchrun --nproc_per_node 2 bench/gpu_aggregation.py --sizes 25e6 100e6
# --reps 20`, 2 x H200, 2026-11-26), used when this process cannot measure it.
ORDER_RULES: list[tuple[str, type[Rule], float]] = [("median", Median, 3.0), ("trimmed_mean", TrimmedMean, 3.0),
                                                   ("bulyan", Bulyan, 6.0)]
RECORDED_ALLREDUCE_MS = {25_000_000: 0.38, 100_000_000: 1.37}


def build(name: str, **params: Any) -> Rule:
    """A rule from its spec name, through the registry (which needs pydantic, as the spec does: the
    ``--order-*`` modes build their rules directly and run without it)."""
    from algorithms.aggregation.registry import build as build_rule

    return build_rule(name, **params)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> tuple[float, Any]:
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0, out


def grads(n: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device)
    x.add_(torch.randn(1, d, generator=g, device=device))  # a shared direction, as real gradients have
    return x


# --- the reference implementation, loaded from a checkout ---------------------------------------
@contextlib.contextmanager
def _quiet_open() -> Iterator[Callable[..., Any]]:
    def fake_open(path: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if "home/data" in str(path):
            return io.StringIO()
        return open(path, mode, *a, **k)

    yield fake_open


def load_reference(path: Path) -> Callable[..., torch.Tensor]:
    """The authors' ``aggregators/flag.py:aggregate``, loaded from ``path`` with outside shims."""
    agg_dir = path / "aggregators"
    if not (agg_dir / "flag.py").exists():
        raise SystemExit(f"--ref-path {path}: no aggregators/flag.py (clone hamidralmasi/FlagAggregator there)")
    pkg = types.ModuleType("flagref")
    pkg.__path__ = [str(agg_dir)]
    pkg.register = lambda *a, **k: None  # type: ignore[attr-defined]
    sys.modules["flagref"] = pkg
    if importlib.util.find_spec("pandas") is None:
        sys.modules["pandas"] = types.ModuleType("pandas")
    with _quiet_open() as fake_open:
        mods = {}
        for name in ("center_algorithms", "center_algorithms_torch", "flag"):
            spec = importlib.util.spec_from_file_location(f"flagref.{name}", agg_dir / f"{name}.py")
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            mod.open = fake_open  # type: ignore[attr-defined]
            sys.modules[f"flagref.{name}"] = mod
            setattr(pkg, name, mod)
            spec.loader.exec_module(mod)
            mods[name] = mod
    return mods["flag"].aggregate  # type: ignore[no-any-return]


# --- collectives under torchrun -----------------------------------------------------------------
def bench_collectives(sizes: list[int], device: torch.device, reps: int) -> tuple[list[str], dict[int, float]]:
    """The table of the collectives (rank 0; empty elsewhere) and the all-reduce's ms per size."""
    world, rank = dist.get_world_size(), dist.get_rank()
    lines = [f"\n### Collectives on {world} x {device_name(device)} (fp32, median of {reps})\n",
             "| d | all_reduce (mean) ms | all_to_all + all_gather (shard exchange) ms | "
             "all_gather (gather exchange) ms |", "|---|---|---|---|"]
    all_reduce_ms = {}
    for d in sizes:
        row, all_reduce_ms[d] = _collective_row(d, world, device, reps)
        lines.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return (lines if rank == 0 else []), all_reduce_ms


def _collective_row(d: int, world: int, device: torch.device, reps: int) -> tuple[str, float]:
    d_pad = -(-d // world) * world
    x = torch.randn(d_pad, device=device)
    recv = torch.empty_like(x)
    out_gather = torch.empty(world * d_pad, device=device)
    shard = torch.empty(d_pad // world, device=device)
    full = torch.empty(d_pad, device=device)

    def all_reduce() -> None:
        dist.all_reduce(x)

    def shard_exchange() -> None:
        dist.all_to_all_single(recv, x)
        dist.all_gather_into_tensor(full, shard)

    def gather_exchange() -> None:
        dist.all_gather_into_tensor(out_gather, x)

    row = [f"{d / 1e6:g}M"]
    slowest = []
    for fn in (all_reduce, shard_exchange, gather_exchange):
        dist.barrier()
        ms, _ = timed(fn, device, reps, warmup=2)
        t = torch.tensor([ms], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest.append(float(t))
        row.append(f"{float(t):.2f}")
    return "| " + " | ".join(row) + " |", slowest[0]


def _rules_for_size(x: torch.Tensor, f: int, reps: int, ref_reps: int,
                    reference: Callable[..., torch.Tensor] | None) -> tuple[dict[str, str], list[str]]:
    n, d = x.shape
    cells: dict[str, str] = {}
    notes: list[str] = []
    ours_flag1 = None
    flag1_cols = build("flag", f=f, max_iter=1).columns(n)  # type: ignore[attr-defined]  # the reference's r_col
    for name, params in RULES:
        label = name + (f" (max_iter={params['max_iter']})" if "max_iter" in params else "")
        rule = build(name, **params)
        try:
            ms, out = timed(lambda rule=rule: rule(x), x.device, reps)  # type: ignore[misc]
            cells[label] = f"{ms:.2f}"
            if label == "flag (max_iter=1)":
                ours_flag1 = out
        except torch.cuda.OutOfMemoryError:
            cells[label] = "OOM"
        print(f"  d={d}: {label} {cells[label]} ms", flush=True)
    if reference is not None:
        label = "flag, authors' reference (1 IRLS iteration)"
        rows_list = list(x.unbind(0))
        try:
            ms, out = timed(lambda: reference(gradients=rows_list, r_col=flag1_cols), x.device, ref_reps)
            cells[label] = f"{ms:.1f}"
            if ours_flag1 is not None:
                ref = out.reshape(-1).to(ours_flag1.device, torch.float64)
                cos = float(torch.nn.functional.cosine_similarity(ref, ours_flag1.double(), dim=0))
                rel = float((ref.norm() - ours_flag1.double().norm()).abs() / ref.norm())
                notes.append(f"d = {d / 1e6:g}M: cosine(reference, ours with max_iter=1) = {cos:.6f}, "
                             f"relative norm difference {rel:.1e}")
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            cells[label] = f"failed: {type(exc).__name__}"
            notes.append(f"d = {d / 1e6:g}M: reference {exc!s:.200}")
        print(f"  d={d}: {label} {cells[label]} ms", flush=True)
    return cells, notes


def profile(rule_name: str, sizes: list[int], n: int, device: torch.device, reps: int) -> None:
    """Where one rule's time goes: its time at a few block sizes (``chunk``), then torch.profiler's
    table of the top operators and kernels at the default block size."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for d in sizes:
        x = grads(n, d, device)
        for chunk in (1 << 20, 1 << 22, 1 << 24, 1 << 26):
            ms, _ = timed(lambda c=chunk, x=x: build(rule_name, f=3, chunk=c)(x), device, reps)  # type: ignore[misc]
            print(f"{rule_name} d={d / 1e6:g}M chunk={chunk}: {ms:.2f} ms", flush=True)
        rule = build(rule_name, f=3)
        rule(x)
        sync(device)
        with torch_profile(activities=acts) as prof:
            for _ in range(reps):
                rule(x)
            sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"\n{rule_name} d={d / 1e6:g}M, {reps} calls:")
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
        del x


def gram_sweep(sizes: list[int], ns: list[int], device: torch.device, reps: int) -> None:
    """The kernels' launch settings against torch on the same rows: ms, GB/s of ``X`` read, registers
    and spills per thread, and the largest difference from torch's result (the Gram per entry,
    relative to ``|x_i| |x_j|``; the combination per coordinate, relative to ``sum_i |c_i x_i|``)."""
    print("| n | d | path | row block | block | span | warps | stages | regs | spills | ms | GB/s | max rel diff |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in ns:
        for d in sizes:
            x = grads(n, d, device)
            _gram_rows(x, reps)
            _combine_rows(x, reps)
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _torch_path(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[float, Any]:
    """``fn`` timed with the kernels off."""
    row_kernels.ENABLED = False
    try:
        return timed(fn, device, reps)
    finally:
        row_kernels.ENABLED = True


def _gram_rows(x: torch.Tensor, reps: int) -> None:
    from algorithms.aggregation import base

    n, d = x.shape
    gigabytes = x.numel() * x.element_size() / 1e9
    ms, want = _torch_path(lambda: base.gram(x, False), x.device, reps)
    scale = want.diagonal().sqrt()
    scale = scale[:, None] * scale[None, :]
    print(f"| {n} | {d / 1e6:g}M | bmm | - | - | {base.GRAM_SPLIT} | - | - | - | - | {ms:.3f} | "
          f"{gigabytes / ms * 1e3:.0f} | 0 |", flush=True)
    seen = set()
    settings = itertools.product((4, 8), ((128, 4), (256, 8), (64, 2), (256, 4)), (16384, 32768), (None, 2))
    for rb, (block, warps), span, stages in settings:
        eff_rb = row_kernels.row_block_for(n, rb)
        if (eff_rb, block, warps, span, stages) in seen:
            continue
        seen.add((eff_rb, block, warps, span, stages))
        cfg = f"| {n} | {d / 1e6:g}M | kernel | {eff_rb} | {block} | {span} | {warps} | {stages} |"
        try:
            ms, got = timed(functools.partial(row_kernels.gram_triton, x, row_block=rb, block=block, span=span,
                                              num_warps=warps, num_stages=stages), x.device, reps)
        except Exception as exc:  # noqa: BLE001 - a setting the compiler refuses is a row
            print(f"{cfg} failed: {type(exc).__name__}: {str(exc)[:80]} |||||")
            continue
        launch = row_kernels.last_launch
        regs, spills = getattr(launch, "n_regs", "?"), getattr(launch, "n_spills", "?")
        diff = float(((got - want).abs() / scale).max())
        print(f"{cfg} {regs} | {spills} | {ms:.3f} | {gigabytes / ms * 1e3:.0f} | {diff:.1e} |", flush=True)


def _combine_rows(x: torch.Tensor, reps: int) -> None:
    n, d = x.shape
    gigabytes = x.numel() * x.element_size() / 1e9
    coef = torch.randn(n, dtype=torch.float64)
    ms, want = _torch_path(lambda: coef.to(x.device, x.dtype) @ x, x.device, reps)
    bound = coef.abs().to(x.device, torch.float32) @ x.abs()
    print(f"| {n} | {d / 1e6:g}M | combine: torch matmul | - | - | - | - | - | - | - | {ms:.3f} | "
          f"{gigabytes / ms * 1e3:.0f} | 0 |", flush=True)
    for block, warps in itertools.product((1024, 2048, 4096), (4, 8)):
        cfg = f"| {n} | {d / 1e6:g}M | combine: kernel | - | {block} | - | {warps} |"
        try:
            ms, got = timed(functools.partial(row_kernels.combine_triton, coef, x, block=block, num_warps=warps),
                            x.device, reps)
        except Exception as exc:  # noqa: BLE001 - a setting that fails is a row
            print(f"{cfg} failed: {type(exc).__name__} ||||||")
            continue
        diff = float(((got - want).abs() / bound.clamp_min(1e-30)).max())
        print(f"{cfg} - | - | - | {ms:.3f} | {gigabytes / ms * 1e3:.0f} | {diff:.1e} |", flush=True)


# --- the order-statistic rules: kernels against torch's sort and against the all-reduce ------------
def order_stats(sizes: list[int], n: int, device: torch.device, reps: int, all_reduce: dict[int, float],
                measured: bool) -> None:
    """Each order-statistic rule (f = 3) with the kernels and with torch's path: ms, x the all-reduce,
    the goal, the speed-up, and whether both paths gave the same bits; then Bulyan's parts and each
    kernel alone (GB/s of the rows it reads)."""
    source = "measured here" if measured else "recorded in bench/RESULTS.md (2 x H200) or --allreduce-ms"
    print(f"\n### Order statistics, n = {n}, on {device_name(device)} (fp32, f = 3, median of {reps}); "
          f"all-reduce {source}\n")
    print("| rule | d | kernels ms | x all-reduce | goal | torch ms | x all-reduce | torch / kernels | same bits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    parts: list[str] = []
    for d in sizes:
        x = grads(n, d, device)
        ar = all_reduce.get(d)
        for name, cls, goal in ORDER_RULES:
            rule = cls(f=3)
            run = functools.partial(rule, x)
            ms, out = timed(run, device, reps)
            ms_torch, out_torch = _torch_path(run, device, max(2, reps // 2))  # torch's Bulyan: 1/4 s at 100M
            if isinstance(rule, Bulyan):
                out, out_torch = _bulyan_steps(rule, x)
            same = bool(torch.equal(out.isnan(), out_torch.isnan())
                        and torch.equal(out.nan_to_num(), out_torch.nan_to_num()))
            ratio, ratio_torch = (f"{ms / ar:.2f}", f"{ms_torch / ar:.1f}") if ar else ("-", "-")
            verdict = "" if not ar else (" (met)" if ms / ar <= goal else " (missed)")
            print(f"| {name} | {d / 1e6:g}M | {ms:.3f} | {ratio}{verdict} | {goal:g}x | {ms_torch:.2f} | "
                  f"{ratio_torch} | {ms_torch / ms:.0f}x | {'yes' if same else 'NO'} |", flush=True)
            del run, out, out_torch
        parts += _order_parts(x, reps)
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| part | d | ms | GB/s |\n|---|---|---:|---:|")
    print("\n".join(parts))


def _bulyan_steps(rule: Bulyan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bulyan's coordinate step for one plan, with the kernel and with torch's path (block by block, as
    the rule runs it). Its two paths also compute the Gram matrix differently (fp32 rounding), which may
    choose other rows where two Krum scores nearly tie: the bits are compared for the same rows."""
    plan = rule.plan(rule.stats(x), x.shape[0])
    with_kernel = rule.apply(plan, x)[0]
    enabled, row_kernels.ENABLED = row_kernels.ENABLED, False
    try:
        torch_path = torch.cat([rule.apply(plan, x[:, s:e])[0] for s, e in chunks(x.shape[1], rule.chunk)])
    finally:
        row_kernels.ENABLED = enabled
    return with_kernel, torch_path


def _order_parts(x: torch.Tensor, reps: int) -> list[str]:
    """Bulyan's three steps (the centred Gram over the rule's blocks, kernels and bmm; the plan on the
    CPU; the coordinate step over all of ``d``), and the median and trimmed-mean kernels alone."""
    n, d = x.shape
    rule = Bulyan(f=3)
    rows_gb = x.numel() * x.element_size() / 1e9

    def stats() -> torch.Tensor:
        total = None
        for s, e in chunks(d, rule.chunk):
            part = rule.stats(x[:, s:e])
            assert part is not None
            total = part if total is None else total + part
        assert total is not None
        return total

    label = f"{d / 1e6:g}M"
    ms_gram, g = timed(stats, x.device, reps)
    ms_bmm, g_bmm = _torch_path(stats, x.device, reps)
    ms_plan, plan = timed(lambda: rule.plan(g, n), torch.device("cpu"), reps)
    same_plan = "the same rows" if torch.equal(plan, rule.plan(g_bmm, n)) else "OTHER rows (a near tie)"
    selected_gb = rows_gb * len(plan) / n
    ms_step, _ = timed(lambda: order_kernels.bulyan_triton(x, plan, rule.f), x.device, reps)
    ms_median, _ = timed(lambda: order_kernels.median_triton(x), x.device, reps)
    ms_trimmed, _ = timed(lambda: order_kernels.trimmed_mean_triton(x, 3), x.device, reps)
    return [f"| bulyan: centred Gram, kernels (mean pass + Gram pass) | {label} | {ms_gram:.3f} | "
            f"{2 * rows_gb / ms_gram * 1e3:.0f} |",
            f"| bulyan: centred Gram, torch (bmm) | {label} | {ms_bmm:.3f} | {2 * rows_gb / ms_bmm * 1e3:.0f} |",
            f"| bulyan: plan (recursive Krum, CPU); from the bmm Gram: {same_plan} | {label} | {ms_plan:.3f} | - |",
            f"| bulyan: coordinate step kernel ({len(plan)} rows) | {label} | {ms_step:.3f} | "
            f"{selected_gb / ms_step * 1e3:.0f} |",
            f"| median kernel | {label} | {ms_median:.3f} | {rows_gb / ms_median * 1e3:.0f} |",
            f"| trimmed mean kernel | {label} | {ms_trimmed:.3f} | {rows_gb / ms_trimmed * 1e3:.0f} |"]


def order_sweep(sizes: list[int], n: int, device: torch.device, reps: int) -> None:
    """The order kernels' launch settings: columns per program and warps (the default first)."""
    print("| kernel | n | d | block | warps | ms | GB/s |\n| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    selected = torch.arange(n - 6)  # Bulyan's theta = n - 2f rows at f = 3
    kernels: list[tuple[str, Callable[..., torch.Tensor]]] = [
        ("median", order_kernels.median_triton),
        ("trimmed_mean", functools.partial(order_kernels.trimmed_mean_triton, f=3)),
        ("bulyan step", functools.partial(order_kernels.bulyan_triton, rows=selected, f=3))]
    for d in sizes:
        x = grads(n, d, device)
        for (name, fn), warps, per_thread in itertools.product(kernels, (4, 8), (None, 1, 2, 4, 8)):
            rows = len(selected) if name == "bulyan step" else n
            block = None if per_thread is None else per_thread * 32 * warps
            shown = block or order_kernels.block_for(rows, warps)
            try:
                ms, _ = timed(functools.partial(fn, x, block=block, num_warps=warps), device, reps)
            except Exception as exc:  # noqa: BLE001 - a setting the compiler refuses is a row
                print(f"| {name} | {n} | {d / 1e6:g}M | {shown} | {warps} | failed: {type(exc).__name__} | |")
                continue
            gigabytes = rows * d * x.element_size() / 1e9
            print(f"| {name} | {n} | {d / 1e6:g}M | {shown} | {warps} | {ms:.3f} | {gigabytes / ms * 1e3:.0f} |",
                  flush=True)
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--sizes", type=float, nargs="+", default=[25e6, 100e6])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref-reps", type=int, default=2)
    ap.add_argument("--ref-path", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke test")
    ap.add_argument("--profile", default=None, metavar="RULE", help="profile one rule (one process) and stop")
    ap.add_argument("--gram-sweep", action="store_true",
                    help="time the kernels' settings against torch (n = 2, 4, 16 unless --n is given) and stop")
    ap.add_argument("--gram", choices=["kernel", "bmm"], default="kernel",
                    help="the rules' Gram, combination and order statistics on a GPU: the Triton kernels (where "
                         "Triton imports) or torch's bmm, matmul and sort")
    ap.add_argument("--order-stats", action="store_true",
                    help="median, trimmed mean and Bulyan: kernels against torch's path and the all-reduce, then stop")
    ap.add_argument("--order-sweep", action="store_true", help="the order kernels' launch settings, then stop")
    ap.add_argument("--allreduce-ms", type=float, nargs="+", default=None,
                    help="--order-stats without torchrun: the all-reduce's ms for each of --sizes "
                         f"(default: {RECORDED_ALLREDUCE_MS} from bench/RESULTS.md)")
    args = ap.parse_args()
    row_kernels.ENABLED = args.gram == "kernel"
    kernels = "Triton kernels" if row_kernels.ENABLED and row_kernels.triton else "torch"
    print(f"Gram, combination and order statistics on a GPU: {kernels}", flush=True)
    if args.quick:
        args.sizes, args.reps, args.ref_reps = [2e4, 1e5], 2, 1
    sizes = [int(s) for s in args.sizes]
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)) if args.device != "cpu" else 1)

    if args.gram_sweep:
        ns = [args.n] if "--n" in sys.argv else [2, 4, 16]
        gram_sweep(sizes, ns, torch.device(args.device), args.reps)
        return
    if args.profile:
        profile(args.profile, sizes, args.n, torch.device(args.device), args.reps)
        return
    if args.order_sweep:
        order_sweep(sizes, args.n, torch.device(args.device), args.reps)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lines: list[str] = []
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if args.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        collectives, all_reduce = bench_collectives(sizes, device, args.reps)
        lines += collectives
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    else:
        device = torch.device(args.device)
        lines.append("\nCollectives: not measured (one process; launch with "
                     "`torchrun --nproc_per_node 2 bench/gpu_aggregation.py ...` on 2 GPUs for the all_reduce "
                     "of the same size).")
        all_reduce = dict(zip(sizes, args.allreduce_ms, strict=True)) if args.allreduce_ms else RECORDED_ALLREDUCE_MS
    if args.order_stats:
        print("\n".join(lines))
        order_stats(sizes, args.n, device, args.reps, all_reduce, measured=world > 1)
        return
    reference = load_reference(args.ref_path) if args.ref_path else None

    n, f = args.n, 3
    header = f"\n### Aggregation of n = {n} gradients on {device_name(device)} (fp32, f = {f}, median of {args.reps})\n"
    rows = ["| rule | " + " | ".join(f"d = {d / 1e6:g}M ms" for d in sizes) + " |",
            "|---" * (len(sizes) + 1) + "|"]
    results: dict[str, list[str]] = {}
    notes: list[str] = []
    for d in sizes:
        x = grads(n, d, device)
        cells, size_notes = _rules_for_size(x, f, args.reps, args.ref_reps, reference)
        for label, cell in cells.items():
            results.setdefault(label, []).append(cell)
        notes += size_notes
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for label, per_size in results.items():
        rows.append(f"| {label} | " + " | ".join(per_size) + " |")
    print("".join(lines[:1]) + "\n".join(lines[1:]) if lines else "")
    print(header + "\n".join(rows))
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()

"""Robust gradient exchange across GPUs: the worker's exchange step against a plain all-reduce.

Launch with torchrun on the GPUs of one host (any number):

    torchrun --nproc_per_node N bench/gpu_exchange.py [--sizes 25e6 100e6] [--iters 10]
    torchrun --nproc_per_node 2 bench/gpu_exchange.py --device cpu --sizes 1e5 --iters 3   # a CPU smoke run

For every rule, the exchange that the training loop runs between backward and the optimizer step
(``workers.exchange``: ``GatherExchange`` under ``ddp``, the robust reduce-scatter
``ShardExchange`` under ``deepspeed``) on a gradient of ``d`` float32 numbers, timed end to end
(collectives and rule), median over ``--iters`` steps after a warm-up, against one NCCL
all-reduce of the same gradient (what DDP's ``mean`` costs). Rank 0 prints a markdown table.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULES = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median", "flag"]


def spec_for(rule: str, strategy: str, world: int):  # type: ignore[no-untyped-def]
    from pydantic import TypeAdapter

    from algorithms.aggregation.config import AggregatorConfig
    from service.spec import ExperimentSpec

    probe = TypeAdapter(AggregatorConfig).validate_python({"name": rule})
    f = max(0, min(1, probe.max_f(world)))
    doc = {
        "name": "exchange-bench",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"}, "model": {"name": "mlp"}},
        "train": {"max_steps": 1, "batch_size": 64 * world},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "distributed": {"num_workers": world, "strategy": strategy, "aggregator": {"name": rule, "f": f},
                        **({"deepspeed": {"zero_stage": 0}} if strategy == "deepspeed" else {})},
    }
    return ExperimentSpec.model_validate(doc), f


def timed(fn, iters: int, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (kernels, buffers)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(out)


def bench_size(d: int, rules: list[str], iters: int, rank: int, world: int, device: torch.device,
               keep_elems: int | None = None) -> list[tuple[str, str, int, int, float, float]]:
    from workers.exchange import GatherExchange, ShardExchange

    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(d, device=device))  # type: ignore[assignment]
    gen = torch.Generator(device=device).manual_seed(rank)
    grad = torch.randn(d, generator=gen, device=device)

    def reset() -> None:
        model.w.grad = grad.clone()  # type: ignore[union-attr]

    def allreduce() -> None:
        reset()
        dist.all_reduce(model.w.grad)  # type: ignore[union-attr,arg-type]
        model.w.grad.div_(world)  # type: ignore[union-attr]

    base = timed(allreduce, iters, device)
    rows = [("all-reduce mean", "-", d, 0, base, 1.0)]
    for rule in rules:
        for strategy, cls in (("ddp", GatherExchange), ("deepspeed", ShardExchange)):
            try:
                spec, f = spec_for(rule, strategy, world)
            except ValueError as exc:  # the rule needs more workers than this world has
                if rank == 0 and strategy == "ddp":
                    print(f"skipped {rule} at world size {world}: {str(exc).splitlines()[1].strip()[:160]}")
                continue
            kw = {"keep_elems": keep_elems} if cls is GatherExchange and keep_elems is not None else {}
            exchange = cls(spec, rank, world, **kw)
            step = [0]

            def run(ex=exchange, st=step) -> None:  # type: ignore[no-untyped-def]
                reset()
                ex(model, st[0])
                st[0] += 1

            ms = timed(run, iters, device)
            rows.append((rule, strategy, d, f, ms, ms / base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[25e6, 100e6])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rules", nargs="+", default=RULES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--keep-elems", type=int, default=None,
                        help="GatherExchange's keep_elems (0: pass 2 gathers again); default: the exchange's own")
    parser.add_argument("--gram", choices=["kernel", "bmm"], default="kernel",
                        help="the rules' Gram and combination on a GPU: the Triton kernels (where Triton imports) "
                             "or torch's bmm and matmul")
    args = parser.parse_args()
    from algorithms.aggregation import row_kernels

    row_kernels.ENABLED = args.gram == "kernel"

    use_cuda = args.device == "cuda"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    rows: list[tuple[str, str, int, int, float, float]] = []
    for size in args.sizes:
        rows += bench_size(int(size), args.rules, args.iters, rank, world, device, args.keep_elems)
        if use_cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
        kernels = "Triton" if row_kernels.ENABLED and row_kernels.triton else "torch"
        keep = "default" if args.keep_elems is None else args.keep_elems
        print(f"world size {world} ({name}), float32 gradients, median of {args.iters} steps; "
              f"Gram and combination: {kernels}; gather keep_elems: {keep}")
        print("| rule | exchange | d | f | ms/step | x all-reduce |")
        print("| --- | --- | --- | --- | --- | --- |")
        for rule, strategy, d, f, ms, ratio in rows:
            print(f"| {rule} | {strategy} | {d / 1e6:g}M | {f} | {ms:.2f} | {ratio:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

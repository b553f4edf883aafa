"""Straggler mitigation on the parameter server (workers/parameter_server/, real Ray actors and
``ray.wait``): wait-for-all, ignore-stragglers, gradient coding (Tandon et al. 2017) and
sequential gradient coding (Krishnan et al. 2023), plus the decoding condition numbers.

Every method runs the product's code path -- ``ParameterServer`` over ``RayPool`` (one Ray actor
per worker) -- on sklearn's digits with an MLP; only the straggler delays come from the
benchmark: every round a seeded (B, W, lambda)-bursty pattern with lambda = s picks the
stragglers (at most s per round, so gradient coding for s stragglers covers every round), and
each straggler's result is held back by ``delay x`` the measured no-straggler step time (a sleep
after its computation). The same pattern is replayed for every method.

* ``no_stragglers``: uncoded, nobody delayed, wait for all (the reference step time).
* ``wait_all``: uncoded, wait for all n.
* ``ignore``: uncoded, take the first n - s, average the data that arrived (biased).
* ``gc``: fractional repetition when s + 1 divides n, else cyclic repetition; first n - s.
* ``sr_sgc`` / ``m_sgc``: sequential codes with (B, W, lambda = s); a round ends (1 + mu) x the
  first arrival later if the missing workers fit the model (the server's rule). Step time is
  the median steady-state round (one job decoded per round).

``load`` is the largest fraction of a step's data one worker computes per round (the papers'
normalised load); ``worker ms`` the median compute time of a message; ``max|d|`` the largest
parameter difference after training from SGD on the full batch (delayed by T for the
sequential codes, as the server applies each job at its deadline): float noise for the exact
methods, large for ``ignore``.

    .venv/bin/python bench/straggler_coding.py                 # n = 8, s = 1 2, delays 2 5 20
    .venv/bin/python bench/straggler_coding.py --quick
    .venv/bin/python bench/straggler_coding.py --conditioning  # condition numbers, no Ray
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout (GPU hosts)

from algorithms.coding import build
from algorithms.coding.straggler_model import bursty_pattern
from service.spec import ExperimentSpec
from workers.parameter_server import Layout, ParameterServer, RayPool
from workers.tasks import build_task


def make_task(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "llama":  # char-level Llama: enough compute per message for a GPU to matter
        hidden, layers = args.llama
        return {"kind": "causal_lm", "dataset": {"name": "char_corpus", "seq_len": args.seq},
                "model": {"name": "llama", "hidden": hidden, "layers": layers, "heads": max(1, hidden // 64)}}
    return {"kind": "image_classification", "dataset": {"name": "digits"},
            "model": ({"name": "mlp", "hidden": [args.hidden, args.hidden]} if args.model == "mlp"
                      else {"name": "cnn", "channels": args.channels, "hidden": args.hidden})}


def gpu_share(args: argparse.Namespace) -> float:
    """GPUs per worker actor: one each, or a share of one when there are more workers than GPUs."""
    return min(1.0, max(1, torch.cuda.device_count()) / args.workers) if args.gpu else 0.0


def make_spec(args: argparse.Namespace, coding: dict[str, Any] | None = None) -> ExperimentSpec:
    res: dict[str, float] = {"CPU": args.num_cpus / args.workers}
    if args.gpu:
        res["GPU"] = gpu_share(args)
    return ExperimentSpec.model_validate({
        "name": "bench-straggler-coding",
        "task": make_task(args),
        "train": {"max_steps": args.steps, "batch_size": args.batch, "seed": args.seed, "eval_batches": 1},
        "optimizer": {"name": "sgd", "lr": args.lr},
        "distributed": {"num_workers": args.workers, "strategy": "parameter_server", "gradient_coding": coding,
                        "use_gpu": args.gpu, "resources_per_worker": res},
    })


def reference(spec: ExperimentSpec, sizes: list[int], delay: int) -> list[torch.Tensor]:
    """SGD on the union of the parts' batches, each gradient applied ``delay`` steps late."""
    assert spec.train is not None and spec.optimizer is not None
    task = build_task(spec)
    torch.manual_seed(spec.train.seed)
    model = task.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    streams = [task.batches(rank=p, world=len(sizes), batch_size=s, seed=spec.train.seed)
               for p, s in enumerate(sizes)]
    pending: list[list[torch.Tensor]] = []

    def apply(grads: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(spec.optimizer.lr * g)  # type: ignore[union-attr]

    for job in range(spec.train.max_steps):
        parts = [next(s) for s in streams]
        batch = tuple(torch.cat(ts) for ts in zip(*parts, strict=True))
        pending.append(list(torch.autograd.grad(task.loss(model, batch), params)))
        if job >= delay:
            apply(pending.pop(0))
    while pending:
        apply(pending.pop(0))
    return [p.detach() for p in params]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.n = args, args.workers
        self.delays: dict[tuple[int, int], float] = {}
        base = make_spec(args)
        self.pool = RayPool(base, Layout.from_spec(base), delay_fn=lambda r, w: self.delays.get((r, w), 0.0))
        self.refs: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def run(self, method: str, s: int, pattern: list[frozenset[int]], delay_s: float) -> dict[str, Any]:
        a = self.args
        coding: dict[str, Any] | None = None
        if method == "gc":
            scheme = "fractional_repetition" if self.n % (s + 1) == 0 else "cyclic_repetition"
            coding = {"scheme": scheme, "stragglers": s}
        elif method in ("sr_sgc", "m_sgc"):
            coding = {"scheme": "sequential_gc" if method == "sr_sgc" else "multiplexed_sgc", "stragglers": s,
                      "burst": a.burst, "window": a.window, "patience": a.mu}
        spec = make_spec(a, coding)
        layout = Layout.from_spec(spec)
        if method == "ignore":
            layout.stragglers = s
        self.pool.reconfigure(layout)
        self.delays = {(r, w): delay_s for r, ws in enumerate(pattern) for w in ws}
        server = ParameterServer(spec, layout, self.pool)
        server.train_model()
        time.sleep(delay_s + 0.2)  # let sleeping stragglers of this method finish, untimed
        T = layout.code.delay if layout.mode == "sequential" else 0
        recs = server.records[T:a.steps] if T else server.records
        key = (tuple(layout.sizes), T)
        diff = float("nan")  # --no-check: the exactness is the CPU run's (and the unit tests') to show
        if a.check:
            if key not in self.refs:
                self.refs[key] = reference(spec, layout.sizes, T)
            diff = max(float((p.detach().cpu() - q).abs().max())
                       for p, q in zip(server.params, self.refs[key], strict=True))
        load = layout.code.load if layout.code is not None else 1.0 / self.n
        return {"step_ms": statistics.median(r.step_s for r in recs) * 1e3,
                "decode_ms": statistics.median(r.decode_s for r in recs) * 1e3,
                "worker_ms": statistics.median(r.compute_s for r in recs) * 1e3,
                "late": sum(len(r.late) for r in recs) / len(recs), "load": load, "diff": diff}


def bench(args: argparse.Namespace) -> None:
    import ray

    torch.set_num_threads(8 if args.gpu else 1)  # the server's decode, step and final eval run on the host
    ray.init(address="local", num_cpus=args.num_cpus, num_gpus=torch.cuda.device_count() if args.gpu else 0,
             include_dashboard=False, log_to_driver=False, object_store_memory=int(args.object_store_gb * 1e9))
    b = Bench(args)
    t_start = time.perf_counter()
    quiet = [frozenset[int]()] * (args.steps + args.window + args.burst)
    b.run("no_stragglers", 0, quiet, 0.0)  # warm-up
    base = b.run("no_stragglers", 0, quiet, 0.0)
    base_ms = base["step_ms"]
    print(f"no-straggler step (uncoded, wait for all): {base_ms:.1f} ms", flush=True)
    rows = [f"| - | - | no_stragglers | {base['load']:.3f} | {base['worker_ms']:.1f} | {base_ms:.1f} | 1.00 | 1.00 | "
            f"{base['decode_ms']:.2f} | 0.00 | {base['diff']:.1e} |"]
    for s in args.stragglers:
        rounds = args.steps + args.window + args.burst
        pattern = bursty_pattern(args.workers, rounds, args.burst, args.window, s, p_start=args.p_start,
                                 p_continue=0.9, seed=args.seed + s)
        busy = sum(1 for r in pattern[:args.steps] if r) / args.steps
        own: dict[str, float] = {}
        for method in args.methods:  # each method's own step time without stragglers
            if method not in ("wait_all", "ignore"):
                own[method] = b.run(method, s, quiet, 0.0)["step_ms"]
        for delay in args.delays:
            for method in args.methods:
                res = b.run(method, s, pattern, delay * base_ms / 1e3)
                ratio_own = res["step_ms"] / own.get(method, base_ms)
                rows.append(f"| {s} | {delay:g}x | {method} | {res['load']:.3f} | {res['worker_ms']:.1f} | "
                            f"{res['step_ms']:.1f} | {res['step_ms'] / base_ms:.2f} | {ratio_own:.2f} | "
                            f"{res['decode_ms']:.2f} | {res['late']:.2f} | {res['diff']:.1e} |")
                print(rows[-1], flush=True)
        print(f"(s={s}: stragglers in {busy:.0%} of the first {args.steps} rounds)", flush=True)
    ray.shutdown()
    model = {"mlp": f"digits, MLP {args.hidden}x{args.hidden}",
             "cnn": f"digits, CNN channels {args.channels} hidden {args.hidden}",
             "llama": f"char corpus, Llama hidden {args.llama[0]} x {args.llama[1]} layers, seq {args.seq}"}[args.model]
    where = f"{args.num_cpus} CPUs"
    if args.gpu:
        where += f", {gpu_share(args):g} of a GPU each ({torch.cuda.device_count()} x {gpu_name()})"
    print(f"\nn={args.workers} Ray actors on {where}, {model}, "
          f"batch {args.batch}, {args.steps} steps per method, pattern (B={args.burst}, W={args.window}, "
          f"lambda=s), no-straggler step {base_ms:.1f} ms, total {time.perf_counter() - t_start:.0f} s\n")
    print("| s | delay | method | load/worker | worker ms | median step ms | x no-straggler | x own no-delay | "
          "decode ms | late/step | max|d| vs full batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible to the driver"


def conditioning(args: argparse.Namespace) -> None:
    """Worst condition number of the survivors' rows (all survivor sets when few, else the
    contiguous ones and a seeded sample of 200) and the decoding error of that worst set with
    float32 and float64 messages (random part gradients, d = 2000)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("| n | s | scheme | parts/worker | sets checked | worst cond | rel. error f32 msgs | rel. error f64 msgs |")
    print("|---|---|---|---|---|---|---|---|")
    from algorithms.coding.linalg import condition_number
    from algorithms.coding.repetition import survivor_sets

    for n in args.cond_n:
        for s in args.cond_s:
            if s >= n:
                continue
            for scheme in ("fractional_repetition", "cyclic_repetition"):
                if scheme == "fractional_repetition" and n % (s + 1):
                    continue
                code: Any = build(scheme, n, s)
                sets = survivor_sets(n, s, 200, 0)
                conds = [condition_number(code.B[a]) for a in sets]
                worst = sets[max(range(len(sets)), key=conds.__getitem__)]
                parts = torch.randn(code.n_parts, 2000, generator=gen)
                exact = parts.double().sum(0)
                a = code.decode(worst)
                errs = []
                for dt in (torch.float32, torch.float64):
                    msgs = (code.B.to(dt) @ parts.to(dt))[worst]
                    dec = (a[worst].to(dt) @ msgs).double()
                    errs.append(float((dec - exact).norm() / exact.norm()))
                parts_per = max(len(code.parts(i)) for i in range(n))
                print(f"| {n} | {s} | {scheme} | {parts_per} | {len(sets)} | {max(conds):.3g} | "
                      f"{errs[0]:.1e} | {errs[1]:.1e} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=None, help="default 8, or the GPU count with --gpu")
    p.add_argument("--stragglers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--delays", type=float, nargs="+", default=[2, 5, 20], help="x the no-straggler step")
    p.add_argument("--steps", type=int, default=20, help="SGD steps per method")
    p.add_argument("--model", choices=["mlp", "cnn", "llama"], default="mlp",
                   help="cnn: more compute per parameter, so the load counts more than per-task overheads; "
                        "llama: a char-level Llama (--llama, --seq)")
    p.add_argument("--llama", type=int, nargs=2, default=[512, 4], metavar=("HIDDEN", "LAYERS"))
    p.add_argument("--seq", type=int, default=256, help="llama sequence length")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the full-batch SGD reference (max|d| column; slow for a large model on the CPU)")
    p.add_argument("--gpu", action="store_true",
                   help="workers on the GPUs: one each, or a share of one when --workers exceeds the GPUs visible "
                        "(--workers defaults to the GPU count)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128], help="cnn channels")
    p.add_argument("--batch", type=int, default=768)
    p.add_argument("--burst", type=int, default=2, help="B of the bursty straggler pattern")
    p.add_argument("--window", type=int, default=3, help="W of the bursty straggler pattern")
    p.add_argument("--p-start", type=float, default=0.5)
    p.add_argument("--mu", type=float, default=0.5, help="SGC patience after the first arrival")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--object-store-gb", type=float, default=2.0)
    p.add_argument("--methods", nargs="+", default=["wait_all", "ignore", "gc", "sr_sgc", "m_sgc"])
    p.add_argument("--quick", action="store_true", help="s = 1, delays 5 20, 8 steps, small MLP")
    p.add_argument("--conditioning", action="store_true", help="print the condition-number table only")
    p.add_argument("--cond-n", type=int, nargs="+", default=[8, 12, 16, 24, 32, 48, 64])
    p.add_argument("--cond-s", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    args = p.parse_args()
    if args.conditioning:
        conditioning(args)
        return
    if args.workers is None:
        args.workers = torch.cuda.device_count() if args.gpu else 8
    if args.quick:
        args.stragglers, args.delays, args.steps, args.hidden = [1], [5, 20], 8, 128
    bench(args)


if __name__ == "__main__":
    main()

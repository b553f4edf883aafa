"""Byzantine-robust training at small scale on CPU: every rule under every attack.

sklearn's 8x8 digits, ``n`` simulated workers in one process, each with its own iid shard of the
training set; every step each worker draws a batch from its shard and its gradient is computed
(all workers at once, ``torch.func.vmap``); the first ``f`` workers lie; the rule aggregates the
``n`` gradients; SGD (plain by default; ``--momentum``/``--weight-decay`` as torch's SGD) applies
the aggregate, with the same lr, steps and seeds for every rule. Final test accuracy (mean over
seeds) for every rule (rows) under every attack (columns); the Flag authors' attacks
(hamidralmasi/FlagAggregator, ``garfieldpp/byzWorker.py``) are marked "theirs":

* ``none``: nobody lies (the cost of robustness);
* ``uniform``: ``U[0, 1)`` noise per coordinate (theirs: "random", the attack of their main runs);
* ``reverse``: each liar sends ``-10 x`` its own gradient (theirs: "reverse");
* ``sign_flip``: every liar sends ``-10 x`` the honest mean (an omniscient, identical reverse);
* ``gaussian``: ``N(0, 1)`` noise;
* ``alie``: mean - z std, z from Baruch et al.'s formula (theirs: "lie", z = 0.21 hard-coded);
* ``ipm``: ``-0.1 x`` the honest mean (theirs: "empire");
* ``label_flip``: the liars compute honest gradients on labels ``9 - y``.

The liars are omniscient (``sign_flip``, ``alie``, ``ipm`` rows are computed from the honest rows of
the same step). Rows ``<rule> @ n shards`` run the blockwise variant of the shard exchange (the rule
decided per shard of ``d / n`` coordinates, with no Gram all-reduce); the ``cos`` column is the mean
cosine between that aggregate and the exact rule's on the same gradients (``workers/exchange.py``'s
default shard exchange is exact, cos = 1). Run:

    .venv/bin/python bench/robust_cpu.py --jobs 2           # full table, f = 3 of 15
    .venv/bin/python bench/robust_cpu.py --jobs 2 --byzantine 1 --no-shards
    .venv/bin/python bench/robust_cpu.py --quick            # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor
from torch.func import functional_call, grad, vmap

from algorithms.aggregation.attacks import build_attack
from algorithms.aggregation.base import Rule
from algorithms.aggregation.registry import build

ATTACKS: dict[str, dict[str, float]] = {
    "none": {}, "uniform": {}, "reverse": {}, "sign_flip": {"scale": 10.0}, "gaussian": {"std": 1.0}, "alie": {},
    "ipm": {"epsilon": 0.1}, "label_flip": {},
}
WORKER_SIDE = ("none", "reverse", "label_flip")  # attacks the liars apply to their own gradient or data
REVERSE_SCALE = 10.0  # the Flag authors' "reverse": a liar sends -10 x its own gradient
RULES = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median", "flag"]
SHARDED = ["krum", "bulyan", "flag"]


class Blockwise:
    """The rule decided separately on each of ``shards`` contiguous coordinate blocks."""

    def __init__(self, rule: Rule, shards: int) -> None:
        self.rule, self.shards = rule, shards

    def __call__(self, x: Tensor) -> Tensor:
        size = -(-x.shape[1] // self.shards)
        return torch.cat([self.rule(part) for part in x.split(size, dim=1)])


def load(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    test, train = perm[:360], perm[360:]
    return x[train], y[train], x[test], y[test]


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(rule_name: str, attack: str, *, n: int, f: int, steps: int, batch: int, lr: float, seed: int,
          data: tuple[Tensor, Tensor, Tensor, Tensor], shards: int = 0, flag_r: int | None = None,
          momentum: float = 0.0, weight_decay: float = 0.0) -> tuple[float, float]:
    """Final test accuracy, and the mean cosine to the exact rule (blockwise rows; else nan)."""
    x_tr, y_tr, x_te, y_te = data
    model = make_model(seed)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    rule_params: dict[str, int] = {} if rule_name == "mean" else {"f": f}
    if rule_name == "flag" and flag_r is not None:
        rule_params["r"] = flag_r
    exact = build(rule_name, **rule_params)
    rule: Callable[[Tensor], Tensor] = Blockwise(exact, shards) if shards else exact
    atk = build_attack(attack, **ATTACKS[attack]) if attack not in WORKER_SIDE else None
    liars = f if attack != "none" else 0
    gen = torch.Generator().manual_seed(seed)
    shard_of = torch.randperm(len(y_tr), generator=gen).chunk(n)  # each worker's own data

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    per_worker = vmap(grad(loss), in_dims=(None, 0, 0))
    cosines = []
    buf: dict[str, Tensor] = {}
    for step in range(steps):
        idx = torch.stack([s[torch.randint(len(s), (batch,), generator=gen)] for s in shard_of])
        xb, yb = x_tr[idx], y_tr[idx]
        if attack == "label_flip" and liars:
            yb[:liars] = 9 - yb[:liars]
        g = per_worker(params, xb, yb)
        flat = torch.cat([g[k].reshape(n, -1) for k in names], dim=1)
        if attack == "reverse" and liars:
            flat[:liars] *= -REVERSE_SCALE
        if atk is not None and liars:
            flat[:liars] = atk(flat[liars:], liars, torch.Generator().manual_seed(seed * 100_003 + step))
        agg = rule(flat)
        if shards and step % 10 == 0:
            cosines.append(float(F.cosine_similarity(agg, exact(flat), dim=0)))
        for k, part, shape in zip(names, agg.split(sizes), shapes, strict=True):
            d_p = part.view(shape) + weight_decay * params[k]  # torch.optim.SGD's update, on the aggregate
            buf[k] = d_p if step == 0 else momentum * buf[k] + d_p
            params[k] = params[k] - lr * buf[k]
    with torch.no_grad():
        acc = float((functional_call(model, params, (x_te,)).argmax(-1) == y_te).float().mean())
    return acc, (statistics.fmean(cosines) if cosines else float("nan"))


def _run(key: tuple[str, int, str, int], **kw: int | float | None) -> tuple[float, float]:
    torch.set_num_threads(1)
    rule_name, shards, attack, seed = key
    return train(rule_name, attack, seed=seed, data=_data(), shards=shards, **kw)  # type: ignore[arg-type]


@functools.cache
def _data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return load()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--byzantine", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--no-shards", action="store_true", help="skip the blockwise shard rows")
    ap.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (the Flag authors use 0.9)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (theirs: 5e-4)")
    ap.add_argument("--flag-r", type=int, default=None, help="flag's subspace dimension (default ceil(n / 2))")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (results do not change)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.seeds = 40, 1
    rows = [(r, 0) for r in args.rules]
    if not args.no_shards:
        rows += [(r, args.workers) for r in SHARDED if r in args.rules]
    t_start = time.perf_counter()
    run = functools.partial(_run, n=args.workers, f=args.byzantine, steps=args.steps, batch=args.batch, lr=args.lr,
                            flag_r=args.flag_r, momentum=args.momentum, weight_decay=args.weight_decay)
    keys = [(rule_name, shards, attack, seed) for rule_name, shards in rows for attack in args.attacks
            for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = dict(zip(keys, pool.map(run, keys), strict=True))
    table: dict[tuple[str, int], dict[str, tuple[float, float, float]]] = {}
    for rule_name, shards in rows:
        table[(rule_name, shards)] = {}
        for attack in args.attacks:
            accs = [results[(rule_name, shards, attack, seed)][0] for seed in range(args.seeds)]
            coss = [results[(rule_name, shards, attack, seed)][1] for seed in range(args.seeds)]
            table[(rule_name, shards)][attack] = (statistics.fmean(accs), float(np.std(accs)),
                                                  statistics.fmean(coss))

    print(f"\nn = {args.workers} workers, f = {args.byzantine} Byzantine, {args.steps} SGD steps (lr {args.lr}, "
          f"momentum {args.momentum}, weight decay {args.weight_decay}), batch {args.batch} per worker, "
          f"{args.seeds} seed(s), flag r = {args.flag_r or (args.workers + 1) // 2}; "
          "final test accuracy, mean (std over seeds)\n")
    attacks = list(args.attacks)
    print("| rule | " + " | ".join(attacks) + " |")
    print("|---" * (len(attacks) + 1) + "|")
    for (rule_name, shards), cells in table.items():
        label = f"{rule_name} @ {shards} shards" if shards else rule_name
        out = []
        for a in attacks:
            mean, std, cos = cells[a]
            cell = f"{mean:.3f} ({std:.3f})"
            if shards:
                cell += f", cos {cos:.2f}"
            out.append(cell)
        print(f"| {label} | " + " | ".join(out) + " |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

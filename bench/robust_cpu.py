"""Byzantine-robust training at small scale on CPU: every rule under every attack.

sklearn's 8x8 digits, ``n`` simulated workers in one process, each with its own iid shard of the
training set; every step each worker draws a batch from its shard and its gradient is computed
(all workers at once, ``torch.func.vmap``); the first ``f`` workers lie; the rule aggregates the
``n`` gradients; plain SGD applies the aggregate. Final test accuracy (mean over seeds) for every
rule (rows) under every attack (columns):

* ``none``: nobody lies (the cost of robustness);
* ``sign_flip``: ``-10 x`` the honest mean (the Flag authors' "reverse" attack);
* ``gaussian``: ``N(0, 1)`` noise (their "random" attack draws U[0, 1));
* ``alie``: mean - z std, z from Baruch et al.'s formula (their "lie");
* ``ipm``: ``-0.1 x`` the honest mean (their "empire");
* ``label_flip``: the liars compute honest gradients on labels ``9 - y``.

The liars are omniscient (their rows are computed from the honest rows of the same step).
Rows ``<rule> @ n shards`` run the blockwise variant of the shard exchange (the rule decided per
shard of ``d / n`` coordinates, with no Gram all-reduce); the ``cos`` column is the mean cosine
between that aggregate and the exact rule's on the same gradients (``workers/exchange.py``'s
default shard exchange is exact, cos = 1). Run:

    .venv/bin/python bench/robust_cpu.py            # full table (a few minutes on 2 cores)
    .venv/bin/python bench/robust_cpu.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

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
    "none": {}, "sign_flip": {"scale": 10.0}, "gaussian": {"std": 1.0}, "alie": {}, "ipm": {"epsilon": 0.1},
    "label_flip": {},
}
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
          data: tuple[Tensor, Tensor, Tensor, Tensor], shards: int = 0,
          flag_r: int | None = None) -> tuple[float, float]:
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
    atk = build_attack(attack, **ATTACKS[attack]) if attack not in ("none", "label_flip") else None
    liars = f if attack != "none" else 0
    gen = torch.Generator().manual_seed(seed)
    shard_of = torch.randperm(len(y_tr), generator=gen).chunk(n)  # each worker's own data

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    per_worker = vmap(grad(loss), in_dims=(None, 0, 0))
    cosines = []
    for step in range(steps):
        idx = torch.stack([s[torch.randint(len(s), (batch,), generator=gen)] for s in shard_of])
        xb, yb = x_tr[idx], y_tr[idx]
        if attack == "label_flip" and liars:
            yb[:liars] = 9 - yb[:liars]
        g = per_worker(params, xb, yb)
        flat = torch.cat([g[k].reshape(n, -1) for k in names], dim=1)
        if atk is not None and liars:
            flat[:liars] = atk(flat[liars:], liars, torch.Generator().manual_seed(seed * 100_003 + step))
        agg = rule(flat)
        if shards and step % 10 == 0:
            cosines.append(float(F.cosine_similarity(agg, exact(flat), dim=0)))
        for k, part, shape in zip(names, agg.split(sizes), shapes, strict=True):
            params[k] = params[k] - lr * part.view(shape)
    with torch.no_grad():
        acc = float((functional_call(model, params, (x_te,)).argmax(-1) == y_te).float().mean())
    return acc, (statistics.fmean(cosines) if cosines else float("nan"))


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
    ap.add_argument("--flag-r", type=int, default=None, help="flag's subspace dimension (default n - f)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.seeds = 40, 1
    data = load()
    rows = [(r, 0) for r in args.rules]
    if not args.no_shards:
        rows += [(r, args.workers) for r in SHARDED if r in args.rules]
    t_start = time.perf_counter()
    table: dict[tuple[str, int], dict[str, tuple[float, float, float]]] = {}
    for rule_name, shards in rows:
        table[(rule_name, shards)] = {}
        for attack in args.attacks:
            accs, coss = [], []
            for seed in range(args.seeds):
                acc, cos = train(rule_name, attack, n=args.workers, f=args.byzantine, steps=args.steps,
                                 batch=args.batch, lr=args.lr, seed=seed, data=data, shards=shards,
                                 flag_r=args.flag_r)
                accs.append(acc)
                coss.append(cos)
            table[(rule_name, shards)][attack] = (statistics.fmean(accs), float(np.std(accs)),
                                                  statistics.fmean(coss))
        print(f"  {rule_name}{' @ shards' if shards else ''}: done at {time.perf_counter() - t_start:.0f} s",
              flush=True)

    print(f"\nn = {args.workers} workers, f = {args.byzantine} Byzantine, {args.steps} SGD steps (lr {args.lr}), "
          f"batch {args.batch} per worker, {args.seeds} seed(s), flag r = {args.flag_r or 'n - f'}; "
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

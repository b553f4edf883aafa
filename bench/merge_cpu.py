"""Model merging at small scale on CPU: the PLeaS claim on the built-in digits task.

Two MLPs (or CNNs) of the digits task are trained on disjoint halves of the classes (0-4 and 5-9)
and merged into one model; every merged model is scored on the full test split (all 10 classes).

- ``diff-init``: the two models start from different random initialisations (PLeaS's setting: no
  common base). Task arithmetic and TIES need a base: they get the mean of the two initialisations,
  the nearest thing to one (with scaling 1/2 task arithmetic is then weight averaging).
- ``shared-base``: both are fine-tuned from one base (a model trained for one epoch on all
  classes): the setting task arithmetic, TIES and aTLAS are designed for.

A third table does the same for a Llama-style transformer on the built-in character corpus: two
2-layer models from different initialisations, each trained on one half of the training text,
merged, scored by validation loss (nats per character; lower is better).

PLeaS (Nasery et al. 2024) gets unlabelled training images of both halves; PLeaS-free gets no
data at all (standard-normal inputs). "perm+avg" is the ablation that matches units like PLeaS and
then averages the permuted weights (Git Re-Basin / ZipIt style) instead of solving least squares.

    python bench/merge_cpu.py            # 5 seeds, MLP [64, 64] and CNN [8, 16]; 2 seeds, Llama
    python bench/merge_cpu.py --quick    # 1 seed: MLP and Llama
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.merging.base import Merger  # noqa: E402
from algorithms.merging.pleas import PleasMerger  # noqa: E402
from algorithms.merging.registry import build  # noqa: E402
from workers.tasks.digits import build_cnn, build_mlp, load_digits_split  # noqa: E402

HALVES = ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])


def merger_of(method: str, **fields: Any) -> Merger:
    """The merger of a ``merge`` section with ``fields`` (its inputs are the two models A and B)."""
    return build(method, inputs=["A", "B"], **fields)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def permute_and_average(a: nn.Module, b: nn.Module, x: torch.Tensor) -> nn.Module:
    """Match units as PLeaS does (full matching), then average the permuted weights (no least squares)."""
    merger = merger_of("pleas", ridge=0.0)
    assert isinstance(merger, PleasMerger)
    merger.merge([a, b], data=[x])  # only for its matches
    out = copy.deepcopy(a)
    la = [m for m in a.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    lb = [m for m in b.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    lo = [m for m in out.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    prev = None
    with torch.no_grad():
        for j, (wa, wb, wo) in enumerate(zip(la, lb, lo, strict=True)):
            m = merger.matches_[j]
            pa, pb = m.pairs_a, m.pairs_b  # full matching: pairs_a is 0..d-1
            wa_, wb_ = wa.weight[pa], wb.weight[pb]
            if prev is not None:
                d_in = len(prev.pairs_a)
                if isinstance(wa, nn.Linear) and wa.in_features != d_in:  # Linear after Flatten of maps
                    s = wa.in_features // d_in
                    wa_ = wa_.view(len(pa), d_in, s)[:, prev.pairs_a].reshape(len(pa), -1)
                    wb_ = wb_.view(len(pb), d_in, s)[:, prev.pairs_b].reshape(len(pb), -1)
                else:
                    wa_, wb_ = wa_[:, prev.pairs_a], wb_[:, prev.pairs_b]
            wo.weight.copy_((wa_ + wb_) / 2)
            assert wo.bias is not None and wa.bias is not None and wb.bias is not None
            wo.bias.copy_((wa.bias[pa] + wb.bias[pb]) / 2)
            prev = m
    return out


def run_seed(arch: str, setting: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    x_tr, y_tr, x_te, y_te = load_digits_split(0.2)
    make = (lambda: build_mlp([64, 64])) if arch == "mlp" else (lambda: build_cnn([8, 16], 64))
    masks = [torch.isin(y_tr, torch.tensor(h)) for h in HALVES]
    torch.manual_seed(1000 * seed)
    if setting == "diff-init":
        inits: list[nn.Module] = [make(), make()]
        base: nn.Module = make()
        base.load_state_dict({k: (inits[0].state_dict()[k] + inits[1].state_dict()[k]) / 2 for k in base.state_dict()})
        lr, epochs = 1e-3, args.epochs
    else:
        base = train(make(), x_tr, y_tr, epochs=1, lr=1e-3, seed=seed)
        inits = [copy.deepcopy(base), copy.deepcopy(base)]
        lr, epochs = 5e-4, args.epochs
    a, b = (train(inits[i], x_tr[masks[i]], y_tr[masks[i]], epochs=epochs, lr=lr, seed=seed * 10 + i)
            for i in range(2))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    unlabelled = x_tr[torch.randperm(len(y_tr), generator=gen)[: args.merge_examples]]
    few = torch.randperm(len(y_tr), generator=gen)[: args.merge_examples]

    res: dict[str, float] = {
        "model A (0-4)": accuracy(a, x_te, y_te),
        "model B (5-9)": accuracy(b, x_te, y_te),
        "ensemble (mean logits)": accuracy(lambda z: (a(z) + b(z)) / 2, x_te, y_te),
        "average": accuracy(merger_of("average").merge([a, b]), x_te, y_te),
    }
    if setting == "shared-base":
        res["base"] = accuracy(base, x_te, y_te)
    ta = merger_of("task_arithmetic", scaling=1.0).merge([a, b], base=base)
    res["task arithmetic (lambda 1)"] = accuracy(ta, x_te, y_te)
    ties = merger_of("ties", density=0.2, scaling=1.0).merge([a, b], base=base)
    res["TIES (density 0.2, lambda 1)"] = accuracy(ties, x_te, y_te)
    if setting == "shared-base":
        atlas = merger_of("atlas", steps=200, lr=0.02).merge([a, b], base=base, data=[(x_tr[few], y_tr[few])])
        res[f"aTLAS ({args.merge_examples} labelled)"] = accuracy(atlas, x_te, y_te)
    res["perm+avg (matching, no LS)"] = accuracy(permute_and_average(a, b, unlabelled), x_te, y_te)
    for tw in (0.75, 1.0, 1.5, 2.0):
        merged = merger_of("pleas", target_width=tw).merge([a, b], data=[unlabelled])
        res[f"PLeaS width {tw}x"] = accuracy(merged, x_te, y_te)
    shape = list(x_tr.shape[1:])
    free = merger_of("pleas", data_free=True, input_shape=shape, noise_samples=args.merge_examples).merge([a, b])
    res["PLeaS-free width 1.0x (noise)"] = accuracy(free, x_te, y_te)
    return res


def run_lm_seed(seed: int, args: argparse.Namespace) -> dict[str, float]:
    from service.spec.task import CharCorpusData, TransformerModel
    from workers.merge_job import Ensemble
    from workers.tasks.char_lm import CharLMTask

    spec = TransformerModel(name="llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    task = CharLMTask(CharCorpusData(name="char_corpus", seq_len=64), spec)
    full = task.train_ids
    half = len(full) // 2
    models = []
    for i, part in enumerate((full[:half], full[half:])):
        torch.manual_seed(1000 * seed + i)
        model = task.build_model()
        task.train_ids = part
        batches = task.batches(rank=0, world=1, batch_size=16, seed=seed * 10 + i)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(args.lm_steps):
            opt.zero_grad()
            task.loss(model, next(batches)).backward()
            opt.step()
        models.append(model.eval())
    task.train_ids = full
    it = task.batches(rank=0, world=1, batch_size=16, seed=seed + 99)
    data = [next(it) for _ in range(8)]
    cpu = torch.device("cpu")

    def loss(model: nn.Module) -> float:
        return task.evaluate(model, cpu, 20)["eval/loss"]

    a, b = models
    res = {"model A (1st half)": loss(a), "model B (2nd half)": loss(b)}
    res["ensemble (mean logits)"] = loss(Ensemble([a, b]))
    res["average"] = loss(merger_of("average").merge([a, b]))
    for tw in (1.0, 1.5):
        res[f"PLeaS width {tw}x (MLP units)"] = loss(merger_of("pleas", target_width=tw).merge([a, b], data=data))
        prop = merger_of("pleas", target_width=tw, propagate=True).merge([a, b], data=data)
        res[f"PLeaS width {tw}x, propagate"] = loss(prop)
    free = merger_of("pleas", data_free=True, noise_samples=128, input_shape=[64]).merge([a, b])
    res["PLeaS-free width 1.0x (random tokens)"] = loss(free)
    return res


def print_table(runs: list[dict[str, float]], column: str) -> None:
    """One row per method: the mean over the seeds' runs, +- their standard deviation."""
    print(f"| method | {column} |\n| --- | --- |")
    for key in runs[0]:
        vals = [r[key] for r in runs]
        sd = f" +- {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        print(f"| {key} | {statistics.mean(vals):.3f}{sd} |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed: MLP and Llama")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--merge-examples", type=int, default=512, help="PLeaS / aTLAS data (from the train split)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lm-seeds", type=int, default=2, help="seeds of the transformer table (0: skip it)")
    parser.add_argument("--lm-steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    archs = ["mlp"] if args.quick else ["mlp", "cnn"]
    t0 = time.perf_counter()
    print(f"digits, halves 0-4 / 5-9, test accuracy on all 10 classes; mean +- std over {seeds} seed(s)\n")
    for arch in archs:
        for setting in ("diff-init", "shared-base"):
            runs = [run_seed(arch, setting, s, args) for s in range(seeds)]
            print(f"### {arch.upper()} ({'hidden [64, 64]' if arch == 'mlp' else 'channels [8, 16], hidden 64'}), "
                  f"{setting}\n")
            print_table(runs, "test accuracy")
    lm_seeds = min(1, args.lm_seeds) if args.quick else args.lm_seeds
    if lm_seeds:
        runs = [run_lm_seed(s, args) for s in range(lm_seeds)]
        print(f"### Llama (hidden 64, 2 layers, 4 heads / 2 kv heads, MLP 128), char corpus halves, diff-init, "
              f"{args.lm_steps} steps each; mean +- std over {lm_seeds} seed(s)\n")
        print_table(runs, "validation loss (nats/char)")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Small char-level Llama pre-training on CPU, the same budget for every optimizer.

AdamW, GaLore, LORENZA, DCT, AdaZo-SAM and SAM train the same randomly initialised Llama (built from
the foundation task ``workers/tasks/char_lm.py``: byte vocabulary, the built-in corpus) for the same
number of steps on the same batches; the table gives the final eval loss on the held-out tail of the
corpus, wall time, passes per step and optimizer-state size. No Ray: the model and data are built
directly; the closure optimizers get the loop's ``forward_backward(backward)`` contract.

    .venv/bin/python bench/optim_compare_cpu.py            # ~10 minutes on 2 cores
    .venv/bin/python bench/optim_compare_cpu.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

METHODS: dict[str, dict[str, Any]] = {
    # learning rates: Adam-type at 3e-3 for this size; the GaLore family at 1e-2 with scale 0.25 as
    # in the GaLore paper (the projected matrices move at 2.5e-3)
    "adamw": {"lr": 3e-3, "weight_decay": 0.0},
    "galore": {"lr": 1e-2, "scale": 0.25},
    "lorenza": {"lr": 1e-2, "scale": 0.25, "rho": 0.05, "mu": 1e-3, "n_directions": 1},
    "dct": {"lr": 3e-3, "scale": 1.0},
    "adazo_sam": {"lr": 3e-3, "rho": 0.05, "mu": 1e-3, "n_directions": 1},
    "sam": {"lr": 3e-3, "rho": 0.05, "base": "adamw"},
}
LOW_RANK = {"galore", "lorenza", "dct"}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    return total


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from algorithms.optimizers.registry import build
    from service.spec.task import CharCorpusData, TransformerModel
    from workers.tasks.char_lm import CharLMTask

    torch.manual_seed(args.seed)
    task = CharLMTask(CharCorpusData(name="char_corpus", seq_len=args.seq),
                      TransformerModel(name="llama", hidden=args.hidden, layers=args.layers, heads=args.heads))
    model = task.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    hp = dict(METHODS[name])
    if name in LOW_RANK:
        hp.update(rank=args.hidden // 4, update_proj_gap=args.gap)
    opt: Any = build(name, params, **hp)
    batches = task.batches(rank=0, world=1, batch_size=args.batch, seed=args.seed)
    counts = {"fwd": 0, "bwd": 0}
    model.train()
    t0 = time.perf_counter()
    train_loss = 0.0
    for step in range(args.steps):
        batch = next(batches)

        def forward_backward(backward: bool = True, batch: Any = batch) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            counts["fwd"] += 1
            if backward:
                loss.backward()
                counts["bwd"] += 1
            return loss.detach()

        loss: Any
        if getattr(opt, "needs_closure", False):
            loss = opt.step(forward_backward)
        else:
            loss = forward_backward(True)
            opt.step()
        last = min(20, args.steps)
        if step >= args.steps - last:
            train_loss += float(loss) / last
    elapsed = time.perf_counter() - t0
    ev = task.evaluate(model, torch.device("cpu"), args.eval_batches)
    return {"method": name, "eval_loss": ev["eval/loss"], "bpc": ev["eval/bits_per_char"],
            "train_loss": train_loss, "seconds": elapsed, "ms_per_step": 1000 * elapsed / args.steps,
            "fwd": counts["fwd"] / args.steps, "bwd": counts["bwd"] / args.steps,
            "state_mb": state_bytes(getattr(opt, "base", opt)) / 2**20,
            "params_m": sum(p.numel() for p in params) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps of a tiny model")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--gap", type=int, default=100, help="update_proj_gap of the projected optimizers")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.gap, args.hidden, args.layers, args.seq, args.batch, args.eval_batches = 12, 5, 32, 1, 32, 4, 2
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.methods.split(","):
        rows.append(run(name, args))
        r = rows[-1]
        print(f"# {name}: eval loss {r['eval_loss']:.4f} in {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(f"\nchar-level Llama, hidden {args.hidden}, {args.layers} layers, {rows[0]['params_m']:.2f}M params, "
          f"seq {args.seq}, batch {args.batch}, {args.steps} steps, rank {args.hidden // 4}, gap {args.gap}, "
          f"{args.threads} thread(s)\n")
    print("| optimizer | eval loss | bits/char | train loss (last 20 steps) | s total | ms/step | fwd/step | bwd/step "
          "| state MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['eval_loss']:.4f} | {r['bpc']:.3f} | {r['train_loss']:.4f} | {r['seconds']:.0f} "
              f"| {r['ms_per_step']:.0f} | {r['fwd']:.2f} | {r['bwd']:.2f} | {r['state_mb']:.2f} |")


if __name__ == "__main__":
    main()

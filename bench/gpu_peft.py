"""Step time of LoRA vs LoRA-GGPO, LoRA-Pro and ALLoRA on a ~1B Llama (random init), bf16.

Needs torch (CUDA), transformers and peft; not pydantic/ray (it imports the method modules
directly, not the registry). Goal from issue 4: each method's step time <= 1.10x LoRA's.

    python bench/gpu_peft.py                       # one CUDA GPU, ~1.1B Llama, bf16
    python bench/gpu_peft.py --device cpu --tiny   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.peft.allora import apply_allora  # noqa: E402
from algorithms.peft.ggpo import apply_lora_ggpo  # noqa: E402
from algorithms.peft.lora import apply_lora  # noqa: E402
from algorithms.peft.lora_pro import apply_lora_pro  # noqa: E402

METHODS = {"lora": apply_lora, "lora_ggpo": apply_lora_ggpo, "lora_pro": apply_lora_pro,
           "allora": apply_allora}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    else:  # TinyLlama-1.1B shapes
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                          num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(dtype)  # type: ignore[arg-type]
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(name: str, args: argparse.Namespace) -> dict[str, float]:
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = build(args, dtype)
    builder: Any = METHODS[name]
    handle = builder(model, r=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS)
    model = handle.model
    opt = torch.optim.AdamW(handle.param_groups(model, 1e-4))
    vocab = model.config.vocab_size
    g = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device, generator=g)
    times = []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        handle.on_step_start(step, model)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        handle.before_backward(step, model)
        loss.backward()
        handle.after_backward(step, model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    mem = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    del model, handle, opt
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"median_s": times[len(times) // 2], "loss": float(loss), "mem_gib": mem, "params": n_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (16 if args.tiny else 1024)
    args.steps = args.steps or (3 if args.tiny else 15)
    if args.device == "cpu":
        torch.set_num_threads(1)
    rows = {m: run(m, args) for m in args.methods.split(",")}
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    first = next(iter(rows.values()))
    print(f"\n{dev}; Llama {first['params'] / 1e9:.2f}B params; batch {args.batch} x seq {args.seq}; "
          f"rank {args.rank} on {', '.join(TARGETS)}; median of {args.steps} steps\n")
    print("| method | step time (s) | vs LoRA | peak mem (GiB) | last loss |")
    print("| --- | --- | --- | --- | --- |")
    base = rows.get("lora", first)["median_s"]
    for m, r in rows.items():
        ratio = r["median_s"] / base
        print(f"| {m} | {r['median_s']:.4f} | {ratio:.3f}x | {r['mem_gib']:.1f} | {r['loss']:.3f} |")


if __name__ == "__main__":
    main()

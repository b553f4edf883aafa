"""Projected optimizers on one GPU: optimizer-state memory and step time on a Llama of ~350M params.

For AdamW (torch), GaLore, LORENZA and DCT (ours) and the references ``galore-torch``
(``GaLoreAdamW``) and the authors' ``DCTAdamW`` (``ista-daslab-optimizers``) when they are installed
(skipped with a note otherwise), each on a fresh model with the same seed and batches:

- optimizer state: bytes of every tensor the optimizer keeps between steps (moments, projection
  matrices, selected indices, shared DCT bases), and the peak CUDA memory of a training step;
- step time (forward + backward + optimizer, bf16 autocast, fp32 weights): median and mean over a
  whole projection period (``--gap`` steps, which include one subspace refresh), and the refresh step;
- the projection update alone, summed over all matrices of the model: GaLore's SVD, LORENZA's
  randomized SVD and DCT's selection (one matmul + top-k).

Every 2-D parameter is projected (embeddings and LM head included) at rank = hidden/4, also in the
references (``DCTAdamW(max_shape=10**9)``) so that all do the same work. Only torch and
transformers are needed (no pydantic: the optimizer classes are imported directly).

    python bench/gpu_optimizers.py                           # Llama-350M (GaLore's config), H100/H200
    python bench/gpu_optimizers.py --quick --device cpu      # tiny smoke run
    pip install --no-deps galore-torch==1.0 ista-daslab-optimizers==1.1.15   # the references
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import math
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


# ---- references (optional) ------------------------------------------------------------------------
def load_galore_torch() -> Any:
    """galore-torch's GaLoreAdamW; without bitsandbytes (its __init__ imports the 8-bit variant),
    the ``galore_torch.adamw`` module is loaded under a bare package module."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from galore_torch import GaLoreAdamW
            except ModuleNotFoundError as missing:
                spec = importlib.util.find_spec("galore_torch")
                if spec is None or spec.submodule_search_locations is None or missing.name == "galore_torch":
                    raise
                sys.modules.pop("galore_torch", None)
                pkg = types.ModuleType("galore_torch")
                pkg.__path__ = list(spec.submodule_search_locations)
                sys.modules["galore_torch"] = pkg
                GaLoreAdamW = importlib.import_module("galore_torch.adamw").AdamW
        return GaLoreAdamW
    except Exception as exc:  # noqa: BLE001
        print(f"note: galore-torch not available ({type(exc).__name__}: {exc}); skipping it", file=sys.stderr)
        return None


def load_dct_adamw() -> Any:
    """The authors' DCTAdamW without the package __init__ (which needs wandb and CUDA kernels)."""
    spec = importlib.util.find_spec("ista_daslab_optimizers")
    if spec is None or spec.submodule_search_locations is None:
        print("note: ista-daslab-optimizers not available; skipping DCTAdamW", file=sys.stderr)
        return None
    if "ista_daslab_optimizers" not in sys.modules:
        pkg = types.ModuleType("ista_daslab_optimizers")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["ista_daslab_optimizers"] = pkg
    try:
        return importlib.import_module("ista_daslab_optimizers.fft_low_rank.dct_adamw").DCTAdamW
    except Exception as exc:  # noqa: BLE001
        print(f"note: DCTAdamW failed to load ({type(exc).__name__}: {exc}); skipping it", file=sys.stderr)
        return None


# ---- model, data, step -----------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw: dict[str, Any] = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                              num_hidden_layers=args.layers, num_attention_heads=args.heads,
                              num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                              tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:  # built in place (on the GPU: no CPU init and copy; on "meta": no memory at all)
        model: Any = LlamaForCausalLM(LlamaConfig(**kw))
    return model  # type: ignore[no-any-return]


def make_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace, refs: dict[str, Any]) -> Any:
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    low = dict(rank=args.rank, update_proj_gap=args.gap)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr)
    if name == "galore":
        from algorithms.optimizers.galore import GaLore

        return GaLore(model.parameters(), lr=args.lr, scale=0.25, **low)
    if name == "lorenza":
        from algorithms.optimizers.lorenza import Lorenza

        return Lorenza(model.parameters(), lr=args.lr, scale=0.25, rho=0.05, mu=1e-3, n_directions=1, **low)
    if name == "dct":
        from algorithms.optimizers.dct import DCT

        return DCT(model.parameters(), lr=args.lr, **low)
    if name == "galore-torch":
        return refs["galore-torch"]([{"params": rest}, {"params": mats, "scale": 0.25, "proj_type": "std", **low}],
                                    lr=args.lr, no_deprecation_warning=True)
    if name == "DCTAdamW":
        return refs["DCTAdamW"](model.parameters(), lr=args.lr, weight_decay=0.0, rank=args.rank, proj="dct",
                                update_proj_gap=args.gap, max_shape=10**9)
    raise ValueError(name)


def state_bytes(opt: Any) -> int:
    """Tensors kept between steps: optimizer state (incl. galore-torch's projector objects) and
    shared bases (our DCT's per-size matrices, DCTAdamW's Q)."""
    seen: set[int] = set()

    def count(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen or x.device.type == "meta":
                return 0
            seen.add(id(x))
            return x.numel() * x.element_size()
        if isinstance(x, list | tuple):
            return sum(count(y) for y in x)
        if hasattr(x, "ortho_matrix"):  # galore-torch's GaLoreProjector
            return count(x.ortho_matrix)
        if hasattr(x, "indices_crt"):  # DCTAdamW's FFTLowRankProjector
            return count(x.indices_crt) + count(getattr(x, "indices_prev", None))
        return 0

    total = sum(count(v) for s in opt.state.values() for v in s.values())
    total += sum(count(q) for q in getattr(opt, "_bases", {}).values())
    total += count(getattr(opt, "Q", None))
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: torch.nn.Module, opt: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
               for _ in range(args.warmup + args.gap)]
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(ids: torch.Tensor) -> None:
        def forward_backward(backward: bool = True) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp):  # type: ignore[arg-type]
                loss = model(input_ids=ids, labels=ids).loss
            if backward:
                loss.backward()
            return loss.detach()

        if getattr(opt, "needs_closure", False):
            opt.step(forward_backward)
        else:
            forward_backward(True)
            opt.step()

    times = []
    with contextlib.redirect_stdout(io.StringIO()):  # DCTAdamW prints its choices
        for i, ids in enumerate(batches):
            if device.type == "cuda" and i == args.warmup:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            step(ids)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    fwd = []
    with torch.no_grad(), torch.autocast(**amp):  # type: ignore[arg-type]
        for ids in batches[:5]:
            sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids)
            sync(device)
            fwd.append(time.perf_counter() - t0)
    return {"state_bytes": state_bytes(opt), "median": statistics.median(times),
            "mean": statistics.fmean(times), "max": max(times), "fwd": statistics.median(fwd[1:] or fwd),
            "params": sum(p.numel() for p in model.parameters()),
            "peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0}


def run(name: str, args: argparse.Namespace, device: torch.device, refs: dict[str, Any]) -> dict[str, Any]:
    model = build_model(args, device)
    model.train()
    opt = make_optimizer(name, model, args, refs)
    out = {"name": name, **measure(model, opt, args, device)}
    del opt, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- projection update alone ------------------------------------------------------------------------
def time_refresh(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Seconds to recompute every matrix's subspace once (median of 3), by method."""
    from algorithms.optimizers.dct import DCT
    from algorithms.optimizers.projection import galore_side, randomized_svd_basis, svd_basis

    model = build_model(args, torch.device("meta"))
    shapes: dict[tuple[int, int], int] = {}
    for p in model.parameters():
        if p.dim() == 2:
            key = (int(p.shape[0]), int(p.shape[1]))
            shapes[key] = shapes.get(key, 0) + 1
    del model
    dct = DCT([torch.nn.Parameter(torch.zeros(1, device=device))], lr=1.0)
    gen = torch.Generator(device=device).manual_seed(0)
    methods: dict[str, Callable[[torch.Tensor], Any]] = {
        "svd (GaLore)": lambda g: svd_basis(g, args.rank, galore_side(g.shape, "std")),
        "randomized svd (LORENZA)": lambda g: randomized_svd_basis(g, args.rank, galore_side(g.shape, "std"),
                                                                   oversampling=8, power_iters=1, generator=gen),
        "dct selection (DCT)": lambda g: dct.select(g, args.rank, 1.0),
    }
    out = {}
    for label, fn in methods.items():
        total = 0.0
        for shape, count in shapes.items():
            g = torch.randn(*shape, device=device)
            fn(g)  # warm-up (and DCT basis construction, built once per size)
            reps = []
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                fn(g)
                sync(device)
                reps.append(time.perf_counter() - t0)
            total += statistics.median(reps) * count
        out[label] = total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (use with --device cpu)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2736)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=0, help="default hidden/4")
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap = the timed window")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--fp32-matmul", action="store_true", help="keep full fp32 matmuls (default: TF32 allowed)")
    ap.add_argument("--methods", default="adamw,galore,lorenza,dct,galore-torch,DCTAdamW")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 64, 160, 2, 4, 256
        args.seq, args.batch, args.gap, args.warmup = 32, 2, 4, 1
    args.rank = args.rank or args.hidden // 4
    device = torch.device(args.device)
    if not args.fp32_matmul:
        torch.set_float32_matmul_precision("high")
    if device.type == "cpu":
        torch.set_num_threads(1)
    refs = {"galore-torch": load_galore_torch(), "DCTAdamW": load_dct_adamw()}
    names = [n for n in args.methods.split(",") if n not in refs or refs[n] is not None]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for name in names:
        rows.append(run(name, args, device, refs))
        r = rows[-1]
        print(f"# {name}: state {r['state_bytes'] / 2**20:.1f} MiB, median step {1000 * r['median']:.1f} ms",
              file=sys.stderr, flush=True)
    base = next((r for r in rows if r["name"] == "adamw"), rows[0])
    print(f"\nLlama {rows[0]['params'] / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}), batch {args.batch} x seq {args.seq}, bf16 autocast, fp32 weights, rank {args.rank}, "
          f"gap {args.gap} (timed window = {args.gap} steps after {args.warmup} warm-up), "
          f"matmul precision {'highest' if args.fp32_matmul else 'high (TF32)'}, device: {gpu}, "
          f"torch {torch.__version__}\n")
    print("| optimizer | state MiB | state / AdamW | peak MiB | median step ms | / AdamW | mean step ms | / AdamW "
          "| refresh step ms | median - 2 fwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        excl = f"{1000 * (r['median'] - 2 * r['fwd']):.1f}" if r["name"] == "lorenza" else ""
        print(f"| {r['name']} | {r['state_bytes'] / 2**20:.1f} | {r['state_bytes'] / max(base['state_bytes'], 1):.3f} "
              f"| {r['peak'] / 2**20:.0f} | {1000 * r['median']:.1f} | {r['median'] / base['median']:.3f} "
              f"| {1000 * r['mean']:.1f} | {r['mean'] / base['mean']:.3f} | {1000 * r['max']:.1f} | {excl} |")
    print(f"\nforward only (no grad), median: {1000 * base['fwd']:.1f} ms; LORENZA makes 2 of them per step "
          "(one probe direction, two-sided) on top of one forward-backward.\n")
    refresh = time_refresh(args, device)
    svd = refresh["svd (GaLore)"]
    print("| projection update, all matrices | seconds | SVD / this |")
    print("|---|---|---|")
    for label, sec in refresh.items():
        print(f"| {label} | {sec:.4f} | {svd / sec:.1f} |")
    if not math.isfinite(svd):
        raise SystemExit("non-finite timing")


if __name__ == "__main__":
    main()

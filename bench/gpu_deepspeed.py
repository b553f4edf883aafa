"""DeepSpeed through the service's worker path versus bare ``torchrun`` + DeepSpeed, same config.

(a) service: the resolved spec, stored on an MLflow run, goes to ``python -m workers.entrypoint``
    (as a Ray Job would run it) against a local Ray head started here; Ray Train's TorchTrainer runs
    ``workers.train_loop`` with the ``deepspeed`` strategy; figures come from the run's MLflow
    metrics (a local file store).
(b) bare: ``torchrun`` runs this file's ``--worker`` mode: the same Llama (built by the same
    function), the same DeepSpeed config (``merged_config`` of the same spec, written to JSON),
    the same optimizer, a plain DeepSpeed loop (forward, ``engine.backward``, ``engine.step``).

Both use every GPU given (``--gpus``, default all), one process per GPU, any number of them.
Figures: tokens/s (global), per GPU, MFU = tokens/s x (6 N + 12 L h T) / (989 TFLOP/s x GPUs)
(N: parameters less the input embedding; the attention term counts QK^T and AV, forward and
backward, over the full T x T square, as PaLM and nanoGPT do), peak memory (torch's max
allocated on the GPU; nvidia-smi's peak as well), and (a)/(b).

    source .whl/install.sh
    python bench/gpu_deepspeed.py                       # ~1.07B Llama, seq 2048, bf16, ZeRO-2, micro 4
    python bench/gpu_deepspeed.py --stage 3 --micro-batch 8
    python bench/gpu_deepspeed.py --mode largest        # ZeRO-3 + CPU offload, bare path, largest that fits
    python bench/gpu_deepspeed.py --quick --device cpu  # tiny, 2 CPU processes, gloo (checks the plumbing)
"""

import argparse
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense bf16
VOCAB = 256  # the char corpus' byte vocabulary

# Llama shapes (vocab 256): name -> hidden, layers, heads, intermediate.
SIZES = {
    "tiny": (64, 2, 4, 128),
    "1b": (2048, 16, 16, 8192),    # 1.07B
    "3b": (3072, 28, 24, 8192),    # 3.2B
    "5b": (4096, 24, 32, 11008),   # 4.9B
    "7b": (4096, 32, 32, 11008),   # 6.5B
    "9b": (4096, 36, 32, 14336),   # 8.8B
    "13b": (5120, 40, 40, 13824),  # 12.7B
    "16b": (5120, 52, 40, 13824),  # 16.5B
    "20b": (6144, 44, 48, 16384),  # 19.9B
}


# ---- the spec both paths share ----------------------------------------------------------------


def build_spec(args: argparse.Namespace, n: int) -> dict[str, Any]:
    from service.spec import ExperimentSpec

    hidden, layers, heads, inter = SIZES[args.size]
    ds: dict[str, Any] = {"zero_stage": args.stage, "offload_optimizer": args.offload_optimizer,
                          "offload_params": args.offload_params, "activation_checkpointing": args.act_ckpt}
    if args.ds_config:
        ds["config"] = json.loads(args.ds_config)
    doc = {
        "name": "bench-deepspeed",
        "task": {"kind": "causal_lm", "dataset": {"name": "char_corpus", "seq_len": args.seq},
                 "model": {"name": "llama", "hidden": hidden, "layers": layers, "heads": heads,
                           "intermediate": inter, "attn_implementation": args.attn}},
        "train": {"max_steps": args.warmup + args.steps, "batch_size": args.micro_batch * n * args.accum,
                  "grad_accum": args.accum, "log_every": args.log_every, "precision": args.precision,
                  "grad_clip": 1.0, "eval_batches": 1, "seed": 0, "compile": args.compile},
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "distributed": {"num_workers": n, "use_gpu": args.device == "cuda", "strategy": "deepspeed",
                        "deepspeed": ds},
    }
    return ExperimentSpec.model_validate(doc).resolved()


def model_flops_per_token(spec: dict[str, Any]) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of the spec's Llama, counted on the meta device."""
    import torch

    from service.spec import ExperimentSpec
    from workers.tasks.char_lm import build_decoder

    s = ExperimentSpec.model_validate(spec)
    with torch.device("meta"):
        model = build_decoder(s.task.model, VOCAB, s.task.dataset.seq_len)  # type: ignore[arg-type,union-attr]
    n = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()  # type: ignore[operator]
    m = spec["task"]["model"]
    seq = spec["task"]["dataset"]["seq_len"]
    return n, 6.0 * (n - n_embed) + 12.0 * m["layers"] * m["hidden"] * seq


# ---- peak device memory seen by nvidia-smi (both paths, sampled) ---------------------------------


class SmiSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib = 0.0
        self.stop_flag = threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.available and not self.stop_flag.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max([self.peak_mib, *[float(x) for x in out.split() if x.strip()]])
            except (subprocess.SubprocessError, ValueError):
                pass
            self.stop_flag.wait(0.5)

    def stop(self) -> float | None:
        self.stop_flag.set()
        self.join(timeout=15)
        return self.peak_mib / 1024 if self.available else None


# ---- (a) the service's worker path ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ray_head(work: Path, args: argparse.Namespace, n: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A local Ray head (token auth on, as the service's), in its own process group."""
    token = work / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           # Ray Train's workers import workers.train_loop from this checkout (not installed on GPU hosts)
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    port = free_port()
    cpus = max(2 * n, os.cpu_count() or 2)
    ray_bin = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # pip --target installs (the GPU bundle) may leave no `ray` script: run its module then
    launcher = [ray_bin] if ray_bin else [sys.executable, "-m", "ray.scripts.scripts"]
    cmd = [*launcher, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={work / 'ray'}",
           f"--ray-client-server-port={free_port()}"]
    if args.device == "cuda":
        cmd.append(f"--num-gpus={n}")
    log = open(work / "ray-head.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited; see {work / 'ray-head.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    time.sleep(3)  # the GCS listens before the raylet has registered the node
    return proc, env


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_service(args: argparse.Namespace, spec: dict[str, Any], work: Path, n: int) -> dict[str, Any]:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # this process and the workers it starts
    from mlflow.tracking import MlflowClient

    mlflow_uri = (work / "mlruns").as_uri()
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("bench-deepspeed")).info.run_id
    # what the control plane does at dispatch: the resolved spec on the run, which the job reads
    from service.spec import SPEC_ARTIFACT, ExperimentSpec

    client.log_dict(run_id, ExperimentSpec.model_validate(spec).resolved(), SPEC_ARTIFACT)
    head, ray_env = start_ray_head(work, args, n)
    env = {**os.environ, **ray_env, "MLFLOW_TRACKING_URI": mlflow_uri,
           "ORCHESTRA_MLFLOW_RUN_ID": run_id, "ORCHESTRA_STORAGE_PATH": str(work / "ray_results"),
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    sampler = SmiSampler()
    sampler.start()
    t0 = time.perf_counter()
    try:
        with open(work / "service.log", "wb") as log:
            rc = subprocess.run([sys.executable, "-m", "workers.entrypoint", "bench-a"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    finally:
        smi = sampler.stop()
        stop_process_group(head)
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (work / "service.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"service path failed (rc={rc}); log tail:\n{tail}")
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
               for key in ("perf/step_time_s", "perf/max_mem_allocated_gib", "train/loss")}
    times = [v for step, v in history["perf/step_time_s"] if step > args.warmup]
    mem = [v for _, v in history["perf/max_mem_allocated_gib"]]
    return {"step_time_s": sum(times) / len(times), "max_alloc_gib": max(mem) if mem else None, "smi_gib": smi,
            "loss": [v for _, v in history["train/loss"]], "wall_s": wall}


# ---- (b) bare torchrun + DeepSpeed ----------------------------------------------------------------


def omp_threads(args: argparse.Namespace, n: int) -> str:
    """CPU threads per rank: 1 on the CPU check (2 shared cores); otherwise the host's cores split
    among the ranks (DeepSpeed's CPU Adam runs on them under offload)."""
    if "OMP_NUM_THREADS" in os.environ:
        return os.environ["OMP_NUM_THREADS"]
    return "1" if args.device == "cpu" else str(max(1, (os.cpu_count() or 1) // n))


def run_bare(args: argparse.Namespace, spec: dict[str, Any], work: Path, n: int) -> dict[str, Any]:
    from service.spec import ExperimentSpec
    from service.spec.deepspeed_rules import merged_config

    (work / "spec.json").write_text(json.dumps(spec))
    (work / "ds_config.json").write_text(json.dumps(merged_config(ExperimentSpec.model_validate(spec)), indent=1))
    out = work / "bare.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", "--work", str(work), "--device", args.device, "--warmup", str(args.warmup),
           "--steps", str(args.steps)]
    if args.zero_init:
        cmd.append("--zero-init")
    sampler = SmiSampler()
    sampler.start()
    t0 = time.perf_counter()
    try:
        with open(work / "bare.log", "wb") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout,
                                env={**os.environ, "OMP_NUM_THREADS": omp_threads(args, n)}).returncode
    finally:
        smi = sampler.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (work / "bare.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"bare path failed (rc={rc}); log tail:\n{tail}")
    result = json.loads(out.read_text())
    times = result["step_times"][args.warmup:]
    return {"step_time_s": sum(times) / len(times), "max_alloc_gib": result["max_alloc_gib"], "smi_gib": smi,
            "loss": result["losses"], "wall_s": wall, "host_rss_gib": result["host_rss_gib"]}


def bare_worker(args: argparse.Namespace) -> None:
    """One torchrun rank: a plain DeepSpeed training loop on the config the service would use."""
    import torch
    import torch.nn.functional as F

    from service.spec import ExperimentSpec
    from workers.tasks.char_lm import build_decoder

    work = Path(args.work)
    spec = ExperimentSpec.model_validate(json.loads((work / "spec.json").read_text()))
    config = json.loads((work / "ds_config.json").read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(1)
    import deepspeed
    import deepspeed.ops

    if args.device == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, not compiled here
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if args.device == "cpu" else "nccl")
    rank = torch.distributed.get_rank()
    train, ds = spec.train, spec.distributed.deepspeed
    assert train is not None and ds is not None and spec.optimizer is not None
    seq = spec.task.dataset.seq_len  # type: ignore[union-attr]
    torch.manual_seed(train.seed)
    if args.zero_init and config["zero_optimization"]["stage"] == 3:
        # Materialise each parameter already partitioned (no whole fp32 model in host memory).
        # Import what the model needs first: zero.Init patches tensor constructors, which breaks
        # torch._dynamo's import (pulled in lazily by transformers).
        import torch._dynamo  # noqa: F401
        from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401

        with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
            model = build_decoder(spec.task.model, VOCAB, seq)  # type: ignore[arg-type]
    else:
        model = build_decoder(spec.task.model, VOCAB, seq)  # type: ignore[arg-type]
    if ds.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    opt_cfg = spec.optimizer
    hp: dict[str, Any] = {"lr": opt_cfg.lr, "betas": tuple(opt_cfg.betas), "eps": opt_cfg.eps,  # type: ignore[union-attr]
          "weight_decay": opt_cfg.weight_decay}
    params = [p for p in model.parameters() if p.requires_grad]
    if args.device == "cpu":
        optimizer: Any = torch.optim.AdamW(params, **hp)
    elif ds.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **hp)
    else:
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam(params, adam_w_mode=True, **hp)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if train.compile:
        engine.compile()
    micro = config["train_micro_batch_size_per_gpu"]
    accum = config["gradient_accumulation_steps"]
    gen = torch.Generator().manual_seed(1000 + rank)
    engine.train()
    step_times, losses = [], []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for _ in range(accum):
            ids = torch.randint(0, VOCAB, (micro, seq + 1), generator=gen).to(device, non_blocking=True)
            logits = engine(input_ids=ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            engine.step()  # applies the update at the accumulation boundary
            total += loss.detach() / accum
        losses.append(float(total))  # one host sync per step, as the service loop does
        step_times.append(time.perf_counter() - t0)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0],
                        device=device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device=device)  # KiB -> GiB
    torch.distributed.all_reduce(rss, op=torch.distributed.ReduceOp.SUM)
    if rank == 0:
        (work / "bare.json").write_text(json.dumps({
            "step_times": step_times, "losses": losses,
            "max_alloc_gib": float(peak.item()) if device.type == "cuda" else None,
            "host_rss_gib": float(rss.item())}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---- the table ----------------------------------------------------------------------------------


def host_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        return float("nan")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row(name: str, res: dict[str, Any], tokens_per_step: int, flops_per_token: float, n: int, gpu: bool) -> str:
    tps = tokens_per_step / res["step_time_s"]
    mfu = tps * flops_per_token / (PEAK_TFLOPS * 1e12 * n) if gpu else None
    return (f"| {name} | {tps:,.0f} | {tps / n:,.0f} | {fmt(mfu, '.1%')} | {res['step_time_s'] * 1000:.1f} | "
            f"{fmt(res.get('max_alloc_gib'), '.1f')} | {fmt(res.get('smi_gib'), '.1f')} | {res['wall_s']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["compare", "largest"], default="compare")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="Llama shape (default 1b; tiny with --quick)")
    p.add_argument("--sizes", default="7b,5b,3b", help="--mode largest: sizes to try, first that trains wins")
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 128 with --quick)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's module")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-params", action="store_true")
    p.add_argument("--zero-init", action="store_true", help="bare path: build the model under zero.Init (ZeRO-3)")
    p.add_argument("--ds-config", default=None, help="raw DeepSpeed fragment (JSON) for both paths")
    p.add_argument("--gpus", type=int, default=None, help="processes (GPUs) per path; default: all GPUs")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the figures")
    p.add_argument("--steps", type=int, default=30, help="measured steps")
    p.add_argument("--log-every", type=int, default=10, help="the service loop's metric window (divides warmup)")
    p.add_argument("--only", choices=["a", "b"], default=None, help="run one path only")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (with --device cpu: 2 gloo processes)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per path")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, MLflow store)")
    # internal: one torchrun rank of the bare path
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        bare_worker(args)
        return

    n, gpu_name = settle(p, args)
    sizes = [s.strip() for s in args.sizes.split(",")] if args.mode == "largest" and not args.size else \
        [args.size or "1b"]
    print(f"# DeepSpeed: service worker path (a) vs bare torchrun (b) — {n} x {gpu_name}, "
          f"{os.cpu_count()} CPU cores, {host_memory_gib():.0f} GiB host memory")
    for size in sizes:
        args.size = size
        failed, n_params = compare_size(args, size, n)
        if args.mode == "largest" and not failed:
            print(f"\nlargest that trained: {size} ({n_params / 1e9:.2f}B)")
            break


def settle(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, str]:
    """Fill the defaults that depend on the mode and the device; the ranks per path and the GPU's name."""
    if args.quick:
        args.size = args.size or "tiny"
        args.seq = args.seq or 128
        args.warmup, args.steps, args.log_every = 2, 4, 2
    if args.mode == "largest":
        args.stage, args.offload_optimizer, args.zero_init = 3, True, True
        args.only = args.only or "b"
        if not args.quick:
            args.warmup, args.steps, args.log_every = 2, 3, 1
    args.seq = args.seq or 2048
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    if args.device == "cpu" and (args.offload_optimizer or args.offload_params):
        print("CPU offload needs GPU workers; --device cpu runs without it", file=sys.stderr)
        args.offload_optimizer = args.offload_params = False
    if args.warmup % args.log_every:
        p.error("--warmup must be a multiple of --log-every (the service's metric windows)")
    if args.device == "cuda":
        import torch

        n = args.gpus or torch.cuda.device_count()
        if n < 1:
            p.error("no CUDA device: use --device cpu --quick")
        gpu_name = torch.cuda.get_device_name(0)
    else:
        n, gpu_name = args.gpus or 2, "cpu"

    return n, gpu_name


def compare_size(args: argparse.Namespace, size: str, n: int) -> tuple[bool, float]:
    """Both paths (or --only one) on Llama ``size``: prints the table; (any path failed, parameters)."""
    spec = build_spec(args, n)
    n_params, flops_per_token = model_flops_per_token(spec)
    tokens_per_step = spec["train"]["batch_size"] * args.seq
    print(f"\nLlama {size}: {n_params / 1e6:,.1f}M parameters, seq {args.seq}, {args.precision}, "
          f"ZeRO-{args.stage}{' + optimizer offload' if args.offload_optimizer else ''}"
          f"{' + param offload' if args.offload_params else ''}, micro-batch {args.micro_batch} x accum "
          f"{args.accum} x {n} ranks = {spec['train']['batch_size']} sequences/step, attention {args.attn}"
          f"{', activation checkpointing' if args.act_ckpt else ''}{', torch.compile' if args.compile else ''}; "
          f"{args.warmup} warm-up + {args.steps} measured steps; "
          f"{flops_per_token / 1e9:.2f} GFLOP/token (6N + 12 L h T)\n")
    print("| path | tokens/s | tokens/s/GPU | MFU | step ms | max alloc GiB | nvidia-smi GiB | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    work = Path(tempfile.mkdtemp(prefix=f"bench-ds-{size}-"))
    results: dict[str, dict[str, Any]] = {}
    failed = False
    for path, runner, name in (("b", run_bare, "(b) bare torchrun + DeepSpeed"),
                               ("a", run_service, "(a) service: entrypoint + Ray Train")):
        if args.only and args.only != path:
            continue
        try:
            results[path] = runner(args, spec, work, n)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"| {name} | failed: {str(exc).splitlines()[0][:200]} |||||||")
            print(str(exc)[-2000:], file=sys.stderr)
            failed = True
            continue
        print(row(name, results[path], tokens_per_step, flops_per_token, n, args.device == "cuda"))
    if "a" in results and "b" in results:
        ratio = results["b"]["step_time_s"] / results["a"]["step_time_s"]
        print(f"\n(a)/(b) tokens/s: {ratio:.3f}")
        print(f"loss, first/last logged: (a) {results['a']['loss'][0]:.3f} -> {results['a']['loss'][-1]:.3f}; "
              f"(b) {results['b']['loss'][0]:.3f} -> {results['b']['loss'][-1]:.3f}")
    if "b" in results and results["b"].get("host_rss_gib") is not None:
        print(f"bare path host memory (peak RSS, all ranks): {results['b']['host_rss_gib']:.1f} GiB")
    if args.keep or failed:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return failed, n_params


if __name__ == "__main__":
    main()

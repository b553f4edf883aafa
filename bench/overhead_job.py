"""The quickstart's training without Orchestra, for bench/overhead.py: an MLP on the digits, two
data-parallel CPU workers (gloo), AdamW, the quickstart's batch, evaluation and logging cadence.

    python bench/overhead_job.py --ray  [--steps 200]   # a Ray Train TorchTrainer (run it as a Ray job)
    python bench/overhead_job.py --hand [--steps 200]   # two processes of torch.multiprocessing

Rank 0 prints ``OVERHEAD first_step <unix time>`` at the first logged step (step ``log_every``)
and ``OVERHEAD last_step <unix time>`` after the last; the caller times from its own start.
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS, BATCH, LOG_EVERY, EVAL_EVERY = 2, 64, 10, 50


def train(config: dict) -> None:  # type: ignore[type-arg]
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    sys.path.insert(0, config["root"])
    from workers.tasks.digits import build_mlp, load_digits_split

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split(0.2)
    model = torch.nn.parallel.DistributedDataParallel(build_mlp([128, 64]))
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.01)
    g = torch.Generator().manual_seed(rank)
    per_rank = BATCH // world
    for step in range(1, config["steps"] + 1):
        idx = torch.randint(len(y_tr), (per_rank,), generator=g)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step == LOG_EVERY:
            print(f"OVERHEAD first_step {time.time():.3f}", flush=True)
        if rank == 0 and step % EVAL_EVERY == 0:
            with torch.no_grad():
                float((model.module(x_te).argmax(1) == y_te).float().mean())
    if rank == 0:
        print(f"OVERHEAD last_step {time.time():.3f}", flush=True)


def hand_worker(rank: int, steps: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    try:
        train({"steps": steps, "root": str(ROOT)})
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ray", action="store_true")
    mode.add_argument("--hand", action="store_true")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--port", type=int, default=29611, help="--hand: the gloo rendezvous port")
    args = parser.parse_args()
    if args.hand:
        import torch.multiprocessing as mp

        mp.spawn(hand_worker, args=(args.steps, args.port), nprocs=WORKERS)
        return
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    TorchTrainer(train, train_loop_config={"steps": args.steps, "root": str(ROOT)},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False)).fit()


if __name__ == "__main__":
    main()

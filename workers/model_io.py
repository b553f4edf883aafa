"""The final model as an MLflow artifact, and loading a finished run's model back (for merges)."""

import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from service.spec import ExperimentSpec

MODEL_DIR = "model"


def save_final_model(logger: Any, spec: ExperimentSpec, model: nn.Module, peft_handle: Any = None) -> None:
    """``model/state_dict.pt`` + ``model/spec.json`` (enough to rebuild it), ``model/hf`` for
    transformers models, ``model/adapter`` (peft format) when a PEFT method was used."""
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(tmp, "state_dict.pt"))
        with open(os.path.join(tmp, "spec.json"), "w") as fh:
            json.dump(spec.resolved(), fh, indent=1)
        if peft_handle is not None:
            peft_handle.save_adapter(model, os.path.join(tmp, "adapter"))
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(os.path.join(tmp, "hf"))
        logger.artifacts(tmp, MODEL_DIR)


def rebuild_model(folder: str) -> tuple[nn.Module, ExperimentSpec]:
    """Rebuild a model saved by ``save_final_model`` from its folder."""
    from workers.tasks import build_task

    with open(os.path.join(folder, "spec.json")) as fh:
        spec = ExperimentSpec.model_validate(json.load(fh))
    model = build_task(spec).build_model()
    state = torch.load(os.path.join(folder, "state_dict.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model, spec

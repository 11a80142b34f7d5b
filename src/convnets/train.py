"""Stage `train`: fit the convnet on the train split, keep the best model by validation loss.

Outputs: data/model/ (model.keras: the best epoch, as the book's
ModelCheckpoint(save_best_only=True) keeps it, always saved in float32; and
classes.json, so that predict knows the labels) and data/train/ (dvclive:
per-epoch metrics, the summary with the best epoch and the devices used;
devices.json says which ones by name).

Training runs in phases: one, or two for fine-tuning (the frozen-base phase,
then the base's last layers unfrozen at a low learning rate). With
model.cached_features the frozen base runs once over the photos and the first
phase trains only the classifier on its outputs.

A killed run resumes from its last finished epoch when rerun (see
convnets/resume.py); the state is kept in the user's cache folder, and mirrored
to $CONVNETS_RESUME_URL when that is set, until the run succeeds. It resumes
only the same run: same params, data, code (this module and the project
modules it imports), environment (environment_identity) and precision and
devices; after any change, or when the state does not restore completely,
training starts over and says why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.utils import standardize_metric_name

from convnets import environment
from convnets.averaging import AveragedWeights, batch_normalizations, statistics_batches, with_warmed_up_average
from convnets.cli import stage_main
from convnets.codedeps import import_closure
from convnets.datasets import ordered_batches, training_batches
from convnets.devices import CPU_MIXED, DevicePlan, describe, dtype_policy, make_strategy, plan_devices, precision_line
from convnets.layout import CLASSES, DEVICES_FILE, MODEL_FILE, STOPPED, TIMINGS, images_file, labels_file
from convnets.models import Convnet, build_convnet, loss_for, one_hot_classes
from convnets.outputs import atomic_file, staged_dir, write_json
from convnets.params import ModelParams, Params, TrainParams
from convnets.prepared import load_classes, load_subset
from convnets.pretrained import VGG16Preprocess, set_trainable_layers
from convnets.resume import (
    BEST,
    EpochBackup,
    Progress,
    ResumeDir,
    ResumeMirror,
    RunKey,
    UnusableState,
    digest_files,
    digest_json,
    restore_training_state,
)
from convnets.trained import save_model


@dataclass(frozen=True)
class Phase:
    """Epochs [start, end) trained with one learning rate and one set of trainable layers."""

    name: str
    start: int
    end: int
    learning_rate: float
    trainable_layers: int  # of the pretrained base; 0 = frozen
    features: bool  # train the classifier alone on cached base outputs
    warmup_epochs: int = 0  # its first epochs raise the rate linearly from 0


def plan_phases(model: ModelParams, train: TrainParams) -> list[Phase]:
    """The phases of params that Params accepted (it refuses the plans that cannot work)."""
    warmup = min(train.warmup_epochs, train.epochs)  # a shorter first phase warms up throughout
    if not train.fine_tune_epochs:
        return [
            Phase("train", 0, train.epochs, train.learning_rate, model.trainable_layers, model.cached_features, warmup)
        ]
    end = train.epochs + train.fine_tune_epochs
    return [
        Phase("train", 0, train.epochs, train.learning_rate, 0, model.cached_features, warmup),
        Phase("fine_tune", train.epochs, end, train.fine_tune_learning_rate, model.trainable_layers, False),
    ]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Same params + same data + same machine -> same weights and metrics."""
    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow generators
    if deterministic:
        tf.config.experimental.enable_op_determinism()


OPTIMIZERS = {
    "rmsprop": keras.optimizers.RMSprop,
    "adam": keras.optimizers.Adam,
    "sgd": keras.optimizers.SGD,
    "adamw": keras.optimizers.AdamW,
}


def make_optimizer(
    name: str,
    learning_rate: float,
    schedule: str = "constant",
    steps: int = 0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    ema: float = 0.0,
) -> keras.optimizers.Optimizer:
    """The optimizer of params, over `steps` steps (the phase), the first `warmup_steps` warming up.

    The schedule reads the optimizer's step counter, which a resumed run restores
    with the rest of its state, so resuming does not restart the warm-up or the
    decay. With `ema` the optimizer also keeps the weights' moving average, its
    momentum warming up to `ema` (convnets.averaging; AveragedWeights swaps it in
    for validation and the backup).
    """
    options = {"learning_rate": learning_rate_schedule(learning_rate, schedule, steps, warmup_steps)}
    optimizer_class = OPTIMIZERS[name]
    if ema:
        options.update(use_ema=True, ema_momentum=ema)
        optimizer_class = with_warmed_up_average(optimizer_class)
    if name == "adamw":
        options["weight_decay"] = weight_decay  # Keras's own default (0.004) would apply otherwise
    return optimizer_class(**options)


def learning_rate_schedule(learning_rate: float, schedule: str, steps: int, warmup_steps: int = 0):
    """The rate, or a schedule of the step: linear from 0 over `warmup_steps`, then the schedule.

    cosine: decays to 0 at step `steps` (after the warm-up when there is one).
    """
    schedules = keras.optimizers.schedules
    if schedule == "cosine" and warmup_steps:
        return schedules.CosineDecay(
            0.0, decay_steps=max(steps - warmup_steps, 1), warmup_target=learning_rate, warmup_steps=warmup_steps
        )
    if schedule == "cosine":
        return schedules.CosineDecay(learning_rate, decay_steps=max(steps, 1))
    if warmup_steps:
        # A linear "decay" from 0 up to the rate, which then stays there: warm-up, then constant.
        return schedules.PolynomialDecay(0.0, decay_steps=warmup_steps, end_learning_rate=learning_rate, power=1.0)
    return learning_rate


def train(params: Params, prepared_dir, model_dir, live_dir, resume_dir=None, timings_file=None) -> dict:
    """Train (or resume), write the best model and the dvclive logs; return the best epoch's figures.

    Wall-clock figures vary from run to run, so they stay out of the outputs: they are
    printed, and written to `timings_file` when one is given (see README, Reproducibility).
    """
    phases = plan_phases(params.model, params.train)
    x_train, y_train = load_subset(prepared_dir, "train")
    x_val, y_val = load_subset(prepared_dir, "val")
    classes = load_classes(prepared_dir)
    input_shape = tuple(x_train.shape[1:])

    seed_everything(params.seed, params.train.deterministic)
    plan = plan_devices(params.train)
    strategy = make_strategy(plan)
    devices = describe(plan, strategy, params.train.deterministic, params.train)
    print(f"train: {devices['replicas']} replica(s) on {', '.join(plan.gpus) or 'the CPU'} ({plan.dtype_policy})")
    print(precision_line(plan))

    key = resume_key(params, prepared_dir, plan, devices["replicas"])
    resume = ResumeDir(resume_dir, key, ResumeMirror.from_environment())
    images = {"train": (x_train, y_train), "val": (x_val, y_val)}
    try:
        run = fit_phases(params, phases, resume, images, len(classes), strategy, plan)
    except UnusableState as exc:
        resume.discard(str(exc))
        seed_everything(params.seed, params.train.deterministic)  # a fresh start draws what a first run draws
        run = fit_phases(params, phases, resume, images, len(classes), strategy, plan)

    best = best_summary(run.progress)
    write_model(run.net, params.model, input_shape, classes, run.progress, phases, model_dir)
    finish_live(run.live, best, devices, plan)
    report_timings(run.progress, timings_file)
    write_json(resume.live_dir / DEVICES_FILE, devices)
    stopped = run.progress.epochs_done < phases[-1].end
    with staged_dir(live_dir) as staged:  # the cache may be on another file system: copy, then rename
        shutil.copytree(resume.live_dir, staged, dirs_exist_ok=True)
        if stopped:
            write_stopped(staged, resume, run.progress.epochs_done, phases[-1].end)
    if not stopped:
        resume.remove()
    return best


def write_stopped(live_dir: Path, resume: ResumeDir, done: int, budget: int) -> None:
    """A run that stopped early (train.stop_at_epoch) keeps its state, and says which in data/train/STOPPED:
    a halving sweep reads there how far the point trained, and whose state to remove once it is out."""
    print(
        f"train: stopped after epoch {done} of {budget} (train.stop_at_epoch); "
        f"its state is kept in {resume.root} for a later run to go on"
    )
    write_json(live_dir / STOPPED, {"epochs_done": done, "epochs": budget, "state": resume.root.name})


def fit_phases(
    params: Params, phases: list[Phase], resume: ResumeDir, images: dict, num_classes: int, strategy, plan: DevicePlan
) -> Run:
    """Build the model and train every phase, from the state `resume` holds (UnusableState if it does not restore)."""
    progress = resume.open()
    with dtype_policy(plan.dtype_policy), strategy.scope():
        net = build_convnet(params.model, tuple(images["train"][0].shape[1:]), num_classes)
    net.model.summary(print_fn=lambda line, **_: print(line))
    data = TrainingData(params, resume, images, net, strategy)
    run = Run(params, net, num_classes, strategy, data, progress, replay_live(resume.live_dir, progress))
    stop = params.train.stop_at_epoch or phases[-1].end
    if progress.epochs_done > stop:
        print(f"train: the saved state is past train.stop_at_epoch ({progress.epochs_done} > {stop}): kept as it is")
    for phase in phases:
        run_phase(run, phase, stop)
    return run


def resume_key(params: Params, prepared_dir, plan: DevicePlan, replicas: int) -> RunKey:
    """What a saved training state must match to be resumed (convnets.resume.RunKey).

    train.stop_at_epoch is not part of it: a run that stopped early is continued by the
    same params with a later stop (or none), which is how a halving sweep's rungs go on.
    """
    shaping = {
        "seed": params.seed,
        "model": params.model.model_dump(),
        "train": params.train.model_dump(exclude={"stop_at_epoch"}),
    }
    prepared_dir = Path(prepared_dir)
    data = [prepared_dir / CLASSES] + [
        prepared_dir / name(s) for s in ("train", "val") for name in (images_file, labels_file)
    ]
    # The plan that ran, not params' `auto`: a mixed_float16 state (loss scaling) must not resume in float32.
    devices = {"dtype_policy": plan.dtype_policy, "gpus": list(plan.gpus), "replicas": replicas}
    return RunKey(
        params=digest_json(shaping),
        data=digest_files({path.name: path for path in data}),
        code=code_digest(),
        environment=digest_json(environment_identity()),
        precision=digest_json(devices),
    )


def source_dir() -> Path:
    """The folder whose convnets package is running (src/ of the checkout)."""
    return Path(__file__).resolve().parents[1]


def code_digest(src: Path | None = None) -> str:
    """The project files this stage runs (the code deps dvc.yaml lists for it), by path and bytes."""
    src = source_dir() if src is None else Path(src)
    return digest_files({path.relative_to(src).as_posix(): path for path in import_closure("convnets.train", src)})


def environment_identity() -> dict[str, str | None]:
    """Python (major.minor) and the versions of the packages training runs: a state saved under
    others does not resume. One function, so that its source can change (a per-stage package file)."""
    described = environment.describe()
    return {
        "python": ".".join(described["python"].split(".")[:2]),
        "tensorflow": described["tensorflow"],
        "keras": described["keras"],
        # Arrays, the weights files and bfloat16 go through these.
        **{package: environment.version_of(package) for package in ("numpy", "h5py", "ml_dtypes")},
    }


class TrainingData:
    """The batches each phase trains on: images, or the frozen base's outputs computed once."""

    def __init__(self, params: Params, resume: ResumeDir, images: dict, net: Convnet, strategy):
        self.params, self.resume, self.images, self.net, self.strategy = params, resume, images, net, strategy
        self._features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def arrays(self, phase: Phase) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if not phase.features:
            return self.images
        if self._features is None:
            self._features = {
                subset: (self.base_outputs(subset), labels) for subset, (_, labels) in self.images.items()
            }
        return self._features

    def base_outputs(self, subset: str) -> np.ndarray:
        """The frozen base's outputs for a subset, kept in the resume folder for a rerun."""
        path = self.resume.features_dir / f"{subset}.npy"
        if path.exists():
            return np.load(path, mmap_mode="r")
        images, _ = self.images[subset]
        with self.strategy.scope():
            inputs = keras.Input(shape=images.shape[1:])
            extractor = keras.Model(inputs, self.net.base(VGG16Preprocess()(inputs), training=False))
        print(f"train: computing the frozen base's outputs for {len(images)} {subset} images (once)")
        batch = self.params.train.batch_size
        features = extractor.predict(ordered_batches(images, batch_size=batch), verbose=keras_verbosity())
        with atomic_file(path) as tmp:
            np.save(tmp, features.astype(np.float32))
        return np.load(path, mmap_mode="r")


@dataclass
class Run:
    """Everything the phases of one training run share."""

    params: Params
    net: Convnet
    num_classes: int
    strategy: tf.distribute.Strategy
    data: TrainingData
    progress: Progress
    live: Live


def run_phase(run: Run, phase: Phase, stop: int) -> None:
    """Train one phase, or what an interrupted run left of it, up to epoch `stop` at most.

    The optimizer's schedule still spans the whole phase: a run that stops early and one
    that goes on from its state train exactly what an uninterrupted run would.
    """
    done = run.progress.epochs_done
    if done > phase.end or phase.start >= stop:
        return  # a later phase's state holds everything this one did; or the run stops before it
    trained = run.net.classifier if phase.features else run.net.model
    train_params = run.params.train
    classes = one_hot_classes(run.num_classes, train_params.label_smoothing, train_params.mixup)
    with run.strategy.scope():
        if run.net.base is not None:
            set_trainable_layers(run.net.base, phase.trainable_layers)
        trained.compile(
            optimizer=phase_optimizer(train_params, phase, len(run.data.images["train"][1])),
            loss=loss_for(run.num_classes, train_params.label_smoothing, one_hot=bool(classes)),
            metrics=["accuracy"],  # Keras picks the binary, sparse or one-hot accuracy from the labels' shape
        )
        if done > phase.start:  # the checkpoint was written in this phase
            restore_training_state(trained, run.progress)
    first, end = max(phase.start, done), min(phase.end, stop)
    if first >= end:
        return
    if first > phase.start:
        print(f"train: resuming {phase.name} at epoch {first + 1} of {phase.end}")
    arrays = run.data.arrays(phase)
    batch = train_params.batch_size
    train_ds, steps = training_batches(
        *arrays["train"], batch, run.params.seed, first, end, classes=classes, mixup=train_params.mixup
    )
    trained.fit(
        train_ds,
        steps_per_epoch=steps,
        validation_data=ordered_batches(*arrays["val"], batch_size=batch, cache=True, classes=classes),
        initial_epoch=first,
        epochs=end,
        shuffle=False,  # the dataset shuffles itself, per epoch
        callbacks=phase_callbacks(
            run, phase, trained, arrays["train"][0], resumed=first > phase.start, stops_early=end < phase.end
        ),
        verbose=keras_verbosity(),
    )


def phase_optimizer(train_params: TrainParams, phase: Phase, train_images: int) -> keras.optimizers.Optimizer:
    steps_per_epoch = math.ceil(train_images / train_params.batch_size)
    return make_optimizer(
        train_params.optimizer,
        phase.learning_rate,
        train_params.lr_schedule,
        steps_per_epoch * (phase.end - phase.start),
        warmup_steps=steps_per_epoch * phase.warmup_epochs,
        weight_decay=train_params.weight_decay,
        ema=train_params.ema,
    )


def phase_callbacks(
    run: Run, phase: Phase, trained: keras.Model, train_images: np.ndarray, resumed: bool, stops_early: bool = False
) -> list[keras.callbacks.Callback]:
    callbacks = [EpochBackup(run.data.resume, run.progress, phase.name), LiveEpochs(run.live)]
    if run.params.train.ema:
        statistics = None
        if batch_normalizations(trained):  # the averaged weights need BatchNorm statistics of their own
            statistics = statistics_batches(train_images, run.params.train.batch_size, run.params.seed)
        # First in the list: the backup must find the averaged weights in the model (resume.py).
        callbacks.insert(0, AveragedWeights(statistics, in_model=resumed, stops_early=stops_early))
    return callbacks


def keras_verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, one line per epoch in logs


class LiveEpochs(keras.callbacks.Callback):
    """dvclive's Keras callback without its live.end() at the end of each fit (we fit once per phase)."""

    def __init__(self, live: Live):
        super().__init__()
        self.live = live

    def on_epoch_end(self, epoch, logs=None):
        log_epoch(self.live, logs or {})


def log_epoch(live: Live, logs: dict) -> None:
    for name, value in logs.items():
        live.log_metric(standardize_metric_name(name, "dvclive.keras"), float(value))
    live.next_step()


def replay_live(live_dir: Path, progress: Progress) -> Live:
    """A dvclive logger whose step goes on after the finished epochs.

    The logs of an interrupted run are rewritten from the committed history
    rather than resumed as they are (Live(resume=True)): a kill can land after
    dvclive wrote an epoch the backup did not commit, which would then appear twice.
    """
    # dvcyaml=None: dvc.yaml is ours, dvclive must not rewrite it every epoch.
    live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    for record in progress.history:
        log_epoch(live, record["logs"])
    return live


def best_summary(progress: Progress) -> dict:
    """The epoch whose weights are kept (lowest val_loss), 0-based like dvclive's step."""
    record = progress.best_record()
    return {"epoch": record["epoch"], **record["logs"]}


def write_model(
    net: Convnet,
    model_params: ModelParams,
    input_shape,
    classes: list[str],
    progress: Progress,
    phases: list[Phase],
    model_dir,
) -> None:
    """Save the best epoch's weights in a float32 model outside any distribution strategy.

    A model trained in mixed precision or on several GPUs then loads and
    predicts anywhere, CPU included.
    """
    best_phase = next(p for p in phases if p.name == progress.best_record()["phase"])
    with dtype_policy("float32"):
        # weights="none": every weight comes from the trained model below, nothing is read twice.
        final = build_convnet(model_params.model_copy(update={"weights": "none"}), input_shape, len(classes))
    # The trained model's weights first: a best epoch of the cached-features phase holds
    # the classifier's weights only, the (frozen) base's come from here.
    final.model.set_weights(net.model.get_weights())
    target = final.classifier if best_phase.features else final.model
    target.load_weights(progress.folder / BEST)
    with staged_dir(model_dir) as tmp:
        save_model(final.model, tmp / MODEL_FILE)
        (tmp / CLASSES).write_text(json.dumps(classes) + "\n")


def finish_live(live: Live, best: dict, devices: dict, plan: DevicePlan) -> None:
    live.summary["best"] = best
    # Strings cannot be DVC metrics: the device names go to devices.json, counts here.
    live.summary["devices"] = {
        "gpu_count": devices["gpu_count"],
        "replicas": devices["replicas"],
        "mixed_precision": int(plan.mixed_precision),
        "bfloat16": int(plan.dtype_policy == CPU_MIXED),  # mixed_bfloat16 on the CPU (else float16 or float32)
    }
    live.end()


def report_timings(progress: Progress, timings_file=None) -> dict:
    seconds = [record["seconds"] for record in progress.history]
    timings = {
        "seconds_per_epoch": round(float(np.mean(seconds)), 3),
        "seconds": round(float(np.sum(seconds)), 1),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(f"train: {timings['seconds_per_epoch']} s per epoch, {timings['seconds']} s in all")
    if timings_file is not None:
        write_json(timings_file, timings)
    return timings


def _run(params: Params, args: argparse.Namespace) -> None:
    # `dvc exp run` (which sets DVC_EXP_BASELINE_REV) commits the timings file with the experiment.
    timings_file = TIMINGS if os.environ.get("DVC_EXP_BASELINE_REV") else None
    best = train(params, args.prepared_dir, args.model_dir, args.live_dir, timings_file=timings_file)
    # Counted from 1 here, as Keras's progress bar counts; best.epoch in the metrics is dvclive's 0-based step.
    print(
        f"train: best epoch {best['epoch'] + 1} (step {best['epoch']}) val_loss={best['val_loss']:.4f} "
        f"-> {args.model_dir}/{MODEL_FILE}"
    )


def main(argv=None) -> int:
    return stage_main(
        __doc__.splitlines()[0],
        [
            ("prepared_dir", "preprocessed arrays (data/prepared)"),
            ("model_dir", "output folder for model.keras (data/model)"),
            ("live_dir", "output folder for training metrics (data/train); the resume state waits in the user cache"),
        ],
        _run,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())

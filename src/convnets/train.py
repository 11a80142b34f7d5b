"""Stage `train`: fit the convnet on the train split, keep the best model by validation loss.

Outputs: data/model/model.keras (the best epoch, as the book's ModelCheckpoint
keeps it) and data/train/ (dvclive: per-epoch metrics and the final summary).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from convnets.cli import stage_main
from convnets.datasets import load_classes, load_subset
from convnets.models import build_model, loss_for
from convnets.outputs import staged_dir
from convnets.params import Params, TrainParams

MODEL_FILE = "model.keras"


def seed_everything(seed: int) -> None:
    """Same params + same data + same machine -> same weights and metrics."""
    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow generators
    tf.config.experimental.enable_op_determinism()


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, shuffle: bool) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(images), labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_optimizer(params: TrainParams) -> keras.optimizers.Optimizer:
    classes = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    return classes[params.optimizer](learning_rate=params.learning_rate)


def train(params: Params, prepared_dir: str | Path, model_dir: str | Path, live_dir: str | Path) -> dict:
    """Train, write the best model and the dvclive logs; return the best epoch's figures."""
    seed_everything(params.seed)
    x_train, y_train = load_subset(prepared_dir, "train")
    x_val, y_val = load_subset(prepared_dir, "val")
    num_classes = len(load_classes(prepared_dir))
    model = build_model(params.model, x_train.shape[1:], num_classes)
    model.compile(optimizer=make_optimizer(params.train), loss=loss_for(num_classes), metrics=["accuracy"])
    model.summary(print_fn=lambda line, **_: print(line))

    batch = params.train.batch_size
    with staged_dir(model_dir) as tmp_model, staged_dir(live_dir) as tmp_live:
        # dvcyaml=None: dvc.yaml is ours, dvclive must not rewrite it every epoch.
        live = Live(dir=str(tmp_live), dvcyaml=None, save_dvc_exp=False, report=None)
        checkpoint = keras.callbacks.ModelCheckpoint(
            tmp_model / MODEL_FILE, monitor="val_loss", save_best_only=True
        )
        history = model.fit(
            make_dataset(x_train, y_train, batch, params.seed, shuffle=True),
            validation_data=make_dataset(x_val, y_val, batch, params.seed, shuffle=False),
            epochs=params.train.epochs,
            shuffle=False,  # the dataset reshuffles itself each epoch
            callbacks=[checkpoint, DVCLiveCallback(live=live)],
            verbose=1 if sys.stdout.isatty() else 2,
        )
        best = best_epoch(history.history)
        live.summary["best"] = best
        live.make_summary()
    return best


def best_epoch(history: dict[str, list[float]]) -> dict:
    """The epoch ModelCheckpoint kept (lowest val_loss), 0-based like dvclive's step."""
    epoch = int(np.argmin(history["val_loss"]))
    return {"epoch": epoch, **{name: float(values[epoch]) for name, values in history.items()}}


def _run(params: Params, args: argparse.Namespace) -> None:
    best = train(params, args.prepared_dir, args.model_dir, args.live_dir)
    print(f"train: best epoch {best['epoch']} val_loss={best['val_loss']:.4f} -> {args.model_dir}/{MODEL_FILE}")


def main(argv=None) -> int:
    return stage_main(
        __doc__.splitlines()[0],
        [
            ("prepared_dir", "preprocessed arrays (data/prepared)"),
            ("model_dir", "output folder for model.keras (data/model)"),
            ("live_dir", "output folder for training metrics (data/train)"),
        ],
        _run,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())

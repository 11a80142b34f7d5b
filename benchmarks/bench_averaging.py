"""What train.ema costs a `record` epoch: the same model with the average off and on, side by side (run by hand).

    python benchmarks/bench_averaging.py [--scale 0.25] [--epochs 4] [--rounds 1]

The `record` preset (mini_xception with the training ingredients) at 128 px on a slice
of the shared Dogs vs. Cats replica that keeps a record epoch's proportions: `--scale`
of its 2,000 training photos, 1,000 validation photos and 512 photos of the BatchNorm
statistics pass. Each round fits two fresh, identically seeded models for `--epochs`
epochs, one with train.ema off and one with it on (the second round in the other
order, so that a drift of the machine's load hits both), with the callbacks that
train.py gives them. The first epoch of each fit traces the graphs and fills the
caches: it is shown, but left out of the ratio. Prints, per arm, the median of the
later epochs and of their parts (training steps, the swaps, the statistics pass,
validation), the ratio on/off, and the CPU model. The EMA update itself runs inside
the training step: it shows as the difference of the two arms' training steps.

Each part is given in wall and in CPU seconds of this process: on a shared 2-core VM the
wall clock of an epoch moves by 30% with the other load, the CPU seconds by a few percent,
so the CPU ratio is the figure to compare. The swaps' total leaves out the finalize after a
fit's last epoch (traced there, once a fit). Measured (issue 27, AMD EPYC without bfloat16
units, float32, --scale 0.1, two runs): 1.08x and 1.14x in CPU time before the averaging
pass was traced whole, 1.08x and 1.09x after; what train.ema adds is the statistics pass, about 7% of an epoch, and the
swaps, which went from 0.19 s to 0.02 s an epoch.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ARCHIVE = ROOT.parent / "shared" / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"
SIZE = 128
RECORD_EPOCH = {"train": 2000, "val": 1000, "statistics": 512}  # photos of one epoch of the book's split

import keras  # noqa: E402  (after TF_CPP_MIN_LOG_LEVEL)

from convnets.averaging import AveragedWeights, statistics_batches  # noqa: E402


def replica_photos(count: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` photos (half cats, half dogs) of the replica from index `start` on, as uint8 arrays."""
    from PIL import Image

    per_class = count // 2
    images, labels = [], []
    with zipfile.ZipFile(ARCHIVE) as outer, zipfile.ZipFile(io.BytesIO(outer.read("train.zip"))) as inner:
        for label, name in enumerate(("cat", "dog")):
            for index in range(start, start + per_class):
                photo = Image.open(io.BytesIO(inner.read(f"train/{name}.{index}.jpg"))).convert("RGB")
                images.append(np.asarray(photo.resize((SIZE, SIZE))))
                labels.append(label)
    order = np.random.default_rng(0).permutation(len(labels))  # classes mixed, as the prepared split is
    return np.stack(images)[order], np.array(labels, dtype=np.int64)[order]


def record_params():
    """The params `dvc exp run -S +experiment=record -S preprocess.image_size=[128,128]` composes."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from convnets.params import Params

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        config = compose("config", overrides=["+experiment=record", f"preprocess.image_size=[{SIZE},{SIZE}]"])
    return Params.model_validate(OmegaConf.to_container(config, resolve=True))


def clocks() -> np.ndarray:
    """(wall, CPU) seconds now: the CPU seconds of this process's threads are what the machine's
    other load changes least."""
    return np.array([time.perf_counter(), time.process_time()])


class Marks(keras.callbacks.Callback):
    """perf_counter at the epoch's and validation's hooks: one Marks before AveragedWeights, one after it."""

    def __init__(self):
        super().__init__()
        self.at: dict[str, np.ndarray] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.at["on_epoch_begin"] = clocks()

    def on_test_begin(self, logs=None):
        self.at["on_test_begin"] = clocks()

    def on_test_end(self, logs=None):
        self.at["on_test_end"] = clocks()

    def on_epoch_end(self, epoch, logs=None):
        self.at["on_epoch_end"] = clocks()


class TimedAveragedWeights(AveragedWeights):
    """AveragedWeights that adds up the (wall, CPU) seconds of its swaps and of its statistics passes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = defaultdict(lambda: np.zeros(2))

    def _swap_variables(self):
        start = clocks()
        super()._swap_variables()
        self.seconds["swap"] += clocks() - start

    def on_test_begin(self, logs=None):
        start, swapped = clocks(), self.seconds["swap"].copy()
        super().on_test_begin(logs)
        self.seconds["statistics"] += clocks() - start - (self.seconds["swap"] - swapped)

    def take(self) -> dict[str, np.ndarray]:
        taken, self.seconds = dict(self.seconds), defaultdict(lambda: np.zeros(2))
        return taken


class EpochParts(keras.callbacks.Callback):
    """Collects each epoch's parts, (wall, CPU) seconds, from the two Marks and the averaging callback."""

    def __init__(self, before: Marks, after: Marks, averaging: TimedAveragedWeights | None):
        super().__init__()
        self.before, self.after, self.averaging = before, after, averaging
        self.epochs: list[dict[str, np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None):
        before, after = self.before.at, self.after.at
        parts = {
            "epoch": after["on_epoch_end"] - before["on_epoch_begin"],
            "train steps": before["on_test_begin"] - after["on_epoch_begin"],
            "validation": before["on_test_end"] - after["on_test_begin"],
        }
        parts |= self.averaging.take() if self.averaging else {}
        self.epochs.append(parts)


def fit_arm(params, data: dict, ema: float, epochs: int) -> list[dict[str, float]]:
    """Seconds of each epoch's parts for a fresh record model with train.ema = `ema`."""
    from convnets.datasets import ordered_batches, training_batches
    from convnets.models import build_model, loss_for
    from convnets.train import make_optimizer, seed_everything

    train_params = params.train
    seed_everything(params.seed, train_params.deterministic)
    model = build_model(params.model, (SIZE, SIZE, 3), 2)
    (x_train, y_train), validation, sample = data["train"], data["val"], data["statistics"]
    steps = -(-len(y_train) // train_params.batch_size)
    optimizer = make_optimizer(
        train_params.optimizer,
        train_params.learning_rate,
        train_params.lr_schedule,
        steps * train_params.epochs,
        warmup_steps=steps * train_params.warmup_epochs,
        weight_decay=train_params.weight_decay,
        ema=ema,
    )
    model.compile(optimizer, loss_for(2, train_params.label_smoothing), metrics=["accuracy"])
    batches, steps = training_batches(
        x_train, y_train, train_params.batch_size, params.seed, 0, epochs, mixup=train_params.mixup
    )
    averaging = None
    if ema:
        averaging = TimedAveragedWeights(statistics_batches(sample, train_params.batch_size, params.seed))
    before, after = Marks(), Marks()
    parts = EpochParts(before, after, averaging)
    model.fit(
        batches,
        steps_per_epoch=steps,
        validation_data=ordered_batches(*validation, batch_size=train_params.batch_size, cache=True),
        epochs=epochs,
        shuffle=False,
        callbacks=[before, *([averaging] if averaging else []), after, parts],
        verbose=0,
    )
    return parts.epochs


def median_parts(epochs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    names = dict.fromkeys(name for epoch in epochs for name in epoch)
    return {name: np.median([epoch.get(name, np.zeros(2)) for epoch in epochs], axis=0) for name in names}


def show(name: str, epochs: list[dict[str, np.ndarray]]) -> None:
    seconds = ", ".join(f"{epoch['epoch'][0]:.1f}" for epoch in epochs)
    print(f"  ema {name:3s}: epochs {seconds} s wall (the first traces); medians of the later ones, wall / CPU s:")
    print("      " + ", ".join(f"{k} {wall:.2f} / {cpu:.2f}" for k, (wall, cpu) in median_parts(epochs[1:]).items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="fraction of a record epoch's photos")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit, the first left out (default: 4)")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of fits, alternating the order")
    args = parser.parse_args()
    if not ARCHIVE.exists():
        sys.exit(f"{ARCHIVE} not found: the shared replica must sit next to the repository")
    counts = {subset: 2 * round(photos * args.scale / 2) for subset, photos in RECORD_EPOCH.items()}
    train = replica_photos(counts["train"], 0)
    data = {"train": train, "val": replica_photos(counts["val"], 1000), "statistics": train[0][: counts["statistics"]]}
    params = record_params()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(
        f"record at {SIZE} px, {', '.join(f'{n} {k}' for k, n in counts.items())} photos; batch "
        f"{params.train.batch_size}, {args.epochs} epochs per fit, train.ema {params.train.ema}"
    )
    runs = defaultdict(list)
    for round_ in range(args.rounds):
        arms = {"off": 0.0, "on": params.train.ema}
        for name in list(arms)[:: 1 if round_ % 2 == 0 else -1]:
            epochs = fit_arm(params, data, arms[name], args.epochs)
            show(name, epochs)
            runs[name].extend(epochs[1:])
    off, on = (median_parts(runs[name])["epoch"] for name in ("off", "on"))
    for clock, index in (("wall", 0), ("CPU", 1)):
        print(
            f"ema on / off, {clock} time: {on[index] / off[index]:.2f}x "
            f"({on[index]:.1f} s / {off[index]:.1f} s per epoch, medians; target <= 1.15)"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

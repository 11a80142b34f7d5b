"""Where training runs: the same code and params on a CPU, one GPU or several.

- no GPU: TensorFlow's default strategy on the CPU, float32;
- one GPU: the default strategy on it, mixed_float16 if train.mixed_precision;
- several GPUs: tf.distribute.MirroredStrategy over all of them (the batch of
  params is the global batch, split between them), mixed precision likewise.

`describe()` gives what was used, for data/train/devices.json and the metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import keras
import tensorflow as tf

from convnets.params import TrainParams

MIXED = "mixed_float16"


@dataclass(frozen=True)
class DevicePlan:
    gpus: tuple[str, ...]
    mixed_precision: bool

    @property
    def strategy_name(self) -> str:
        return "MirroredStrategy" if len(self.gpus) > 1 else "default"

    @property
    def dtype_policy(self) -> str:
        return MIXED if self.mixed_precision else "float32"


def visible_gpus() -> list[str]:
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Take GPU memory as needed instead of all of it at start: the card may be shared.
        with contextlib.suppress(RuntimeError):  # already initialised: too late, harmless
            tf.config.experimental.set_memory_growth(gpu, True)
    return [gpu.name for gpu in gpus]


def plan_devices(params: TrainParams, gpus: list[str] | None = None) -> DevicePlan:
    """Decide devices and precision; `gpus` defaults to what TensorFlow sees."""
    gpus = visible_gpus() if gpus is None else gpus
    # Mixed precision only pays on GPUs (tensor cores); on a CPU it is slower.
    return DevicePlan(gpus=tuple(gpus), mixed_precision=params.mixed_precision and bool(gpus))


def make_strategy(plan: DevicePlan) -> tf.distribute.Strategy:
    if len(plan.gpus) > 1:
        return tf.distribute.MirroredStrategy([name.replace("/physical_device:", "/") for name in plan.gpus])
    return tf.distribute.get_strategy()


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build models under a Keras dtype policy, restoring the previous one afterwards.

    Keras keeps the policy in a global; restoring it keeps one run's choice from
    leaking into the next model built in the same process (tests, evaluate).
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def describe(plan: DevicePlan, strategy: tf.distribute.Strategy, deterministic: bool) -> dict:
    return {
        "gpus": list(plan.gpus),
        "gpu_count": len(plan.gpus),
        "replicas": strategy.num_replicas_in_sync,
        "strategy": plan.strategy_name,
        "dtype_policy": plan.dtype_policy,
        "deterministic": deterministic,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }

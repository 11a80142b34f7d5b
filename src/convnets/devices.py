"""Where training runs: the same code and params on a CPU, one GPU or several.

- no GPU: TensorFlow's default strategy on the CPU, float32, or mixed_bfloat16
  if train.cpu_bfloat16 is true or auto and the CPU has bfloat16 units
  (AMX / AVX512-BF16); true on another CPU falls back to float32 and says so;
- one GPU: the default strategy on it, mixed_float16 if train.mixed_precision;
- several GPUs: tf.distribute.MirroredStrategy over all of them (the batch of
  params is the global batch, split between them), mixed precision likewise.

`describe()` gives what was used, and why, for data/train/devices.json and the metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from convnets import environment
from convnets.params import TrainParams

GPU_MIXED = "mixed_float16"
CPU_MIXED = "mixed_bfloat16"
# /proc/cpuinfo flags of CPUs that compute in bfloat16 natively (oneDNN uses them).
BF16_FLAGS = {"amx_bf16", "avx512_bf16"}
CPUINFO = "/proc/cpuinfo"
BF16_UNITS = "bfloat16 units (AMX / AVX512-BF16)"


@dataclass(frozen=True)
class DevicePlan:
    gpus: tuple[str, ...]
    dtype_policy: str  # float32, mixed_float16 (GPUs) or mixed_bfloat16 (CPUs with bfloat16 units)
    reason: str = ""  # why this precision, for the train stage's output and devices.json

    @property
    def strategy_name(self) -> str:
        return "MirroredStrategy" if len(self.gpus) > 1 else "default"

    @property
    def mixed_precision(self) -> bool:
        return self.dtype_policy != "float32"


def visible_gpus() -> list[str]:
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Take GPU memory as needed instead of all of it at start: the card may be shared.
        with contextlib.suppress(RuntimeError):  # already initialised: too late, harmless
            tf.config.experimental.set_memory_growth(gpu, True)
    return [gpu.name for gpu in gpus]


def cpu_has_bfloat16(cpuinfo: str | Path | None = None) -> bool:
    """Whether the CPU computes in bfloat16 natively (elsewhere bfloat16 is emulated: slower)."""
    try:
        text = Path(CPUINFO if cpuinfo is None else cpuinfo).read_text()
    except OSError:  # not Linux: assume not
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool(BF16_FLAGS & set(flags))


def plan_devices(params: TrainParams, gpus: list[str] | None = None, cpu_bfloat16: bool | None = None) -> DevicePlan:
    """Decide devices and precision; `gpus` and `cpu_bfloat16` default to what this machine has."""
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        # float16 pays on GPUs (tensor cores); bfloat16 is the CPU's fast format.
        if params.mixed_precision:
            return DevicePlan(tuple(gpus), GPU_MIXED, "train.mixed_precision is true and a GPU is used")
        return DevicePlan(tuple(gpus), "float32", "train.mixed_precision is false")
    setting = params.cpu_bfloat16
    if setting is False:
        return DevicePlan((), "float32", "train.cpu_bfloat16 is false")
    key = f"train.cpu_bfloat16 is {'auto' if setting == 'auto' else 'true'}"
    native = cpu_has_bfloat16() if cpu_bfloat16 is None else cpu_bfloat16
    if native:
        return DevicePlan((), CPU_MIXED, f"{key} and this CPU has {BF16_UNITS}")
    if setting == "auto":
        return DevicePlan((), "float32", f"{key} and this CPU has no {BF16_UNITS}")
    return DevicePlan(
        (), "float32", f"{key} but this CPU has no {BF16_UNITS}: falling back to float32 (emulated bfloat16 is slower)"
    )


def precision_line(plan: DevicePlan) -> str:
    """The train stage's one line on the precision it chose, and why."""
    return f"train: precision {plan.dtype_policy}: {plan.reason}"


def make_strategy(plan: DevicePlan) -> tf.distribute.Strategy:
    if len(plan.gpus) > 1:
        return tf.distribute.MirroredStrategy()  # all visible GPUs, gradients summed with NCCL
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


def describe(plan: DevicePlan, strategy: tf.distribute.Strategy, deterministic: bool, params: TrainParams) -> dict:
    return {
        "gpus": list(plan.gpus),
        "gpu_count": len(plan.gpus),
        "replicas": strategy.num_replicas_in_sync,
        "strategy": plan.strategy_name,
        "dtype_policy": plan.dtype_policy,
        "cpu_bfloat16": params.cpu_bfloat16,  # the setting: true, false or "auto"
        "precision_reason": plan.reason,
        "deterministic": deterministic,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        # The locked environment that trained: uv.lock's hash (short), Python, TensorFlow, Keras.
        "environment": environment.describe(),
    }

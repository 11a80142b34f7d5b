"""The tf.data input pipeline, the device plan, and mixed precision, on tiny synthetic prepared arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convnets.datasets import CHUNK_ROWS, ordered_batches, training_batches
from convnets.prepared import load_subset

# The preprocess params that describe make_prepared's arrays (VGG16 checks them).
PREPARED_PREPROCESS = {"channels": 3, "image_size": [32, 32]}


def make_prepared(root: Path, sizes=(64, 32, 32), size: int = 32, seed: int = 0) -> Path:
    """A data/prepared layout of RGB 'photos': dogs carry a bright square, cats do not.

    Easy enough that two epochs learn it, so the tests can tell a working model
    from a broken one. Shared by the test_train_* / test_experiments_* / test_predict files.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for subset, count in zip(("train", "val", "test"), sizes):
        labels = np.arange(count) % 2
        images = rng.integers(0, 100, (count, size, size, 3), dtype=np.uint8)
        lo, hi = size // 4, 3 * size // 4
        images[labels == 1, lo:hi, lo:hi, :] += 120
        np.save(root / f"{subset}_images.npy", images)
        np.save(root / f"{subset}_labels.npy", labels.astype(np.int64))
    (root / "classes.json").write_text(json.dumps(["cat", "dog"]) + "\n")
    (root / "report.json").write_text(json.dumps({"kept": dict(zip(("train", "val", "test"), sizes))}) + "\n")
    return root


@pytest.fixture
def rows():
    """50 images whose 'label' is their row number, to follow each one through the pipeline."""
    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1).repeat(2, axis=1)
    return images, np.arange(50, dtype=np.int64)


def test_every_image_once_per_epoch_in_a_new_order(rows):
    images, ids = rows
    dataset, steps = training_batches(images, ids, batch_size=16, seed=3, first_epoch=0, epochs=3)
    assert steps == 4
    batches = [labels.numpy() for _, labels in dataset]
    assert [len(b) for b in batches] == [16, 16, 16, 2] * 3  # batches never straddle two epochs
    epochs = [np.concatenate(batches[i * 4 : (i + 1) * 4]) for i in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(50))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Images stay with their labels through cache and shuffle.
    for pixels, labels in dataset.take(2):
        assert np.array_equal(pixels.numpy()[:, 0, 0, 0], labels.numpy())


@pytest.mark.parametrize("seed", [0, 2**31 - 1])
def test_a_global_seed_that_truncates_to_zero_trains(rows, seed):
    """`seed: 0` seeds TensorFlow's global generator with 0; the epochs' shuffle crashed then
    (OperatorNotAllowedInGraphError), and any test that ran after one seeding 0 failed with it."""
    import keras

    images, ids = rows
    keras.utils.set_random_seed(seed)
    dataset, steps = training_batches(images, ids, batch_size=16, seed=seed, first_epoch=1, epochs=3)
    batches = [labels.numpy() for _, labels in dataset]
    assert len(batches) == 2 * steps
    assert sorted(np.concatenate(batches[:steps])) == list(range(50))


def test_an_epoch_has_the_same_order_when_a_run_resumes_there(rows):
    images, ids = rows
    full, steps = training_batches(images, ids, batch_size=16, seed=3, first_epoch=0, epochs=4)
    resumed, _ = training_batches(images, ids, batch_size=16, seed=3, first_epoch=2, epochs=4)
    full_ids = np.concatenate([labels.numpy() for _, labels in full])
    resumed_ids = np.concatenate([labels.numpy() for _, labels in resumed])
    assert np.array_equal(full_ids[2 * 50 :], resumed_ids)
    other_seed, _ = training_batches(images, ids, batch_size=16, seed=4, first_epoch=0, epochs=1)
    assert not np.array_equal(np.concatenate([batch.numpy() for _, batch in other_seed]), full_ids[:50])


def test_ordered_batches_keep_file_order_and_stream_a_memmap(tmp_path):
    n = CHUNK_ROWS * 2 + 7  # several generator chunks, the last one partial
    path = tmp_path / "images.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, 3, 1))
    images[:, 0, 0, 0] = np.arange(n) % 251
    images.flush()
    mapped = np.load(path, mmap_mode="r")
    dataset = ordered_batches(mapped, np.arange(n), batch_size=100, cache=True)
    assert int(dataset.cardinality()) == 6  # known length: Keras never runs into the end of the data
    for _ in range(2):  # the second pass reads the cache
        labels = np.concatenate([batch.numpy() for _, batch in dataset])
        pixels = np.concatenate([p.numpy()[:, 0, 0, 0] for p, _ in dataset])
        assert np.array_equal(labels, np.arange(n)) and np.array_equal(pixels, np.arange(n) % 251)
    only_images = ordered_batches(mapped, batch_size=64)
    assert sum(len(b) for b in only_images) == n


def test_load_subset_names_the_missing_stage(tmp_path):
    from convnets.errors import DataError

    with pytest.raises(DataError, match="run the preprocess stage first"):
        load_subset(tmp_path, "train")


# --- devices ---------------------------------------------------------------------------


def test_device_plan(tmp_path):
    from convnets.devices import cpu_has_bfloat16, plan_devices
    from convnets.params import TrainParams

    default = TrainParams()
    assert plan_devices(default, gpus=[]).dtype_policy == "float32"
    one = plan_devices(default, gpus=["/physical_device:GPU:0"])
    assert one.dtype_policy == "mixed_float16" and one.strategy_name == "default"
    two = plan_devices(default, gpus=["/physical_device:GPU:0", "/physical_device:GPU:1"])
    assert two.strategy_name == "MirroredStrategy"
    assert plan_devices(TrainParams(mixed_precision=False), gpus=["g"]).dtype_policy == "float32"
    bf16 = TrainParams(cpu_bfloat16=True)
    assert plan_devices(bf16, gpus=[], cpu_bfloat16=True).dtype_policy == "mixed_bfloat16"
    assert plan_devices(bf16, gpus=[], cpu_bfloat16=False).dtype_policy == "float32"  # emulated would be slower
    assert plan_devices(bf16, gpus=["g"]).dtype_policy == "mixed_float16"  # on a GPU, float16
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    assert cpu_has_bfloat16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not cpu_has_bfloat16(info)
    assert not cpu_has_bfloat16(tmp_path / "missing")


@pytest.mark.parametrize(
    ("flags", "setting", "policy", "reason"),
    [
        ("avx2 avx512f avx512_bf16", "auto", "mixed_bfloat16", "is auto and this CPU has bfloat16 units"),
        ("avx2 amx_tile amx_bf16", "auto", "mixed_bfloat16", "is auto and this CPU has bfloat16 units"),
        ("avx2 avx512f", "auto", "float32", "is auto and this CPU has no bfloat16 units"),
        ("avx2 amx_bf16", True, "mixed_bfloat16", "is true and this CPU has bfloat16 units"),
        ("avx2", True, "float32", "is true but this CPU has no bfloat16 units (AMX / AVX512-BF16): falling back"),
        ("avx2 amx_bf16", False, "float32", "train.cpu_bfloat16 is false"),
    ],
)
def test_cpu_bfloat16_follows_the_cpu(tmp_path, monkeypatch, flags, setting, policy, reason):
    """auto / true / false against a faked /proc/cpuinfo: the plan, and the line the train stage prints."""
    import convnets.devices
    from convnets.devices import plan_devices, precision_line
    from convnets.params import TrainParams

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: fpu sse {flags}\n")
    monkeypatch.setattr(convnets.devices, "CPUINFO", str(info))
    plan = plan_devices(TrainParams(cpu_bfloat16=setting), gpus=[])
    assert plan.dtype_policy == policy and reason in plan.reason
    line = precision_line(plan)
    assert line.startswith(f"train: precision {policy}: ") and reason in line and "\n" not in line
    # With a GPU the CPU's units do not matter: float16 as train.mixed_precision says.
    assert plan_devices(TrainParams(cpu_bfloat16=setting), gpus=["g"]).dtype_policy == "mixed_float16"


@pytest.mark.parametrize(
    ("flags", "policy"),
    [("avx2 avx512f avx512_bf16", "mixed_bfloat16"), ("avx2 amx_tile amx_bf16", "mixed_bfloat16"), ("avx2", "float32")],
)
def test_the_presets_train_in_bfloat16_by_default_where_the_cpu_has_it(tmp_path, monkeypatch, flags, policy):
    """conf/ sets cpu_bfloat16: auto (issue 19): MNIST's params.yaml and every preset follow the CPU."""
    import convnets.devices
    from conftest import REPO_ROOT
    from convnets.devices import plan_devices
    from convnets.params import load_params
    from convnets.summaries import composed_params, presets

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: fpu sse {flags}\n")
    monkeypatch.setattr(convnets.devices, "CPUINFO", str(info))
    default = load_params(REPO_ROOT / "params.yaml")
    assert default.train.cpu_bfloat16 == "auto"
    assert plan_devices(default.train, gpus=[]).dtype_policy == policy
    # mini_xception (and record, built on it) ask for bfloat16 outright: the same where the CPU has it
    settings = {name: composed_params(name).train.cpu_bfloat16 for name in presets()}
    assert settings == {name: True if name in ("mini_xception", "record") else "auto" for name in presets()}
    for name in ("scratch", "augmented", "mini_xception"):
        assert plan_devices(composed_params(name).train, gpus=[]).dtype_policy == policy


def test_dtype_policy_is_restored():
    import keras

    from convnets.devices import dtype_policy

    before = keras.config.dtype_policy().name
    with pytest.raises(RuntimeError), dtype_policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        raise RuntimeError
    assert keras.config.dtype_policy().name == before


def test_mixed_precision_training_logs_devices_and_saves_a_float32_model(tmp_path, monkeypatch, capsys):
    """CPU bfloat16 stands in for a GPU's float16: same code path (policy, float32 save)."""
    import keras

    import convnets.devices
    from convnets.params import Params
    from convnets.train import train

    monkeypatch.setattr(convnets.devices, "cpu_has_bfloat16", lambda: True)
    prepared = make_prepared(tmp_path / "prepared")
    params = Params.model_validate(
        {
            "model": {"conv_filters": [8, 16], "pooled_blocks": 2},
            "train": {"epochs": 2, "batch_size": 16, "cpu_bfloat16": "auto"},
        }
    )
    train(params, prepared, tmp_path / "model", tmp_path / "train")
    assert "train: precision mixed_bfloat16: train.cpu_bfloat16 is auto and this CPU has bfloat16 units" in (
        capsys.readouterr().out
    )
    devices = json.loads((tmp_path / "train" / "devices.json").read_text())
    assert devices["dtype_policy"] == "mixed_bfloat16" and devices["gpu_count"] == 0 and devices["replicas"] == 1
    assert devices["cpu_bfloat16"] == "auto" and "has bfloat16 units" in devices["precision_reason"]
    summary = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert summary["devices"] == {"gpu_count": 0, "replicas": 1, "mixed_precision": 1, "bfloat16": 1}
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert model.predict(np.load(prepared / "test_images.npy")[:4], verbose=0).dtype == np.float32
    assert json.loads((tmp_path / "model" / "classes.json").read_text()) == ["cat", "dog"]

"""Training benchmarks on the shared 128 px Dogs vs. Cats replica (run by hand; prints figures).

    python benchmarks/bench_train.py throughput [--epochs 8] [--source-size 500x375] [--work /tmp/bench-train]
    python benchmarks/bench_train.py accuracy --clone /tmp/exp-clone [--skip-run] [--experiments scratch,augmented]
    python benchmarks/bench_train.py precision --clone /tmp/exp-clone [--seeds 1,2,3] [--experiments scratch,augmented]
        [--precisions float32,bfloat16]
    python benchmarks/bench_train.py default-precision --clone /tmp/mnist-clone [--rounds 2]

throughput: first each input pipeline alone (no model), then the same model (the
`scratch` preset, 128 x 128 RGB, batch 32) trained on the book's 2,000 training
photos with 1,000 for validation, fed two ways, one epoch of each in turn so that
all see the same machine load:
  - ours: the prepared uint8 arrays (convnets.preprocess) through convnets.datasets'
    tf.data pipeline (cache, per-epoch shuffle, prefetch), float32 as the book;
  - the book's: keras.utils.image_dataset_from_directory over the extracted
    JPEG folders, decoding every photo again every epoch;
  - ours with train.cpu_bfloat16 (mixed_bfloat16), when the CPU has bfloat16 units.
Then the arithmetic limit (the model's multiply-adds per image against what this
CPU reaches on a large float32 matrix product) and the peak memory (max RSS) of
the `train` stage itself on the same data, run as a subprocess. Each arm's fastest
epoch after the first is compared: on a shared VM whole epochs run slow at random.
--source-size 500x375 enlarges the photos first, so that the book's path pays per
epoch what decoding the real archive's photos costs (ours pays it once, in preprocess).

accuracy: runs each experiment's one documented command,
`dvc exp run -n NAME -S +experiment=NAME -S preprocess.image_size=[128,128]`,
in a clone of the repository (these take hours on 2 cores), then prints the test
accuracy of each from `dvc exp show --json`, side by side.

precision: the same commands with `-S seed=S -S train.cpu_bfloat16=false|true` for
each seed, float32 and bfloat16 in turn (so both see the same machine load), then
each experiment's test accuracy as mean +- standard deviation over the seeds, and
whether the bfloat16 mean lies within the float32 runs' spread (their min..max):
the rule issue 13 set for making `cpu_bfloat16: auto` the default. --precisions
bfloat16 runs one side only, to set beside float32 figures measured earlier.

default-precision: what `make run` (the MNIST default, every stage) costs with
`train.cpu_bfloat16` false and auto, in turn, `--rounds` times each: `dvc exp run
--force` in a clone, so that no stage comes from the run cache. Prints the wall time
of the whole run and of the train stage, and the test accuracy, per setting.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"
SIZE = 128
# The book's make_subset: per class, file indices [start, stop).
BOOK_SPLIT = {"train": (0, 1000), "validation": (1000, 1500)}
SUBSET_NAMES = {"train": "train", "validation": "val"}


# --- data -----------------------------------------------------------------------------


def extract_book_subset(work: Path, source_size: tuple[int, int] | None = None) -> Path:
    """cats_vs_dogs_small/{train,validation}/{cat,dog}/*.jpg, as the book's make_subset writes it.

    source_size (width, height): the photos enlarged to that size first, so that
    decoding costs what the real archive's photos cost (up to 500 px a side).
    """
    root = work / f"cats_vs_dogs_small{size_suffix(source_size)}"
    if (root / "validation" / "dog").is_dir():
        return root
    with zipfile.ZipFile(ARCHIVE) as outer, zipfile.ZipFile(io.BytesIO(outer.read("train.zip"))) as inner:
        for subset, (start, stop) in BOOK_SPLIT.items():
            for label in ("cat", "dog"):
                target = root / subset / label
                target.mkdir(parents=True, exist_ok=True)
                for index in range(start, stop):
                    name = f"{label}.{index}.jpg"
                    data = inner.read(f"train/{name}")
                    (target / name).write_bytes(data if source_size is None else enlarged_jpeg(data, source_size))
    return root


def size_suffix(source_size: tuple[int, int] | None) -> str:
    """Folder suffix that keeps the photos and arrays of each source size apart."""
    return "" if source_size is None else f"_{source_size[0]}x{source_size[1]}"


def photo_size(text: str) -> tuple[int, int]:
    """argparse type for WxH, e.g. 500x375."""
    try:
        width, height = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 500x375, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"sides must be positive, got {text!r}")
    return width, height


def enlarged_jpeg(data: bytes, size: tuple[int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def prepare_arrays(book_root: Path, out: Path) -> Path:
    """Our prepared arrays of exactly the same photos, made by the project's preprocess."""
    from convnets.params import PreprocessParams
    from convnets.preprocess import preprocess

    if (out / "classes.json").exists():
        return out
    rows = [
        {"file": f"{subset}/{label}/{path.name}", "label": label, "split": SUBSET_NAMES[subset]}
        for subset in BOOK_SPLIT
        for label in ("cat", "dog")
        for path in sorted((book_root / subset / label).glob("*.jpg"))
    ]
    preprocess(pd.DataFrame(rows), book_root, PreprocessParams(image_size=[SIZE, SIZE], channels=3), out)
    return out


def scratch_params():
    from convnets.params import Params

    composed = {**yaml.safe_load((REPO / "params.yaml").read_text())}
    preset = yaml.safe_load((REPO / "conf" / "model" / "scratch.yaml").read_text())
    composed.update(model=preset["model"], train=preset["train"])
    return Params.model_validate(composed)


# --- throughput -------------------------------------------------------------------------


def compiled_model(params, policy: str = "float32"):
    from convnets.devices import dtype_policy
    from convnets.models import build_model, loss_for
    from convnets.train import make_optimizer

    with dtype_policy(policy):
        model = build_model(params.model, (SIZE, SIZE, 3), 2)
    model.compile(make_optimizer(params.train.optimizer, params.train.learning_rate), loss_for(2), metrics=["accuracy"])
    return model


def our_datasets(prepared: Path, params, epochs: int):
    from convnets.datasets import ordered_batches, training_batches
    from convnets.prepared import load_subset

    x_train, y_train = load_subset(prepared, "train")
    x_val, y_val = load_subset(prepared, "val")
    batch = params.train.batch_size
    train, steps = training_batches(x_train, y_train, batch, params.seed, 0, epochs)
    return train, steps, ordered_batches(x_val, y_val, batch_size=batch, cache=True)


def book_datasets(book_root: Path, params):
    import keras

    kwargs = {"image_size": (SIZE, SIZE), "batch_size": params.train.batch_size, "verbose": False}
    train = keras.utils.image_dataset_from_directory(book_root / "train", seed=params.seed, **kwargs)
    val = keras.utils.image_dataset_from_directory(book_root / "validation", shuffle=False, **kwargs)
    return train, val


def interleaved_epochs(prepared: Path, book_root: Path, epochs: int, bfloat16: bool) -> dict[str, list[float]]:
    """Seconds per epoch (training + validation) of each arm, one epoch of each in turn."""
    import keras

    params = scratch_params()
    keras.utils.set_random_seed(params.seed)
    book_train, book_val = book_datasets(book_root, params)
    arms = {"ours": "float32", "book": "float32"} | ({"ours_bf16": "mixed_bfloat16"} if bfloat16 else {})
    models = {name: compiled_model(params, policy) for name, policy in arms.items()}
    ours = {name: our_datasets(prepared, params, epochs) for name in arms if name.startswith("ours")}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for epoch in range(epochs):
        for name, model in models.items():
            start = time.perf_counter()
            if name == "book":
                model.fit(book_train, validation_data=book_val, initial_epoch=epoch, epochs=epoch + 1, verbose=0)
            else:
                train, steps, val = ours[name]
                model.fit(
                    train,
                    steps_per_epoch=steps,
                    validation_data=val,
                    initial_epoch=epoch,
                    epochs=epoch + 1,
                    shuffle=False,
                    verbose=0,
                )
            seconds[name].append(time.perf_counter() - start)
            print(f"  epoch {epoch + 1} {name}: {seconds[name][-1]:.1f} s", flush=True)
    return seconds


def input_only_rate(prepared: Path, book_root: Path) -> dict[str, float]:
    """Images per second of each input pipeline alone (no model), after a first pass."""
    params = scratch_params()
    train, steps, _ = our_datasets(prepared, params, 3)
    book_train, _ = book_datasets(book_root, params)
    rates = {}
    iterator = iter(train)
    for _ in range(steps):  # epoch 1 fills the cache
        next(iterator)
    start = time.perf_counter()
    for _ in range(2 * steps):
        next(iterator)
    rates["ours"] = 4000 / (time.perf_counter() - start)
    for _ in book_train:
        pass
    start = time.perf_counter()
    for _ in range(2):
        for _ in book_train:
            pass
    rates["book"] = 4000 / (time.perf_counter() - start)
    return rates


def multiply_adds_per_image(model) -> int:
    """Forward multiply-adds of the convolutions and dense layers (the rest is negligible)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            c_in = layer.input.shape[-1]
            total += h * w * c_out * c_in * int(np.prod(layer.kernel_size))
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return total


def matmul_flops_per_second(n: int = 4096, repeats: int = 5, dtype: str = "float32") -> float:
    import tensorflow as tf

    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    tf.linalg.matmul(a, b).numpy()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def train_stage_peak_memory(prepared: Path, work: Path, epochs: int) -> tuple[float, float]:
    """(max RSS in MiB, seconds) of `python -m convnets.train` on the prepared arrays."""
    params = scratch_params().model_dump()
    params["train"]["epochs"] = epochs
    params["preprocess"]["image_size"] = [SIZE, SIZE]
    params["preprocess"]["channels"] = 3
    params_file = work / "params-memory.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out = work / "memory-run"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "convnets.train",
        str(prepared),
        str(out / "model"),
        str(out / "train"),
        "--params",
        str(params_file),
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.perf_counter() - start
    # ru_maxrss of the children: the largest one waited for, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, seconds


def throughput(args: argparse.Namespace) -> None:
    if not ARCHIVE.exists():
        sys.exit(f"{ARCHIVE} not found: the shared replica must sit next to the repository")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    book_root = extract_book_subset(work, args.source_size)
    prepared = prepare_arrays(book_root, work / f"prepared{size_suffix(args.source_size)}")
    source = (
        f"JPEGs of {size_suffix(args.source_size)[1:]} px" if args.source_size else f"the replica's {SIZE} px JPEGs"
    )
    print(f"data: 2,000 train + 1,000 validation photos, {source}, trained at {SIZE} px ({book_root}, {prepared})")
    print(f"cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")

    from convnets.devices import cpu_has_bfloat16

    inputs = input_only_rate(prepared, book_root)
    print(f"input pipelines alone (no model): ours {inputs['ours']:,.0f} img/s, book {inputs['book']:,.0f} img/s")

    bfloat16 = cpu_has_bfloat16()
    seconds = interleaved_epochs(prepared, book_root, args.epochs, bfloat16)
    train_images = 2000
    print("\ntraining throughput, train images per second of epoch time (validation included):")
    labels = {
        "ours": "ours: tf.data, float32",
        "book": "book: image_dataset_from_directory",
        "ours_bf16": "ours: tf.data, cpu_bfloat16",
    }
    # This VM's epochs of the same work take either ~13-15 s or 20.5 s, whichever arm
    # runs (the host, not the code: it hits every arm): the median depends on how
    # many slow epochs an arm drew, so the fastest later epoch is the figure compared.
    rates, medians = {}, {}
    for name, steps in seconds.items():
        steady = steps[1:] or steps  # epoch 1 also fills our cache / traces the model
        rates[name] = train_images / min(steady)
        medians[name] = train_images / float(np.median(steady))
        print(
            f"  {labels[name]:36s} first epoch {train_images / steps[0]:6.1f}, fastest later "
            f"{rates[name]:6.1f}, median later {medians[name]:6.1f} img/s "
            f"(epochs: {', '.join(f'{s:.1f}' for s in steps)} s)"
        )
    print(
        f"  ratio ours / book, same float32 compute: {rates['ours'] / rates['book']:.2f}x fastest, "
        f"{medians['ours'] / medians['book']:.2f}x median"
    )
    if bfloat16:
        print(
            f"  ratio ours with train.cpu_bfloat16 / book: {rates['ours_bf16'] / rates['book']:.2f}x fastest, "
            f"{medians['ours_bf16'] / medians['book']:.2f}x median (target >= 1.3)"
        )
    else:
        print("  (this CPU has no bfloat16 units: the cpu_bfloat16 arm was skipped)")

    model = compiled_model(scratch_params())
    macs = multiply_adds_per_image(model)
    peak = matmul_flops_per_second()
    # Training costs about 3 forward passes per image (forward, gradients of inputs and of weights);
    # validation 1 forward pass for each of 1,000 images per 2,000 trained.
    flops_per_train_image = 2 * macs * (3 + 1000 / train_images)
    limit = peak / flops_per_train_image
    print("\narithmetic limit:")
    print(f"  model: {macs / 1e6:.0f} M multiply-adds per image forward ({2 * macs / 1e9:.2f} GFLOP)")
    print(f"  this CPU on a 4096 x 4096 float32 matmul: {peak / 1e9:.1f} GFLOP/s")
    print(
        f"  limit: {limit:.0f} train img/s (validation included); "
        f"ours (float32) reaches {rates['ours'] / limit:.0%} of it"
    )
    if bfloat16:
        peak16 = matmul_flops_per_second(dtype="bfloat16")
        limit16 = peak16 / flops_per_train_image
        print(
            f"  the same matmul in bfloat16: {peak16 / 1e9:.1f} GFLOP/s, limit {limit16:.0f} train img/s; "
            f"ours with cpu_bfloat16 reaches {rates['ours_bf16'] / limit16:.0%} of it"
        )

    rss, run_seconds = train_stage_peak_memory(prepared, work, args.memory_epochs)
    print(
        f"\npeak memory of the train stage ({args.memory_epochs} epochs, scratch, {SIZE} px): "
        f"{rss:.0f} MiB max RSS ({run_seconds:.0f} s)"
    )


# --- accuracy ---------------------------------------------------------------------------


def venv_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def ensure_clone(clone: Path) -> None:
    if not clone.exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        shared = clone.parent / "shared"
        if not shared.exists():
            shared.symlink_to(REPO.parent / "shared")  # fetch finds the replica at ../shared


def run_experiment(clone: Path, name: str, preset: str, *overrides: str) -> None:
    print(f"running experiment {name} ...", flush=True)
    command = [
        "dvc",
        "exp",
        "run",
        "-n",
        name,
        "-S",
        f"+experiment={preset}",
        "-S",
        f"preprocess.image_size=[{SIZE},{SIZE}]",
    ]
    for override in overrides:
        command += ["-S", override]
    subprocess.run(command, cwd=clone, check=True, env=venv_env())


def shown_experiments(clone: Path) -> dict[str, dict]:
    """Finished experiments by name: their metrics files' data, from `dvc exp show --json`."""
    shown = json.loads(
        subprocess.run(
            ["dvc", "exp", "show", "--json"], cwd=clone, check=True, capture_output=True, text=True, env=venv_env()
        ).stdout
    )
    found = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            for revision in exp.get("revs") or []:
                if revision.get("name") and revision.get("rev") != "workspace":
                    found[revision["name"]] = {k: v["data"] for k, v in revision["data"]["metrics"].items()}
    return found


def accuracy(args: argparse.Namespace) -> None:
    clone = Path(args.clone)
    names = args.experiments.split(",")
    if not args.skip_run:
        ensure_clone(clone)
        for name in names:
            run_experiment(clone, name, name)
    done = shown_experiments(clone)
    print(
        f"\n{'experiment':16s} {'test acc':>8s} {'test loss':>9s} {'ROC AUC':>8s} "
        f"{'epochs':>6s} {'best epoch':>10s} {'s/epoch':>8s}"
    )
    for name in names:
        if name not in done:  # not run, or still running
            print(f"{name:16s} (not finished)")
            continue
        test = done[name]["data/eval/metrics.json"]["test"]
        trained = done[name]["data/train/metrics.json"]
        timings = done[name].get("timings/train.json", {})  # wall clock: outside the outputs
        print(
            f"{name:16s} {test['accuracy']:8.4f} {test['loss']:9.4f} {test['roc_auc']:8.4f} "
            f"{trained['step'] + 1:6d} {trained['best']['epoch'] + 1:10d} "
            f"{timings.get('seconds_per_epoch', float('nan')):8.1f}"
        )


PRECISIONS = {"float32": "false", "bfloat16": "true"}


def precision(args: argparse.Namespace) -> None:
    clone = Path(args.clone)
    names = args.experiments.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    labels = args.precisions.split(",")
    unknown = set(labels) - set(PRECISIONS)
    if unknown:
        raise SystemExit(f"--precisions: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PRECISIONS)})")
    runs = [(name, seed, label) for name in names for seed in seeds for label in labels]
    if not args.skip_run:
        ensure_clone(clone)
        done = shown_experiments(clone)
        for name, seed, label in runs:
            exp = f"{name}-{label}-s{seed}"
            if exp not in done:
                run_experiment(clone, exp, name, f"seed={seed}", f"train.cpu_bfloat16={PRECISIONS[label]}")
    done = shown_experiments(clone)
    rows = []
    for name, seed, label in runs:
        metrics = done.get(f"{name}-{label}-s{seed}")
        if metrics:
            timings = metrics.get("timings/train.json", {})
            rows.append(
                {
                    "experiment": name,
                    "precision": label,
                    "seed": seed,
                    "test_accuracy": metrics["data/eval/metrics.json"]["test"]["accuracy"],
                    "train_minutes": timings.get("seconds", float("nan")) / 60,
                }
            )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.4f"))
    summary = table.groupby(["experiment", "precision"])["test_accuracy"].agg(["mean", "std", "min", "max", "count"])
    summary["train_minutes"] = table.groupby(["experiment", "precision"])["train_minutes"].mean()
    print("\n" + summary.to_string(float_format="%.4f"))
    for name in names:
        if (name, "float32") in summary.index and (name, "bfloat16") in summary.index:
            fp32, bf16 = summary.loc[(name, "float32")], summary.loc[(name, "bfloat16")]
            inside = fp32["min"] <= bf16["mean"] <= fp32["max"]
            print(
                f"{name}: bfloat16 mean {bf16['mean']:.4f} is {'inside' if inside else 'OUTSIDE'} "
                f"the float32 spread [{fp32['min']:.4f}, {fp32['max']:.4f}]"
            )


DEFAULT_PRECISIONS = ("false", "auto")


def default_precision(args: argparse.Namespace) -> None:
    clone = Path(args.clone)
    ensure_clone(clone)
    rows = []
    for round_ in range(1, args.rounds + 1):
        for setting in DEFAULT_PRECISIONS:
            start = time.perf_counter()
            subprocess.run(
                ["dvc", "exp", "run", "--force", "-S", f"train.cpu_bfloat16={setting}"],
                cwd=clone,
                check=True,
                capture_output=True,
                env=venv_env(),
            )
            wall = time.perf_counter() - start
            timings = json.loads((clone / "timings" / "train.json").read_text())
            metrics = json.loads((clone / "data" / "eval" / "metrics.json").read_text())
            devices = json.loads((clone / "data" / "train" / "devices.json").read_text())
            rows.append(
                {
                    "round": round_,
                    "cpu_bfloat16": setting,
                    "dtype_policy": devices["dtype_policy"],
                    "run_s": wall,
                    "train_s": timings["seconds"],
                    "test_accuracy": metrics["test"]["accuracy"],
                }
            )
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=round_ == 1 and setting == "false"), flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby("cpu_bfloat16", sort=False)[["run_s", "train_s", "test_accuracy"]].agg(["median", "min"])
    print("\n" + summary.to_string(float_format="%.3f"))
    float32, auto = (table[table.cpu_bfloat16 == s]["run_s"].median() for s in DEFAULT_PRECISIONS)
    print(f"\nmake run with auto / with false: {auto / float32:.2f}x (median wall time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("throughput", help="ours vs the book's input pipeline, arithmetic limit, peak memory")
    run.add_argument("--epochs", type=int, default=8, help="epochs of each pipeline, in turn (default: %(default)s)")
    run.add_argument(
        "--memory-epochs", type=int, default=2, help="epochs of the peak-memory run (default: %(default)s)"
    )
    run.add_argument(
        "--source-size",
        metavar="WxH",
        type=photo_size,
        help="enlarge the photos to this size first, to weigh decoding as the real archive's photos do (e.g. 500x375)",
    )
    run.add_argument("--work", default="/tmp/bench-train", help="scratch folder (default: %(default)s)")
    run.set_defaults(func=throughput)
    acc = sub.add_parser("accuracy", help="the experiments' documented commands, then their test accuracy")
    acc.add_argument("--clone", required=True, help="clone of the repository to run them in (made if missing)")
    acc.add_argument("--experiments", default="scratch,augmented,mini_xception")
    acc.add_argument("--skip-run", action="store_true", help="only print the table of experiments already run")
    acc.set_defaults(func=accuracy)
    prec = sub.add_parser("precision", help="float32 against bfloat16 training, several seeds each")
    prec.add_argument("--clone", required=True, help="clone of the repository to run them in (made if missing)")
    prec.add_argument("--experiments", default="scratch,augmented")
    prec.add_argument("--seeds", default="1,2,3")
    prec.add_argument("--precisions", default="float32,bfloat16", help="which sides to run (default: %(default)s)")
    prec.add_argument("--skip-run", action="store_true", help="only print the table of experiments already run")
    prec.set_defaults(func=precision)
    default = sub.add_parser("default-precision", help="make run's cost with cpu_bfloat16 false and auto, in turn")
    default.add_argument("--clone", required=True, help="clone of the repository to run it in (made if missing)")
    default.add_argument("--rounds", type=int, default=2, help="runs of each setting (default: %(default)s)")
    default.set_defaults(func=default_precision)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

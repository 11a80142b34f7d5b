"""Every experiment side by side: a leaderboard, overlaid validation curves and confusion matrices, in compare.html.

    python -m convnets.compare                       # every experiment of the current commit
    python -m convnets.compare scratch augmented     # these ones
    python -m convnets.compare --all-commits -o all.html

It reads what DVC already has and reruns nothing: params and metrics from
`dvc exp show --json`, the per-epoch validation metrics and the confusion
matrix of each experiment through DVC's file system at the experiment's commit
(from the local DVC cache). An experiment that failed, or whose outputs are not
in the cache (an older commit), shows blanks where its figures would be.

The leaderboard is sorted by test accuracy and leads with the figures (experiment,
test accuracy, ROC AUC, best epoch, training time), then the preset and only the
params that differ among its rows, shortened (a path to its file name, a hash to
8 characters; more of either only where that would make two values look alike);
experiments that differ only in `seed` also get one grouped row, mean ± standard
deviation (n). Each experiment's environment (the uv.lock hash, Python,
TensorFlow and Keras versions that trained it) is read from its
data/train/devices.json at its commit: the page states it once when all agree,
and flags it and shows it per experiment when they do not. `leaderboard_rows`
and `charts_markdown` give the same for a Prefect table and markdown artifact.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from convnets.layout import DEVICES_FILE, TIMINGS
from convnets.report import (
    DPI,
    PNG_METADATA,
    STYLE,
    environment_of,
    environment_text,
    esc,
    flatten,
    format_duration,
    identify_preset,
)

HOW_TO_MAKE_ONE = (
    "no experiments to compare: make one with `dvc exp run -n NAME -S train.epochs=20` (docs/experiments.md)"
)
VAL_FILES = {
    "accuracy": "data/train/plots/metrics/eval/accuracy.tsv",
    "loss": "data/train/plots/metrics/eval/loss.tsv",
}
CONFUSION_FILE = "data/eval/plots/sklearn/confusion_matrix.json"
# Not a DVC metric (its strings and lists would crowd `dvc exp show` and `dvc metrics diff`):
# read at each experiment's commit, as the plots are.
DEVICES = f"data/train/{DEVICES_FILE}"
PARAMS_FILE = "params.yaml"
TIMINGS_FILE = TIMINGS.as_posix()


@dataclass
class Experiment:
    name: str
    rev: str
    baseline: str = ""
    params: dict = field(default_factory=dict)  # flattened params.yaml
    metrics: dict = field(default_factory=dict)  # flattened, "<file>:<key>" -> value
    failed: bool = False
    state: str = ""  # "running" or "queued" while DVC is still at it
    environment: dict | None = None  # devices.json's record (read_environments); None: not read or not recorded

    def metric(self, file: str, key: str):
        value = self.metrics.get(f"{file}:{key}")
        return (
            value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None
        )

    @property
    def accuracy(self):
        return self.metric("data/eval/metrics.json", "test.accuracy")

    @property
    def roc_auc(self):
        return self.metric("data/eval/metrics.json", "test.roc_auc")

    @property
    def best_epoch(self):
        return self.metric("data/train/metrics.json", "best.epoch")

    @property
    def epochs(self):
        step = self.metric("data/train/metrics.json", "step")
        return int(step) + 1 if step is not None else None

    @property
    def training_seconds(self):
        """Wall-clock training time: timings/train.json (a metric of its own), or seconds per epoch x epochs."""
        total = self.metric(TIMINGS_FILE, "seconds")
        if total is not None:
            return total
        per_epoch = self.metric(TIMINGS_FILE, "seconds_per_epoch")
        if per_epoch is None:
            per_epoch = self.metric("data/train/metrics.json", "seconds_per_epoch")  # older commits
        return per_epoch * self.epochs if per_epoch is not None and self.epochs else None

    @property
    def device(self) -> str:
        gpus = self.metric("data/train/metrics.json", "devices.gpu_count")
        if gpus is None:
            return ""
        mixed = self.metric("data/train/metrics.json", "devices.mixed_precision")
        where = "CPU" if not gpus else f"{int(gpus)} GPU" + ("s" if gpus > 1 else "")
        return where + (", mixed precision" if mixed else "")


# --- what `dvc exp show --json` says ---------------------------------------------------------


def _data_of(files: dict | None) -> dict:
    """{file: {"data": {...}}} -> flattened {"file:key": value}; a file that errored gives nothing."""
    out = {}
    for file, content in (files or {}).items():
        data = (content or {}).get("data") if isinstance(content, dict) else None
        if isinstance(data, dict):
            out.update({f"{file}:{k}": v for k, v in flatten(data).items()})
    return out


def experiments_from_show(show: list) -> list[Experiment]:
    """The experiments (not the workspace or baseline commits) in `dvc exp show --json`'s output."""
    found = []
    for baseline in show or []:
        if not isinstance(baseline, dict):
            continue
        for exp in baseline.get("experiments") or []:
            if not isinstance(exp, dict):
                continue
            revs = exp.get("revs") or []
            record = revs[0] if revs and isinstance(revs[0], dict) else {}
            data = record.get("data") or {}
            state = ((exp.get("executor") or {}).get("state") or "") if isinstance(exp.get("executor"), dict) else ""
            params = (data.get("params") or {}).get(PARAMS_FILE, {})
            found.append(
                Experiment(
                    name=str(exp.get("name") or record.get("name") or record.get("rev", "")[:7]),
                    rev=str(record.get("rev", "")),
                    baseline=str(baseline.get("name") or baseline.get("rev", ""))[:20],
                    params=flatten(params.get("data") or {}) if isinstance(params, dict) else {},
                    metrics=_data_of(data.get("metrics")),
                    failed=bool(record.get("error")) or state == "failed",
                    state="" if state in ("", "success") else state,
                )
            )
            if found[-1].failed or found[-1].state:
                # A failed run has no figures of its own; a running one shows the workspace's: blanks for both.
                found[-1].metrics = {}
    return found


def exp_show(repo: str | Path = ".", all_commits: bool = False) -> list:
    """`dvc exp show --json` in `repo`, parsed."""
    command = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout or "[]")


def select(experiments: list[Experiment], names: Sequence[str] | None) -> list[Experiment]:
    if not names:
        return experiments
    known = {e.name: e for e in experiments}
    by_rev = {e.rev[: len(n)]: e for e in experiments for n in names if len(n) >= 7}
    chosen, missing = [], []
    for name in names:
        exp = known.get(name) or by_rev.get(name)
        (chosen if exp else missing).append(exp or name)
    if missing:
        raise KeyError(f"no such experiment: {', '.join(missing)} (known: {', '.join(sorted(known)) or 'none'})")
    return chosen


# --- the leaderboard -----------------------------------------------------------------------

FIGURES = ["test accuracy", "ROC AUC", "best epoch", "training time"]  # right after the name, before any param
HASH = re.compile(r"[0-9a-fA-F]{32,}")  # an MD5, SHA-1 or SHA-256 digest
SHORT_HASH = 8


def _show(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def shorten(value, level: int = 0) -> str:
    """A param's value as the leaderboard shows it: a path (or URL) by its file name, a hash by
    its first 8 characters; each `level` keeps one more folder, or 8 more characters."""
    text = _show(value)
    if not isinstance(value, str):
        return text
    if HASH.fullmatch(text):
        return text[: SHORT_HASH * (level + 1)]
    if ("/" in text or "\\" in text) and not text.startswith(("[", "{")):
        parts = [part for part in re.split(r"[/\\]+", text) if part]
        return "/".join(parts[-(level + 1) :]) if level < len(parts) else text
    return text


def short_forms(values: Sequence) -> list[str]:
    """`values` shortened alike, as little as keeps the different ones different
    (two archives of the same name in different folders keep their folders)."""
    distinct = len({_show(v) for v in values})
    level = 0
    while len({shorten(v, level) for v in values}) < distinct:
        level += 1  # terminates: at a high enough level every value is shown whole
    return [shorten(v, level) for v in values]


def differing_params(experiments: list[Experiment]) -> list[str]:
    keys = sorted({k for e in experiments for k in e.params})
    return [k for k in keys if len({_show(e.params.get(k)) for e in experiments}) > 1]


def sort_by_accuracy(experiments: Iterable[Experiment]) -> list[Experiment]:
    return sorted(experiments, key=lambda e: (e.accuracy is None, -(e.accuracy or 0.0), e.name))


def _num(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if value is not None else ""


def _best(exp: Experiment) -> str:
    if exp.best_epoch is None or exp.epochs is None:
        return ""
    return f"{int(exp.best_epoch) + 1} of {exp.epochs}"


def _finished(exp: Experiment) -> bool:
    return not exp.failed and not exp.state


def read_environments(experiments: Iterable[Experiment], reader: PlotReader) -> None:
    """Each finished experiment's environment, from its devices.json at its commit (blank if DVC has none)."""
    for exp in experiments:
        if _finished(exp) and exp.environment is None:
            text = reader.read(exp.rev, DEVICES)
            try:
                devices = json.loads(text) if text else None
            except ValueError:
                devices = None
            exp.environment = environment_of(devices) if isinstance(devices, dict) else None


def environments(experiments: Iterable[Experiment]) -> list[str]:
    """The environments the finished experiments ran in, as text, sorted; "" for one not recorded."""
    return sorted({environment_text(e.environment) for e in experiments if _finished(e)})


def environment_note(experiments: list[Experiment]) -> str:
    """The environment all of them ran in, or a warning that they differ, naming each environment's experiments."""
    found = environments(experiments)
    if not found or found == [""]:
        return ""
    if len(found) == 1:
        return f"All ran in one environment: {found[0]}."
    recorded = len([f for f in found if f])
    ran = [e for e in sort_by_accuracy(experiments) if _finished(e)]

    def who(text: str) -> str:
        names = [e.name for e in ran if environment_text(e.environment) == text]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    each = "; ".join(f"{text or 'not recorded'} ({who(text)})" for text in found)
    if recorded == 1:
        return f"⚠ Only some of these experiments recorded their environment, so they may not all share one: {each}."
    return (
        f"⚠ These experiments ran in {recorded} different environments "
        f"(their figures may differ for that alone): {each}."
    )


def seed_groups(experiments: list[Experiment]) -> list[list[Experiment]]:
    """Finished experiments whose params (and environment) are equal except `seed`, two or more, in a stable order."""
    groups: dict[str, list[Experiment]] = {}
    for exp in experiments:
        if exp.failed or exp.state or exp.accuracy is None:
            continue  # nothing to average
        key = json.dumps({k: _show(v) for k, v in exp.params.items() if k != "seed"}, sort_keys=True)
        groups.setdefault(key + environment_text(exp.environment), []).append(exp)
    found = [g for g in groups.values() if len(g) > 1 and len({_show(e.params.get("seed")) for e in g}) > 1]
    return sorted(found, key=lambda g: g[0].name)


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f} (n={len(values)})"


def leaderboard(experiments: list[Experiment], conf_dir: Path | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows): one row per experiment sorted by test accuracy, then one per group of seeds.

    The figures come first, then the preset and the params that differ (shortened), the device,
    and the environment when the experiments' environments differ (environment_note says it otherwise).
    """
    varying = differing_params(experiments)
    shown_params = [k for k in varying if k != "seed"] + (["seed"] if "seed" in varying else [])
    env_differs = len(environments(experiments)) > 1
    columns = ["experiment", *FIGURES, "preset", *shown_params, "device", *(["environment"] if env_differs else [])]
    ordered = sort_by_accuracy(experiments)
    groups = seed_groups(experiments)
    # Each param column shortened as a whole, over every value it shows (a group row shows its first's).
    shown_by = [*ordered, *(g[0] for g in groups)]
    short = {}
    for key in shown_params:
        present = [e for e in shown_by if key in e.params]
        short[key] = dict(zip(map(id, present), short_forms([e.params[key] for e in present]), strict=True))
    rows = []
    for exp in ordered:
        preset = identify_preset(_unflatten(exp.params), conf_dir)["preset"] if exp.params else ""
        note = " (failed)" if exp.failed else f" ({exp.state})" if exp.state else ""
        row = {
            "experiment": exp.name + note,
            "test accuracy": _num(exp.accuracy),
            "ROC AUC": _num(exp.roc_auc),
            "best epoch": _best(exp),
            "training time": format_duration(exp.training_seconds, exact=False),
            "preset": preset,
        }
        row.update({k: short[k].get(id(exp), "") for k in shown_params})
        row["device"] = exp.device
        if env_differs:
            row["environment"] = environment_text(exp.environment) if _finished(exp) else ""
        rows.append(row)
    for group in groups:
        row = dict.fromkeys(columns, "")
        first = group[0]
        row["experiment"] = "mean of " + ", ".join(e.name for e in group)
        row["preset"] = identify_preset(_unflatten(first.params), conf_dir)["preset"]
        row.update({k: short[k].get(id(first), "") for k in shown_params if k != "seed"})
        row["seed"] = "various" if "seed" in shown_params else ""
        row["test accuracy"] = mean_std([e.accuracy for e in group])
        row["ROC AUC"] = mean_std([e.roc_auc for e in group])
        row["device"] = ", ".join(sorted({e.device for e in group if e.device}))
        if env_differs:
            row["environment"] = environment_text(first.environment)  # the same for the group (seed_groups)
        rows.append({k: row.get(k, "") for k in columns})
    return columns, rows


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def leaderboard_rows(
    show: list, names: Sequence[str] | None = None, conf_dir: Path | None = None, reader: PlotReader | None = None
) -> list[dict[str, str]]:
    """The leaderboard for a Prefect table artifact: `show` is `dvc exp show --json`'s parsed output;
    with a `reader`, the experiments' environments too (leaderboard_note says what the rows do not)."""
    experiments = select(experiments_from_show(show), names)
    if reader is not None:
        read_environments(experiments, reader)
    return leaderboard(experiments, conf_dir)[1]


def leaderboard_note(show: list, reader: PlotReader, names: Sequence[str] | None = None) -> str:
    """environment_note for these experiments: their common environment, or the warning that they differ."""
    experiments = select(experiments_from_show(show), names)
    read_environments(experiments, reader)
    return environment_note(experiments)


# --- plots through DVC -----------------------------------------------------------------------


class PlotReader:
    """Reads an experiment's output files (plots, devices.json) at its commit through DVC (the local
    cache, or the default remote), blanks when absent."""

    def __init__(self, repo: str | Path = "."):
        self.repo = str(repo)
        self._fs: dict[str, object] = {}

    def _filesystem(self, rev: str):
        from dvc.api import DVCFileSystem

        if rev not in self._fs:  # one per commit: opening the repo is most of the cost
            self._fs[rev] = DVCFileSystem(self.repo, rev=rev)
        return self._fs[rev]

    def read(self, rev: str, path: str) -> str | None:
        if not rev or rev == "workspace":
            return None
        try:
            with self._filesystem(rev).open(path, "r") as handle:
                return handle.read()
        except Exception:  # not in the cache, not in that commit, a failed run: a blank, not a crash
            return None

    def series(self, rev: str, metric: str) -> list[tuple[int, float]]:
        text = self.read(rev, VAL_FILES[metric])
        if not text:
            return []
        points = []
        for line in text.splitlines()[1:]:
            parts = line.split("\t")
            try:
                points.append((int(parts[0]), float(parts[1])))
            except (IndexError, ValueError):
                continue
        return points

    def confusion(self, rev: str) -> list[dict]:
        text = self.read(rev, CONFUSION_FILE)
        try:
            cells = json.loads(text) if text else []
        except ValueError:
            return []
        return cells if isinstance(cells, list) else next(iter(cells.values()), []) if isinstance(cells, dict) else []


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)
    return buffer.getvalue()


def overlay_chart(experiments: list[Experiment], reader: PlotReader, metric: str) -> bytes:
    """Validation `metric` of every experiment on one chart (the book compares its runs so)."""
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    drawn = 0
    for exp in experiments:
        points = reader.series(exp.rev, metric)
        if points:
            ax.plot([step + 1 for step, _ in points], [v for _, v in points], label=exp.name, linewidth=1.4)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no per-epoch metrics in the DVC cache", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=f"Validation {metric}", xlabel="Epoch", ylabel=metric.capitalize())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if drawn:
        ax.legend(fontsize=7, ncol=2 if drawn > 6 else 1)
    return _png(fig)


def confusion_chart(exp: Experiment, reader: PlotReader) -> bytes | None:
    cells = reader.confusion(exp.rev)
    if not cells:
        return None
    labels = sorted(
        {str(c.get("actual")) for c in cells} | {str(c.get("predicted")) for c in cells},
        key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s),
    )
    index = {name: i for i, name in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for cell in cells:
        counts[index[str(cell.get("actual"))], index[str(cell.get("predicted"))]] += 1
    fig, ax = plt.subplots(figsize=(3.4, 3.4), layout="constrained")
    ax.imshow(counts, cmap="Blues")
    small = len(labels) > 6
    for (i, j), value in np.ndenumerate(counts):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            fontsize=6 if small else 10,
            color="white" if value > counts.max() / 2 else "black",
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="Predicted", ylabel="True", title=exp.name)
    return _png(fig)


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def charts_markdown(
    show: list, repo: str | Path = ".", names: Sequence[str] | None = None, reader: PlotReader | None = None
) -> str:
    """Validation accuracy and loss of every experiment overlaid, as markdown with inline PNGs (a Prefect artifact)."""
    experiments = sort_by_accuracy(select(experiments_from_show(show), names))
    if not experiments:
        return HOW_TO_MAKE_ONE + "\n"
    reader = reader or PlotReader(repo)
    parts = ["## Validation curves of every experiment", ""]
    for metric in ("accuracy", "loss"):
        parts.append(f"![validation {metric}]({_uri(overlay_chart(experiments, reader, metric))})")
        parts.append("")
    return "\n".join(parts)


# --- the page --------------------------------------------------------------------------------


def render_compare(
    experiments: list[Experiment],
    reader: PlotReader,
    conf_dir: Path | None = None,
    title: str = "convnets: every experiment side by side",
) -> str:
    read_environments(experiments, reader)
    columns, rows = leaderboard(experiments, conf_dir)
    individual = rows[: len(experiments)]
    grouped = rows[len(experiments) :]
    ordered = sort_by_accuracy(experiments)
    numeric = set(FIGURES)
    # A shortened value keeps the whole one as its tooltip.
    whole = [{k: _show(e.params[k]) for k in columns if k in e.params} for e in ordered]

    def cell(column: str, value: str, full: dict[str, str]) -> str:
        classes = " ".join(filter(None, ["num" if column in numeric else "", "env" if column == "environment" else ""]))
        title = f' title="{esc(full[column])}"' if column in full and full[column] != value else ""
        return f'<td class="{classes}"{title}>{esc(value)}</td>'

    def table_html(body_rows: list[dict[str, str]], cls: str, titles: list[dict[str, str]] | None = None) -> str:
        head = "".join(f'<th class="{"num" if c in numeric else ""}">{esc(c)}</th>' for c in columns)
        body = "".join(
            "<tr>" + "".join(cell(c, r.get(c, ""), (titles or [])[i] if titles else {}) for c in columns) + "</tr>"
            for i, r in enumerate(body_rows)
        )
        table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        return f'<div class="scroll">{table}</div>'

    charts = "".join(
        f'<figure><img alt="validation {m} of every experiment" '
        f'src="{_uri(overlay_chart(ordered, reader, m))}"></figure>'
        for m in ("accuracy", "loss")
    )
    matrices = []
    for exp in ordered:
        png = confusion_chart(exp, reader)
        matrices.append(
            f'<figure><img alt="confusion matrix of {esc(exp.name)}" src="{_uri(png)}"></figure>'
            if png
            else f'<figure class="blank"><figcaption>{esc(exp.name)}: '
            f"no confusion matrix in the DVC cache</figcaption></figure>"
        )
    groups = "<h2>Same params, different seeds</h2>" + table_html(grouped, "groups") if grouped else ""
    baselines = sorted({e.baseline for e in experiments if e.baseline})
    env_note = environment_note(experiments)
    env_class = "env-differs" if "environment" in columns else "env-same"
    env_html = f'<p class="{env_class}" id="environment-note">{esc(env_note)}</p>' if env_note else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{STYLE}
.leaderboard td:first-child{{font-weight:600}}figure{{margin:0}}.blank{{border:1px dashed var(--line);padding:1rem}}
.leaderboard td,.groups td{{white-space:nowrap}}td.env{{background:#fff8c5;white-space:normal;min-width:10rem}}
.env-differs{{background:#fff8c5;border-left:4px solid #bf8700;padding:.3rem .6rem}}
.env-same{{color:var(--muted);font-size:.9rem}}
</style></head><body>
<h1>{esc(title)}</h1>
<p class="note">{len(experiments)} experiment(s) of {esc(", ".join(baselines))}, sorted by test accuracy;
only the params that differ among them are shown, a path by its file name and a hash by its first
characters (hover for the whole value). Blanks: a failed experiment, or figures DVC does not have.</p>
{env_html}
<h2>Leaderboard</h2>
{table_html(individual, "leaderboard", whole)}
{groups}
<h2>Validation accuracy and loss</h2>
<div class="grid">{charts}</div>
<h2>Confusion matrices (test)</h2>
<div class="grid3">{"".join(matrices)}</div>
</body></html>
"""


def compare(
    repo: str | Path = ".",
    names: Sequence[str] | None = None,
    all_commits: bool = False,
    out: str | Path = "compare.html",
    show: list | None = None,
) -> Path | None:
    """Write the page; None when there is no experiment to compare."""
    repo = Path(repo)
    experiments = select(experiments_from_show(show if show is not None else exp_show(repo, all_commits)), names)
    if not experiments:
        return None
    conf_dir = repo / "conf"
    page = render_compare(experiments, PlotReader(repo), conf_dir if conf_dir.is_dir() else None)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("experiments", nargs="*", metavar="EXP", help="experiment names (default: all of them)")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    parser.add_argument("-o", "--output", default="compare.html", help="page to write (default: %(default)s)")
    parser.add_argument("--repo", default=".", help="the project (default: the current folder)")
    args = parser.parse_args(argv)
    try:
        path = compare(args.repo, args.experiments, args.all_commits, args.output)
    except (KeyError, RuntimeError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    if path is None:
        print(HOW_TO_MAKE_ONE)
        return 0
    print(f"compare: open {path} in a browser")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

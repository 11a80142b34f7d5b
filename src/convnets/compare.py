"""Every experiment side by side: a leaderboard, overlaid validation curves and confusion matrices, in compare.html.

    python -m convnets.compare                       # every experiment of the current commit
    python -m convnets.compare scratch augmented     # these ones
    python -m convnets.compare --all-commits -o all.html

It reads what DVC already has and reruns nothing: params and metrics as
`dvc exp show --json` gives them (asked in-process, exp_show), the per-epoch
validation metrics and the confusion matrix of each experiment through DVC's
file system at the experiment's commit (from the local DVC cache); the figures
as convnets.figures reads every run's. An experiment that failed, or whose
outputs are not in the cache (an older commit), shows blanks where its figures
would be.

The leaderboard is sorted by test accuracy and leads with the figures (experiment,
test accuracy, ROC AUC, best epoch, training time), then the preset and only the
params that differ among its rows, shortened (a path to its file name, a hash to
8 characters; more of either only where that would make two values look alike);
experiments that differ only in `seed` also get one grouped row, mean ± standard
deviation (n). Each experiment's environment (the uv.lock hash, Python,
TensorFlow and Keras versions that trained it) is read from its
data/train/devices.json at its commit: the page states it once when all agree,
and flags it and shows it per experiment when they do not. `board` and
`charts_markdown` give the same for a Prefect table and markdown artifact: the
one leaderboard, which a sweep extends with what only it knows (pipeline.results).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convnets.figures import (
    DEVICES,
    EVAL_METRICS,
    HISTORY,
    TIMINGS_FILE,
    TRAIN_DIR,
    TRAIN_METRICS,
    Figures,
    environment_of,
    figures_of,
    read_series,
)
from convnets.outputs import write_text
from convnets.presentation import (
    confusion_png,
    data_uri,
    environment_text,
    esc,
    format_duration,
    html_page,
    number,
    overlay_png,
)
from convnets.presets import Presets, flatten, identify_preset, load_presets, unflatten

HOW_TO_MAKE_ONE = (
    "no experiments to compare: make one with `dvc exp run -n NAME -S train.epochs=20` (docs/experiments.md)"
)
CONFUSION_FILE = "data/eval/plots/sklearn/confusion_matrix.json"
PARAMS_FILE = "params.yaml"


def validation_file(metric: str) -> str:
    """DVCLive's per-epoch validation `metric` of the train stage, in the repository."""
    return f"{TRAIN_DIR}/{HISTORY.as_posix()}/eval/{metric}.tsv"


@dataclass
class Experiment:
    name: str
    rev: str
    baseline: str = ""
    params: dict = field(default_factory=dict)  # flattened params.yaml
    figures: Figures = field(default_factory=Figures)  # blank for a failed or unfinished run
    failed: bool = False
    state: str = ""  # "running" or "queued" while DVC is still at it
    environment: dict | None = None  # devices.json's record (read_environments); None: not read or not recorded

    @property
    def accuracy(self) -> float | None:
        return self.figures.test_accuracy

    @property
    def device(self) -> str:
        """e.g. "CPU", "2 GPUs, mixed precision" (the counts the train metrics keep)."""
        gpus = self.figures.gpu_count
        if gpus is None:
            return ""
        where = "CPU" if not gpus else f"{gpus} GPU" + ("s" if gpus > 1 else "")
        return where + (", mixed precision" if self.figures.mixed_precision else "")


# --- what `dvc exp show --json` says ---------------------------------------------------------


def files_data(files: dict | None) -> dict[str, dict]:
    """{file: {"data": {...}}} -> {file: {...}}; a file that errored gives nothing."""
    contents = (files or {}).items()
    return {file: c["data"] for file, c in contents if isinstance(c, dict) and isinstance(c.get("data"), dict)}


def experiment_of(exp: dict, baseline: str) -> Experiment:
    """One experiment of `dvc exp show --json` (its first rev), of the baseline commit named `baseline`."""
    revs = exp.get("revs") or []
    record = revs[0] if revs and isinstance(revs[0], dict) else {}
    executor = exp.get("executor") if isinstance(exp.get("executor"), dict) else {}
    state = executor.get("state") or ""
    failed = bool(record.get("error")) or state == "failed"
    state = "" if state in ("", "success") else state
    data = record.get("data") or {}
    metrics = files_data(data.get("metrics"))
    # A failed run has no figures of its own; a running one shows the workspace's: blanks for both.
    figures = Figures()
    if not failed and not state:
        figures = figures_of(*(metrics.get(file) for file in (TRAIN_METRICS, EVAL_METRICS, TIMINGS_FILE)))
    return Experiment(
        name=str(exp.get("name") or record.get("name") or record.get("rev", "")[:7]),
        rev=str(record.get("rev", "")),
        baseline=baseline,
        params=flatten(files_data(data.get("params")).get(PARAMS_FILE, {})),
        figures=figures,
        failed=failed,
        state=state,
    )


def experiments_from_show(show: list) -> list[Experiment]:
    """The experiments (not the workspace or baseline commits) in `dvc exp show --json`'s output."""
    return [
        experiment_of(exp, str(baseline.get("name") or baseline.get("rev", ""))[:20])
        for baseline in show or []
        if isinstance(baseline, dict)
        for exp in baseline.get("experiments") or []
        if isinstance(exp, dict)
    ]


def exp_show(repo: str | Path = ".", all_commits: bool = False) -> list:
    """What `dvc exp show --json [--all-commits]` prints for `repo` (dates as datetimes), from the
    DVC this process runs, not whichever `dvc` is first on PATH.

    Not dvc.api.exp_show: it returns the table's cells (lists and booleans as text, whole numbers
    as floats, a metric's file only where two files share a key, revisions cut to 7 characters,
    no --all-commits), where the leaderboard needs each file's data as the run wrote it.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc:
            return [state.dumpd() for state in dvc.experiments.show(all_commits=all_commits)]
    except DvcException as exc:
        raise RuntimeError(f"`dvc exp show` failed in {repo}: {exc}") from exc


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
RANK_METRIC = "val_loss"  # what a halving sweep's rungs rank by unless told (pipeline.halving)


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


def best_of(figures: Figures) -> str:
    """e.g. "5 of 10": the epoch kept, of those trained."""
    return f"{figures.best_epoch} of {figures.epochs}" if figures.best_epoch and figures.epochs else ""


def _finished(exp: Experiment) -> bool:
    return not exp.failed and not exp.state


def read_environments(experiments: Iterable[Experiment], reader: PlotReader) -> None:
    """Each finished experiment's environment, from its devices.json at its commit (blank if DVC has none)."""
    for exp in experiments:
        if _finished(exp) and exp.environment is None:
            exp.environment = environment_of(reader.read_json(exp.rev, DEVICES))


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
    return f"{number(statistics.fmean(values))} ± {number(std)} (n={len(values)})"


def leaderboard(
    experiments: list[Experiment], conf_dir: Path | None = None, metric: str = RANK_METRIC
) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows): one row per experiment sorted by test accuracy, then one per group of seeds.

    The figures come first, then the preset and the params that differ (shortened), the device,
    and the environment when the experiments' environments differ (environment_note says it otherwise).
    The rungs of a halving sweep make one row per point (halving_rungs, ranked by `metric`).
    Every row has every column, in the columns' order.
    """
    ordered, rungs = rows_of(experiments, metric)
    experiments = [exp for exp in experiments if id(exp) in rungs] if rungs else experiments
    varying = differing_params(experiments)
    shown_params = [k for k in varying if k != "seed"] + (["seed"] if "seed" in varying else [])
    env_differs = len(environments(experiments)) > 1
    columns = ["experiment", *FIGURES, *(RUNG_COLUMNS if rungs else [])]
    columns += ["preset", *shown_params, "device", *(["environment"] if env_differs else [])]
    groups = seed_groups(experiments)
    # Each param column shortened as a whole, over every value it shows (a group row shows its first's).
    shown_by = [*ordered, *(g[0] for g in groups)]
    short = {}
    for key in shown_params:
        present = [e for e in shown_by if key in e.params]
        short[key] = dict(zip(map(id, present), short_forms([e.params[key] for e in present]), strict=True))
    presets = load_presets(conf_dir) if any(e.params for e in experiments) else None
    rows = []
    for exp in ordered:
        row = experiment_row(exp, preset_of(exp, presets))
        if rungs:
            row.update(rungs[id(exp)].columns(row))
        row.update({k: short[k].get(id(exp), "") for k in shown_params})
        row["device"] = exp.device
        if env_differs:
            row["environment"] = environment_text(exp.environment) if _finished(exp) else ""
        rows.append({k: row.get(k, "") for k in columns})
    for group in groups:
        row = group_row(group, preset_of(group[0], presets), env_differs)
        row.update({k: short[k].get(id(group[0]), "") for k in shown_params if k != "seed"})
        row["seed"] = "various" if "seed" in shown_params else ""
        rows.append({k: row.get(k, "") for k in columns})
    return columns, rows


def rows_of(experiments: list[Experiment], metric: str = RANK_METRIC) -> tuple[list[Experiment], dict[int, Rung]]:
    """The experiments that get a row, in the leaderboard's order, and their rungs (a halving sweep's: {} otherwise)."""
    rungs = halving_rungs(experiments, metric)
    if rungs:
        return sorted((exp for exp in experiments if id(exp) in rungs), key=lambda e: rungs[id(e)].order), rungs
    return sort_by_accuracy(experiments), rungs


# --- a halving sweep's rungs: one row per point ------------------------------------------------

STOP = "train.stop_at_epoch"
RUNG_COLUMNS = ["rung", "rank"]


@dataclass(frozen=True)
class Rung:
    """Where a point of a halving sweep got to: its furthest run, and its rank among those that got as far."""

    stop: int | None  # the epoch that run stopped at; None: it trained to the end
    budget: int | None
    rank: int
    of: int

    @property
    def order(self) -> tuple:
        return (self.stop is not None, -(self.stop or 0), self.rank)

    def columns(self, row: dict[str, str]) -> dict[str, str]:
        """The rung and rank cells; a point that stopped early shows no test figures (they decided nothing)."""
        cells = {"rung": "finished" if self.stop is None else f"stopped at {self.stop} of {self.budget}"}
        cells["rank"] = f"{self.rank} of {self.of}"
        if self.stop is not None:
            cells.update({"test accuracy": "", "ROC AUC": ""})
        return cells


def halving_rungs(experiments: list[Experiment], metric: str = RANK_METRIC) -> dict[int, Rung]:
    """{id of each point's furthest run: its Rung} when some experiments stopped early (train.stop_at_epoch), else {}.

    Runs of one point share every param but the stop, and the commit; a run that trained to the
    end goes furthest. A point ranks where it stopped, among every run of its commit that got
    there (the points that went on too), by its best epoch's `metric`, as the sweep ranked them
    at that rung (pipeline.halving), ties by name.
    """
    if not any(exp.params.get(STOP) is not None for exp in experiments):
        return {}
    points: dict[str, Experiment] = {}
    at_rung: dict[tuple[str, float], list[Experiment]] = {}
    for exp in experiments:
        key = exp.baseline + json.dumps({k: _show(v) for k, v in exp.params.items() if k != STOP}, sort_keys=True)
        if key not in points or reach(exp) > reach(points[key]):
            points[key] = exp
        at_rung.setdefault((exp.baseline, reach(exp)), []).append(exp)
    rungs = {}
    for exp in points.values():
        ranked = sorted(at_rung[(exp.baseline, reach(exp))], key=lambda e: rank_key(e, metric))
        budget = exp.params.get("train.epochs")
        rungs[id(exp)] = Rung(exp.params.get(STOP), budget, ranked.index(exp) + 1, len(ranked))
    return rungs


def rank_key(exp: Experiment, metric: str) -> tuple:
    """Best first by `metric` (a loss lower, anything else higher); runs without it last; ties by name."""
    figure = getattr(exp.figures, metric, None)
    if not isinstance(figure, (int, float)) or math.isnan(figure):
        return (1, 0.0, exp.name)
    return (0, figure if metric.endswith("loss") else -figure, exp.name)


def reach(exp: Experiment) -> float:
    """How far a run trained: its stop, or past every stop when it trained to the end."""
    stop = exp.params.get(STOP)
    return math.inf if stop is None else float(stop)


def preset_of(exp: Experiment, presets: Presets | None) -> str:
    return identify_preset(unflatten(exp.params), presets)["preset"] if exp.params else ""


def experiment_row(exp: Experiment, preset: str) -> dict[str, str]:
    """An experiment's name (and state) and figures; blanks where it has none."""
    note = " (failed)" if exp.failed else f" ({exp.state})" if exp.state else ""
    figures = exp.figures
    return {
        "experiment": exp.name + note,
        "test accuracy": number(figures.test_accuracy),
        "ROC AUC": number(figures.roc_auc),
        "best epoch": best_of(figures),
        "training time": format_duration(figures.training_seconds, exact=False),
        "preset": preset,
    }


def group_row(group: list[Experiment], preset: str, env_differs: bool) -> dict[str, str]:
    """The mean ± standard deviation of a group of seeds, and what its experiments share."""
    row = {
        "experiment": "mean of " + ", ".join(e.name for e in group),
        "test accuracy": mean_std([e.figures.test_accuracy for e in group]),
        "ROC AUC": mean_std([e.figures.roc_auc for e in group]),
        "preset": preset,
        "device": ", ".join(sorted({e.device for e in group if e.device})),
    }
    if env_differs:
        row["environment"] = environment_text(group[0].environment)  # the same for the group (seed_groups)
    return row


@dataclass
class Board:
    """The leaderboard of some experiments: its columns, its rows, and the environment note (environment_note)."""

    columns: list[str]
    rows: list[dict[str, str]]
    note: str = ""


def board(
    show: list,
    names: Sequence[str] | None = None,
    conf_dir: Path | None = None,
    reader: PlotReader | None = None,
    metric: str = RANK_METRIC,
) -> Board:
    """The leaderboard of `dvc exp show --json`'s experiments (`names`: these only; [] none), as compare.html
    shows it; with a `reader`, their environments too (a column where they differ, else the note)."""
    experiments = [] if names is not None and not names else select(experiments_from_show(show), names)
    if reader is not None:
        read_environments(experiments, reader)
    columns, rows = leaderboard(experiments, conf_dir, metric)
    return Board(columns, rows, environment_note(experiments))


def leaderboard_rows(
    show: list, names: Sequence[str] | None = None, conf_dir: Path | None = None, reader: PlotReader | None = None
) -> list[dict[str, str]]:
    """The leaderboard's rows (board): `show` is `dvc exp show --json`'s parsed output."""
    return board(show, names, conf_dir, reader).rows


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

    def read_json(self, rev: str, path: str):
        text = self.read(rev, path)
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def series(self, rev: str, metric: str):
        """The validation `metric` per epoch (figures.read_series), or None."""
        text = self.read(rev, validation_file(metric))
        try:
            return read_series(io.StringIO(text), metric) if text else None
        except (ValueError, KeyError):  # not a DVCLive TSV of that metric
            return None

    def confusion(self, rev: str) -> list[dict]:
        """The test predictions as DVCLive's confusion-matrix plot keeps them: [{"actual", "predicted"}]."""
        cells = self.read_json(rev, CONFUSION_FILE)
        if isinstance(cells, dict):  # {"<name>": [...]}
            cells = next(iter(cells.values()), [])
        return cells if isinstance(cells, list) else []


def overlay_chart(experiments: list[Experiment], reader: PlotReader, metric: str) -> bytes:
    """Validation `metric` of every experiment with per-epoch metrics in the cache, on one chart."""
    series = [(exp.name, reader.series(exp.rev, metric)) for exp in experiments]
    return overlay_png([(name, frame) for name, frame in series if frame is not None and len(frame)], metric)


def confusion_chart(exp: Experiment, reader: PlotReader) -> bytes | None:
    cells = [c for c in reader.confusion(exp.rev) if isinstance(c, dict)]
    if not cells:
        return None
    true, predicted = [str(c.get("actual")) for c in cells], [str(c.get("predicted")) for c in cells]
    labels = sorted(set(true) | set(predicted), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    return confusion_png(true, predicted, labels, exp.name, size=3.4)


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
        parts.append(f"![validation {metric}]({data_uri(overlay_chart(experiments, reader, metric))})")
        parts.append("")
    return "\n".join(parts)


# --- the page --------------------------------------------------------------------------------

PAGE_STYLE = """
.leaderboard td:first-child{font-weight:600}figure{margin:0}.blank{border:1px dashed var(--line);padding:1rem}
.leaderboard td,.groups td{white-space:nowrap}td.env{background:#fff8c5;white-space:normal;min-width:10rem}
.env-differs{background:#fff8c5;border-left:4px solid #bf8700;padding:.3rem .6rem}
.env-same{color:var(--muted);font-size:.9rem}
"""


def leaderboard_html(columns: list[str], rows: list[dict[str, str]], cls: str, whole: list[dict] | None = None) -> str:
    """The rows as a table; a cell whose value is shortened keeps the whole one (`whole`, per row) as its tooltip."""
    numeric = set(FIGURES)

    def cell(column: str, value: str, full: dict[str, str]) -> str:
        classes = " ".join(filter(None, ["num" if column in numeric else "", "env" if column == "environment" else ""]))
        title = f' title="{esc(full[column])}"' if column in full and full[column] != value else ""
        return f'<td class="{classes}"{title}>{esc(value)}</td>'

    head = "".join(f'<th class="{"num" if c in numeric else ""}">{esc(c)}</th>' for c in columns)
    body = "".join(
        "<tr>" + "".join(cell(c, r.get(c, ""), whole[i] if whole else {}) for c in columns) + "</tr>"
        for i, r in enumerate(rows)
    )
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def matrix_figure(exp: Experiment, reader: PlotReader) -> str:
    png = confusion_chart(exp, reader)
    if png is None:
        return (
            f'<figure class="blank"><figcaption>{esc(exp.name)}: '
            f"no confusion matrix in the DVC cache</figcaption></figure>"
        )
    return f'<figure><img alt="confusion matrix of {esc(exp.name)}" src="{data_uri(png)}"></figure>'


def render_compare(
    experiments: list[Experiment],
    reader: PlotReader,
    conf_dir: Path | None = None,
    title: str = "convnets: every experiment side by side",
) -> str:
    read_environments(experiments, reader)
    columns, rows = leaderboard(experiments, conf_dir)
    ordered = rows_of(experiments)[0]  # the experiments of the rows, in their order (a halving point: its furthest run)
    whole = [{k: _show(e.params[k]) for k in columns if k in e.params} for e in ordered]
    grouped = rows[len(ordered) :]
    charts = "".join(
        f'<figure><img alt="validation {m} of every experiment" '
        f'src="{data_uri(overlay_chart(ordered, reader, m))}"></figure>'
        for m in ("accuracy", "loss")
    )
    groups = "<h2>Same params, different seeds</h2>" + leaderboard_html(columns, grouped, "groups") if grouped else ""
    baselines = sorted({e.baseline for e in experiments if e.baseline})
    env_note = environment_note(experiments)
    env_class = "env-differs" if "environment" in columns else "env-same"
    env_html = f'<p class="{env_class}" id="environment-note">{esc(env_note)}</p>' if env_note else ""
    body = f"""<p class="note">{len(experiments)} experiment(s) of {esc(", ".join(baselines))}, sorted by test accuracy;
only the params that differ among them are shown, a path by its file name and a hash by its first
characters (hover for the whole value). Blanks: a failed experiment, or figures DVC does not have.</p>
{env_html}
<h2>Leaderboard</h2>
{leaderboard_html(columns, rows[: len(ordered)], "leaderboard", whole)}
{groups}
<h2>Validation accuracy and loss</h2>
<div class="grid">{charts}</div>
<h2>Confusion matrices (test)</h2>
<div class="grid3">{"".join(matrix_figure(exp, reader) for exp in ordered)}</div>
"""
    return html_page(title, body, PAGE_STYLE)


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
    write_text(out, render_compare(experiments, PlotReader(repo), conf_dir if conf_dir.is_dir() else None))
    return Path(out)


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

"""What the points of a sweep came to, and the table of them (terminal, Prefect artifact).

No Prefect here: the flows and the CLI build their tables from these records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

from pipeline.grid import Point


class ExperimentsFailed(RuntimeError):
    """Some experiments of a sweep did not come home; `rows` is the whole table."""

    def __init__(self, outcomes: list[Outcome], rows: list[dict[str, str]] | None = None):
        failed = [o for o in outcomes if not o.ok]
        super().__init__(
            f"{len(failed)} experiment(s) failed: " + "; ".join(f"{o.point.name} ({o.status})" for o in failed)
        )
        self.failed = [o.point.name for o in failed]
        self.rows = rows or []


@dataclass(frozen=True)
class Target:
    """Where the points run: which commit of which repository, which DVC remote, which pool."""

    repository: str
    commit: str
    dvc_remote: str | None
    pool: str


@dataclass
class Outcome:
    point: Point
    status: str = "pending"  # done | already done | failed | crashed | no worker | not pushed
    message: str = ""
    figures: dict = field(default_factory=dict)
    host: str = ""
    lock: str = ""  # the uv.lock hash (short) of the environment it ran in
    seconds: float | None = None
    attempts: int = 0
    flow_run_id: UUID | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "already done")


def leaderboard(outcomes: list[Outcome]) -> list[dict[str, str]]:
    """One row per experiment, best test accuracy first; failed ones last with their error.

    The figures lead (as in convnets.compare), then the overrides, shortened: a path to its file
    name, a hash to 8 characters, so that an archive's absolute path and its sha256 do not push
    the test accuracy off the screen. Then the status, the worker.
    """

    def accuracy(outcome: Outcome) -> float:
        value = outcome.figures.get("test_accuracy")
        return value if isinstance(value, (int, float)) else -1.0

    ordered = sorted(outcomes, key=lambda o: (not o.ok, -accuracy(o), o.point.name))
    labels = short_labels([o.point for o in ordered])
    rows = []
    for outcome, label in zip(ordered, labels, strict=True):
        figures = outcome.figures
        best, epochs = figures.get("best_epoch"), figures.get("epochs")
        rows.append(
            {
                "experiment": outcome.point.name,
                "test accuracy": number(figures.get("test_accuracy")),
                "ROC AUC": number(figures.get("roc_auc")),
                "best epoch": f"{best} of {epochs}" if best and epochs else "",
                "wall time": duration(outcome.seconds),
                "overrides": label,
                "status": outcome.status + (f": {first_line(outcome.message)}" if outcome.message else ""),
                "worker": outcome.host,
                "environment": f"uv.lock {outcome.lock}" if outcome.lock else "",
            }
        )
    return rows


def bring_home_command(rows: list[dict[str, str]], git_remote: str) -> str | None:
    """The command that brings the best experiment of the table (its first row, if it is home)
    into a checkout of its commit: outputs and metrics, pulled, then checked out.

    `dvc exp apply NAME && dvc pull` failed there: the sweep pulls the experiments' refs only,
    and `dvc exp apply` deletes the outputs that the cache lacks, then exits 255.
    """
    if not rows or not rows[0]["status"].startswith(("done", "already done")):
        return None
    name = rows[0]["experiment"]
    return f"dvc exp pull {git_remote} {name} && dvc exp apply {name}"


def short_labels(points: Sequence[Point]) -> list[str]:
    """Each point's overrides as `Point.label` gives them, every value shortened alike per key
    (convnets.compare.short_forms: as little as keeps different values different)."""
    from convnets.compare import short_forms

    split = [[override.partition("=") for override in point.overrides] for point in points]
    by_key: dict[str, list[str]] = {}
    for parts in split:
        for key, eq, value in parts:
            if eq:
                by_key.setdefault(key, []).append(value)
    shortened = {key: iter(short_forms(values)) for key, values in by_key.items()}
    return [
        " ".join(key + eq + (next(shortened[key]) if eq else "") for key, eq, _ in parts) or "(defaults)"
        for parts in split
    ]


def first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def text_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no experiments)"
    header = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in header]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(r[h].ljust(w) for h, w in zip(header, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)

"""What the points of a sweep came to, and the one table of them (terminal, Prefect artifact).

The table is compare's leaderboard of the experiments that came home (convnets.compare.board: the
rows compare.html shows) with what only the sweep knows beside it (leaderboard). No Prefect here.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class PointRow:
    """What only the sweep knows of one point (its cells: status, worker, ...), and the experiments
    `dvc exp show` may list it as (a halving point: one per rung); `name` heads its row when none came home."""

    name: str
    experiments: tuple[str, ...]
    cells: dict[str, str]


def point_rows(outcomes: list[Outcome]) -> list[PointRow]:
    """A plain sweep's points: each one experiment, if it came home."""
    return [PointRow(o.point.name, (o.point.name,) if o.ok else (), sweep_cells(o)) for o in outcomes]


def sweep_cells(outcome: Outcome | None) -> dict[str, str]:
    """The run's cells of its point's row: how it ended, where, after how many tries, how long it took."""
    if outcome is None:
        return {"status": "not run", "worker": "", "attempts": "", "wall time": ""}
    return {
        "status": outcome.status + (f": {first_line(outcome.message)}" if outcome.message else ""),
        "worker": outcome.host,
        "attempts": str(outcome.attempts),
        "wall time": duration(outcome.seconds),
    }


def leaderboard(columns: list[str], compared: list[dict[str, str]], points: list[PointRow]) -> list[dict[str, str]]:
    """The one leaderboard of a sweep: compare's rows for its experiments (convnets.compare.board, what
    compare.html shows), each with its point's cells, then a row for each point that has no experiment.

    A row of compare's that is no point's (a group of seeds) gets blank cells.
    """
    extra = list(dict.fromkeys(cell for point in points for cell in point.cells if cell not in columns))
    blank = dict.fromkeys([*columns, *extra], "")
    by_experiment = {name: point for point in points for name in point.experiments}
    rows, shown = [], set()
    for row in compared:
        point = by_experiment.get(row.get("experiment", ""))
        rows.append({**blank, **row, **(point.cells if point else {})})
        shown.add(point.name if point else None)
    rows += [{**blank, "experiment": p.name, **p.cells} for p in points if p.name not in shown]
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
    """The rows as the terminal shows them: aligned columns, the cells as they are (no number parsing)."""
    from tabulate import tabulate

    if not rows:
        return "(no experiments)"
    return tabulate(rows, headers="keys", tablefmt="plain", disable_numparse=True)

"""A successive-halving sweep: its rungs run as sweeps of their own, every run a DVC experiment.

Rung k of a point is the point with `train.stop_at_epoch=<epochs of rung k>`, named
`<point>-e<epochs>` (so `dvc exp show` lists a point's rungs side by side); the last rung
is the plain point, with the name and overrides a plain sweep gives it, so its result is
that sweep's experiment. Each rung is run by `run_rung` (pipeline.sweep.run_points in the
flow): points already home are not run again, so a halving sweep run again after an
interruption goes on at the first rung that is not done. A promoted point's run finds its
own training state on the mirror beside the DVC remote and trains only the epochs between
two rungs (convnets.train, train.stop_at_epoch); the state of a point that is out is removed
from the mirror at the end. pipeline.halving decides who goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline import halving
from pipeline.grid import Point
from pipeline.results import Outcome, PointRow, number, sweep_cells


@dataclass
class PointRecord:
    """How far one point of the grid went."""

    point: Point
    rung: int = 0  # the last rung it ran (0-based)
    rank: int | None = None  # its place at that rung (1 = best)
    of: int = 0  # how many points ran that rung
    outcome: Outcome | None = None  # its run at that rung


@dataclass
class HalvingResult:
    records: list[PointRecord]
    rung_epochs: list[int]
    decisions: list[list[dict[str, str]]] = field(default_factory=list)  # each rung's ranking
    runs: list[Outcome] = field(default_factory=list)  # every rung's runs, each a DVC experiment

    def epochs_trained(self) -> int:
        """Epochs trained in all: a point continued from its checkpoint trains each epoch once."""
        return sum(self.rung_epochs[record.rung] for record in self.records if record.outcome is not None)

    def closing_line(self) -> str:
        return halving.closing_line(self.epochs_trained(), len(self.records), self.rung_epochs[-1])


def rung_epochs(full_epochs: int, eta: int, min_epochs: int = 1) -> list[int]:
    return halving.rung_epochs(full_epochs, eta, min_epochs)


def rung_point(point: Point, epochs: int, full: int) -> Point:
    """The point as rung `epochs` runs it: stopped there, and named so; the last rung is the point itself."""
    if epochs == full:
        return point
    return Point((*point.overrides, f"train.stop_at_epoch={epochs}"), f"{point.name}-e{epochs}")


def run_halving(
    points: Sequence[Point],
    full_epochs: int,
    eta: int,
    run_rung: Callable[[list[Point], dict[str, Point]], list[Outcome]],
    log: Callable[[str], None],
    min_epochs: int = 1,
    metric: str = halving.DEFAULT_METRIC,
) -> HalvingResult:
    """Run the rungs; `run_rung(rung points, {rung point name: its point})` runs one and returns its outcomes."""
    epochs_of = halving.rung_epochs(full_epochs, eta, min_epochs)
    records = {point.name: PointRecord(point) for point in points}
    result = HalvingResult(list(records.values()), epochs_of)
    alive = list(points)
    for index, epochs in enumerate(epochs_of):
        rung = {rung_point(point, epochs, full_epochs).name: point for point in alive}
        log(f"rung {index + 1} of {len(epochs_of)}: {len(alive)} point(s) to epoch {epochs} of {full_epochs}")
        outcomes = run_rung([rung_point(point, epochs, full_epochs) for point in alive], rung)
        result.runs += outcomes
        standings = record_rung(records, outcomes, rung, index, metric)
        if epochs == full_epochs:
            result.decisions.append(decision_rows(standings, [], metric, index, epochs))
            break
        promoted = halving.promote(standings, eta, metric)
        result.decisions.append(decision_rows(standings, promoted, metric, index, epochs))
        log(
            f"rung {index + 1}: {', '.join(promoted) or 'none'} go on by {metric}; out: "
            + (", ".join(s.name for s in standings if s.name not in promoted) or "none")
        )
        alive = [records[name].point for name in promoted]
        if not alive:
            break
    return result


def record_rung(
    records: dict[str, PointRecord], outcomes: list[Outcome], rung: dict[str, Point], index: int, metric: str
) -> list[halving.Standing]:
    """Each point's standing at this rung (a failed run has none), kept in its record."""
    standings = []
    for outcome in outcomes:
        point = rung[outcome.point.name]
        figure = outcome.figures.get(metric) if outcome.ok else None
        standings.append(halving.Standing(point.name, figure if isinstance(figure, (int, float)) else None))
        record = records[point.name]
        record.rung, record.outcome = index, outcome
    ranked = halving.rank(standings, metric)
    for place, standing in enumerate(ranked, start=1):
        records[standing.name].rank, records[standing.name].of = place, len(ranked)
    return standings


def decision_rows(
    standings: list[halving.Standing], promoted: list[str], metric: str, index: int, epochs: int
) -> list[dict[str, str]]:
    """A rung's ranking and what became of each point, for its Prefect artifact (no promotions: the last rung)."""
    rows = []
    for place, standing in enumerate(halving.rank(standings, metric), start=1):
        if standing.figure is None:
            verdict = "failed"
        elif promoted:
            verdict = "goes on" if standing.name in promoted else "out"
        else:
            verdict = "finished"
        rows.append(
            {
                "rung": str(index + 1),
                "epochs": str(epochs),
                "rank": str(place),
                "point": standing.name,
                metric: number(standing.figure),
                "decision": verdict,
            }
        )
    return rows


def point_rows(result: HalvingResult) -> list[PointRow]:
    """Each point's cells for the leaderboard (results.leaderboard): how far it trained ("epochs",
    which closing_line_of counts) and its last run's status; its experiments are its runs that came home."""
    full = result.rung_epochs[-1]
    home = {outcome.point.name for outcome in result.runs if outcome.ok}
    rows = []
    for record in result.records:
        outcome = record.outcome
        runs = tuple(
            name for epochs in result.rung_epochs if (name := rung_point(record.point, epochs, full).name) in home
        )
        trained = result.rung_epochs[record.rung] if outcome else 0
        cells = {"epochs": f"{trained} of {full}", **sweep_cells(outcome)}
        rows.append(PointRow(outcome.point.name if outcome else record.point.name, runs, cells))
    return rows


def eliminated_states(result: HalvingResult) -> list[str]:
    """The training states (convnets.resume folder names) that points which are out left on the mirror."""
    last = len(result.rung_epochs) - 1
    return [
        record.outcome.figures["state"]
        for record in result.records
        if record.rung < last and record.outcome is not None and record.outcome.figures.get("state")
    ]


def remove_states(mirror_url: str, states: Sequence[str], log: Callable[[str], None]) -> None:
    """Remove these training states from the mirror (a worker's own cache keeps a copy until it is cleaned)."""
    if not states:
        return
    from fsspec.core import url_to_fs

    fs, base = url_to_fs(mirror_url)
    for state in states:
        path = f"{base.rstrip('/')}/{state}"
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except OSError as exc:  # the results are home: a state left behind costs disk, not a result
            log(f"could not remove the training state {state} from {mirror_url}: {exc}")
    log(f"removed the training state of {len(states)} point(s) that are out, from {mirror_url}")


def closing_line_of(rows: Sequence[dict[str, str]]) -> str | None:
    """The closing line from a halving sweep's leaderboard ("epochs": "E of N"); None for a plain sweep's."""
    counts = [row["epochs"].split(" of ") for row in rows if row.get("epochs")]  # a seed group's row has none
    if not counts:
        return None
    return halving.closing_line(sum(int(done) for done, _ in counts), len(counts), int(counts[0][1]))

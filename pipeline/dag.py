"""The stage graph as DVC reports it (`dvc dag --dot`), and which stages a run goes through.

The order is never written down here: it comes from dvc.yaml through DVC, so a stage
added to dvc.yaml is picked up by the flows as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.dvc import check_dvc

QUOTED = r'"((?:[^"\\]|\\.)*)"'
NODE = re.compile(rf"^\s*{QUOTED};?\s*$")
EDGE = re.compile(rf"^\s*{QUOTED}\s*->\s*{QUOTED};?\s*$")


class UnknownStage(ValueError):
    """A stage asked for by name is not in the pipeline."""


@dataclass(frozen=True)
class StageGraph:
    order: tuple[str, ...]  # dependencies first; ties in dvc.yaml order
    edges: frozenset[tuple[str, str]]  # (upstream, downstream)

    def predecessors(self, stage: str) -> list[str]:
        """Stages whose outputs `stage` reads directly, in run order."""
        self.check(stage)
        return [s for s in self.order if (s, stage) in self.edges]

    def ancestors(self, stage: str) -> set[str]:
        found: set[str] = set()
        todo = [stage]
        while todo:
            for up in self.predecessors(todo.pop()):
                if up not in found:
                    found.add(up)
                    todo.append(up)
        return found

    def plan(self, targets: Iterable[str] | None = None, single_item: bool = False) -> list[str]:
        """Stages to run, in order: all of them, or `targets` and (unless single_item) their upstream.

        Like `dvc repro <targets>`: upstream stages are included and DVC skips those that
        are up to date.
        """
        targets = list(targets or [])
        if not targets:
            return list(self.order)
        for stage in targets:
            self.check(stage)
        wanted = set(targets)
        if not single_item:
            for stage in targets:
                wanted |= self.ancestors(stage)
        return [s for s in self.order if s in wanted]

    def check(self, stage: str) -> None:
        if stage not in self.order:
            raise UnknownStage(f"unknown stage {stage!r}; dvc.yaml has: {', '.join(self.order)}")


def parse_dot(text: str) -> StageGraph:
    """Read the graph from `dvc dag --dot` output."""
    nodes: list[str] = []
    edges: set[tuple[str, str]] = set()

    def add(node: str) -> str:
        node = node.replace('\\"', '"')
        if node not in nodes:
            nodes.append(node)
        return node

    for line in text.splitlines():
        if match := EDGE.match(line):
            edges.add((add(match.group(1)), add(match.group(2))))
        elif match := NODE.match(line):
            add(match.group(1))
    return StageGraph(topological_order(nodes, edges), frozenset(edges))


def topological_order(nodes: list[str], edges: set[tuple[str, str]]) -> tuple[str, ...]:
    """Kahn's algorithm, always taking the earliest ready node so ties keep dvc.yaml order."""
    pending = {node: {up for up, down in edges if down == node} for node in nodes}
    order: list[str] = []
    while pending:
        ready = [node for node in nodes if node in pending and not pending[node]]
        if not ready:
            raise ValueError(f"the stage graph has a cycle among: {', '.join(pending)}")
        order.append(ready[0])
        del pending[ready[0]]
        for ups in pending.values():
            ups.discard(ready[0])
    return tuple(order)


def read_stage_graph(project: Path) -> StageGraph:
    """The project's stages, in the order DVC would run them."""
    run = check_dvc(project, ["dag", "--dot"], keep=None)
    graph = parse_dot("\n".join(run.tail))
    if not graph.order:
        raise ValueError(f"`dvc dag` found no stages in {project}; is dvc.yaml there?")
    return graph

"""Progress bars that show on a terminal and stay out of logs and CI."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "img") -> Iterator[T]:
    # disable=None turns the bar off when stderr is not a TTY (DVC logs, CI, Prefect workers).
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=None, leave=False))

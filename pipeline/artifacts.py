"""What the flow shows in the Prefect UI: metrics against the baseline, params changed, plots.

Pure functions from DVC's JSON and the report folder to table rows and markdown; the
tasks in pipeline.tasks publish them.
"""

from __future__ import annotations

import base64
from pathlib import Path

# Prefect stores artifacts in its database: leave out anything this big (the HTML report
# stays in data/report/ for that).
MAX_IMAGE_BYTES = 2_000_000


def metrics_rows(diff: dict) -> list[dict[str, str]]:
    """Rows of `dvc metrics diff --all --json`: file, metric, baseline, this run, change."""
    rows = []
    for path in sorted(diff):
        for name in sorted(diff[path]):
            entry = diff[path][name]
            rows.append(
                {
                    "file": path,
                    "metric": name,
                    "baseline": show(entry.get("old")),
                    "this run": show(entry.get("new")),
                    "change": show(entry.get("diff")),
                }
            )
    return rows


def params_rows(diff: dict) -> list[dict[str, str]]:
    """Rows of `dvc params diff --json` (only changed params): param, baseline, this run."""
    return [
        {
            "param": name if path == "params.yaml" else f"{path}:{name}",
            "baseline": show(entry.get("old")),
            "this run": show(entry.get("new")),
        }
        for path in sorted(diff)
        for name, entry in sorted(diff[path].items())
    ]


def show(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, str]]) -> str:
    # By hand, not tabulate: tabulate leaves a `|` in a cell unescaped (it would end the cell), so
    # the escaping stays here anyway, and it pads every cell to its column's width, which markdown needn't.
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[key].replace("|", "\\|") for key in header) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report_dir: Path, baseline: str, params: list[dict[str, str]]) -> str:
    """The report's PNGs inlined as base64 images (image artifacts only take public URLs)."""
    parts = [f"# Pipeline report\n\nBaseline: {baseline}\n"]
    if params:
        parts.append("## Params changed against the baseline\n\n" + markdown_table(params) + "\n")
    else:
        parts.append("Params: as in the baseline.\n")
    images = sorted(report_dir.glob("*.png"))
    if not images:
        parts.append(f"No plots in {report_dir}.\n")
    for image in images:
        title = image.stem.replace("_", " ")
        size = image.stat().st_size
        if size > MAX_IMAGE_BYTES:
            parts.append(f"## {title}\n\n{image.name} is {size:,} bytes; open it from {report_dir}.\n")
            continue
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        parts.append(f"## {title}\n\n![{title}](data:image/png;base64,{data})\n")
    return "\n".join(parts)

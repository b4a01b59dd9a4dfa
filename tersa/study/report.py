"""What a study writes: results.csv (rewritten atomically), results.md and pareto.png.

Rows are dicts of text, as csv reads them back, so a resumed study reports old and new rows alike.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from tersa.study.grid import CELL_COLUMNS
from tersa.study.schema import LOWER_IS_BETTER

STATUS_COLUMNS = ("status", "error", "wall_s")
Row = dict[str, str]


def columns(rows: Sequence[Row]) -> list[str]:
    """Cell fields, then status/error/wall_s, then every metric any row has, sorted."""
    fixed = (*CELL_COLUMNS, *STATUS_COLUMNS)
    metrics = sorted({k for row in rows for k in row} - set(fixed))
    return [*fixed, *metrics]


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """Replace ``path`` in one step: a reader (or a crash) sees the old file or the new one."""
    with _atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[Row]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [
            c for c in (*CELL_COLUMNS, *STATUS_COLUMNS) if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        return [{k: v for k, v in row.items() if v is not None} for row in reader]


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temp file next to ``path`` that replaces it when the block succeeds."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(name)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def number(text: str | None) -> float | None:
    """The value of a numeric cell, or None (empty, text, NaN)."""
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def shown(text: str) -> str:
    """A metric as people read it: integers as they are, other numbers to 4 significant digits."""
    if text.lstrip("-").isdigit():
        return text
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def write_markdown(rows: Sequence[Row], path: Path, title: str = "study") -> None:
    """One table per (model, quant), in the order the rows come; errors keep their message."""
    lines = [f"# {title}", ""]
    for (model, quant), group in _groups(rows).items():
        metrics = [c for c in columns(group) if c not in (*CELL_COLUMNS, *STATUS_COLUMNS)]
        cols = ["policy", "budget", "context", "status", *metrics, "wall_s"]
        if any(r.get("options", "{}") != "{}" for r in group):
            cols.insert(1, "options")
        if any(r.get("status") != "ok" for r in group):
            cols.append("error")
        lines += [f"## {model} · {quant}", "", _md_row(cols), _md_row(["---"] * len(cols))]
        lines += [_md_row([_md_value(r, c) for c in cols]) for r in group]
        lines.append("")
    with _atomic(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")


def _md_value(row: Row, column: str) -> str:
    text = row.get(column, "")
    if column == "options":
        return "" if text == "{}" else text
    return text if column in (*CELL_COLUMNS, "status", "error") else shown(text)


def _groups(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["quant"]), []).append(row)
    return groups


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (x minimised, y maximised), by ascending x.

    A point is beaten by one at least as good on both axes and better on one; equal points do
    not beat each other, so duplicates on the front are all kept.
    """

    def beaten(i: int) -> bool:
        xi, yi = points[i]
        return any(x <= xi and y >= yi and (x, y) != (xi, yi) for x, y in points)

    front = [i for i in range(len(points)) if not beaten(i)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plotted_points(rows: Sequence[Row], x: str, y: str) -> list[tuple[Row, float, float]]:
    """(row, x, y) of each ok row that has finite values for both axes."""
    return [
        (row, vx, vy)
        for row in rows
        if row.get("status") == "ok"
        and (vx := number(row.get(x))) is not None
        and (vy := number(row.get(y))) is not None
    ]


def front_indices(points: Sequence[tuple[Row, float, float]], x: str, y: str) -> list[int]:
    """The Pareto front of plotted points, each axis in its own sense (``ppl`` and ``kv_*``
    are better low, ``*_exact`` high)."""
    sx = 1 if x in LOWER_IS_BETTER else -1
    sy = -1 if y in LOWER_IS_BETTER else 1
    return pareto_front([(sx * vx, sy * vy) for _, vx, vy in points])


def plot_pareto(rows: Sequence[Row], x: str, y: str, path: Path, title: str = "study") -> bool:
    """Scatter the ok rows (colour: policy, marker: model · quant) and draw their Pareto front.

    Returns False (and writes nothing) when no ok row has both values.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.lines import Line2D

    points = plotted_points(rows, x, y)
    if not points:
        return False
    colour = _palette([_policy_label(r) for r, _, _ in points], _COLOURS)
    marker = _palette([_build_label(r) for r, _, _ in points], _MARKERS)
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    for row, vx, vy in points:
        ax.scatter(vx, vy, color=colour[_policy_label(row)], marker=marker[_build_label(row)], s=36)
    front = front_indices(points, x, y)
    fx, fy = [points[i][1] for i in front], [points[i][2] for i in front]
    ax.plot(fx, fy, color="black", linewidth=1, zorder=1)
    ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
    handles = [Line2D([], [], color="black", marker="o", mfc="none", ms=10, label="Pareto front")]
    handles += [Line2D([], [], ls="", marker="o", color=c, label=k) for k, c in colour.items()]
    handles += [Line2D([], [], ls="", marker=m, color="grey", label=k) for k, m in marker.items()]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    ax.set_xlabel(_axis_label(x))
    ax.set_ylabel(_axis_label(y))
    ax.set_title(f"{title}: {y} vs {x}")
    ax.grid(alpha=0.3)
    with _atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return True


_COLOURS = [f"C{i}" for i in range(10)]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def _palette(keys: list[str], styles: list[str]) -> dict[str, str]:
    """One style per distinct key, in first-seen order (cycling when there are more keys)."""
    return {k: styles[i % len(styles)] for i, k in enumerate(dict.fromkeys(keys))}


def _policy_label(row: Row) -> str:
    """``quest(page=16)``: the policy with its options, for tables and legends."""
    try:
        options = json.loads(row.get("options") or "{}")
    except ValueError:  # a hand-edited CSV: show what is there
        return f"{row['policy']} {row.get('options')}"
    inner = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{row['policy']}({inner})" if inner else row["policy"]


def _build_label(row: Row) -> str:
    return f"{row['model']} · {row['quant']}"


def _axis_label(metric: str) -> str:
    return f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)"


def summary_table(rows: Sequence[Row], x: str, y: str, title: str) -> Table:
    """One line per cell: what it is, its plot metrics and its status (errors: the message)."""
    table = Table(title=title)
    for col in ("model", "quant", "policy", "budget", "context", x, y, "status"):
        table.add_column(col, justify="right" if col in ("budget", "context", x, y) else "left")
    for r in rows:
        ok = r.get("status") == "ok"
        status = "ok" if ok else f"[red]error[/red] {escape(r.get('error', ''))}"
        metrics = [shown(r.get(x, "")), shown(r.get(y, ""))] if ok else ["", ""]
        cell = [r["model"], r["quant"], _policy_label(r), r["budget"], r["context"]]
        table.add_row(*(escape(c) for c in cell), *metrics, status)
    return table

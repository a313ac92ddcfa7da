"""Plots people look at: training curves from the runs' ``log.csv`` files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence, Union

from maetok.errors import DataError

PathLike = Union[str, Path]


def read_log(path: PathLike) -> list[dict[str, float]]:
    """Rows of a run's ``log.csv`` as floats (empty cells dropped)."""
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_training_curves(
    runs: dict[str, PathLike],
    path: PathLike,
    keys: Sequence[str] = ("loss", "mse", "eval_psnr"),
    step_offsets: Optional[dict[str, int]] = None,
) -> Path:
    """One panel per key present in any log, one line per run (labelled by the dict keys).
    ``step_offsets`` shifts a run's steps, e.g. to draw stage 2 after stage 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {label: read_log(p) for label, p in runs.items()}
    present = [k for k in keys if any(k in row for rows in logs.values() for row in rows)]
    if not present:
        raise DataError(f"none of the keys {list(keys)} appear in the logs {list(runs.values())}")
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
    for ax, key in zip(axes[0], present):
        for label, rows in logs.items():
            offset = (step_offsets or {}).get(label, 0)
            points = [(r["step"] + offset, r[key]) for r in rows if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key in ("loss", "mse") and all(v > 0 for rows in logs.values() for r in rows for k, v in r.items() if k == key):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_labelled_scatter(
    points: dict[str, tuple[float, float]], path: PathLike, xlabel: str, ylabel: str, title: str = ""
) -> Path:
    """One labelled point per entry of ``points`` (``{name: (x, y)}``), e.g. gFID vs linear-probe accuracy."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    if not points:
        raise ValueError("plot_labelled_scatter: no points")
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path

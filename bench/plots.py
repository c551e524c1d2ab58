"""Small matplotlib helpers (Agg backend: benchmarks run headless) shared by the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import RESULTS_DIR

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# One colour per peer in every panel and every benchmark.
_COLORS = {name: f"C{i}" for i, name in enumerate([
    "pagechat", "pagechat-no-prefix-cache", "hf-generate", "hf-generate-cache", "hf-continuous",
    "transformers-serve",
])}


def color(name: str) -> str:
    """The peer's colour; "name p99" and the like share the colour of "name"."""
    base = name.split(" ")[0]
    return _COLORS.setdefault(base, f"C{len(_COLORS) % 10}")


def figure(rows: int, cols: int, title: str,
           size: tuple[float, float] | None = None) -> tuple[Figure, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size or (6.4 * cols, 4.2 * rows), squeeze=False)
    fig.suptitle(title, fontsize=11)
    return fig, axes


def lines(ax: Axes, x: list, series: dict[str, list], title: str, ylabel: str, xlabel: str,
          log: bool = False) -> None:
    """One line per peer; None values are left out."""
    for name, ys in series.items():
        points = [(a, b) for a, b in zip(x, ys) if b is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name, color=color(name),
                    linestyle="--" if name.endswith(" p99") else "-")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if all(isinstance(v, int) for v in x):
        ax.set_xticks(x)
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def bars(ax: Axes, groups: list[str], series: dict[str, list], title: str, ylabel: str,
         log: bool = False, labels: bool = True) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per series (None = no bar)."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, ys) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        drawn = ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=name, color=color(name))
        if labels:
            ax.bar_label(drawn, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def save(fig: Figure, name: str, out_dir: Path | None = None) -> Path:
    import matplotlib.pyplot as plt

    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

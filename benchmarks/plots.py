"""Speedup-vs-sparsity figures of the conv and model benchmarks (PNG, drawn from measured rows
only). matplotlib is imported lazily and without a display."""
from __future__ import annotations

from pathlib import Path


def speedup_plot(path: Path, title: str, panels: dict[str, dict[str, list[tuple]]],
                 ideal: dict[str, list[tuple]] | None = None) -> Path:
    """One panel per key of `panels`, each a {series label: [(sparsity, speedup), ...]} line
    plot; `ideal` (optional, per panel: a list of points or {label: points}) is drawn dashed.
    Returns the written path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items()):
        for label, points in series.items():
            points = sorted(points)
            ax.plot([100 * s for s, _ in points], [v for _, v in points], marker="o",
                    label=label)
        lines = (ideal or {}).get(name) or {}
        if not isinstance(lines, dict):
            lines = {"ideal": lines}
        for label, points in lines.items():
            points = sorted(points)
            ax.plot([100 * s for s, _ in points], [v for _, v in points], "--", lw=1,
                    marker="_", markersize=14, label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("speedup vs dense (x)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

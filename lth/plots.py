"""PNG plots of a run (matplotlib, Agg backend): accuracy vs sparsity with one line per
method/branch, and training-step time vs sparsity (dense-masked vs sparse)."""
from __future__ import annotations

import os
import warnings


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install matplotlib): no plots written",
                      RuntimeWarning, stacklevel=3)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _by_line(entries):
    lines: dict[str, list[dict]] = {}
    dense = [e for e in entries if e["round"] == 0 and e["branch"] == "ticket"]
    for e in entries:
        label = e["method"] if e["branch"] == "ticket" else e["branch"]
        lines.setdefault(label, []).append(e)
    for label, es in lines.items():  # branches start from the dense point, like the ticket
        if dense and es[0]["branch"] != "ticket":
            lines[label] = dense + es
        lines[label] = sorted(lines[label], key=lambda e: e["sparsity"])
    return lines


def plot_run(run_dir: str, entries: list[dict]) -> list[str]:
    """Writes <run_dir>/plots/*.png; returns their paths (none without matplotlib)."""
    plt = _pyplot()
    if plt is None or not entries:
        return []
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, es in _by_line(entries).items():
        ax.plot([100 * e["sparsity"] for e in es], [100 * e["test_acc"] for e in es],
                marker="o", label=label)
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy vs sparsity: {os.path.basename(os.path.normpath(run_dir))}")
    paths.append(_save(fig, ax, os.path.join(out_dir, "accuracy_vs_sparsity.png")))

    paths.append(plot_step_times(
        [e for e in entries if e["branch"] == "ticket"],
        os.path.join(out_dir, "step_time_vs_sparsity.png"),
        "training step time vs sparsity (each round timed by the process that trained it)"))
    return paths


def plot_step_times(entries: list[dict], path: str, title: str) -> str | None:
    """Training-step time vs sparsity (summary entries or rows of lth.report --time: their
    step_ms_dense / step_ms_sparse, and step_ms_unmasked where every entry has it); None
    without matplotlib."""
    plt = _pyplot()
    if plt is None or not entries:
        return None
    entries = sorted(entries, key=lambda e: e["sparsity"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [100 * e["sparsity"] for e in entries]
    ax.plot(xs, [e["step_ms_dense"] for e in entries], marker="o", label="dense (masked)")
    ax.plot(xs, [e["step_ms_sparse"] for e in entries], marker="o", label="sparse (sparsekern)")
    if all(e.get("step_ms_unmasked") is not None for e in entries):
        ax.plot(xs, [e["step_ms_unmasked"] for e in entries], marker=".", linestyle=":",
                label="dense (unmasked parent)")
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_yscale("log")
    ax.set_ylabel("training step (ms, median, log scale)")
    ax.set_title(title)
    return _save(fig, ax, path)


def plot_comparison(rows: list[dict], path: str) -> str | None:
    """Accuracy vs sparsity of several runs (rows of lth.report.compare), one line per
    configuration and method/branch, error bars over the seeds; None without matplotlib."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(f"{r['config']}: {r['line']}", []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["sparsity"])
        ax.errorbar([100 * r["sparsity"] for r in rs], [100 * r["test_acc"] for r in rs],
                    yerr=[100 * r["test_acc_std"] for r in rs], marker="o", capsize=3,
                    label=label)
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel("test accuracy (%, mean over seeds)")
    ax.set_title("accuracy vs sparsity")
    return _save(fig, ax, path)


def _save(fig, ax, path: str) -> str:
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # The folder may not exist yet: lth.report --time on a run killed before its plots.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path

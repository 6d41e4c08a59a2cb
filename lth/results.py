"""summary.json / summary.csv of a run and the table `python -m lth.train` ends with.

summary.json is a list with one entry per round/branch (see DESIGN.md): round, branch, method,
sparsity (fraction of prunable weights removed), test_acc, epochs, and the median time of one
training step (forward, backward, optimizer step) of the whole model, measured interleaved in the
training process on one batch:
  step_ms_dense           every pruned layer masked-dense (how mask-based LTH code trains)
  step_ms_sparse          the model as this round trains it: sparsekern kernels where the auto
                          policy chose them (masked-dense when the whole step was not faster)
  step_ms_sparse_kernels  the model with the auto policy's per-layer choices, before that check
  step_ms_unmasked        the dense parent without masks
  speedup = step_ms_dense / step_ms_sparse
"""
from __future__ import annotations

import csv
import io
import os

from lth.checkpoint import write_json, write_text

CSV_COLUMNS = ["round", "branch", "method", "sparsity", "test_acc", "best_test_acc", "train_acc",
               "epochs", "steps", "rewind", "step_ms_dense", "step_ms_sparse",
               "step_ms_unmasked", "step_ms_sparse_kernels", "speedup", "sparse_layers", "wall_s",
               "device", "autocast"]


def write_summary(run_dir: str, entries: list[dict]) -> None:
    write_json(entries, os.path.join(run_dir, "summary.json"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for e in entries:
        writer.writerow({k: e.get(k) for k in CSV_COLUMNS})
    write_text(buf.getvalue(), os.path.join(run_dir, "summary.csv"))


def format_table(entries: list[dict]) -> str:
    head = (f"{'round':>5}  {'branch':<14} {'sparsity':>8}  {'test acc':>8}  {'epochs':>6}  "
            f"{'dense ms':>8}  {'sparse ms':>9}  {'speedup':>7}  {'sparse layers':>13}")
    lines = [head, "-" * len(head)]
    for e in entries:
        lines.append(
            f"{e['round']:>5}  {e['branch']:<14} {100 * e['sparsity']:>7.1f}%  "
            f"{100 * e['test_acc']:>7.2f}%  {e['epochs']:>6.3g}  {e['step_ms_dense']:>8.2f}  "
            f"{e['step_ms_sparse']:>9.2f}  {e['speedup']:>6.2f}x  {e['sparse_layers']:>13}")
    return "\n".join(lines)

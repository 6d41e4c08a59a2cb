"""`python -m lth.report RUN_DIR`: is each ticket a winning ticket?

The rigorous definition (Frankle & Carbin; Ma et al. 2021): a ticket at a sparsity is winning
when it reaches the dense network's accuracy within its epoch budget (up to --tolerance) AND
beats the best random baseline trained with the same budget (random_reinit, random_ticket,
shuffled) by at least --margin. Both numbers are shown; a sparsity without a baseline gets no
verdict. Prints the table and saves report.txt / report.json in the run dir.
"""
from __future__ import annotations

import argparse
import os
import sys

from lth.checkpoint import read_json, write_json, write_text

TOLERANCE = 0.01
MARGIN = 0.005


def verdicts(entries: list[dict], tolerance: float = TOLERANCE, margin: float = MARGIN,
             metric: str = "test_acc") -> list[dict]:
    dense = [e for e in entries if e["round"] == 0 and e["branch"] == "ticket"]
    if not dense:
        raise ValueError("no dense round 0 in this run's summary")
    dense_acc = dense[0][metric]
    rows = []
    for t in sorted((e for e in entries if e["branch"] == "ticket" and e["round"] > 0),
                    key=lambda e: e["round"]):
        baselines = {e["branch"]: e[metric] for e in entries
                     if e["round"] == t["round"] and e["branch"] != "ticket"}
        best = max(baselines.items(), key=lambda kv: kv[1]) if baselines else None
        reaches = t[metric] >= dense_acc - tolerance
        if best is None:
            verdict = "no baseline" if reaches else "not winning (below dense)"
        elif not reaches:
            verdict = "not winning (below dense)"
        elif t[metric] >= best[1] + margin:
            verdict = "WINNING"
        else:
            verdict = "not winning (random baseline as good)"
        rows.append({"round": t["round"], "sparsity": t["sparsity"], "ticket_acc": t[metric],
                     "dense_acc": dense_acc, "gap_to_dense": t[metric] - dense_acc,
                     "best_baseline": best[0] if best else None,
                     "best_baseline_acc": best[1] if best else None,
                     "margin_over_baseline": t[metric] - best[1] if best else None,
                     "baselines": baselines, "reaches_dense": reaches, "verdict": verdict,
                     "tolerance": tolerance, "margin": margin, "metric": metric})
    return rows


def report_text(rows: list[dict]) -> str:
    if not rows:
        return "no pruned rounds: nothing to judge"
    r0 = rows[0]
    lines = [f"winning-ticket verdict ({r0['metric']}; reach dense {100 * r0['dense_acc']:.2f}% "
             f"within {100 * r0['tolerance']:.2f} pts AND beat the best random baseline by "
             f">= {100 * r0['margin']:.2f} pts)",
             f"{'round':>5}  {'sparsity':>8}  {'ticket':>7}  {'vs dense':>8}  "
             f"{'best baseline':<24} {'ticket - baseline':>17}  verdict"]
    for r in rows:
        base = (f"{r['best_baseline']} {100 * r['best_baseline_acc']:.2f}%"
                if r["best_baseline"] else "-")
        diff = (f"{100 * r['margin_over_baseline']:+.2f} pts" if r["best_baseline"] else "-")
        lines.append(f"{r['round']:>5}  {100 * r['sparsity']:>7.1f}%  "
                     f"{100 * r['ticket_acc']:>6.2f}%  {100 * r['gap_to_dense']:>+7.2f}   "
                     f"{base:<24} {diff:>17}  {r['verdict']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lth.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder written by python -m lth.train")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"how far below dense accuracy a ticket may be and still 'reach' "
                        f"it, as a fraction (default: {TOLERANCE} = 1 point)")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help=f"how far a ticket must beat the best random baseline, as a "
                        f"fraction (default: {MARGIN})")
    parser.add_argument("--metric", choices=("test_acc", "best_test_acc"), default="test_acc",
                        help="final test accuracy of each phase, or its best over the epochs "
                        "(default: test_acc)")
    args = parser.parse_args(argv)
    path = os.path.join(args.run_dir, "summary.json")
    if not os.path.isfile(path):
        parser.error(f"{path} not found: is {args.run_dir} a run folder of python -m lth.train?")
    if args.tolerance < 0 or args.margin < 0:
        parser.error("--tolerance and --margin must be >= 0")
    rows = verdicts(read_json(path), args.tolerance, args.margin, args.metric)
    text = report_text(rows)
    print(text)
    write_text(text + "\n", os.path.join(args.run_dir, "report.txt"))
    write_json(rows, os.path.join(args.run_dir, "report.json"))
    print(f"\nsaved {os.path.join(args.run_dir, 'report.txt')} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

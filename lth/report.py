"""`python -m lth.report RUN_DIR`: is each ticket a winning ticket?

The rigorous definition (Frankle & Carbin; Ma et al. 2021): a ticket at a sparsity is winning
when it reaches the dense network's accuracy within its epoch budget (up to --tolerance) AND
beats the best random baseline trained with the same budget (random_reinit, random_ticket,
shuffled) by at least --margin. Both numbers are shown; a sparsity without a baseline gets no
verdict, and neither does a ticket whose masks join no output to the input (`signal_outputs` 0
in its summary entry, lth.pruning.signal; entries written before that field: a layer pruned
entirely): it trains a constant function, its accuracy is no result, and such a baseline is left
out too.
Prints the table and saves report.txt / report.json in the run dir.

`python -m lth.report RUN_DIR RUN_DIR ...` compares runs instead: runs whose settings differ
only in --seed are one configuration (mean and standard deviation over the seeds), and every
ticket round and branch of every configuration is a row with its accuracy, sparsity and the
measured sparse / dense-masked step time, overlaid in one accuracy-vs-sparsity plot
(comparison.txt / .json / .png in --out).

`python -m lth.report --time RUN_DIR` gives the run's speed table from one process: every
finished round's final model (dense-masked and as it trained, plus the unmasked parent) is
rebuilt from its checkpoint and timed again, all interleaved in this process, so a resume or a
busy moment during one round cannot skew the speedup column; the figures each round measured
while it trained are shown beside them (timing.txt / timing.json and
plots/step_time_one_process.png in the run dir).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

from lth import run_files
from lth.checkpoint import read_json, write_json, write_text

TOLERANCE = 0.01
MARGIN = 0.005


class RunFileError(Exception):
    """A run folder's file this report cannot use; one line says which and what to do."""


def read_run_json(path: str, check):
    """A run folder's JSON file, its content checked (lth.run_files). A file that is missing,
    unreadable or holds something else is a RunFileError: rerunning the run's own command
    writes summary.json and config.json again."""
    try:
        return run_files.read(read_json, path, check)
    except run_files.UnreadableFile as e:
        raise RunFileError(f"{e}: rerun the run's python -m lth.train command, which writes it "
                           f"again") from None


def no_signal(entry: dict) -> bool:
    """A phase whose masks join no output to the input (older entries: one with a layer pruned
    entirely, which cuts a plain chain in two)."""
    if "signal_outputs" in entry:
        return entry["signal_outputs"] == 0
    return bool(entry.get("empty_layers"))


def verdicts(entries: list[dict], tolerance: float = TOLERANCE, margin: float = MARGIN,
             metric: str = "test_acc") -> list[dict]:
    """Per pruned round: the verdict and both numbers. A run whose round 0 is not plain dense
    training (RST's penalty phase: dense_reference false) is judged on its baselines only.
    A phase that carries no signal gets no verdict and is no baseline."""
    dense = [e for e in entries if e["round"] == 0 and e["branch"] == "ticket"]
    if not dense:
        raise ValueError("no round 0 in this run's summary")
    dense_acc = dense[0][metric] if dense[0].get("dense_reference", True) else None
    rows = []
    for t in sorted((e for e in entries if e["branch"] == "ticket" and e["round"] > 0),
                    key=lambda e: e["round"]):
        baselines = {e["branch"]: e[metric] for e in entries
                     if e["round"] == t["round"] and e["branch"] != "ticket"
                     and not no_signal(e)}
        best = max(baselines.items(), key=lambda kv: kv[1]) if baselines else None
        reaches = None if dense_acc is None else t[metric] >= dense_acc - tolerance
        beats = best is not None and t[metric] >= best[1] + margin
        if no_signal(t):
            reaches = beats = None
            empty = t.get("empty_layers") or []
            verdict = ("no result: no path of kept weights from the input to the output"
                       + (f" ({', '.join(empty)} pruned entirely)" if empty else ""))
        elif reaches is None:
            verdict = ("no dense reference, no baseline" if best is None else
                       "no dense reference; beats the random baseline" if beats else
                       "no dense reference; random baseline as good")
        elif best is None:
            verdict = "no baseline" if reaches else "not winning (below dense)"
        elif not reaches:
            verdict = "not winning (below dense)"
        elif beats:
            verdict = "WINNING"
        else:
            verdict = "not winning (random baseline as good)"
        rows.append({"round": t["round"], "sparsity": t["sparsity"], "ticket_acc": t[metric],
                     "dense_acc": dense_acc,
                     "gap_to_dense": None if dense_acc is None else t[metric] - dense_acc,
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
    reference = ("no dense round 0 in this run" if r0["dense_acc"] is None else
                 f"reach dense {100 * r0['dense_acc']:.2f}% within {100 * r0['tolerance']:.2f} "
                 f"pts")
    lines = [f"winning-ticket verdict ({r0['metric']}; {reference} AND beat the best random "
             f"baseline by >= {100 * r0['margin']:.2f} pts)",
             f"{'round':>5}  {'sparsity':>8}  {'ticket':>7}  {'vs dense':>8}  "
             f"{'best baseline':<24} {'ticket - baseline':>17}  verdict"]
    for r in rows:
        base = (f"{r['best_baseline']} {100 * r['best_baseline_acc']:.2f}%"
                if r["best_baseline"] else "-")
        diff = (f"{100 * r['margin_over_baseline']:+.2f} pts" if r["best_baseline"] else "-")
        gap = "-" if r["gap_to_dense"] is None else f"{100 * r['gap_to_dense']:+.2f}"
        lines.append(f"{r['round']:>5}  {100 * r['sparsity']:>7.1f}%  "
                     f"{100 * r['ticket_acc']:>6.2f}%  {gap:>7}   "
                     f"{base:<24} {diff:>17}  {r['verdict']}")
    return "\n".join(lines)


def _configurations(run_dirs: list[str]) -> dict[str, list[str]]:
    """{label: run dirs} with runs grouped by their settings other than the seed."""
    groups: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for run in run_dirs:
        info = read_run_json(os.path.join(run, "config.json"), lambda c: run_files.check_config(
            c, {"name": str, "non_default": dict}))
        key = json.dumps({k: v for k, v in info["non_default"].items()
                          if k != "training.seed"}, sort_keys=True)
        if key not in names:
            base = info["name"].rsplit("-", 1)[0]
            taken = sum(1 for v in names.values() if v.split("#")[0] == base)
            names[key] = f"{base}#{taken + 1}" if taken else base
        groups.setdefault(names[key], []).append(run)
    return groups


def _check_compared_summary(entries) -> None:
    step_ms = {"step_ms_sparse": run_files.NUMBER, "step_ms_dense": run_files.NUMBER}
    run_files.check_summary(entries, run_files.SUMMARY_FIELDS | step_ms)


def compare(run_dirs: list[str]) -> list[dict]:
    """One row per configuration x (round, branch): mean/std over the seeds."""
    rows = []
    for label, runs in _configurations(run_dirs).items():
        cells: dict[tuple, list[dict]] = {}
        for run in runs:
            for e in read_run_json(os.path.join(run, "summary.json"), _check_compared_summary):
                cells.setdefault((e["round"], e["branch"]), []).append(e)
        for (rnd, branch), es in sorted(cells.items(),  # each round: ticket, then branches
                                        key=lambda kv: (kv[0][0], kv[0][1] != "ticket",
                                                        kv[0][1])):
            accs = [e["test_acc"] for e in es]
            rows.append({
                "config": label, "round": rnd, "branch": branch,
                "line": es[0]["method"] if branch == "ticket" else branch,
                "seeds": len(es), "sparsity": statistics.fmean(e["sparsity"] for e in es),
                "test_acc": statistics.fmean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "step_ms_sparse": statistics.median(e["step_ms_sparse"] for e in es),
                "step_ms_dense": statistics.median(e["step_ms_dense"] for e in es),
                "runs": runs})
    return rows


def compare_text(rows: list[dict]) -> str:
    lines = [f"{'config':<22} {'line':<14} {'round':>5}  {'sparsity':>8}  "
             f"{'test acc (mean +- std, n)':<26} {'sparse ms':>9}  {'dense ms':>8}"]
    for r in rows:
        acc = f"{100 * r['test_acc']:.2f} +- {100 * r['test_acc_std']:.2f} ({r['seeds']})"
        lines.append(f"{r['config']:<22} {r['line']:<14} {r['round']:>5}  "
                     f"{100 * r['sparsity']:>7.1f}%  {acc:<26} {r['step_ms_sparse']:>9.2f}  "
                     f"{r['step_ms_dense']:>8.2f}")
    return "\n".join(lines)


def time_run(run_dir: str) -> dict:
    """The one-process timing pass of a run folder (see the module docstring)."""
    from lth.hparams import Config
    from lth.train import Experiment
    info = read_run_json(os.path.join(run_dir, "config.json"), lambda c: run_files.check_config(
        c, {"config": dict, "command": list}))
    return Experiment(Config.from_dict(info["config"]), argv=info["command"][3:],
                      run_dir=run_dir, read_only=True).retime()


def timing_text(timing: dict) -> str:
    load = timing["load_average"]
    lines = [f"training step re-timed in one process, interleaved: median of "
             f"{timing['timing_rounds']} rounds (at most {timing['timing_repeats']}"
             f"{'' if timing['timing_stable'] else '; the ratios did not settle'}) after "
             f"{timing['timing_warmup']} warm-up, batch {timing['timing_batch']}, "
             f"{timing['timing_threads']} threads, {timing['device']}, autocast "
             f"{timing['autocast']}, load average {'-' if load is None else f'{load:.2f}'}"
             f"{' (BUSY: other work had the cores)' if timing['busy'] else ''}; unmasked parent "
             f"{timing['step_ms_unmasked']:.2f} ms",
             f"{'phase':<26} {'sparsity':>8}  {'dense ms':>8}  {'sparse ms':>9}  "
             f"{'speedup':>7}  {'in run: dense ms':>16}  {'sparse ms':>9}  {'speedup':>7}"]
    for r in timing["rows"]:
        lines.append(f"{r['phase']:<26} {100 * r['sparsity']:>7.1f}%  "
                     f"{r['step_ms_dense']:>8.2f}  {r['step_ms_sparse']:>9.2f}  "
                     f"{r['speedup']:>6.2f}x  {r['in_run_step_ms_dense']:>16.2f}  "
                     f"{r['in_run_step_ms_sparse']:>9.2f}  {r['in_run_speedup']:>6.2f}x")
    return "\n".join(lines)


def _time_main(run_dir: str) -> int:
    from lth.hparams import ConfigError
    from lth.plots import plot_step_times
    from lth.train import UsageError
    try:
        timing = time_run(run_dir)
    except (UsageError, ConfigError, RunFileError, run_files.UnreadableFile) as e:
        print(f"python -m lth.report: error: {e}", file=sys.stderr)
        return 2
    text = timing_text(timing)
    print(text)
    write_text(text + "\n", os.path.join(run_dir, "timing.txt"))
    write_json(timing, os.path.join(run_dir, "timing.json"))
    plot = plot_step_times([r for r in timing["rows"] if r["branch"] == "ticket"],
                           os.path.join(run_dir, "plots", "step_time_one_process.png"),
                           "training step time vs sparsity (all rounds re-timed in one process)")
    print(f"\nsaved {os.path.join(run_dir, 'timing.txt')} and timing.json"
          + (f", {plot}" if plot else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lth.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run folder written by python -m lth.train; several: compare")
    parser.add_argument("--out", default="lth_comparison",
                        help="several RUN_DIRs: folder for comparison.txt/.json/.png "
                        "(default: lth_comparison)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"how far below dense accuracy a ticket may be and still 'reach' "
                        f"it, as a fraction (default: {TOLERANCE} = 1 point)")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help=f"how far a ticket must beat the best random baseline, as a "
                        f"fraction (default: {MARGIN})")
    parser.add_argument("--metric", choices=("test_acc", "best_test_acc"), default="test_acc",
                        help="final test accuracy of each phase, or its best over the epochs "
                        "(default: test_acc)")
    parser.add_argument("--time", action="store_true",
                        help="one RUN_DIR: re-time every finished round's model interleaved in "
                        "this one process and write timing.txt / timing.json there")
    args = parser.parse_args(argv)
    if not all(math.isfinite(v) and 0 <= v < 1 for v in (args.tolerance, args.margin)):
        parser.error(f"--tolerance and --margin are fractions of accuracy in [0, 1), got "
                     f"{args.tolerance} and {args.margin}")
    real = [os.path.realpath(r) for r in args.run_dirs]
    if len(set(real)) < len(real):
        parser.error("a RUN_DIR is given twice: each run counts once (seeds are separate runs)")
    if len(args.run_dirs) > 1 and not args.time:
        try:  # before reading every run: a bad --out fails now, not after the comparison
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            parser.error(f"--out {args.out}: cannot make the folder ({e.strerror})")
    for run in args.run_dirs:
        if not os.path.isfile(os.path.join(run, "config.json")):
            parser.error(f"{os.path.join(run, 'config.json')} not found: is {run} a run folder "
                         f"of python -m lth.train?")
        if not os.path.isfile(os.path.join(run, "summary.json")) and not args.time:
            parser.error(f"{run} has no finished phase yet (no summary.json): rerun its "
                         f"python -m lth.train command to finish it")
    try:
        return _main(parser, args)
    except RunFileError as e:
        print(f"python -m lth.report: error: {e}", file=sys.stderr)
        return 2


def _main(parser, args) -> int:
    if args.time:
        if len(args.run_dirs) > 1:
            parser.error("--time takes one RUN_DIR")
        return _time_main(args.run_dirs[0])
    if len(args.run_dirs) > 1:
        return _compare_main(args.run_dirs, args.out)
    args.run_dir = args.run_dirs[0]
    path = os.path.join(args.run_dir, "summary.json")
    entries = read_run_json(path, lambda s: run_files.check_summary(
        s, run_files.SUMMARY_FIELDS | {args.metric: run_files.NUMBER}))
    try:
        rows = verdicts(entries, args.tolerance, args.margin, args.metric)
    except ValueError as e:  # a summary without its dense round
        raise RunFileError(f"{path}: {e}: rerun the run's python -m lth.train command, which "
                           f"writes it again") from None
    text = report_text(rows)
    print(text)
    write_text(text + "\n", os.path.join(args.run_dir, "report.txt"))
    write_json(rows, os.path.join(args.run_dir, "report.json"))
    print(f"\nsaved {os.path.join(args.run_dir, 'report.txt')} and report.json")
    return 0


def _compare_main(run_dirs: list[str], out: str) -> int:
    from lth.plots import plot_comparison
    rows = compare(run_dirs)
    text = compare_text(rows)
    print(text)
    write_text(text + "\n", os.path.join(out, "comparison.txt"))
    write_json(rows, os.path.join(out, "comparison.json"))
    plot = plot_comparison(rows, os.path.join(out, "comparison.png"))
    print(f"\nsaved {os.path.join(out, 'comparison.txt')}, comparison.json"
          + (f", {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

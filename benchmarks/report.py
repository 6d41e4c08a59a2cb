"""What a run is (command, machine, ISA, versions), the issue's targets, and the generated
outputs: progress lines, RESULTS.md and results.json. Only numbers measured by the harness
flow in here; nothing is typed by hand."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import sparsekern as sk
from sparsekern.timing import TOLERANCE, WINDOW, load_average  # noqa: F401 (used by conv, model)

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when run from one

# The speed targets: (format, mode, sparsity, minimum speedup of sparsekern vs dense).
SPEED_TARGETS = (
    ("bsr32", "forward", 0.80, 4.0),
    ("bsr32", "forward", 0.90, 8.5),
    ("bsr32", "forward", 0.95, 17.0),
    ("bsr32", "train", 0.90, 7.0),
    ("bsr16", "forward", 0.90, 6.0),
    ("csr", "forward", 0.90, 4.5),
    ("csr", "train", 0.90, 3.5),
)
# sparsekern must beat this peer: (format, mode, sparsity, peer).
PEER_TARGETS = (("csr", "forward", 0.90, "sparseprop"),)
# Parameter + optimizer-state bytes of a sparse layer vs nn.Linear, at this sparsity.
MEMORY_TARGET_SPARSITY, MEMORY_TARGET_RATIO = 0.90, 0.15
TARGET_BATCH = 256  # targets are stated for the default M
TARGET_SHAPE = (2048, 2048)  # ... and the default (K, N)
# Issue 8: the share of the dense FLOP rate (speedup / ideal) sparsekern sustains, at every
# (K, N) of a --shapes sweep with M >= FRACTION_MIN_BATCH: (format, mode, sparsity, minimum).
FRACTION_TARGETS = (
    ("bsr32", "forward", 0.90, 0.80),
    ("bsr32", "train", 0.90, 0.70),
    ("csr", "forward", 0.90, 0.45),
    ("csr", "train", 0.90, 0.35),
)
FRACTION_MIN_BATCH = 128
# ... and the (K, N) weights of its sweep (the profiles time all of them).
FRACTION_SHAPES = ((768, 3072), (3072, 768), (1024, 1024), (4096, 4096), (2048, 2048))

MODE_TITLES = {"forward": "Forward (y = x W^T)",
               "train": "Training step (forward + dX + dW; sparse dW at kept weights only)"}
MODE_LABELS = {"forward": "forward", "train": "step"}  # column headings of the issue 8 table


# --- what this run is --------------------------------------------------------------------------

def cpu_description() -> dict:
    """CPU model and the SIMD flags that matter here, from /proc/cpuinfo (Linux)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name", platform.processor() or "unknown"),
            "cpu_family": fields.get("cpu family"), "model": fields.get("model"),
            "logical_cpus": os.cpu_count(),
            "simd_flags": [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl")
                           if f in flags]}


def isa_description() -> dict:
    if not sk._extension.available():
        return {"extension_loaded": False, "active": "reference (pure torch)",
                "available": [], "load_error": str(sk._extension.LOAD_ERROR)}
    c = sk._extension._C
    built = datetime.datetime.fromtimestamp(Path(c.__file__).stat().st_mtime,
                                            datetime.timezone.utc)
    return {"extension_loaded": True, "active": c.active_isa(),
            "available": list(c.available_isas()),
            "extension_built": built.isoformat(timespec="seconds")}


def out_folder(text: str) -> Path:
    """argparse type of --out: a folder that exists or can be made, and that takes a file, so a
    bad --out is refused before anything is measured rather than after."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write into {text} ({e.strerror})") from None
    return path


def csv_type(cast, allowed=None, what: str = "value"):
    """argparse type of a comma list: each item cast, at least one (an empty list is an error,
    not the default list), and each in `allowed` when given."""
    def parse(text: str):
        try:
            items = tuple(cast(i.strip()) for i in text.split(",") if i.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not items:
            raise argparse.ArgumentTypeError(f"give at least one {what}, got {text!r}")
        if allowed is not None:
            bad = [i for i in items if i not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from "
                                                 f"{', '.join(map(str, allowed))}")
        return items
    return parse


def default_output_dir(suite: str = "") -> Path:
    """Where a benchmark writes without --out: benchmarks/<suite> under the current directory.
    From the repository root that is the committed results folder (benchmarks/RESULTS.md,
    benchmarks/conv/, ...); run from anywhere else (an installed package) the results land
    beside the user, never inside site-packages."""
    return Path.cwd() / "benchmarks" / suite


def git_revision() -> str:
    """The code the numbers belong to: git HEAD (flagged when the kernels differ from it) when
    the harness runs from a checkout, else the commit that $SPARSEKERN_SOURCE names (a copy of
    a checkout without its .git, e.g. the working tree sent to a lent GPU by .ci/gpu-session),
    else the installed distribution's version."""
    if not (REPO_ROOT / ".git").exists():  # installed: site-packages is no checkout
        named = os.environ.get("SPARSEKERN_SOURCE")
        if named:
            return f"{named} (named by SPARSEKERN_SOURCE: a copy without .git)"
        try:
            return f"installed sparsekern {importlib.metadata.version('sparsekern')}"
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def git(*cmd):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *cmd], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "csrc", "sparsekern", "setup.py")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes in csrc/sparsekern" if dirty else "")


def machine_facts(command: str) -> dict:
    """What any benchmark run is: its command, when, on which machine, ISA, torch and source."""
    return {
        "command": command,
        "python": sys.executable,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_description(),
        "isa": isa_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "git": git_revision(),
        "load_average_start": load_average(),
    }


def machine_fact_pairs(results: dict, dense: str) -> list[tuple[str, str]]:
    """The (name, value) facts every RESULTS.md opens with, from machine_facts: command, date,
    machine, ISA and torch (`dense` says what the baseline is)."""
    m, isa = results["machine"], results["isa"]
    isa_text = isa["active"] + (f" (available: {', '.join(isa['available'])}; extension built "
                                f"{isa['extension_built']})" if isa["extension_loaded"] else
                                f" -- extension not loaded: {isa.get('load_error')}")
    return [("command", f"`{results['command']}`"), ("date (UTC)", results["date"]),
            ("machine", f"{m['model_name']} (cpu family {m['cpu_family']}, model {m['model']}), "
                        f"{m['logical_cpus']} logical CPUs, flags: {' '.join(m['simd_flags'])}"),
            ("sparsekern ISA used", isa_text), ("torch", f"{results['torch']} ({dense})")]


def facts_table(facts: list[tuple[str, str]]) -> list[str]:
    return _table(["", ""], [[k, v] for k, v in facts])


def run_metadata(command: list[str], args, all_peers) -> dict:
    return {
        **machine_facts(shlex.join(command)),
        "dtype": "float32",
        "in_features": args.in_features, "out_features": args.out_features,
        **({"shapes": [list(shape) for shape in args.shapes]} if args.sweep_shapes else {}),
        "batch_sizes": list(args.batch_sizes), "formats": list(args.formats),
        "sparsities": list(args.sparsities),
        "timing": {"warmup": args.warmup, "max_repeats": args.repeats,
                   "group_budget_s": args.group_budget, "seed": args.seed,
                   "min_repeats": args.min_repeats, "retries": args.retries,
                   "disturbed_threshold": args.disturbed_threshold},
        "peers": {p.name: {"label": p.label, "available": p.prepare is not None,
                           "version": p.version, "reason_absent": p.unavailable}
                  for p in all_peers},
    }


def timing_text(t: dict) -> str:
    """How every group was timed, for the facts table of each RESULTS.md."""
    return (f"interleaved groups (sparsekern.timing.measure), warm-up {t['warmup']} rounds, "
            f"then rounds until every candidate's ratio to dense settles (running medians "
            f"within {TOLERANCE:.0%} over {WINDOW + 1} rounds), at least {t['min_repeats']}, "
            f"at most what fits {t['group_budget_s']:g} s, capped at {t['max_repeats']}; "
            f"median of the rounds; groups whose dense baseline ran > "
            f"{t['disturbed_threshold']:g}x the best of its kind re-measured up to "
            f"{t['retries']}x at the end; seed {t['seed']}")


def row_flags(row: dict) -> str:
    """Marks of a table row whose figures deserve less trust (see FLAGS_NOTE)."""
    timing = row.get("timing", {})
    return ((" (busy)" if row.get("disturbed") or timing.get("busy") else "")
            + (" (unsettled)" if timing.get("stable") is False else ""))


FLAGS_NOTE = ("(busy) = the machine was loaded while the group ran: its threads waited for a "
              "CPU more than 10% of the time, or, even after re-measuring, its dense baseline "
              "ran much slower than the best of its kind; its speedups may be off. (unsettled) "
              "= the dense/sparse ratio was still moving when the group's rounds ran out.")


# --- targets -----------------------------------------------------------------------------------

def shape_of(row: dict) -> tuple[int, int]:
    return row["in_features"], row["out_features"]


def _find_row(rows, fmt, mode, sparsity, batch):
    for row in rows:
        if (row["format"], row["mode"], row["batch"]) == (fmt, mode, batch) and math.isclose(
                row["sparsity"], sparsity):
            return row
    return None


def target_batch(batch_sizes: list[int]) -> int:
    return TARGET_BATCH if TARGET_BATCH in batch_sizes else batch_sizes[0]


def target_shape(shapes) -> tuple[int, int]:
    """The (K, N) of a --shapes sweep that the issue's speedup and memory targets are judged on."""
    shapes = [tuple(shape) for shape in shapes]
    return TARGET_SHAPE if TARGET_SHAPE in shapes else shapes[0]


def _status(measured, ok) -> str:
    return "not measured" if measured is None else ("pass" if ok else "MISS")


def speed_targets(rows, batch) -> list[dict]:
    out = []
    for fmt, mode, sparsity, minimum in SPEED_TARGETS:
        row = _find_row(rows, fmt, mode, sparsity, batch)
        measured = row["speedup"]["sparsekern"] if row else None
        out.append({"target": f"{fmt.upper()} {mode} >= {minimum:g}x at {sparsity:.0%}",
                    "kind": "speedup", "format": fmt, "mode": mode, "sparsity": sparsity,
                    "batch": batch, "threshold": minimum, "measured": measured,
                    "status": _status(measured, measured is not None and measured >= minimum)})
    return out


def peer_targets(rows, batch, peers_meta) -> list[dict]:
    out = []
    for fmt, mode, sparsity, peer in PEER_TARGETS:
        row = _find_row(rows, fmt, mode, sparsity, batch)
        measured = None
        if row and peer in row["ms"]:
            measured = row["ms"][peer] / row["ms"]["sparsekern"]  # > 1: sparsekern is faster
        why = None if measured is not None else (peers_meta.get(peer, {}).get("reason_absent")
                                                 or "case not in this sweep")
        out.append({"target": f"{fmt.upper()} {mode} faster than {peers_meta[peer]['label']} "
                              f"at {sparsity:.0%} ({peer} ms / sparsekern ms > 1)",
                    "kind": "vs_peer", "format": fmt, "mode": mode, "sparsity": sparsity,
                    "batch": batch, "peer": peer, "threshold": 1.0, "measured": measured,
                    "status": _status(measured, measured is not None and measured > 1.0),
                    "note": why})
    return out


def memory_targets(memory_rows) -> list[dict]:
    out = []
    for row in memory_rows:
        if row["layer"] == "dense":
            continue
        at_target = math.isclose(row["sparsity"], MEMORY_TARGET_SPARSITY)
        measured = row["ratio"] if at_target else None
        out.append({"target": f"memory {row['layer'].upper()} {row['optimizer']} <= "
                              f"{MEMORY_TARGET_RATIO:g}x at {MEMORY_TARGET_SPARSITY:.0%} "
                              f"(params + optimizer state)",
                    "kind": "memory", "format": row["layer"], "optimizer": row["optimizer"],
                    "sparsity": row["sparsity"], "threshold": MEMORY_TARGET_RATIO,
                    "measured": measured,
                    "status": _status(measured, measured is not None
                                      and measured <= MEMORY_TARGET_RATIO),
                    "with_index": row["ratio_with_index"]})
    return out


def evaluate_targets(results: dict) -> list[dict]:
    batch = target_batch(results["batch_sizes"])
    shape = (results["in_features"], results["out_features"])  # a --shapes run: target_shape
    rows = [row for row in results["linear"] if shape_of(row) == shape]
    return (speed_targets(rows, batch) + peer_targets(rows, batch, results["peers"])
            + memory_targets(results["memory"]))


def fraction_targets(results: dict) -> list[dict]:
    """Issue 8's FRACTION_TARGETS at every (M >= FRACTION_MIN_BATCH, K, N) of a --shapes run."""
    out = []
    for in_features, out_features in results["shapes"]:
        rows = [row for row in results["linear"] if shape_of(row) == (in_features, out_features)]
        for batch in results["batch_sizes"]:
            if batch < FRACTION_MIN_BATCH:
                continue
            for fmt, mode, sparsity, minimum in FRACTION_TARGETS:
                row = _find_row(rows, fmt, mode, sparsity, batch)
                measured = row["fraction_of_ideal"]["sparsekern"] if row else None
                out.append({"target": f"{fmt.upper()} {mode} >= {minimum:g} of the dense FLOP "
                                      f"rate at {sparsity:.0%}",
                            "kind": "fraction_of_ideal", "format": fmt, "mode": mode,
                            "sparsity": sparsity, "batch": batch, "in_features": in_features,
                            "out_features": out_features, "threshold": minimum,
                            "measured": measured,
                            "speedup": row["speedup"]["sparsekern"] if row else None,
                            "ideal": row["ideal"] if row else None,
                            "flags": row_flags(row).strip() if row else "",
                            "status": _status(measured, measured is not None
                                              and measured >= minimum)})
    return out


# --- text ---------------------------------------------------------------------------------------

def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}"


def peer_cell(row: dict, name: str, fraction: bool = False) -> str:
    """'12.3 (2.9x)' when measured ('12.3 (2.9x, 0.29)' with the fraction of the dense FLOP
    rate), 'n/a' when it rejected the case, '-' when not its row."""
    if name in row["ms"]:
        share = f", {row['fraction_of_ideal'][name]:.2f}" if fraction else ""
        return f"{fmt_ms(row['ms'][name])} ({row['speedup'][name]:.2f}x{share})"
    return "n/a" if name in row["peer_notes"] else "-"


def progress_header(active_peers, shapes: bool = False) -> str:
    """shapes: a --shapes run, whose lines also give K x N and the fraction of the dense rate."""
    peer_cols = "".join(f"  {p.label + ' ms (x)':>22s}" for p in active_peers)
    return ((f"{'K x N':>10s} " if shapes else "")
            + f"{'mode':7s} {'format':6s} {'sparsity':>8s} {'M':>5s} {'dense ms':>9s} "
              f"{'sparsekern ms':>13s} {'speedup':>8s} {'ideal':>6s}"
            + (f" {'fraction':>8s}" if shapes else "") + peer_cols)


def progress_line(row: dict, active_peers, shapes: bool = False) -> str:
    peer_cols = "".join(f"  {peer_cell(row, p.name):>22s}" for p in active_peers)
    retry = f"  (attempt {row['attempts']})" if row.get("attempts", 1) > 1 else ""
    return ((f"{row['in_features']:>5d}x{row['out_features']:<4d} " if shapes else "")
            + f"{row['mode']:7s} {row['format']:6s} {row['sparsity']:8.0%} {row['batch']:5d} "
              f"{fmt_ms(row['ms']['dense']):>9s} {fmt_ms(row['ms']['sparsekern']):>13s} "
              f"{row['speedup']['sparsekern']:7.2f}x {row['ideal']:5.1f}x"
            + (f" {row['fraction_of_ideal']['sparsekern']:8.2f}" if shapes else "")
            + peer_cols + retry)


def shapes_text(meta: dict) -> str:
    """The weights of the run: 'W [N, K]' (one shape) or the K x N list of a --shapes run."""
    if "shapes" not in meta:
        return f"W [{meta['out_features']}, {meta['in_features']}]"
    return "W [N, K] (K x N: " + ", ".join(f"{k}x{n}" for k, n in meta["shapes"]) + ")"


def header_text(meta: dict) -> str:
    m, isa = meta["machine"], meta["isa"]
    return (f"sparsekern linear benchmark: {meta['command']}\n"
            f"  {m['model_name']} (family {m['cpu_family']} model {m['model']}), "
            f"{m['logical_cpus']} logical CPUs, flags {' '.join(m['simd_flags'])}\n"
            f"  sparsekern ISA {isa['active']}; torch {meta['torch']}; threads "
            f"{meta['threads']}; {shapes_text(meta)} {meta['dtype']}")


def memory_text(rows: list[dict]) -> str:
    lines = ["memory (bytes after one optimizer step)"]
    for r in rows:
        lines.append(f"  {r['optimizer']:12s} {r['layer']:6s} params+state "
                     f"{r['params_and_state_bytes']:>11,d} ({r['ratio']:.3f}x)  with index "
                     f"{r['with_index_bytes']:>11,d} ({r['ratio_with_index']:.3f}x)")
    return "\n".join(lines)


def _measured_text(t: dict) -> str:
    if t["measured"] is None:
        return "-"
    return f"{t['measured']:.3f}x" if t["kind"] == "memory" else f"{t['measured']:.2f}x"


def targets_text(targets: list[dict]) -> str:
    return "\n".join(["issue targets"] + [f"  {t['status']:12s} {_measured_text(t):>9s}  "
                                          f"{t['target']}" for t in targets])


def _fraction_where(t: dict) -> str:
    return f"M={t['batch']}, K={t['in_features']}, N={t['out_features']}"


def _fraction_measured(t: dict) -> str:
    return "-" if t["measured"] is None else f"{t['measured']:.2f}"


def fraction_misses(targets: list[dict]) -> list[str]:
    """One line per missed fraction target: where, measured vs minimum, speedup vs ideal."""
    return [f"{_fraction_where(t)}: {t['format'].upper()} {MODE_LABELS[t['mode']]} "
            f"{t['measured']:.2f} < {t['threshold']:g} (speedup {t['speedup']:.2f}x of ideal "
            f"{t['ideal']:.1f}x)" + (f" {t['flags']}" if t["flags"] else "")
            for t in targets if t["status"] == "MISS"]


def fraction_targets_text(targets: list[dict]) -> str:
    misses = fraction_misses(targets)
    return "\n".join(
        [f"issue 8 targets (fraction of the dense FLOP rate = speedup / ideal, "
         f"M >= {FRACTION_MIN_BATCH})"]
        + [f"  {t['status']:12s} {_fraction_measured(t):>6s}  {_fraction_where(t)}: "
           f"{t['target']}" for t in targets]
        + [f"misses: {len(misses)} of {len(targets)}"] + [f"  {m}" for m in misses])


# --- RESULTS.md / results.json --------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _num(value) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def shape_fact(results: dict) -> str:
    batches = ", ".join(map(str, results["batch_sizes"]))
    if "shapes" not in results:
        return (f"x [M, {results['in_features']}], W [{results['out_features']}, "
                f"{results['in_features']}], {results['dtype']}; M in {batches}")
    return (f"x [M, K], {shapes_text(results)}; {results['dtype']}; M in {batches}; the speedup "
            f"and memory targets at K x N = {results['in_features']}x{results['out_features']}")


def md_header(results: dict) -> list[str]:
    m, t = results["machine"], results["timing"]
    peers_line = "; ".join(
        f"{p['label']} {p['version']}" if p["available"] else
        f"{p['label']}: column absent, {p['reason_absent']}"
        for p in results["peers"].values())
    facts = [
        *machine_fact_pairs(results, "dense = F.linear, MKL"),
        ("threads", str(results["threads"])),
        ("shape", shape_fact(results)),
        ("timing", timing_text(t)),
        ("peers", peers_line),
        ("source", results["git"]),
        ("runtime", f"{results['runtime_s']:.0f} s"),
        ("load average (1 min)", f"{_num(results['load_average_start'])} at start, "
                                 f"{_num(results['load_average_end'])} at end (other processes "
                                 f"share the {m['logical_cpus']} CPUs)"),
    ]
    how_to_read = (
        "speedup = dense ms / sparsekern ms, measured in the same interleaved group; ideal = "
        "1 / (1 - sparsity) is what a sparse kernel running at the dense baseline's FLOP rate "
        "would reach, so a speedup above ideal means sparsekern sustains more FLOP/s than "
        "torch's dense GEMM on this machine (see the dense GFLOP/s column). Peer cells: "
        "ms (speedup vs the same dense run); n/a = the peer rejects the case; - = not its row.")
    if "shapes" in results:
        how_to_read += (" fraction of dense FLOP rate = speedup / ideal: the share of the dense "
                        "baseline's FLOP rate that the sparse kernel sustains (peer cells: ms "
                        "(speedup, fraction)).")
    return (["# sparsekern benchmark results: linear", "",
             "Generated by `python -m benchmarks linear`; do not edit by hand, rerun it.", ""]
            + facts_table(facts) + ["", how_to_read])


def md_targets(results: dict) -> list[str]:
    targets = results["targets"]
    batch = target_batch(results["batch_sizes"])
    rows = [[t["target"], _measured_text(t), t["status"]] for t in targets]
    where = f"M={batch}" + (f", K={results['in_features']}, N={results['out_features']}"
                            if "shapes" in results else "")
    lines = ["", f"## Issue targets ({where})", ""] + _table(["target", "measured", "result"],
                                                               rows)
    notes = [f"- {t['target']}: {t['note']}" for t in targets if t.get("note")]
    with_index = [f"{t['format'].upper()} {t['optimizer']} {t['with_index']:.3f}x"
                  for t in targets if t["kind"] == "memory"]
    if with_index:
        notes.append("- memory including index buffers (not part of the target): "
                     + ", ".join(with_index))
    return lines + ([""] + notes if notes else [])


def md_fraction_targets(results: dict) -> list[str]:
    """Issue 8's table: one line per (M, K, N), a cell per FRACTION_TARGETS entry, then the
    misses."""
    targets = results["fraction_targets"]
    cells: dict[tuple, list[str]] = {}
    for t in targets:
        flags = f" {t['flags']}" if t["flags"] else ""
        cells.setdefault((t["batch"], t["in_features"], t["out_features"]), []).append(
            f"{_fraction_measured(t)} {t['status']}{flags}")
    header = ["M", "K", "N"] + [f"{fmt.upper()} {MODE_LABELS[mode]} (>= {minimum:g})"
                                for fmt, mode, _, minimum in FRACTION_TARGETS]
    sparsities = sorted({f"{s:.0%}" for _, _, s, _ in FRACTION_TARGETS})
    misses = fraction_misses(targets)
    return (["", f"## Issue 8 targets: fraction of the dense FLOP rate at "
                 f"{', '.join(sparsities)}, every shape with M >= {FRACTION_MIN_BATCH}", "",
             "fraction = speedup / ideal, measured in the groups of the tables below.", ""]
            + _table(header, [[str(m), str(k), str(n)] + c for (m, k, n), c in cells.items()])
            + ["", f"Misses ({len(misses)} of {len(targets)}):", ""]
            + ([f"- {m}" for m in misses] or ["- none"]))


def md_speed_table(results: dict, mode: str, batch: int, shape=None) -> list[str]:
    """One mode and M; with shape (K, N) (a --shapes run) the rows of that weight, with the
    fraction of the dense FLOP rate next to every speedup."""
    rows = [r for r in results["linear"] if r["mode"] == mode and r["batch"] == batch
            and (shape is None or shape_of(r) == tuple(shape))]
    if not rows:
        return []
    fraction = shape is not None
    peer_meta = [(name, p["label"]) for name, p in results["peers"].items() if p["available"]]
    header = (["format", "sparsity", "dense ms", "dense GFLOP/s", "sparsekern ms", "speedup",
               "ideal"] + (["fraction of dense FLOP rate"] if fraction else [])
              + [f"{label} ms (speedup{', fraction' if fraction else ''})"
                 for _, label in peer_meta])
    body = [[r["format"] + row_flags(r),
             f"{r['sparsity']:.0%}", fmt_ms(r["ms"]["dense"]),
             f"{r['dense_gflops']:.0f}", fmt_ms(r["ms"]["sparsekern"]),
             f"**{r['speedup']['sparsekern']:.2f}x**", f"{r['ideal']:.1f}x"]
            + ([f"{r['fraction_of_ideal']['sparsekern']:.2f}"] if fraction else [])
            + [peer_cell(r, name, fraction) for name, _ in peer_meta]
            for r in rows]
    reasons = sorted({f"{results['peers'][name]['label']}: {note}"
                      for r in rows for name, note in r["peer_notes"].items()})
    where = f"M={batch}" + (f", K={shape[0]}, N={shape[1]}" if fraction else "")
    lines = ["", f"## {MODE_TITLES[mode]}, {where}", ""] + _table(header, body)
    if reasons:
        lines += ["", "n/a = the peer rejected this case:"] + [f"- {why}" for why in reasons]
    if any(row_flags(r) for r in rows):
        lines += ["", FLAGS_NOTE]
    return lines


def md_memory(results: dict) -> list[str]:
    header = ["optimizer", "layer", "sparsity", "params B", "optimizer state B",
              "params + state B", "ratio vs dense", "index buffers B", "total with index B",
              "ratio with index"]
    body = [[r["optimizer"], r["layer"], f"{r['sparsity']:.0%}", f"{r['param_bytes']:,}",
             f"{r['optimizer_state_bytes']:,}", f"{r['params_and_state_bytes']:,}",
             f"{r['ratio']:.3f}x", f"{r['index_bytes']:,}", f"{r['with_index_bytes']:,}",
             f"{r['ratio_with_index']:.3f}x"] for r in results["memory"]]
    return (["", f"## Training memory of one {results['out_features']}x"
                 f"{results['in_features']} layer (with bias)", "",
             "Bytes of the actual tensors after one optimizer step: `module.parameters()` + "
             "`optimizer.state`; index buffers (`module.buffers()`) counted separately.", ""]
            + _table(header, body))


def markdown(results: dict) -> str:
    sweep = "shapes" in results  # a --shapes run: issue 8's table first, tables per (K, N)
    lines = (md_header(results) + (md_fraction_targets(results) if sweep else [])
             + md_targets(results))
    for shape in results["shapes"] if sweep else [None]:
        for batch in results["batch_sizes"]:
            for mode in MODE_TITLES:
                lines += md_speed_table(results, mode, batch, shape)
    lines += md_memory(results)
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "RESULTS.md", out_dir / "results.json"
    md.write_text(markdown(results))
    js.write_text(json.dumps(results, indent=1) + "\n")
    return [md, js]

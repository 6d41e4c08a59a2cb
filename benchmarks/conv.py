"""`python -m benchmarks conv`: conv2d with a pruned weight -- torch's dense conv vs sparsekern
vs SparseProp, layer by layer.

For every layer x format x sparsity and for two modes,
  forward  y = conv(x)                               (nothing requires grad)
  train    y = conv(x); y.backward(grad)             (x and the weight/values require grad:
                                                      forward + dX + dW; sparse dW at kept only)
one interleaved group is timed with `sparsekern.timing.measure` (warm-up first, rounds until the
ratios to dense settle, median of the rounds, all candidates round-robin in one process): dense
F.conv2d (oneDNN) on the masked weight, `sparsekern.conv2d` on the packed weight, and SparseProp's
SparseConv2d for unstructured rows where it is importable. Every candidate gets the same NCHW input;
sparsekern returns channels_last (its backward gets its gradient in that layout, as it would from
the next layer of a sparsified model). speedup = dense median / candidate median; ideal = 1 / (1 -
sparsity); fraction of ideal = speedup / ideal (the share of the dense FLOP rate the sparse kernel
sustains).

Masks have an exact kept count: bsrN rows keep round((1-s) * n_blocks) whole channel blocks (N
output x N input channels, each spanning the kh x kw window), csr rows round((1-s) * numel) random
weights. Results go to --out (default ./benchmarks/conv/ under the current directory, the committed
folder when run from the repository root; with --quick a fresh temporary folder): RESULTS.md,
results.json and speedup.png; while it runs, results.partial.json holds every row measured so far.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import sparsekern as sk
from benchmarks import peers, plots, report
from benchmarks.linear import (DISTURBED, MIN_REPEATS, Timing, relative_error, select_isa,
                               time_group)
from benchmarks.masks import exact_random_mask
from sparsekern.timing import measure


@dataclass(frozen=True)
class Layer:
    key: str
    c_in: int
    c_out: int
    k: int
    stride: int
    hw: int
    batch: int

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.k) // self.stride + 1

    @property
    def title(self) -> str:
        s = f"/{self.stride}" if self.stride > 1 else ""
        return (f"{self.k}x{self.k}{s} {self.c_in}->{self.c_out} @{self.hw}x{self.hw} "
                f"batch {self.batch}")

    def flop(self) -> int:
        return 2 * self.batch * self.out_hw ** 2 * self.c_out * self.c_in * self.k * self.k


LAYERS = {layer.key: layer for layer in (
    Layer("3x3-64-32", 64, 64, 3, 1, 32, 64),        # ResNet-18 stage 1 at CIFAR size (target)
    Layer("3x3-256-8", 256, 256, 3, 1, 8, 64),       # ResNet-18 stage 3 (target)
    Layer("3x3-128-16-b128", 128, 128, 3, 1, 16, 128),
    Layer("3x3s2-128-256-16", 128, 256, 3, 2, 16, 64),  # stride-2 3x3 (target)
    Layer("3x3-512-4-b32", 512, 512, 3, 1, 4, 32),
    Layer("1x1-512-2048-7-b32", 512, 2048, 1, 1, 7, 32),  # ResNet-50 bottleneck (target)
    Layer("1x1s2-64-128-32", 64, 128, 1, 2, 32, 64),    # projection shortcut
)}
FORMATS = {"bsr16": 16, "bsr32": 32, "csr": None}
SPARSITIES = (0.8, 0.9, 0.95)
MODES = ("forward", "train")
QUICK_LAYERS, QUICK_FORMATS, QUICK_SPARSITIES = ("3x3-256-8", "1x1s2-64-128-32"), (
    "bsr32", "csr"), (0.9,)

# The targets: (layer, format, mode, sparsity, minimum speedup vs torch's conv).
SPEED_TARGETS = (
    ("3x3-256-8", "bsr32", "forward", 0.90, 6.0), ("3x3-256-8", "bsr32", "train", 0.90, 4.0),
    ("3x3-256-8", "bsr32", "forward", 0.95, 10.0),
    ("3x3-64-32", "bsr32", "forward", 0.90, 6.0), ("3x3-64-32", "bsr32", "train", 0.90, 4.0),
    ("3x3-64-32", "bsr32", "forward", 0.95, 10.0),
    ("3x3-256-8", "csr", "forward", 0.90, 3.0), ("3x3-256-8", "csr", "train", 0.90, 2.5),
    ("3x3-64-32", "csr", "forward", 0.90, 3.0), ("3x3-64-32", "csr", "train", 0.90, 2.5),
    ("1x1-512-2048-7-b32", "bsr32", "forward", 0.90, 6.0),
    ("3x3s2-128-256-16", "bsr32", "forward", 0.90, 4.0),
)
# sparsekern must beat SparseProp's conv here: (layer, format, mode, sparsity).
PEER_TARGETS = (("3x3-256-8", "csr", "forward", 0.90), ("3x3-64-32", "csr", "forward", 0.90),
                ("3x3-256-8", "csr", "train", 0.90), ("3x3-64-32", "csr", "train", 0.90))
PEER_ERRORS_SHOWN = 160
SUSPECT_ERROR = 1e-4


# --- masks and weights --------------------------------------------------------------------------

def conv_mask(layer: Layer, block: int | None, sparsity: float, gen) -> torch.Tensor:
    shape = (layer.c_out, layer.c_in, layer.k, layer.k)
    if block is None:
        return exact_random_mask((shape[0], math.prod(shape[1:])), sparsity, gen).view(shape)
    grid = exact_random_mask((-(-layer.c_out // block), -(-layer.c_in // block)), sparsity, gen)
    chan = grid.repeat_interleave(block, 0).repeat_interleave(block, 1)[:layer.c_out,
                                                                        :layer.c_in]
    return chan[:, :, None, None].expand(shape).contiguous()


@dataclass
class PrunedConv:
    layer: Layer
    fmt: str
    sparsity: float
    mask: torch.Tensor
    dense: torch.Tensor  # zeros where pruned

    @property
    def block(self) -> int | None:
        return FORMATS[self.fmt]


def pruned_conv(layer: Layer, fmt: str, sparsity: float, gen) -> PrunedConv:
    mask = conv_mask(layer, FORMATS[fmt], sparsity, gen)
    weight = torch.randn(mask.shape, generator=gen) / math.sqrt(layer.c_in * layer.k ** 2)
    return PrunedConv(layer, fmt, sparsity, mask, weight * mask)


# --- candidates: prepare(pruned, train) -> (apply(x) -> y, leaves whose .grad a step resets) ---

def dense_prepare(w: PrunedConv, train: bool):
    weight = w.dense.clone().requires_grad_(train)
    s, p = w.layer.stride, w.layer.padding
    return (lambda x: F.conv2d(x, weight, None, s, p)), [weight]


def sparsekern_prepare(w: PrunedConv, train: bool):
    if w.block is None:
        packed = sk.CSR.from_dense(w.dense, w.mask)
    else:
        packed = sk.BlockSparse.from_dense(w.dense, w.mask, block=(w.block, w.block))
    packed.values.requires_grad_(train)
    s, p = w.layer.stride, w.layer.padding
    return (lambda x: sk.conv2d(x, packed, None, s, p)), [packed.values]


def sparseprop_available(threads: int) -> tuple[Callable | None, str | None, str | None]:
    """(SparseConv2d class or None, version, reason absent). peers._sparseprop sets
    OMP_NUM_THREADS before SparseProp's backend loads, so it runs with the harness's threads."""
    peer = next(p for p in peers.available_peers(threads) if p.name == "sparseprop")
    if peer.prepare is None:
        return None, None, peer.unavailable
    from sparseprop.modules import SparseConv2d
    return SparseConv2d, peer.version, None


def sparseprop_prepare_with(cls, x_shape):
    def prepare(w: PrunedConv, train: bool):
        layer = w.layer
        if layer.k not in (1, 3, 5, 7) or layer.stride not in (1, 2):
            raise ValueError(f"SparseProp's conv supports square kernels and stride 1/2, not "
                             f"{layer.k}x{layer.k}/{layer.stride}")
        # SparseProp has two kernel variants (vectorised over batch or over output pixels) and
        # picks the faster per layer in its own swap helper; do the same on this input.
        variants = [cls(w.dense.clone(), None, layer.padding, layer.stride, v)
                    for v in (False, True)]
        x = torch.randn(x_shape)
        for v in variants:
            v.W_val.requires_grad_(train)
        times = measure({str(i): (lambda v=v: v(x)) for i, v in enumerate(variants)},
                        warmup=1, max_rounds=3).seconds
        best = variants[int(min(times, key=times.get))]
        return best, [best.W_val]
    return prepare


def forward_call(apply: Callable, x: torch.Tensor) -> Callable:
    def call():
        with torch.no_grad():
            return apply(x)
    return call


def train_step(apply: Callable, x: torch.Tensor, leaves: list, grad: torch.Tensor) -> Callable:
    with torch.no_grad():
        probe = apply(x)
    if probe.is_contiguous(memory_format=torch.channels_last) and not probe.is_contiguous():
        grad = grad.contiguous(memory_format=torch.channels_last)  # the layout it produces

    def step():
        x.grad = None
        for leaf in leaves:
            leaf.grad = None
        apply(x).backward(grad)
    return step


def build_group(w: PrunedConv, mode: str, sparseprop_cls, gen):
    layer = w.layer
    x = torch.randn(layer.batch, layer.c_in, layer.hw, layer.hw, generator=gen)
    x.requires_grad_(mode == "train")
    grad = torch.randn(layer.batch, layer.c_out, layer.out_hw, layer.out_hw, generator=gen)
    train = mode == "train"
    candidates = {"dense": dense_prepare, "sparsekern": sparsekern_prepare}
    if sparseprop_cls is not None and w.block is None:
        candidates["sparseprop"] = sparseprop_prepare_with(sparseprop_cls, tuple(x.shape))
    fns, notes, errors, reference = {}, {}, {}, None
    for name, prepare in candidates.items():
        try:
            apply, leaves = prepare(w, train)
            fn = train_step(apply, x, leaves, grad) if train else forward_call(apply, x)
            out = fn()
            out = x.grad.clone() if train else out
        except Exception as exc:  # noqa: BLE001  a peer rejecting a case is a result
            if name in ("dense", "sparsekern"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            notes[name] = f"{type(exc).__name__}: {message[:PEER_ERRORS_SHOWN]}"
            continue
        if reference is None:
            reference = out
        else:
            errors[name] = relative_error(out, reference)
            if name not in ("dense", "sparsekern") and not errors[name] <= SUSPECT_ERROR:
                # a peer computing something else is not timed: its speed would mean nothing
                notes[name] = (f"wrong result: {'y' if mode == 'forward' else 'dX'} differs "
                               f"from dense by {errors[name]:.1e} (relative); not timed")
                continue
        fns[name] = fn
    return fns, notes, errors


def measure_case(w: PrunedConv, mode: str, sparseprop_cls, timing: Timing, gen) -> dict:
    fns, notes, errors = build_group(w, mode, sparseprop_cls, gen)
    for name, err in errors.items():
        if err > SUSPECT_ERROR and name in fns:
            print(f"WARNING: {name} {w.layer.key} {w.fmt} {w.sparsity:.0%} {mode}: differs from "
                  f"dense by {err:.1e} (relative)", file=sys.stderr)
    measured = time_group(fns, timing)
    medians, dense_s = measured.seconds, measured.seconds["dense"]
    # The ideal of the mask actually measured: a coarse block grid (64 channels in blocks of 32
    # are 2 x 2 blocks) cannot express every nominal sparsity.
    kept = float(w.mask.float().mean())
    ideal = 1.0 / kept if kept > 0 else math.inf
    speedup = {name: dense_s / s for name, s in medians.items() if name != "dense"}
    products = 3 if mode == "train" else 1
    return {"layer": w.layer.key, "title": w.layer.title, "mode": mode, "format": w.fmt,
            "sparsity": w.sparsity, "batch": w.layer.batch,
            "kept_fraction": kept, "ideal": ideal,
            "warmup": timing.warmup, "repeats": measured.rounds, "timing": measured.record(),
            "dense_gflops": w.layer.flop() * products / dense_s / 1e9,
            "ms": {name: s * 1e3 for name, s in medians.items()}, "speedup": speedup,
            "fraction_of_ideal": {name: v / ideal for name, v in speedup.items()},
            "peer_notes": notes, "relative_error": errors}


def disturbed_rows(rows: list[dict]) -> list[int]:
    """Rows whose dense median is DISTURBED x above the best dense median of the same layer and
    mode (dense work does not depend on the mask: such a row ran on a busy machine)."""
    best: dict[tuple, float] = {}
    for r in rows:
        key = (r["layer"], r["mode"])
        best[key] = min(best.get(key, math.inf), r["ms"]["dense"])
    return [i for i, r in enumerate(rows)
            if r["ms"]["dense"] > DISTURBED * best[(r["layer"], r["mode"])]]


def sweep(args, sparseprop_cls, on_row) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    timing = Timing(args.warmup, args.repeats, args.group_budget)
    weights, rows = {}, []
    for key in args.layers:
        layer = LAYERS[key]
        if args.batch is not None:
            layer = Layer(layer.key, layer.c_in, layer.c_out, layer.k, layer.stride, layer.hw,
                          args.batch)
        for fmt in args.formats:
            for sparsity in args.sparsities:
                w = weights[(key, fmt, sparsity)] = pruned_conv(layer, fmt, sparsity, gen)
                for mode in MODES:
                    row = {**measure_case(w, mode, sparseprop_cls, timing, gen), "attempts": 1}
                    on_row(row)
                    rows.append(row)
    for _ in range(args.retries):
        suspects = disturbed_rows(rows)
        if not suspects:
            break
        print(f"re-measuring {len(suspects)} group(s) whose dense baseline ran > {DISTURBED}x "
              f"slower than the best for its layer and mode (machine busy)", flush=True)
        for i in suspects:
            old = rows[i]
            new = measure_case(weights[(old["layer"], old["format"], old["sparsity"])],
                               old["mode"], sparseprop_cls, timing, gen)
            keep = new if new["ms"]["dense"] < old["ms"]["dense"] else old
            rows[i] = {**keep, "attempts": old["attempts"] + 1}
            on_row(rows[i])
    busy = set(disturbed_rows(rows))
    for i, row in enumerate(rows):
        row["disturbed"] = i in busy
    return rows


# --- targets and report ---------------------------------------------------------------------------

def _find(rows, layer, fmt, mode, sparsity):
    for r in rows:
        if (r["layer"], r["format"], r["mode"]) == (layer, fmt, mode) and math.isclose(
                r["sparsity"], sparsity):
            return r
    return None


def evaluate_targets(rows, sparseprop_reason) -> list[dict]:
    out = []
    for layer, fmt, mode, sparsity, minimum in SPEED_TARGETS:
        row = _find(rows, layer, fmt, mode, sparsity)
        measured = row["speedup"]["sparsekern"] if row else None
        target = {"target": f"{LAYERS[layer].title}: {fmt.upper()} {mode} >= {minimum:g}x "
                            f"at {sparsity:.0%}", "layer": layer, "format": fmt, "mode": mode,
                  "sparsity": sparsity, "threshold": minimum, "measured": measured,
                  "fraction_of_ideal": measured * (1 - sparsity) if measured else None,
                  "status": report._status(measured, measured is not None
                                           and measured >= minimum)}
        real = 1.0 - row["kept_fraction"] if row else sparsity
        if abs(real - sparsity) > 0.02:  # judged on the layer it names, never on another
            target.update(status="n/a", fraction_of_ideal=None, note=(
                f"not representable: in blocks of {FORMATS[fmt]} channels this layer has "
                f"{-(-LAYERS[layer].c_out // FORMATS[fmt])} x "
                f"{-(-LAYERS[layer].c_in // FORMATS[fmt])} blocks, so {sparsity:.0%} becomes "
                f"{real:.1%} (the measured {measured:.2f}x is of that mask); see the bsr16 rows"))
        out.append(target)
    for layer, fmt, mode, sparsity in PEER_TARGETS:
        row = _find(rows, layer, fmt, mode, sparsity)
        measured = (row["ms"]["sparseprop"] / row["ms"]["sparsekern"]
                    if row and "sparseprop" in row["ms"] else None)
        note = None
        if measured is None:
            note = (sparseprop_reason or (row or {}).get("peer_notes", {}).get("sparseprop")
                    or "case not in this sweep")
        out.append({"target": f"{LAYERS[layer].title}: {fmt.upper()} {mode} faster than "
                              f"SparseProp at {sparsity:.0%} (SparseProp ms / sparsekern ms)",
                    "layer": layer, "format": fmt, "mode": mode, "sparsity": sparsity,
                    "threshold": 1.0, "measured": measured, "note": note,
                    "status": report._status(measured, measured is not None and measured > 1)})
    return out


def base_metadata(command: str, args, min_repeats: int = MIN_REPEATS) -> dict:
    """What any run of these benchmarks is: command, machine, ISA, versions, timing settings."""
    return {**report.machine_facts(command), "dtype": "float32",
            "sparsities": list(args.sparsities),
            "timing": {"warmup": args.warmup, "max_repeats": args.repeats,
                       "group_budget_s": args.group_budget, "seed": args.seed,
                       "min_repeats": min(min_repeats, args.repeats), "retries": args.retries,
                       "disturbed_threshold": DISTURBED}}


def metadata(command, args, sparseprop_version, sparseprop_reason) -> dict:
    return {**base_metadata(command, args),
            "layers": [LAYERS[k].__dict__ for k in args.layers], "batch_override": args.batch,
            "formats": list(args.formats),
            "sparseprop": {"available": sparseprop_version is not None,
                           "version": sparseprop_version, "reason_absent": sparseprop_reason}}


def facts_table(results: dict, what: str) -> list[str]:
    t = results["timing"]
    sp = results.get("sparseprop", {})
    facts = [
        *report.machine_fact_pairs(results, what),
        ("threads", str(results["threads"])), ("dtype", results["dtype"]),
        ("timing", report.timing_text(t)),
        ("source", results["git"]), ("runtime", f"{results['runtime_s']:.0f} s"),
        ("load average (1 min)", f"{report._num(results['load_average_start'])} at start, "
                                 f"{report._num(results['load_average_end'])} at end"),
    ]
    if sp:
        facts.insert(7, ("SparseProp", sp["version"] if sp["available"] else
                         f"column absent: {sp['reason_absent']}"))
    return report.facts_table(facts)


def target_lines(targets: list[dict]) -> list[str]:
    rows = [[t["target"], f"{t['measured']:.2f}x" if t["measured"] is not None else "-",
             f"{t['fraction_of_ideal']:.2f}" if t.get("fraction_of_ideal") else "-",
             t["status"]] for t in targets]
    lines = report._table(["target", "measured", "fraction of ideal", "result"], rows)
    notes = [f"- {t['target']}: {t['note']}" for t in targets if t.get("note")]
    return lines + ([""] + notes if notes else [])


def _cell(row, name):
    if name in row["ms"]:
        return f"{report.fmt_ms(row['ms'][name])} ({row['speedup'][name]:.2f}x)"
    return "n/a" if name in row["peer_notes"] else "-"


def markdown(results: dict) -> str:
    how = ("speedup = torch dense conv ms / sparsekern ms in the same interleaved group; ideal = "
           "1 / (1 - sparsity); fraction of ideal = speedup / ideal, the share of the dense "
           "baseline's FLOP rate that the sparse kernel sustains. SparseProp cells: ms "
           "(speedup vs the same dense run); n/a = it rejected the case (reason below); - = "
           "not its row (SparseProp is unstructured CSR only). " + report.FLAGS_NOTE)
    lines = ["# sparsekern benchmark results: conv2d layers", "",
             "Generated by `python -m benchmarks conv`; do not edit by hand, rerun it.", ""]
    lines += facts_table(results, "dense = F.conv2d, oneDNN, NCHW input") + ["", how]
    lines += merged_note(results, "layers")
    lines += ["", "## Issue targets", ""] + target_lines(results["targets"])
    rows = results["conv"]
    for key in dict.fromkeys(r["layer"] for r in rows):
        for mode in MODES:
            sel = [r for r in rows if r["layer"] == key and r["mode"] == mode]
            if not sel:
                continue
            title = report.MODE_TITLES["train" if mode == "train" else "forward"]
            title = title.replace("y = x W^T", "y = conv(x)")
            header = ["format", "sparsity", "dense ms", "dense GFLOP/s", "sparsekern ms",
                      "speedup", "ideal", "fraction of ideal", "SparseProp ms (speedup)"]
            body = [[r["format"] + report.row_flags(r),
                     f"{r['sparsity']:.0%}", report.fmt_ms(r["ms"]["dense"]),
                     f"{r['dense_gflops']:.0f}", report.fmt_ms(r["ms"]["sparsekern"]),
                     f"**{r['speedup']['sparsekern']:.2f}x**", f"{r['ideal']:.1f}x",
                     f"{r['fraction_of_ideal']['sparsekern']:.2f}", _cell(r, "sparseprop")]
                    for r in sel]
            lines += ["", f"## {sel[0]['title']}: {title}", ""] + report._table(header, body)
            reasons = sorted({f"SparseProp: {n}" for r in sel for n in
                              r["peer_notes"].values()})
            if reasons:
                lines += ["", "n/a = the peer rejected this case:"] + [f"- {x}" for x in reasons]
    lines += ["", "![speedup vs sparsity](speedup.png)"]
    return "\n".join(lines) + "\n"


def figure(results: dict, out: Path) -> list[Path]:
    panels, ideal = {}, {}
    for r in results["conv"]:
        name = f"{r['title']} ({r['mode']})"
        series = panels.setdefault(name, {})
        series.setdefault(r["format"], []).append((r["sparsity"], r["speedup"]["sparsekern"]))
        if "sparseprop" in r["speedup"]:
            series.setdefault("SparseProp", []).append((r["sparsity"],
                                                        r["speedup"]["sparseprop"]))
        if (r["sparsity"], r["ideal"]) not in ideal.setdefault(name, []):
            ideal[name].append((r["sparsity"], r["ideal"]))
    return [plots.speedup_plot(out / "speedup.png",
                               f"sparsekern conv2d vs torch dense, {results['threads']} "
                               f"threads, ISA {results['isa']['active']}", panels, ideal)]


def progress_line(r: dict) -> str:
    sp = f"  sparseprop {_cell(r, 'sparseprop')}" if r["format"] == "csr" else ""
    retry = f"  (attempt {r['attempts']})" if r.get("attempts", 1) > 1 else ""
    return (f"{r['layer']:20s} {r['mode']:7s} {r['format']:5s} {r['sparsity']:4.0%}  dense "
            f"{report.fmt_ms(r['ms']['dense']):>8s} ms  sparse "
            f"{report.fmt_ms(r['ms']['sparsekern']):>8s} ms  {r['speedup']['sparsekern']:6.2f}x"
            f" (ideal {r['ideal']:4.1f}x, {r['fraction_of_ideal']['sparsekern']:.2f}){sp}{retry}")


# --- CLI ------------------------------------------------------------------------------------------

def common_options(p: argparse.ArgumentParser, budget: float, min_repeats: int = MIN_REPEATS,
                   warmup: int = 2):
    p.add_argument("--out", type=report.out_folder, default=None,
                   help="folder for RESULTS.md, results.json and the PNG (default "
                        "./benchmarks/<suite> under the current directory; with --quick a new "
                        "temporary folder)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--isa", default=None,
                   help="sparsekern kernel instruction set (set_isa), e.g. avx2")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"warm-up rounds per group ({warmup}; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds per group, an upper bound (15), at least {min_repeats} "
                        f"unless fewer are asked for")
    p.add_argument("--group-budget", type=float, default=None,
                   help=f"seconds of timed rounds one group aims at (default {budget:g})")
    p.add_argument("--retries", type=int, default=None,
                   help="re-measurements of busy groups at the end (default 1; 0 with --quick)")
    p.add_argument("--seed", type=int, default=0)


def finish_options(p, args):
    quick = args.quick
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if quick else 15)
    args.retries = args.retries if args.retries is not None else (0 if quick else 1)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.retries < 0:
        p.error("--repeats and --threads must be >= 1, --warmup and --retries >= 0")
    for s in args.sparsities:
        if not 0.0 <= s < 1.0:
            p.error(f"--sparsities: each must lie in [0, 1), got {s}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks conv",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: layers {','.join(QUICK_LAYERS)}, formats "
                        f"{','.join(QUICK_FORMATS)}, sparsity 0.9, warm-up 1, 3 repeats")
    p.add_argument("--layers", type=report.csv_type(str, LAYERS, "layer"), default=None,
                   help=f"comma list of {', '.join(LAYERS)} (default: all)")
    p.add_argument("--formats", type=report.csv_type(str, FORMATS, "format"), default=None,
                   help=f"comma list of {','.join(FORMATS)} (default: all)")
    p.add_argument("--sparsities", type=report.csv_type(float, what="sparsity"), default=None,
                   help=f"comma list (default: {','.join(map(str, SPARSITIES))})")
    p.add_argument("--batch", type=int, default=None,
                   help="one batch size for every layer instead of each layer's own")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the other layers from the results.json already in "
                        "--out (split a long sweep into several runs, one RESULTS.md)")
    common_options(p, 2.0)
    args = p.parse_args(argv)
    quick = args.quick
    args.layers = args.layers or (QUICK_LAYERS if quick else tuple(LAYERS))
    args.formats = args.formats or (QUICK_FORMATS if quick else tuple(FORMATS))
    args.sparsities = args.sparsities or (QUICK_SPARSITIES if quick else SPARSITIES)
    args.group_budget = args.group_budget if args.group_budget is not None else (
        0.3 if quick else 2.0)
    finish_options(p, args)
    if args.batch is not None and args.batch < 1:
        p.error("--batch must be >= 1")
    return args


def output_dir(args, default: Path) -> Path:
    if args.out is not None:
        return args.out
    if args.quick:
        return Path(tempfile.mkdtemp(prefix="sparsekern-bench-quick-"))
    return default


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    select_isa(args.isa)
    sparseprop_cls, sp_version, sp_reason = sparseprop_available(args.threads)
    command = shlex.join(["python", "-m", "benchmarks", "conv", *argv])
    results = metadata(command, args, sp_version, sp_reason)
    m = results["machine"]
    print(f"sparsekern conv benchmark: {command}\n  {m['model_name']}, flags "
          f"{' '.join(m['simd_flags'])}; sparsekern ISA {results['isa']['active']}; threads "
          f"{results['threads']}; SparseProp {sp_version or 'absent: ' + str(sp_reason)}",
          flush=True)
    out = output_dir(args, report.default_output_dir("conv"))
    rows = sweep(args, sparseprop_cls, progress_writer(results, "conv", out, progress_line))
    for row in rows:
        row["run"] = {"command": command, "date": results["date"]}
    if args.merge:
        rows = merged_rows(out / "results.json", rows, results, "conv", ("layer", "batch"))
    results["conv"] = rows
    results["targets"] = evaluate_targets(rows, sp_reason)
    results["runtime_s"] = time.perf_counter() - started
    results["load_average_end"] = report.load_average()
    paths = write(results, out, markdown, figure)
    print("issue targets")
    for t in results["targets"]:
        measured = f"{t['measured']:.2f}x" if t["measured"] is not None else "-"
        print(f"  {t['status']:12s} {measured:>8s}  {t['target']}")
    print(f"runtime {results['runtime_s']:.0f} s; wrote {', '.join(map(str, paths))}")
    return 0


PARTIAL = "results.partial.json"


def merged_rows(path: Path, rows: list[dict], results: dict, section: str,
                keys: tuple[str, ...]) -> list[dict]:
    """--merge: the rows of an earlier results.json in the same folder whose `keys` (layer and
    batch / model and batch) this run did not measure come first; each row keeps the command
    and date that measured it, and results["merged_commands"] lists the earlier commands."""
    if not path.is_file():
        return rows
    old = json.loads(path.read_text())
    measured = {tuple(r[k] for k in keys) for r in rows}
    kept = [r for r in old.get(section, []) if tuple(r[k] for k in keys) not in measured]
    results["merged_commands"] = [c for c in dict.fromkeys(
        r.get("run", {}).get("command") for r in kept) if c]
    return kept + rows


def merged_note(results: dict, what: str) -> list[str]:
    if not results.get("merged_commands"):
        return []
    return ["", f"Rows of other {what} merged from earlier runs (--merge): "
            + "; ".join(f"`{c}`" for c in results["merged_commands"])
            + " (each row's command and date are in results.json)."]


def progress_writer(results: dict, key: str, out: Path, line):
    """on_row callback: prints the row and rewrites out/results.partial.json with every row so
    far (re-measurements included), so a run that is killed still leaves its measurements."""
    seen = []

    def on_row(row):
        print(line(row), flush=True)
        seen.append(row)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (PARTIAL + ".tmp")
        tmp.write_text(json.dumps({**results, key: seen, "partial": True}, indent=1) + "\n")
        tmp.replace(out / PARTIAL)
    return on_row


def write(results: dict, out: Path, to_markdown, to_figures) -> list[Path]:
    """RESULTS.md, results.json and the figures (to_figures(results, out) -> paths); the
    partial file of the run is removed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL).unlink(missing_ok=True)
    md, js = out / "RESULTS.md", out / "results.json"
    md.write_text(to_markdown(results))
    js.write_text(json.dumps(results, indent=1) + "\n")
    paths = [md, js]
    try:
        paths += to_figures(results, out)
    except ImportError as exc:  # matplotlib absent: the tables still stand
        print(f"no figure: {exc}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m benchmarks model`: whole CNNs at CIFAR size -- the dense model vs the same ticket
after `sparsekern.sparsify(policy="auto")`.

For every model x mask kind x sparsity x batch size: the model (lth.models, 3x32x32 input, 10
classes, fixed seed) is magnitude-pruned layerwise to the sparsity (every prunable layer -- all
Conv2d / Linear but the first conv and the classifier -- at that sparsity), in whole channel
blocks (`block`, the BSR conv block spanning the kh x kw window; grouped convs stay unpruned) or
unstructured. The dense baseline is the plain model holding the pruned weights as zeros (torch's
dense kernels do not care). The sparse model is `sk.sparsify(copy, masks, policy="auto",
example_input=batch)`: each pruned layer timed both ways on what it really receives, keeping
the faster. Then, interleaved in one process (sparsekern.timing.measure),
  inference   model.eval(), torch.no_grad(), logits = model(x)
  train       model.train(), SGD (momentum 0.9, weight decay 5e-4): zero_grad, forward,
              cross-entropy, backward, step
speedup = dense median / sparse median. The FLOP ideal = dense conv+linear FLOPs / the FLOPs
left after pruning (BatchNorm, ReLU, pooling and layout conversions not counted), so a model
whose unpruned layers carry much of the work has an ideal well below 1 / (1 - sparsity).

Results go to --out (default ./benchmarks/model/ under the current directory, the committed folder
when run from the repository root; with --quick a fresh temporary folder):
RESULTS.md, results.json and one speedup-vs-sparsity PNG per model (<model>.png); while it runs,
results.partial.json holds every row measured so far.
"""
from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from benchmarks import conv, plots, report
from benchmarks.linear import DISTURBED, Timing, select_isa
from benchmarks.linear import time_group as linear_time_group
from lth import pruning
from lth.hparams import ModelHparams
from lth.models import build_model

MODELS = ("resnet20", "vgg16", "resnet18")
BLOCKS = {"resnet20": 8, "vgg16": 32, "resnet18": 32}  # resnet20 has 16-64 channels
MASKS = ("block", "unstructured")
SPARSITIES = (0.8, 0.9, 0.95)
BATCHES = (64, 128)
MODES = ("inference", "train")
INPUT_SHAPE, CLASSES = (3, 32, 32), 10
QUICK_MODELS, QUICK_SPARSITIES, QUICK_BATCHES = ("resnet20",), (0.9,), (64,)
SUSPECT_ERROR = 1e-4

# The end-to-end targets: (model, masks, mode, sparsity, minimum speedup).
TARGETS = (("vgg16", "block", "inference", 0.90, 4.0), ("vgg16", "block", "train", 0.90, 3.0),
           ("resnet18", "block", "inference", 0.90, 3.0),
           ("resnet20", "block", "inference", 0.90, 2.0))
TARGET_BATCH = 128
MIN_REPEATS = 5  # a whole-model step takes up to seconds on 2 cores: 5 rounds is the floor,
LONG_ROUND_S, LONG_MIN_REPEATS = 4.0, 3  # and 3 for a group whose round takes over 4 s


def time_group(fns, timing: Timing):
    """(sparsekern.timing.Measurement, warm-up rounds): linear's time_group with a floor of
    MIN_REPEATS, except that a group whose untimed sizing round took over LONG_ROUND_S
    (ResNet-18 training at batch 128 on 2 cores: ~14 s) gets LONG_MIN_REPEATS and no further
    warm-up: the sizing round warmed it up."""
    used = {}

    def warmup_after(round_s):
        long = round_s > LONG_ROUND_S
        used["warmup"] = 0 if long else timing.warmup
        return used["warmup"], LONG_MIN_REPEATS if long else MIN_REPEATS

    return linear_time_group(fns, timing, warmup_after=warmup_after), used["warmup"]


# --- tickets ------------------------------------------------------------------------------------

def ticket(name: str, kind: str, sparsity: float, block: int, seed: int):
    """(dense model holding the pruned weights as zeros, masks)."""
    model = build_model(ModelHparams(name=name), INPUT_SHAPE, CLASSES, seed)
    names = pruning.prunable_names(model, ("first_conv", "classifier"), kind)
    params = dict(model.named_parameters())
    with warnings.catch_warnings():  # a layer too small for the sparsity keeps one unit: the
        warnings.simplefilter("ignore")  # measured sparsity in the results says by how much
        masks = pruning.prune_to(pruning.magnitude_scores({n: params[n] for n in names}),
                                 pruning.full_masks(model, names), sparsity, kind,
                                 (block, block), scope="layerwise")
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    return model, masks


def flop_ideal(model: nn.Module, masks: dict, x: torch.Tensor) -> float:
    """Dense conv + linear FLOPs of one forward over the FLOPs the pruned weights leave."""
    kept = {n[: -len(".weight")]: float(m.float().mean()) for n, m in masks.items()}
    dense = sparse = 0.0
    hooks = []

    def count(name):
        def hook(module, inputs, out):
            nonlocal dense, sparse
            per_output = (module.in_features if isinstance(module, nn.Linear) else
                          module.weight[0].numel())
            flop = 2.0 * out.numel() * per_output
            dense += flop
            sparse += flop * kept.get(name, 1.0)
        return hook
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_hook(count(name)))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was)
    for h in hooks:
        h.remove()
    return dense / sparse


# --- one configuration ---------------------------------------------------------------------------

def inference_fn(model: nn.Module, x: torch.Tensor):
    model.eval()

    def call():
        with torch.no_grad():
            return model(x)
    return call


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def measure_config(name, kind, sparsity, batch, args, gen) -> list[dict]:
    block = args.block or BLOCKS[name]
    dense, masks = ticket(name, kind, sparsity, block, args.seed)
    x = torch.randn(batch, *INPUT_SHAPE, generator=gen)
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    started = time.perf_counter()
    sparse = sk.sparsify(copy.deepcopy(dense), masks, policy=args.policy, example_input=x,
                         repeats=args.policy_repeats)
    sparsify_s = time.perf_counter() - started
    found = sk.decisions(sparse)
    chosen = sum(d["chosen"] == "sparse" for d in found.values())
    ideal = flop_ideal(dense, masks, x)
    with torch.no_grad():
        dense.eval(), sparse.eval()
        ref, out = dense(x), sparse(x)
        error = float((out - ref).double().norm() / ref.double().norm())
    if error > SUSPECT_ERROR:
        print(f"WARNING: {name} {kind} {sparsity:.0%}: sparse logits differ from dense by "
              f"{error:.1e} (relative)", file=sys.stderr)
    timing = Timing(args.warmup, args.repeats, args.group_budget)
    rows = []
    for mode in args.modes:
        if mode == "inference" and args.fold_bn:  # both folded: a fair deployment pair
            fns = {"dense": inference_fn(sk.fold_batchnorm(copy.deepcopy(dense).eval()), x),
                   "sparse": inference_fn(sk.fold_batchnorm(copy.deepcopy(sparse).eval()), x)}
        elif mode == "inference":
            fns = {"dense": inference_fn(dense, x), "sparse": inference_fn(sparse, x)}
        else:  # train copies: the timing steps change their weights
            fns = {"dense": train_fn(copy.deepcopy(dense), x, y),
                   "sparse": train_fn(copy.deepcopy(sparse), x, y)}
        measured, warmup = time_group(fns, timing)
        medians = measured.seconds
        speedup = medians["dense"] / medians["sparse"]
        rows.append({
            "model": name, "masks": kind, "block": block if kind == "block" else None,
            "sparsity": sparsity, "sparsity_measured": pruning.sparsity(masks), "batch": batch,
            "mode": mode, "bn_folded": mode == "inference" and args.fold_bn,
            "ms": {k: v * 1e3 for k, v in medians.items()}, "speedup": speedup,
            "ideal": 1.0 / (1.0 - sparsity), "flop_ideal": ideal,
            "fraction_of_flop_ideal": speedup / ideal, "repeats": measured.rounds,
            "timing": measured.record(),
            "warmup": warmup, "relative_error_logits": error,
            "sparse_layers": f"{chosen}/{len(found)}", "sparsify_s": sparsify_s,
            "decisions": [{k: d.get(k) for k in ("name", "kind", "shape", "sparsity", "format",
                                                 "block", "dense_ms", "sparse_ms", "chosen",
                                                 "reason")} for d in found.values()],
            "report": sk.report(sparse), "attempts": 1})
    return rows


def disturbed_rows(rows):
    best = {}
    for r in rows:
        key = (r["model"], r["batch"], r["mode"])
        best[key] = min(best.get(key, math.inf), r["ms"]["dense"])
    return [i for i, r in enumerate(rows)
            if r["ms"]["dense"] > DISTURBED * best[(r["model"], r["batch"], r["mode"])]]


def sweep(args, on_row) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    configs = [(m, k, s, b) for m in args.models for k in args.masks for s in args.sparsities
               for b in args.batch_sizes]
    for config in configs:
        for row in measure_config(*config, args, gen):
            on_row(row)
            rows.append(row)
    for _ in range(args.retries):
        suspects = disturbed_rows(rows)
        if not suspects:
            break
        print(f"re-measuring {len(suspects)} row(s) whose dense baseline ran > {DISTURBED}x "
              f"slower than the best of its model, batch and mode (machine busy)", flush=True)
        redo = {(rows[i]["model"], rows[i]["masks"], rows[i]["sparsity"], rows[i]["batch"])
                for i in suspects}
        for config in redo:
            for new in measure_config(*config, args, gen):
                for i in suspects:
                    old = rows[i]
                    if (old["model"], old["masks"], old["sparsity"], old["batch"],
                            old["mode"]) == (*config, new["mode"]):
                        keep = new if new["ms"]["dense"] < old["ms"]["dense"] else old
                        rows[i] = {**keep, "attempts": old["attempts"] + 1}
                        on_row(rows[i])
    busy = set(disturbed_rows(rows))
    for i, row in enumerate(rows):
        row["disturbed"] = i in busy
    return rows


# --- targets and report ---------------------------------------------------------------------------

def evaluate_targets(rows, batch_sizes) -> list[dict]:
    batch = TARGET_BATCH if TARGET_BATCH in batch_sizes else batch_sizes[0]
    out = []
    for name, kind, mode, sparsity, minimum in TARGETS:
        row = next((r for r in rows if (r["model"], r["masks"], r["mode"], r["batch"]) ==
                    (name, kind, mode, batch) and math.isclose(r["sparsity"], sparsity)), None)
        measured = row["speedup"] if row else None
        note = None
        if row and measured < minimum:
            note = (f"FLOP ideal of this ticket {row['flop_ideal']:.1f}x, reached "
                    f"{row['fraction_of_flop_ideal']:.2f} of it; {row['sparse_layers']} pruned "
                    f"layers chose the sparse kernels")
        out.append({"target": f"{name} {kind} {mode} >= {minimum:g}x at {sparsity:.0%} "
                              f"(batch {batch})", "model": name, "masks": kind, "mode": mode,
                    "sparsity": sparsity, "batch": batch, "threshold": minimum,
                    "measured": measured, "note": note,
                    "fraction_of_ideal": row["fraction_of_flop_ideal"] if row else None,
                    "status": report._status(measured, measured is not None
                                             and measured >= minimum)})
    return out


def markdown(results: dict) -> str:
    how = ("speedup = dense model ms / sparsified model ms in the same interleaved group; FLOP "
           "ideal = dense conv+linear FLOPs / FLOPs left after pruning (first conv and "
           "classifier are not pruned; BatchNorm, ReLU, pooling not counted); fraction = speedup "
           "/ FLOP ideal. sparse layers = pruned layers for which sparsify(policy='auto') kept "
           "the sparse kernels (the others run masked-dense). A group whose untimed sizing "
           f"round took over {LONG_ROUND_S:g} s is timed {LONG_MIN_REPEATS}+ rounds with no "
           "further warm-up (repeats column). " + report.FLAGS_NOTE)
    lines = ["# sparsekern benchmark results: whole models", "",
             "Generated by `python -m benchmarks model`; do not edit by hand, rerun it.", ""]
    lines += conv.facts_table(results, "dense = the same model with zeros, torch kernels")
    lines += conv.merged_note(results, "models")
    lines += ["", how, "", "## Issue targets", ""]
    lines += conv.target_lines(results["targets"])
    rows = results["model"]
    for name in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == name]
        header = ["masks", "sparsity", "batch", "mode", "dense ms", "sparse ms", "speedup",
                  "FLOP ideal", "fraction", "sparse layers", "logits rel. error", "repeats"]
        body = [[r["masks"] + (f" {r['block']}x{r['block']}" if r["block"] else "")
                 + report.row_flags(r), f"{r['sparsity']:.0%}",
                 str(r["batch"]), r["mode"] + (" (BN folded)" if r.get("bn_folded") else ""),
                 report.fmt_ms(r["ms"]["dense"]),
                 report.fmt_ms(r["ms"]["sparse"]), f"**{r['speedup']:.2f}x**",
                 f"{r['flop_ideal']:.1f}x", f"{r['fraction_of_flop_ideal']:.2f}",
                 r["sparse_layers"], f"{r['relative_error_logits']:.1e}",
                 str(r["repeats"])] for r in sel]
        lines += ["", f"## {name} (3x32x32 input)", ""] + report._table(header, body)
        lines += ["", f"![{name} speedup vs sparsity]({name}.png)"]
        # the per-layer decisions of the configuration closest to the targets
        pick = next((r for r in sel if r["masks"] == "block" and math.isclose(r["sparsity"],
                                                                              0.9)), sel[0])
        lines += ["", f"Per-layer decisions of sparsify for {name}, {pick['masks']} "
                      f"{pick['sparsity']:.0%}, batch {pick['batch']} (training-step ms per "
                      f"layer on its real input):", "", "```", pick["report"], "```"]
    return "\n".join(lines) + "\n"


def figures(results: dict, out: Path) -> list[Path]:
    paths = []
    for name in dict.fromkeys(r["model"] for r in results["model"]):
        panels, ideal = {}, {}
        for r in results["model"]:
            if r["model"] != name:
                continue
            panel = f"{r['mode']}, batch {r['batch']}"
            label = r["masks"] + (f" {r['block']}x{r['block']}" if r["block"] else "")
            panels.setdefault(panel, {}).setdefault(label, []).append(
                (r["sparsity"], r["speedup"]))
            ideal.setdefault(panel, {}).setdefault(f"FLOP ideal, {r['masks']}", []).append(
                (r["sparsity"], r["flop_ideal"]))
        paths.append(plots.speedup_plot(
            out / f"{name}.png", f"{name} (3x32x32): sparsify(policy=auto) vs dense, "
            f"{results['threads']} threads, ISA {results['isa']['active']}", panels, ideal))
    return paths


def progress_line(r: dict) -> str:
    retry = f"  (attempt {r['attempts']})" if r.get("attempts", 1) > 1 else ""
    return (f"{r['model']:9s} {r['masks']:12s} {r['sparsity']:4.0%} b{r['batch']:<4d} "
            f"{r['mode']:9s} dense {report.fmt_ms(r['ms']['dense']):>8s} ms  sparse "
            f"{report.fmt_ms(r['ms']['sparse']):>8s} ms  {r['speedup']:5.2f}x (FLOP ideal "
            f"{r['flop_ideal']:4.1f}x)  sparse layers {r['sparse_layers']}{retry}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {','.join(QUICK_MODELS)}, sparsity 0.9, batch 64, both "
                        f"mask kinds, warm-up 1, 3 repeats")
    p.add_argument("--models", type=report.csv_type(str, MODELS, "model"), default=None,
                   help=f"comma list of {','.join(MODELS)} (default: all)")
    p.add_argument("--masks", type=report.csv_type(str, MASKS, "mask kind"), default=MASKS,
                   help="comma list of block,unstructured (default: both)")
    p.add_argument("--block", type=int, default=None, choices=(8, 16, 32, 64),
                   help=f"channel block of block masks (default per model: {BLOCKS})")
    p.add_argument("--sparsities", type=report.csv_type(float, what="sparsity"), default=None,
                   help=f"comma list (default: {','.join(map(str, SPARSITIES))})")
    p.add_argument("--batch-sizes", type=report.csv_type(int, what="batch size"), default=None,
                   help=f"comma list (default: {','.join(map(str, BATCHES))})")
    p.add_argument("--modes", type=report.csv_type(str, MODES, "mode"), default=MODES,
                   help="comma list of inference,train (default: both)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the other models from the results.json already in "
                        "--out (split a long sweep into several runs, one RESULTS.md)")
    p.add_argument("--fold-bn", action="store_true",
                   help="inference: fold BatchNorm into the preceding conv (sk.fold_batchnorm) "
                        "in both the dense and the sparse model")
    p.add_argument("--policy", default="auto", choices=("auto", "sparse"),
                   help="sparsify policy of the sparse model (default auto)")
    p.add_argument("--policy-repeats", type=int, default=None,
                   help="repeats of sparsify's per-layer timing (default 3; 2 with --quick)")
    conv.common_options(p, 3.0, MIN_REPEATS, warmup=1)
    args = p.parse_args(argv)
    quick = args.quick
    args.models = args.models or (QUICK_MODELS if quick else MODELS)
    args.sparsities = args.sparsities or (QUICK_SPARSITIES if quick else SPARSITIES)
    args.batch_sizes = args.batch_sizes or (QUICK_BATCHES if quick else BATCHES)
    args.group_budget = args.group_budget if args.group_budget is not None else (
        0.5 if quick else 3.0)
    if args.policy_repeats is None:
        args.policy_repeats = 2 if quick else 3
    if args.policy_repeats < 1:
        p.error(f"--policy-repeats must be >= 1, got {args.policy_repeats}")
    # the untimed sizing round of each group warms it up too: one more warm-up round is enough
    args.warmup = args.warmup if args.warmup is not None else 1
    conv.finish_options(p, args)
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    select_isa(args.isa)
    command = shlex.join(["python", "-m", "benchmarks", "model", *argv])
    results = conv.base_metadata(command, args, MIN_REPEATS)
    results.update(models=list(args.models), masks=list(args.masks),
                   blocks={m: args.block or BLOCKS[m] for m in args.models},
                   batch_sizes=list(args.batch_sizes), modes=list(args.modes),
                   policy=args.policy, policy_repeats=args.policy_repeats,
                   fold_bn=args.fold_bn,
                   optimizer="SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)",
                   input_shape=list(INPUT_SHAPE))
    m = results["machine"]
    print(f"sparsekern model benchmark: {command}\n  {m['model_name']}, flags "
          f"{' '.join(m['simd_flags'])}; sparsekern ISA {results['isa']['active']}; threads "
          f"{results['threads']}", flush=True)
    out = conv.output_dir(args, report.default_output_dir("model"))
    rows = sweep(args, conv.progress_writer(results, "model", out, progress_line))
    for row in rows:
        row["run"] = {"command": command, "date": results["date"]}
    results["runtime_s"] = time.perf_counter() - started
    results["load_average_end"] = report.load_average()
    if args.merge:
        rows = conv.merged_rows(out / "results.json", rows, results, "model",
                                ("model", "masks", "batch"))
    results["model"] = rows
    results["targets"] = evaluate_targets(rows, sorted({r["batch"] for r in rows}))
    paths = conv.write(results, out, markdown, figures)
    print("issue targets")
    for t in results["targets"]:
        measured = f"{t['measured']:.2f}x" if t["measured"] is not None else "-"
        print(f"  {t['status']:12s} {measured:>8s}  {t['target']}")
    print(f"runtime {results['runtime_s']:.0f} s; wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

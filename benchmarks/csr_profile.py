"""`python -m benchmarks csr-profile`: where the time of the CSR (unstructured) forward goes.

Issue 8 asks for each miss of a fraction target with its reason. The CSR forward packs x into
batch panels (x transposed, `panel` rows at a time), then every stored weight multiplies one
panel row: a gather of `panel` floats at a random column (csrc/cpu/simd_kernels.h). This splits
the measured time, through the public op only, into:

- floor: the same call on a weight of the same shape that keeps one entry per row: packing x,
  writing y and the dispatch, without the gathers (its share of the full call);
- kernel: full - floor, the gathers and FMAs; `kernel fraction` is the share of the dense FLOP
  rate the call would sustain if the floor cost nothing;
- ragged rows: the same call on a weight with the same number of kept entries spread evenly
  over the rows (each keeps nnz // N or one more, at uniformly random columns): the share of
  the time that comes from rows of unequal length (a uniform random mask's rows differ by
  ~sqrt(kept); magnitude pruning's by far more): the loop trip counts then vary row to row;
- gathers: the same call on a weight whose rows keep as many entries as the mask's rows but in
  its first columns (row r keeps columns 0 .. len_r - 1): every row then reads the same few
  panel rows in order, from L1 or behind the hardware prefetcher, so `gather share` = 1 -
  leading/full is what reading panel rows at random columns costs (they come from L2 once the
  panel outgrows L1: 128 bytes a kept weight at AVX2's 32-row panels);
- threads: the fraction with one thread beside the fraction with all of them;
- panel reach: at one N and M, ns per (kept weight x batch row) and per core as K grows, so the
  panel (K x panel rows x 4 bytes: 128 bytes a column with AVX2's 32-row panels) outgrows L1,
  then L2.

Every figure is a median of interleaved rounds (sparsekern.timing.measure, dense F.linear first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import sparsekern as sk
from benchmarks import profile_cli, report
from benchmarks.masks import make_mask
from sparsekern.timing import measure

SPARSITY = 0.9


@dataclass(frozen=True)
class Plan:
    shapes: tuple = report.FRACTION_SHAPES  # (K, N)
    batches: tuple = (256, 1024)
    reach_n: int = 2048
    reach_m: int = 256
    reach_k: tuple = (128, 256, 512, 1024, 2048, 3072, 4096)


QUICK = Plan(shapes=((64, 48),), batches=(40,), reach_n=48, reach_m=40, reach_k=(32, 64))


def pruned(mask: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, sk.CSR]:
    """The masked dense weight (the baseline's) and the same weight packed as CSR."""
    dense = torch.randn(mask.shape, generator=gen) * mask
    return dense, sk.CSR.from_dense(dense, mask)


def one_per_row(N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(N, K, dtype=torch.bool)
    mask[torch.arange(N), torch.randint(K, (N,), generator=gen)] = True
    return mask


def even_rows(N: int, K: int, kept: int, gen: torch.Generator) -> torch.Tensor:
    """`kept` entries over N rows, every row keeping kept // N or one more, columns uniform."""
    per_row = torch.full((N,), kept // N)
    per_row[torch.randperm(N, generator=gen)[:kept % N]] += 1
    order = torch.rand(N, K, generator=gen).argsort(dim=1)
    return torch.zeros(N, K, dtype=torch.bool).scatter_(
        1, order, torch.arange(K) < per_row[:, None])


def leading_columns(mask: torch.Tensor) -> torch.Tensor:
    """Each row of `mask` keeps as many entries as before, in its first columns."""
    return torch.arange(mask.shape[1]) < mask.sum(dim=1, keepdim=True)


def timed(fns: dict, args) -> dict:
    m = measure(fns, warmup=args.warmup, max_rounds=args.repeats)
    return {"seconds": m.seconds, "timing": m.record()}


def profile_shape(K: int, N: int, M: int, args, gen: torch.Generator) -> dict:
    """Dense, full CSR and the one-entry-per-row floor in one group; dense and the even-rows
    weight in another, dense and the leading-columns weight in a third; at every thread
    count."""
    mask = make_mask(None, N, K, SPARSITY, gen)
    dense_w, full = pruned(mask, gen)
    _, floor = pruned(one_per_row(N, K, gen), gen)
    _, even = pruned(even_rows(N, K, full.nnz, gen), gen)
    _, leading = pruned(leading_columns(mask), gen)
    x = torch.randn(M, K, generator=gen)
    row = {"K": K, "N": N, "M": M, "nnz": full.nnz, "by_threads": {}}
    with torch.no_grad():
        for threads in sorted({1, args.threads}):
            torch.set_num_threads(threads)
            t = timed({"dense": lambda: F.linear(x, dense_w), "csr": lambda: sk.linear(x, full),
                       "floor": lambda: sk.linear(x, floor)}, args)
            # A group of its own, so the even-rows call follows the dense one as the full call
            # does: a call right after the dense GEMM ran up to 20% slower at M=256 than the
            # same call later in the round, which would pass for a cost of ragged rows.
            t_even = timed({"dense": lambda: F.linear(x, dense_w),
                            "even_rows": lambda: sk.linear(x, even)}, args)
            t_lead = timed({"dense": lambda: F.linear(x, dense_w),
                            "leading_columns": lambda: sk.linear(x, leading)}, args)
            s = t["seconds"]
            s_even = t_even["seconds"]
            s_lead = t_lead["seconds"]
            ideal = 1 / (1 - SPARSITY)
            row["by_threads"][threads] = {
                **{f"{k}_ms": v * 1e3 for k, v in s.items()},
                "fraction": s["dense"] / s["csr"] / ideal,
                # None when the floor call took as long as the full one: noise, no kernel time
                "kernel_fraction": (s["dense"] / (s["csr"] - s["floor"]) / ideal
                                    if s["csr"] > s["floor"] else None),
                "floor_share": s["floor"] / s["csr"],
                "even_rows_ms": s_even["even_rows"] * 1e3,
                # each against its own group's dense run
                "ragged_share": 1 - (s_even["even_rows"] / s_even["dense"])
                                / (s["csr"] / s["dense"]),
                "leading_columns_ms": s_lead["leading_columns"] * 1e3,
                "gather_share": 1 - (s_lead["leading_columns"] / s_lead["dense"])
                                / (s["csr"] / s["dense"]),
                # ns that one core spends per kept weight and batch row (the gather-FMA unit)
                "ns_per_entry_row": s["csr"] * threads * 1e9 / (full.nnz * M),
                "dense_ns_per_weight_row": s["dense"] * threads * 1e9 / (N * K * M),
                "timing": t["timing"], "even_rows_timing": t_even["timing"],
                "leading_columns_timing": t_lead["timing"]}
    torch.set_num_threads(args.threads)
    return row



def _fraction(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def panel_rows() -> int:
    """Batch rows per x panel of the active CSR kernels; 0 without the extension (no panels)."""
    return sk._extension._C.active_panel_rows() if sk._extension.available() else 0


def panel_reach(plan: Plan, args, gen: torch.Generator) -> list[dict]:
    """One thread, N and M fixed, K growing: the per-entry cost as the x panel grows."""
    N, M = plan.reach_n, plan.reach_m
    rows = []
    torch.set_num_threads(1)
    with torch.no_grad():
        for K in plan.reach_k:
            mask = make_mask(None, N, K, SPARSITY, gen)
            dense_w, w = pruned(mask, gen)
            x = torch.randn(M, K, generator=gen)
            t = timed({"dense": lambda: F.linear(x, dense_w), "csr": lambda: sk.linear(x, w)},
                      args)
            s = t["seconds"]
            rows.append({"K": K, "panel_kib": K * panel_rows() * 4 / 1024,
                         "ns_per_entry_row": s["csr"] * 1e9 / (w.nnz * M),
                         "dense_ns_per_weight_row": s["dense"] * 1e9 / (N * K * M),
                         "fraction": s["dense"] / s["csr"] * (1 - SPARSITY),
                         "timing": t["timing"]})
    torch.set_num_threads(args.threads)
    return rows


def markdown(results: dict) -> str:
    lines = ["# sparsekern CSR forward profile", "",
             "Generated by `python -m benchmarks csr-profile`; do not edit by hand, rerun it.", "",
             *report.facts_table([
                 *report.machine_fact_pairs(results, "dense = F.linear, MKL"),
                 ("threads", f"{results['threads']} (and 1, in the same group's process)"),
                 ("timing", f"interleaved rounds (sparsekern.timing.measure), warm-up "
                            f"{results['warmup']}, at most {results['repeats']} rounds, median"),
                 ("source", results["git"]), ("runtime", f"{results['runtime_s']:.0f} s")]), "",
             f"CSR at {SPARSITY:.0%}, float32. fraction = speedup / ideal (the share of the dense "
             "FLOP rate). floor = the same call on a weight that keeps one entry per row (pack x, "
             "write y, dispatch); kernel fraction = the fraction if the floor cost nothing. "
             "ns/entry-row = ns one core spends per kept weight and batch row; dense ns/weight-row "
             "is the same unit for the dense GEMM, so their ratio is the fraction. ragged share = "
             "1 - (time with the same number of entries spread evenly over the rows) / (csr "
             "time), each relative to the dense run of its own interleaved group: what the "
             "random mask's unequal row lengths cost (negative: noise). gather share = 1 - "
             "(time when every row keeps its first columns, as many as the mask's row) / (csr "
             "time), also against its own group's dense run: what reading the x panel at "
             "random columns costs beside reading its first rows in order.", "",
             "## Split of the forward, every issue-8 shape", "",
             "| K | N | M | threads | dense ms | csr ms | fraction | floor share | kernel fraction "
             "| ragged share | gather share | ns/entry-row | dense ns/weight-row |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["shapes"]:
        for threads, t in sorted(r["by_threads"].items()):
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {threads} | {t['dense_ms']:.2f} | "
                         f"{t['csr_ms']:.2f} | {t['fraction']:.2f} | {t['floor_share']:.0%} | "
                         f"{_fraction(t['kernel_fraction'])} | {t['ragged_share']:.0%} | "
                         f"{t['gather_share']:.0%} | "
                         f"{t['ns_per_entry_row']:.3f} | "
                         f"{t['dense_ns_per_weight_row']:.4f} |")
    reach = results["reach"]
    lines += ["", f"## Panel reach: one thread, N={reach['N']}, M={reach['M']}, K growing", "",
              f"x panel = K x {results['panel_rows']} batch rows x 4 bytes, the L1/L2 footprint "
              "of the gathers.", "",
              "| K | x panel (KiB) | ns/entry-row | dense ns/weight-row | fraction |",
              "|---|---|---|---|---|"]
    for r in results["panel_reach"]:
        lines.append(f"| {r['K']} | {r['panel_kib']:.0f} | {r['ns_per_entry_row']:.3f} | "
                     f"{r['dense_ns_per_weight_row']:.4f} | {r['fraction']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    run = profile_cli.start(argv, "csr-profile", __doc__, "csr_profile")
    args, gen, results = run.args, run.gen, run.results
    plan = QUICK if args.quick else Plan()
    results.update(reach={"N": plan.reach_n, "M": plan.reach_m}, panel_rows=panel_rows(),
                   shapes=[])
    for K, N in plan.shapes:
        for M in plan.batches:
            row = profile_shape(K, N, M, args, gen)
            t = row["by_threads"][args.threads]
            print(f"K={K} N={N} M={M}: fraction {t['fraction']:.2f}, floor "
                  f"{t['floor_share']:.0%}, kernel fraction {_fraction(t['kernel_fraction'])}, "
                  f"ragged rows {t['ragged_share']:.0%}, gathers {t['gather_share']:.0%}",
                  flush=True)
            results["shapes"].append(row)
    results["panel_reach"] = panel_reach(plan, args, gen)
    run.finish(markdown)
    return 0

"""The command line and the output folder of the profile benchmarks (`csr-profile`,
`cache-profile`): the same options, the same start (threads, ISA, seed) and the same
results.json + RESULTS.md at the end."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.conv import output_dir
from benchmarks.linear import select_isa


def parse_args(argv: list[str], name: str, description: str, suite: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa", help="pin the sparsekern ISA (e.g. avx2 on an AVX-512 machine)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15, help="most timed rounds per group")
    p.add_argument("--quick", action="store_true", help="one small shape, for a smoke run")
    p.add_argument("--out", type=Path, help="folder of RESULTS.md and results.json "
                   f"(default ./benchmarks/{suite}; with --quick a fresh temporary folder)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--threads and --repeats must be >= 1, --warmup >= 0")
    return args


def start(args: argparse.Namespace) -> torch.Generator:
    """Applies --threads and --isa; the generator every profile draws its data from."""
    torch.set_num_threads(args.threads)
    select_isa(args.isa)
    return torch.Generator().manual_seed(0)


def write(args: argparse.Namespace, suite: str, results: dict, markdown: str) -> None:
    out = output_dir(args, report.default_output_dir(suite))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "RESULTS.md").write_text(markdown)
    print(f"runtime {results['runtime_s']:.0f} s; wrote {out / 'RESULTS.md'}")

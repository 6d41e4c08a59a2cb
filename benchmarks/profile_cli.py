"""The command line and the output folder of the profile benchmarks (`csr-profile`,
`cache-profile`): the same options, the same start (threads, ISA, seed, machine facts) and the
same results.json + RESULTS.md at the end."""
from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    p.add_argument("--out", type=report.out_folder, help="folder of RESULTS.md and results.json "
                   f"(default ./benchmarks/{suite}; with --quick a fresh temporary folder)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--threads and --repeats must be >= 1, --warmup >= 0")
    return args


@dataclass
class Run:
    """One profile run: its options, the generator its data comes from, and the results dict it
    fills (machine facts and timing settings already in), written out by finish()."""
    args: argparse.Namespace
    suite: str
    gen: torch.Generator
    results: dict
    started: float  # time.perf_counter() at the start

    def finish(self, markdown: Callable[[dict], str]) -> None:
        self.results["runtime_s"] = time.perf_counter() - self.started
        out = output_dir(self.args, report.default_output_dir(self.suite))
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")
        (out / "RESULTS.md").write_text(markdown(self.results))
        print(f"runtime {self.results['runtime_s']:.0f} s; wrote {out / 'RESULTS.md'}")


def start(argv: list[str], name: str, description: str, suite: str) -> Run:
    """Parses the options, applies --threads and --isa, and opens the run's results."""
    args = parse_args(argv, name, description, suite)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    select_isa(args.isa)
    results = {**report.machine_facts(shlex.join(["python", "-m", "benchmarks", name, *argv])),
               "warmup": args.warmup, "repeats": args.repeats}
    return Run(args, suite, torch.Generator().manual_seed(0), results, started)

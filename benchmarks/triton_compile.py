"""`python -m benchmarks triton-compile`: the ahead-of-time compile report of every sparsekern
Triton kernel x product x dtype (bf16/fp16/fp32) x block (16/32/64) x autotune config, for sm_80
and sm_90 (no GPU needed: triton.compile with a GPUTarget and triton's bundled ptxas): registers,
spill bytes, shared memory, tensor-core MMA, wgmma. Writes benchmarks/gpu/compile.json and
regenerates benchmarks/gpu/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import gpu_report


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks triton-compile", description=__doc__)
    p.add_argument("--arch", nargs="+", default=["80", "90"])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32", "tfloat32"])
    p.add_argument("--block", nargs="+", default=["16x16", "32x32", "64x64"])
    p.add_argument("--out", default=None, help="output folder (default benchmarks/gpu)")
    a = p.parse_args(argv)
    rows = gpu_report.aot_rows(a.arch, a.dtype, a.block)
    spills = [r for r in rows if r["spills"]]
    print(f"{len(rows)} builds, {len(spills)} with spills, "
          f"{sum(r['wgmma'] for r in rows)} with wgmma")
    for r in spills:
        print("SPILLS:", r)
    paths = gpu_report.save_section(
        "compile", ["python", "-m", "benchmarks", "triton-compile", *argv], {"rows": rows}, a.out)
    print("wrote", *paths)
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m benchmarks triton-compile`: the ahead-of-time compile report of every sparsekern
Triton kernel x product x dtype (bf16/fp16/fp32) x block (16/32/64) x autotune config, for sm_80
and sm_90 (no GPU needed: triton.compile with a GPUTarget and triton's bundled ptxas): registers,
spill bytes, shared memory, tensor-core MMA, wgmma. Also the CUDA C++ kernels of the built
sparsekern._C (csrc/cuda/, benchmarks/cuda_compile.py): the archs of its cubins and, per kernel
and arch, registers, stack/local bytes (spills) and shared memory, read with cuobjdump (skipped,
saying why, when the .so has no CUDA code). Writes benchmarks/gpu/compile.json and regenerates
benchmarks/gpu/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import cuda_compile, gpu_report, report
from sparsekern.formats import BLOCK_SIZES
from sparsekern.triton.aot import DTYPES

DTYPE_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "tf32": "tfloat32"}


def _arch(text: str) -> str:
    """80, sm_80 or sm80 -> "80"."""
    digits = text.lower().removeprefix("sm").removeprefix("_")
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a compute capability like 90 or sm_90, got "
                                         f"{text!r}")
    return digits


def _dtype(text: str) -> str:
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPES)} (or "
                                         f"{', '.join(DTYPE_ALIASES)}), got {text!r}")
    return name


def _block(text: str) -> str:
    """BKxBN, or one size for a square block: 32 -> "32x32"."""
    dims = text.lower().split("x")
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or not all(d.isdigit() and int(d) in BLOCK_SIZES for d in dims):
        raise argparse.ArgumentTypeError(f"expected BKxBN or one size, each of {BLOCK_SIZES}, "
                                         f"got {text!r}")
    return "x".join(dims)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks triton-compile", description=__doc__)
    p.add_argument("--arch", nargs="+", type=_arch, default=["80", "90"],
                   help="compute capabilities: 80 or sm_80, ... (default 80 90)")
    p.add_argument("--dtype", nargs="+", type=_dtype,
                   default=["bfloat16", "float16", "float32", "tfloat32"],
                   help=f"{', '.join(DTYPES)} or {', '.join(DTYPE_ALIASES)} (default: all)")
    p.add_argument("--block", nargs="+", type=_block, default=["16x16", "32x32", "64x64"],
                   help="BKxBN, or one size for a square block (default 16x16 32x32 64x64)")
    p.add_argument("--out", type=report.out_folder, default=None,
                   help="output folder (default benchmarks/gpu)")
    a = p.parse_args(argv)
    rows = gpu_report.aot_rows(a.arch, a.dtype, a.block)
    spills = [r for r in rows if r["spills"]]
    print(f"{len(rows)} builds, {len(spills)} with spills, "
          f"{sum(r['wgmma'] for r in rows)} with wgmma")
    for r in spills:
        print("SPILLS:", r)
    cuda_cpp = cuda_compile.report()
    if "skipped" in cuda_cpp:
        print("CUDA C++ kernels: section skipped:", cuda_cpp["skipped"])
    else:
        print(f"CUDA C++ kernels: cubins for {', '.join(cuda_cpp['archs'])}, "
              f"{len(cuda_cpp['rows'])} kernel builds")
        spills += [r for r in cuda_cpp["rows"] if cuda_compile.spills(r)]
        for r in cuda_cpp["rows"]:
            if cuda_compile.spills(r):
                print("SPILLS (CUDA C++):", r)
    paths = gpu_report.save_section(
        "compile", ["python", "-m", "benchmarks", "triton-compile", *argv],
        {"rows": rows, "cuda_cpp": cuda_cpp}, a.out)
    print("wrote", *paths)
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

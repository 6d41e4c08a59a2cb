"""Ahead-of-time compilation of every kernel x autotune config for sm_80 / sm_90, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) with the ptxas that ships with triton. From
each result we read: registers and spill bytes (ptxas -v log), shared memory (kernel metadata),
and whether the PTX uses wgmma (Hopper warpgroup MMA).

The specialisation matches a launch at the benchmark shapes (4096-wide weight, 8192 rows): every
pointer and integer argument is 16-divisible (what triton's launcher detects at run time).

Must run in a process where triton is NOT in interpreter mode (the interpreter replaces the
tl helpers the compiler needs): `python -m sparsekern.triton.aot` or the benchmarks harness,
which run it in a subprocess when needed.

    python -m sparsekern.triton.aot [--arch 80 90] [--dtype bfloat16 ...] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import re
import sys
import tempfile
import time

# "tfloat32": float32 tensors with torch.backends.cuda.matmul.allow_tf32 (tf32 tensor cores)
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "tfloat32": "fp32"}
ELEMENT_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "tfloat32": 4}
ARCHS = (80, 90)
# (bk, bn) blocks of the report; 8 is a padded variant of 16 and compiles to the same tiles.
BLOCKS = ((16, 16), (32, 32), (64, 64))


def _variants(kernel: str, dtype: str, block):
    """(signature, constexprs) pairs of one kernel for one dtype and block: one per way the
    launchers call it."""
    t = DTYPES[dtype]
    bk, bn = block
    prec = "tf32" if dtype == "tfloat32" else "ieee"  # torch's default: allow_tf32=False
    if kernel == "bsr_spmm":
        sig = dict(a_ptr=f"*{t}", v_ptr=f"*{t}", ptr_ptr="*i32", idx_ptr="*i32", perm_ptr="*i32",
                   bias_ptr=f"*{t}", out_ptr=f"*{t}", M="i32", A_COLS="i32", OUT_COLS="i32",
                   M_BUCKET="i32", stride_am="i32", stride_om="i32")
        fwd = dict(BLOCK_IN=bk, BLOCK_OUT=bn, PAD_IN=max(bk, 16), PAD_OUT=max(bn, 16),
                   TRANS=False, HAS_PERM=False, HAS_BIAS=True, ACC_F64=False, PRECISION=prec)
        dx = dict(BLOCK_IN=bn, BLOCK_OUT=bk, PAD_IN=max(bn, 16), PAD_OUT=max(bk, 16),
                  TRANS=True, HAS_PERM=True, HAS_BIAS=False, ACC_F64=False, PRECISION=prec)
        return [("forward", sig, fwd), ("grad_input", sig, dx)]
    if kernel == "bsr_sddmm":
        sig = dict(dy_ptr=f"*{t}", x_ptr=f"*{t}", row_of_ptr="*i32", col_idx_ptr="*i32",
                   out_ptr=f"*{t}", M="i32", N="i32", K="i32", M_BUCKET="i32",
                   stride_dym="i32", stride_xm="i32")
        return [("grad_weight", sig, dict(BK=bk, BN=bn, PAD_K=max(bk, 16), PAD_N=max(bn, 16),
                                          ACC_F64=False, PRECISION=prec))]
    if kernel == "csr_spmm":
        sig = dict(srcT_ptr=f"*{t}", v_ptr=f"*{t}", ptr_ptr="*i32", idx_ptr="*i32",
                   perm_ptr="*i32", bias_ptr=f"*{t}", out_ptr=f"*{t}", M="i32", OUT_COLS="i32",
                   SRC_ROWS="i32", M_BUCKET="i32", stride_src="i32", stride_om="i32")
        return [("forward", sig, dict(HAS_PERM=False, HAS_BIAS=True, ACC_F64=False)),
                ("grad_input", sig, dict(HAS_PERM=True, HAS_BIAS=False, ACC_F64=False))]
    if kernel.startswith("bsr_conv"):
        # conv geometry ints (H, W, KW, stride, ...) take any value: no divisibility hint
        geo = dict(H="i32", W="i32", C_IN="i32", OH="i32", OW="i32", C_OUT="i32", KW="i32",
                   TAPS="i32", SH="i32", SW="i32", PH="i32", PW="i32", DH="i32", DW="i32")
        consts = dict(BK=bk, BN=bn, PAD_K=max(bk, 16), PAD_N=max(bn, 16), ACC_F64=False,
                      PRECISION=prec)
        if kernel == "bsr_conv_fwd":
            sig = dict(x_ptr=f"*{t}", v_ptr=f"*{t}", ptr_ptr="*i32", idx_ptr="*i32",
                       bias_ptr=f"*{t}", out_ptr=f"*{t}", P="i32", P_BUCKET="i32", **geo)
            return [("conv_forward", sig, dict(consts, HAS_BIAS=True))]
        if kernel == "bsr_conv_dx":
            sig = dict(dy_ptr=f"*{t}", v_ptr=f"*{t}", ptr_ptr="*i32", row_idx_ptr="*i32",
                       perm_ptr="*i32", out_ptr=f"*{t}", Q="i32", Q_BUCKET="i32", **geo)
            return [("conv_grad_input", sig, consts)]
        sig = dict(dy_ptr=f"*{t}", x_ptr=f"*{t}", row_of_ptr="*i32", col_idx_ptr="*i32",
                   out_ptr=f"*{t}", P="i32", P_BUCKET="i32", **geo)
        return [("conv_grad_weight", sig, consts)]
    if kernel.startswith("csr_conv"):
        geo = dict(OH="i32", OW="i32", NNZ="i32", KW="i32", TAPS="i32", SH="i32", SW="i32",
                   DH="i32", DW="i32")
        if kernel == "csr_conv_fwd":
            sig = dict(x_ptr=f"*{t}", v_ptr=f"*{t}", ptr_ptr="*i32", idx_ptr="*i32",
                       bias_ptr=f"*{t}", out_ptr=f"*{t}", P="i32", C_OUT="i32", P_BUCKET="i32",
                       stride_xn="i32", stride_xc="i32", stride_xh="i32", **geo)
            return [("conv_forward", sig, dict(HAS_BIAS=True, ACC_F64=False))]
        if kernel == "csr_conv_dx":
            sig = dict(dy_ptr=f"*{t}", v_ptr=f"*{t}", ptr_ptr="*i32", row_idx_ptr="*i32",
                       perm_ptr="*i32", col_of_ptr="*i32", out_ptr=f"*{t}", Q="i32", H="i32",
                       W="i32", C_IN="i32", Q_BUCKET="i32", PH="i32", PW="i32",
                       stride_dn="i32", stride_dc="i32", stride_dh="i32", **geo)
            return [("conv_grad_input", sig, dict(UNIT_STRIDE=True, ACC_F64=False)),
                    ("conv_grad_input_strided", sig, dict(UNIT_STRIDE=False, ACC_F64=False))]
        sig = dict(dy_ptr=f"*{t}", x_ptr=f"*{t}", row_of_ptr="*i32", col_idx_ptr="*i32",
                   partial_ptr="*fp32", P="i32", P_BUCKET="i32", P_PER_SPLIT="i32",
                   stride_xn="i32", stride_xc="i32", stride_xh="i32", stride_dn="i32",
                   stride_dc="i32", **geo)
        return [("conv_grad_weight", sig, dict(ACC_F64=False))]
    if kernel == "csr_sddmm":
        sig = dict(dyT_ptr=f"*{t}", xT_ptr=f"*{t}", row_of_ptr="*i32", col_idx_ptr="*i32",
                   out_ptr=f"*{t}", M="i32", NNZ="i32", M_BUCKET="i32", stride_dy="i32",
                   stride_x="i32")
        return [("grad_weight", sig, dict(ACC_F64=False))]
    raise KeyError(kernel)


def _aligned(kernel, name):
    """Arguments a launch at the report's shapes passes 16-divisible (pointers; linear sizes;
    conv channel counts and pixel counts), as triton's launcher would detect."""
    if kernel.startswith("csr_conv"):
        # channel planes of a ResNet layer (e.g. 56x56) are 16-divisible, a 7x7 or 14x14 row
        # is not: the planar strides get no hint
        return name.endswith("_ptr") or name in ("C_IN", "C_OUT", "P", "Q", "P_BUCKET",
                                                   "Q_BUCKET", "P_PER_SPLIT")
    if not kernel.startswith("bsr_conv"):
        return True
    return name.endswith("_ptr") or name in ("C_IN", "C_OUT", "P", "Q", "P_BUCKET", "Q_BUCKET")


def _parse_ptxas(log: str):
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        raise RuntimeError(f"could not read registers/spills from the ptxas log:\n{log}")
    return int(regs[-1]), int(spill[-1][0]) + int(spill[-1][1])


def compile_one(kernel: str, config_index: int, dtype: str, block, arch: int, product=None):
    """Compiles one kernel/config/dtype/block for sm_<arch>; a list of report rows (one per
    product the kernel serves)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from sparsekern.triton import interpreter_active
    from sparsekern.triton.kernels import KERNELS, configs_for

    if interpreter_active():
        raise RuntimeError("sparsekern.triton.aot: triton is in interpreter mode in this process "
                           "(TRITON_INTERPRET=1); run the AOT compile in a fresh process")
    fn = KERNELS[kernel].fn
    config = configs_for(kernel, ELEMENT_SIZE[dtype])[config_index]
    rows = []
    for prod, sig, consts in _variants(kernel, dtype, block):
        if product is not None and prod != product:
            continue
        constexprs = {**consts, **config.kwargs}
        signature = {name: "constexpr" if name in constexprs else sig[name]
                     for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name in sig and _aligned(kernel, name)}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        target = GPUTarget("cuda", arch, 32)
        options = make_backend(target).parse_options(
            {"num_warps": config.num_warps, "num_stages": config.num_stages})
        log = io.StringIO()
        start = time.perf_counter()
        # a fresh cache per build: a cache hit (e.g. the same CSR kernel for fp32 and tf32)
        # would skip ptxas and its log
        with tempfile.TemporaryDirectory(prefix="sparsekern-aot-") as cache, \
                knobs.nvidia.scope(), knobs.cache.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.cache.dir = cache
            compiled = triton.compile(src, target=target, options=options.__dict__)
        seconds = time.perf_counter() - start
        regs, spills = _parse_ptxas(log.getvalue())
        ptx = compiled.asm["ptx"]
        rows.append(dict(
            kernel=kernel, product=prod, dtype=dtype, block=f"{block[0]}x{block[1]}",
            config=_config_str(config), config_index=config_index, arch=f"sm_{arch}",
            regs=regs, spills=spills, smem=int(compiled.metadata.shared),
            wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx or "wgmma" in ptx,
            round_nearest=_rounds_to_nearest(ptx, dtype) if _stores_dtype(sig, dtype) else None,
            loop_instr_per_fma=None if uses_tensor_cores(kernel, dtype) else
            _loop_instructions_per_fma(ptx),
            compile_s=round(seconds, 2)))
    return rows


def _loop_instructions_per_fma(ptx: str):
    """PTX instructions per FMA in the basic block with the most FMAs (the gather kernels'
    inner loop): the issue cost of one multiply-add with its index arithmetic, loads and
    masks. PTX, not SASS: an integer division is one PTX instruction but ~20 SASS ones."""
    blocks = re.split(r"\n\$L__BB\d+_\d+:", ptx)
    body = max(blocks, key=lambda b: len(re.findall(r"\bfma\.rn", b)))
    fmas = len(re.findall(r"\bfma\.rn", body))
    if not fmas:
        return None
    instructions = [line for line in body.splitlines() if line.strip()
                    and not line.strip().startswith(("//", ".", "$", "{", "}"))]
    return round(len(instructions) / fmas, 1)


def _stores_dtype(sig, dtype):
    """Whether the kernel writes its output in `dtype` (the CSR conv dW writes fp32 partial
    sums, added and rounded to the output type by torch)."""
    return sig.get("out_ptr") == f"*{DTYPES[dtype]}"


def _rounds_to_nearest(ptx: str, dtype: str):
    """16-bit outputs: every fp32 -> fp16/bf16 conversion in the PTX rounds to nearest even."""
    if dtype in ("float32", "tfloat32"):
        return None
    kind = "bf16" if dtype == "bfloat16" else "f16"
    converts = re.findall(rf"cvt\.(\w+)(?:\.\w+)*\.{kind}(?:x2)?\.f32", ptx)
    return bool(converts) and all(mode == "rn" for mode in converts)


def _config_str(config):
    tiles = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles},warps={config.num_warps},stages={config.num_stages}"


def applies(kernel: str, dtype: str) -> bool:
    """tf32 is a tl.dot precision: the CSR kernels (no tl.dot) build the same code for
    "tfloat32" as for "float32", so the report compiles them once, as float32."""
    return dtype != "tfloat32" or kernel.startswith("bsr")


def uses_tensor_cores(kernel: str, dtype: str) -> bool:
    """The BSR kernels multiply with tl.dot (tensor cores for 16-bit types; fp32 runs ieee
    FMA by default); the CSR kernels are CUDA-core gathers by design."""
    return kernel.startswith("bsr") and dtype in ("float16", "bfloat16", "tfloat32")


def expect_wgmma(kernel: str, product: str, dtype: str, block, config, arch: int) -> bool:
    """Where Triton's sm_90 lowering uses wgmma: a 16-bit tl.dot whose M dim (rows of the
    accumulator) is at least 64 with 4 warps per warpgroup. Forward/dX (linear and conv): M =
    BLOCK_M / BLOCK_P (>= 64 in every 16-bit config); dW: M = bk (64-blocks only).
    """
    if arch < 90 or not uses_tensor_cores(kernel, dtype):
        return False
    if kernel in ("bsr_spmm", "bsr_conv_fwd", "bsr_conv_dx"):
        m_dim = config.kwargs.get("BLOCK_M", config.kwargs.get("BLOCK_P"))
    else:  # dW: the accumulator is [bk, bn]
        m_dim = block[0]
    return m_dim >= 64 and config.num_warps % 4 == 0


def run(archs=ARCHS, dtypes=tuple(DTYPES), blocks=BLOCKS, kernels=None, log=None):
    from sparsekern.triton.kernels import KERNELS, configs_for
    rows = []
    for name, dtype in itertools.product(kernels or KERNELS, dtypes):
        if not applies(name, dtype):
            continue
        configs = configs_for(name, ELEMENT_SIZE[dtype])
        # CSR kernels do not depend on the block
        kernel_blocks = blocks if name.startswith("bsr") else blocks[:1]
        for block, ci, arch in itertools.product(kernel_blocks, range(len(configs)), archs):
            for row in compile_one(name, ci, dtype, block, arch):
                if not name.startswith("bsr"):
                    row["block"] = "-"
                rows.append(row)
                if log:
                    log(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekern.triton.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--block", nargs="+", default=[f"{a}x{b}" for a, b in BLOCKS],
                   help="bk x bn blocks, e.g. 32x32")
    p.add_argument("--kernel", nargs="+", default=None)
    p.add_argument("--json", default=None, help="write the rows as JSON here (else stdout)")
    a = p.parse_args(argv)
    blocks = [tuple(int(v) for v in b.split("x")) for b in a.block]
    rows = run(a.arch, a.dtype, blocks, a.kernel,
               log=lambda r: print(json.dumps(r), file=sys.stderr, flush=True))
    text = json.dumps(rows, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

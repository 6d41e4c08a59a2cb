"""The Triton kernels (sparsekern/triton) on CPU tensors in the Triton interpreter, through the
backend switch, against the float64 reference: every op x dtype on small shapes with ragged
dims, empty block rows/columns (CSR rows/columns), all-pruned and all-kept weights, one row.

Tolerances: float32 and float64 as the CPU kernels (1e-5 / 1e-10 relative); float16/bfloat16 at
most 2x the error of torch's own low-precision dense result of the same product (reference.py
run in that dtype), as tests/sparsekern/test_bf16.py does.

bfloat16 BSR: the interpreter of triton 3.8 multiplies bf16 *bit patterns* in tl.dot (triton
issue #11584, "not supported yet"), so the BSR kernels (tl.dot) are proven in bf16 by
compilation for sm_80/sm_90 (test_triton_compile.py) and on a real GPU (test_triton_cuda.py);
test_bf16_dot_is_broken_in_the_interpreter below checks that this is still true. The CSR kernels
use no tl.dot and run in bf16 here.

The interpreter must be chosen before triton is imported: this module does so at collection
(sparsekern.triton.use_interpreter), i.e. before any test of the session runs.
"""
import pytest
import torch

import sparsekern as sk
import sparsekern.triton as skt
from _sk_helpers import (FORMATS, TOL, format_ops, op_args, poisoned, random_problem,
                         reference_op, rel_err, run_op)
from sparsekern import reference

skt.use_interpreter()

F16, BF16 = torch.float16, torch.bfloat16
BF16_BSR_REASON = ("compile-only: triton 3.8's interpreter multiplies bf16 bit patterns in "
                   "tl.dot (triton #11584); bf16 BSR is proven by the sm_80/sm_90 compile test")


@pytest.fixture
def triton_backend():
    with skt.backend("triton"):
        yield


# (m, n, k, block (bn, bk), sparsity, empty) per case; BSR cycles through blocks incl. 8s.
CASES = {
    "ragged": (37, 70, 90, (16, 8), 0.6, False),
    "empty_rows_cols": (20, 64, 96, (16, 32), 0.5, True),
    "all_pruned": (9, 40, 24, (8, 16), 1.0, False),
    "all_kept": (33, 48, 40, (32, 16), 0.0, False),
    "one_row": (1, 72, 128, (64, 64), 0.5, True),
}
DTYPES = [torch.float32, F16, BF16, torch.float64]


def _param(fmt, case, dtype):
    name = str(dtype).split(".")[1]
    marks = [pytest.mark.skip(reason=BF16_BSR_REASON)] if fmt == "bsr" and dtype == BF16 else []
    return pytest.param(fmt, case, dtype, marks=marks, id=f"{fmt}-{case}-{name}")


PARAMS = [_param(fmt, case, dt) for fmt in FORMATS for case in CASES for dt in DTYPES]


def _problem(fmt, case, dtype):
    m, n, k, block, sparsity, empty = CASES[case]
    W, x, dy, bias = random_problem(fmt, m, n, k, block=block, sparsity=sparsity, empty=empty)
    return W.to(dtype), x.to(dtype), dy.to(dtype), bias.to(dtype)


def _upcast(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _round_toward_zero_bf16(t):
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(BF16)


def _check(name, out, args, dtype):
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype} != {dtype}"
    assert not bool(out.isnan().any()), f"{name}: NaN (unwritten output elements?)"
    exact = reference_op(name, args)
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    ours = rel_err(out, exact)
    if dtype in TOL:
        assert ours < TOL[dtype], f"{name}: relative error {ours:.2e} >= {TOL[dtype]:.0e}"
    elif dtype == BF16:
        # The interpreter stores bf16 by truncation (round toward zero: about 2x the error of
        # the round-to-nearest a GPU does, cvt.rn.bf16.f32, checked in test_triton_compile.py),
        # so in bf16 the kernel must be bit for bit its fp32-accumulated result truncated, and
        # that fp32 result must be as accurate as the fp32 kernels.
        acc = run_op(name, _upcast(args))
        assert rel_err(acc, exact) < TOL[torch.float32], name
        same = out.view(torch.int16) == _round_toward_zero_bf16(acc).view(torch.int16)
        assert bool(same.all()), f"{name}: {int((~same).sum())} bf16 outputs differ from the " \
            "fp32 accumulation rounded once"
    else:
        theirs = rel_err(getattr(reference, name)(*args), exact)
        assert ours <= 2 * theirs + 1e-6, (
            f"{name} {dtype}: error {ours:.2e} > 2 x torch's own {theirs:.2e}")


@pytest.mark.parametrize("fmt,case,dtype", PARAMS)
def test_ops_match_reference(fmt, case, dtype, triton_backend):
    W, x, dy, bias = _problem(fmt, case, dtype)
    if case == "all_pruned":
        assert W.nnz == 0
    if case == "all_kept":
        assert W.nnz == W.shape[0] * W.shape[1]
    for name in format_ops(fmt):
        args = op_args(name, W, x, dy, bias)
        with poisoned(dy.numel(), x.numel(), max(W.values.numel(), 1), dtype=dtype):
            out = run_op(name, args)
        _check(name, out, args, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_without_bias_and_every_block_shape(fmt, triton_backend):
    """No bias; BSR over every (bn, bk) pair incl. the padded 8s and rectangular blocks."""
    blocks = [(bn, bk) for bn in (8, 16, 32, 64) for bk in (8, 16, 32, 64)] if fmt == "bsr" \
        else [(16, 16)]
    for block in blocks:
        W, x, dy, _ = random_problem(fmt, 19, 75, 67, block=block, sparsity=0.5)
        for name in format_ops(fmt):
            args = op_args(name, W, x, dy, None)
            with poisoned(dy.numel(), x.numel(), W.values.numel(), dtype=torch.float32):
                out = run_op(name, args)
            _check(name, out, args, torch.float32)


def test_bf16_dot_is_broken_in_the_interpreter(triton_backend):
    """Why bf16 BSR is compile-only here: if this starts failing, triton fixed #11584 and the
    bf16 BSR cases above should run in the interpreter instead of being skipped."""
    W, x, dy, bias = _problem("bsr", "all_kept", BF16)
    args = op_args("bsr_linear", W, x, dy, bias)
    assert rel_err(run_op("bsr_linear", args), reference_op("bsr_linear", args)) > 1.0


def test_zero_rows(triton_backend):
    for fmt in FORMATS:
        W, x, dy, bias = random_problem(fmt, 0, 24, 40, block=(8, 8))
        for name in format_ops(fmt):
            args = op_args(name, W, x, dy, bias)
            out = run_op(name, args)
            assert out.shape == reference_op(name, args).shape
            if name.endswith("grad_weight"):
                assert bool((out == 0).all())


def test_switch_overrides_and_restores_the_cpu_kernels():
    """The C++ CPU kernels reject float16 (sk.linear widens float16 to float32 before them, see
    ops.py, so the op is called directly); the Triton kernels take it; switching back restores
    the C++ kernels."""
    W, x, _, _ = random_problem("bsr", 8, 32, 32, block=(16, 16))
    W, x = W.to(F16), x.to(F16)
    assert sk.get_backend() == "cpu"
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        run_op("bsr_linear", op_args("bsr_linear", W, x, None, None))
    with skt.backend("triton"):
        assert sk.get_backend() == "triton"
        assert sk.linear(x, W).dtype == F16
    assert sk.get_backend() == "cpu"
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        run_op("bsr_linear", op_args("bsr_linear", W, x, None, None))


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="one of"):
        sk.set_backend("cuda")


def test_cuda_kernels_are_registered():
    """CUDA tensors dispatch to the Triton launchers (registered without a GPU), every op."""
    from sparsekern.triton import launch
    assert set(skt.OP_NAMES) == set(launch.OPS)
    for name in skt.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{name}", "CUDA"), name


# ---- bad input: clear errors naming the argument ------------------------------------------------

def test_launchers_reject_bad_input(triton_backend):
    W, x, dy, bias = random_problem("bsr", 6, 32, 48, block=(16, 16))
    args = list(op_args("bsr_linear", W, x, dy, bias))
    cases = [
        (0, x.double(), "values has dtype torch.float32 but the other operand is torch.float64"),
        (0, x.to(torch.int64), "x must be float16, bfloat16, float32 or float64"),
        (0, x[None], "x must be 2-D"),
        (3, W.block_col_idx.long(), "block_col_idx must be a 1-D int32 tensor"),
        (3, W.block_col_idx + 100, r"block_col_idx entries must lie in \[0, 3\)"),
        (2, W.block_row_ptr[:-1], "block_row_ptr must have 3 entries"),
        (7, bias[:-1], "bias must have 32 entries"),
    ]
    for pos, bad, match in cases:
        bad_args = list(args)
        bad_args[pos] = bad
        with pytest.raises((ValueError, RuntimeError), match=match):
            run_op("bsr_linear", tuple(bad_args))
    from sparsekern.triton import launch
    with pytest.raises(ValueError, match="all tensors must be on one device, got x on meta"):
        launch.bsr_linear(x.to("meta"), *args[1:])
    gw = op_args("bsr_linear_grad_weight", W, x, dy, bias)
    with pytest.raises((ValueError, RuntimeError), match="x has 5 rows but grad_out has 6"):
        run_op("bsr_linear_grad_weight", (gw[0], gw[1][:5]) + gw[2:])
    C, x, dy, bias = random_problem("csr", 6, 32, 48)
    cw = op_args("csr_linear", C, x, dy, bias)
    with pytest.raises((ValueError, RuntimeError), match="col_idx entries must lie in"):
        run_op("csr_linear", cw[:3] + (C.col_idx + 48,) + cw[4:])


def test_switch_after_compiled_triton_import_is_a_clear_error():
    """The interpreter can only be chosen before triton is imported: a fresh process that
    imported triton first gets an error that says so (and stays on the CPU kernels)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SPARSEKERN_BACKEND")}
    code = ("import triton, sparsekern as sk\n"
            "try:\n    sk.set_backend('triton')\nexcept RuntimeError as e:\n    print(e)\n"
            "print(sk.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=300).stdout
    assert "already imported in compiled mode" in out and "SPARSEKERN_BACKEND=triton" in out
    assert out.strip().endswith("cpu")

"""The CUDA C++ CSR kernels (csrc/cuda/csr_spmm.cu: ops csr_linear_cuda and
csr_linear_grad_input_cuda) and the opt-in switch that sends CUDA CSR linears to them.

Everywhere: the schemas exist in every build; a build made where the CUDA toolkit and a CUDA
torch were present has CUDA kernels for both ops and cubins for sm_80 and sm_90 (so CI, which has
nvcc but no GPU, proves the CUDA extension compiled); CPU tensors get a clear error; the switch
and its environment variable. On a GPU (else skipped: "no CUDA device"): the kernels against the
float64 reference (every dtype, subwarp width, ragged and empty cases, poisoned outputs),
autograd through sk.linear, opcheck and torch.compile.
"""
import glob
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsekern as sk
import sparsekern.triton as skt
from _sk_helpers import assert_close, random_problem, rebuild, rel_err
from benchmarks import cuda_compile
from sparsekern import _extension, ops, reference

ROOT = Path(__file__).resolve().parents[2]
HAVE_CUDA = torch.cuda.is_available()
OPS = ("csr_linear_cuda", "csr_linear_grad_input_cuda")
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device")


def _setup_module():
    spec = importlib.util.spec_from_file_location("sparsekern_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_expected() -> bool:
    """Whether setup.py builds csrc/cuda/ here: a CUDA torch and a toolkit (SPARSEKERN_CUDA=0
    not set)."""
    cu_sources = glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))
    return _setup_module().build_with_cuda(cu_sources) is not None


@pytest.fixture
def csr_cuda():
    """Restores the switch after a test that flips it."""
    previous = sk.csr_cuda_enabled()
    yield
    sk.set_csr_cuda(previous)


# ---- everywhere ----------------------------------------------------------------------------

def test_cuda_kernels_are_built_where_the_toolkit_is():
    for op in OPS:  # ops.cpp is always compiled: the schemas exist in every build
        assert hasattr(torch.ops.sparsekern, op), op
    expected = _cuda_expected()
    assert _extension._C.cuda_built is expected
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}",
                                                              "CUDA") is expected, op
    assert ops.cuda_csr_built() is expected
    if expected and cuda_compile.find_cuobjdump():
        assert cuda_compile.cubin_archs(cuda_compile.extension_path()) == ["sm_80", "sm_90"]


def test_cuda_kernels_compile_without_spills():
    report = cuda_compile.report()
    if not _cuda_expected():
        assert "skipped" in report  # a CPU-only build: nothing compiled, nothing to read
        return
    if "skipped" in report:
        pytest.skip(report["skipped"])  # no cuobjdump on this machine
    kernels = {(r["kernel"], r["arch"]) for r in report["rows"]}
    for dtype in ("float", "c10::Half", "c10::BFloat16"):
        for lanes in (8, 16, 32):
            for arch in ("sm_80", "sm_90"):
                assert (f"csr_spmm_kernel<{dtype}, {lanes}>", arch) in kernels
    assert [r for r in report["rows"] if cuda_compile.spills(r)] == []


@pytest.mark.parametrize("op", OPS)
def test_cpu_tensors_are_refused_with_the_reason(op):
    W, x, dy, bias = random_problem("csr", 4, 6, 8, sparsity=0.5)
    if op == "csr_linear_cuda":
        args = (x, W.values, W.row_ptr, W.col_idx, W.col_ptr, W.row_idx, W.perm, bias, 6)
        operand, cpu_op = "x", "csr_linear"
    else:
        args = (dy, W.values, W.col_ptr, W.row_idx, W.perm, 8)
        operand, cpu_op = "grad_out", "csr_linear_grad_input"
    with pytest.raises(RuntimeError, match=rf"sparsekern\.{op}: {operand} is on cpu; this op has "
                                           rf"a CUDA kernel only.*sparsekern\.{cpu_op} runs CPU"):
        getattr(torch.ops.sparsekern, op)(*args)


def test_switch_routes_cuda_tensors_only(csr_cuda):
    assert not sk.csr_cuda_enabled()  # Triton is the default until measured on a GPU
    assert ops.csr_linear_op_name("cuda") == ops.csr_linear_op_name("cpu") == "csr_linear"
    if not ops.cuda_csr_built():
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            sk.set_csr_cuda(True)
        assert not sk.csr_cuda_enabled()
        return
    sk.set_csr_cuda(True)
    assert sk.csr_cuda_enabled()
    assert ops.csr_linear_op_name("cuda") == "csr_linear_cuda"
    assert ops.csr_linear_op_name("cpu") == "csr_linear"
    W, x, _, bias = random_problem("csr", 5, 7, 9, sparsity=0.6)
    assert_close(sk.linear(x, W, bias), reference.csr_linear(
        x.double(), W.values.double(), W.row_ptr, W.col_idx, W.col_ptr, W.row_idx, W.perm,
        bias.double(), 7), 1e-5, "CPU linear with the switch on")
    sk.set_csr_cuda(False)
    assert ops.csr_linear_op_name("cuda") == "csr_linear"


ENV_SCRIPT = textwrap.dedent("""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import sparsekern as sk
    print(sk.csr_cuda_enabled())
    for w in caught:
        if "SPARSEKERN_CSR_CUDA" in str(w.message):
            print(w.message)
""")


@pytest.mark.parametrize("value", ["1", "maybe"])
def test_environment_variable(value):
    done = subprocess.run([sys.executable, "-c", ENV_SCRIPT], capture_output=True, text=True,
                          timeout=240, env=dict(os.environ, SPARSEKERN_CSR_CUDA=value))
    assert done.returncode == 0, done.stderr[-3000:]
    enabled, *warned = done.stdout.splitlines()
    if value == "maybe":
        assert enabled == "False"
        assert warned == ["SPARSEKERN_CSR_CUDA='maybe' is not 1 or 0; the CUDA CSR linears run "
                          "the Triton kernels"]
    elif ops.cuda_csr_built():
        assert enabled == "True" and warned == []
    else:
        assert enabled == "False" and len(warned) == 1 and "no CUDA kernels" in warned[0]


# ---- on a GPU ------------------------------------------------------------------------------

def _cuda_problem(dtype, m, n, k, sparsity=0.7, empty=True):
    W, x, dy, bias = random_problem("csr", m, n, k, sparsity=sparsity, empty=empty)
    return W.to("cuda").to(dtype), x.cuda().to(dtype), dy.cuda().to(dtype), bias.cuda().to(dtype)


def _poisoned_call(fn, *numels, dtype):
    """fn() after NaN-filled blocks of those sizes went back to the caching allocator, which
    hands the same memory to the op's outputs: an element the kernel never writes stays NaN."""
    garbage = [torch.full((n,), float("nan"), dtype=dtype, device="cuda") for n in numels]
    del garbage
    out = fn()
    torch.cuda.synchronize()
    return out


def _check(out, exact, low_precision_ref, dtype, what):
    assert out.is_cuda and out.dtype == dtype, what
    if dtype == torch.float32:
        assert_close(out, exact, 1e-5, what)
    else:  # at most 2x the error of torch's own result in that dtype
        assert not bool(out.isnan().any()), f"{what}: NaN (unwritten) elements"
        assert rel_err(out, exact) <= 2 * rel_err(low_precision_ref, exact) + 1e-6, what


# m: 3 and 40 run 8- and 16-lane subwarps (one ragged m-tile), 300 whole warps over several
# m-tiles with a ragged last one and rows not a multiple of the 16-byte vector.
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 40, 300])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernels_match_reference(dtype, m, with_bias):
    n, k = 72, 130
    W, x, dy, bias = _cuda_problem(dtype, m, n, k)
    bias = bias if with_bias else None
    fwd = (x, W.values, W.row_ptr, W.col_idx, W.col_ptr, W.row_idx, W.perm, bias, n)
    out = _poisoned_call(lambda: torch.ops.sparsekern.csr_linear_cuda(*fwd), m * n, k * m,
                         dtype=dtype)
    exact = reference.csr_linear(*(a.double() if isinstance(a, torch.Tensor) and
                                   a.is_floating_point() else a for a in fwd))
    _check(out, exact, reference.csr_linear(*fwd), dtype, "csr_linear_cuda")
    dx_args = (dy, W.values, W.col_ptr, W.row_idx, W.perm, k)
    dx = _poisoned_call(lambda: torch.ops.sparsekern.csr_linear_grad_input_cuda(*dx_args),
                        m * k, dtype=dtype)
    exact = reference.csr_linear_grad_input(dy.double(), W.values.double(), W.col_ptr,
                                            W.row_idx, W.perm, k)
    _check(dx, exact, reference.csr_linear_grad_input(*dx_args), dtype,
           "csr_linear_grad_input_cuda")


@needs_cuda
@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_all_kept_and_all_pruned(sparsity):
    W, x, dy, bias = _cuda_problem(torch.float32, 33, 40, 24, sparsity=sparsity, empty=False)
    out = torch.ops.sparsekern.csr_linear_cuda(x, W.values, W.row_ptr, W.col_idx, W.col_ptr,
                                               W.row_idx, W.perm, bias, 40)
    assert_close(out, torch.nn.functional.linear(x.double(), W.to_dense().double(),
                                                 bias.double()), 1e-5, f"sparsity {sparsity}")


@needs_cuda
def test_bad_arguments_are_rejected():
    W, x, dy, bias = _cuda_problem(torch.float16, 8, 16, 24)
    op = torch.ops.sparsekern.csr_linear_cuda
    args = [x, W.values, W.row_ptr, W.col_idx, W.col_ptr, W.row_idx, W.perm, bias, 16]
    for i, value, message in [
            (0, x.double(), "x must be float32, float16 or bfloat16"),
            (1, W.values.float(), "values has dtype Float but x is Half"),
            (2, W.row_ptr.long(), "row_ptr must be a 1-D int32 tensor"),
            (3, W.col_idx[:-1], "col_idx must have"),
            (7, bias[:3], r"bias must have shape \[16\]"),
            (1, W.values.cpu(), "values must be a CUDA tensor")]:
        bad = list(args)
        bad[i] = value
        with pytest.raises(RuntimeError, match=message):
            op(*bad)


def _direct():
    if skt.interpreter_active():
        pytest.skip("triton runs in the interpreter in this process (dW runs on Triton): "
                    "these tests run in a fresh compiled-mode process "
                    "(test_gpu_suite_in_compiled_process)")


@needs_cuda
def test_gpu_suite_in_compiled_process():
    if not skt.interpreter_active():
        pytest.skip("this process runs triton compiled: the tests below run directly")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SPARSEKERN_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", "autograd or opcheck"],
                          cwd=Path(__file__).parent, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@needs_cuda
def test_autograd_and_compile_through_the_switch(csr_cuda):
    _direct()
    W, x, dy, bias = _cuda_problem(torch.bfloat16, 64, 96, 128)
    values = W.values.clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()

    def f(x, v, b):
        return sk.linear(x, rebuild(W, v), b)

    triton = torch.autograd.grad(f(xg, values, bg), (xg, values, bg), dy)
    sk.set_csr_cuda(True)
    y = f(xg, values, bg)
    grads = torch.autograd.grad(y, (xg, values, bg), dy)
    yc = torch.compile(f, fullgraph=True)(xg, values, bg)
    grads_c = torch.autograd.grad(yc, (xg, values, bg), dy)
    assert_close(yc.float(), y.float(), 1e-6, "compiled forward")
    for name, a, b, t in zip(("dx", "dvalues", "dbias"), grads, grads_c, triton):
        assert_close(b.float(), a.float(), 1e-6, f"compiled {name}")
        assert_close(a.float(), t.float(), 2e-2, f"{name}: CUDA C++ vs Triton")


@needs_cuda
def test_opcheck():
    _direct()
    W, x, dy, bias = _cuda_problem(torch.float32, 16, 48, 64)
    torch.library.opcheck(torch.ops.sparsekern.csr_linear_cuda.default,
                          (x.requires_grad_(), W.values.requires_grad_(), W.row_ptr, W.col_idx,
                           W.col_ptr, W.row_idx, W.perm, bias, 48))
    torch.library.opcheck(torch.ops.sparsekern.csr_linear_grad_input_cuda.default,
                          (dy, W.values.detach(), W.col_ptr, W.row_idx, W.perm, 64))

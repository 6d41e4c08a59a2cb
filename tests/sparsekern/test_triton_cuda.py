"""The Triton kernels on a real GPU: CUDA tensors dispatch to them through the ordinary ops.
Every op (linear and conv2d, BSR and CSR) x float16/bfloat16/float32 against the float64
reference (16-bit: at most 2x the error of torch's own CUDA result in that dtype), autograd,
opcheck, torch.compile(fullgraph=True).

Skipped with "no CUDA device" where there is none. Where there is one but this process runs
triton in the interpreter (the other test_triton_* modules choose it at collection), the CUDA
kernels would be refused (sparsekern.triton never runs CUDA tensors in the interpreter), so
test_cuda_suite_in_compiled_process re-runs this file in a fresh process without
TRITON_INTERPRET, and the direct tests skip saying so.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsekern as sk
import sparsekern.triton as skt
from _sk_helpers import (CONV_BSR_OPS, CONV_CSR_OPS, FORMATS, assert_close, conv_op_args,
                         conv_problem, format_ops, op_args, random_problem, rebuild,
                         reference_op, rel_err, run_op)
from sparsekern import reference

HAVE_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device")


def _direct():
    if skt.interpreter_active():
        pytest.skip("triton runs in the interpreter in this process: these tests run in a "
                    "fresh compiled-mode process (test_cuda_suite_in_compiled_process)")


def test_cuda_suite_in_compiled_process():
    if not skt.interpreter_active():
        pytest.skip("this process runs triton compiled: the tests below run directly")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SPARSEKERN_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__], cwd=Path(__file__).parent, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _cuda_problem(fmt, dtype, m=300, n=200, k=328, block=(32, 16)):
    W, x, dy, bias = random_problem(fmt, m, n, k, block=block, sparsity=0.7, empty=True)
    return W.to("cuda").to(dtype), x.cuda().to(dtype), dy.cuda().to(dtype), bias.cuda().to(dtype)


def _check_cuda(name, out, args, dtype):
    torch.cuda.synchronize()
    assert out.is_cuda and out.dtype == dtype and not bool(out.isnan().any()), name
    exact = reference_op(name, args)
    if dtype == torch.float32:
        tol = 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5
        assert_close(out, exact, tol, name)
    else:
        theirs = rel_err(getattr(reference, name)(*args), exact)
        assert rel_err(out, exact) <= 2 * theirs + 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (64, 64), (8, 32)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_ops_on_cuda(fmt, block, dtype):
    _direct()
    if fmt == "csr" and block != (16, 16):
        pytest.skip("CSR has no block: one block parameter suffices")
    W, x, dy, bias = _cuda_problem(fmt, dtype, block=block)
    for name in format_ops(fmt):
        args = op_args(name, W, x, dy, bias)
        _check_cuda(name, run_op(name, args), args, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_autograd_and_compile_on_cuda(fmt):
    _direct()
    W, x, dy, bias = _cuda_problem(fmt, torch.bfloat16, m=64, n=96, k=128)
    values = W.values.clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()

    def f(x, v, b):
        return sk.linear(x, rebuild(W, v), b)

    y = f(xg, values, bg)
    grads = torch.autograd.grad(y, (xg, values, bg), dy)
    compiled = torch.compile(f, fullgraph=True)
    yc = compiled(xg, values, bg)
    grads_c = torch.autograd.grad(yc, (xg, values, bg), dy)
    assert_close(yc.float(), y.float(), 1e-6, "compiled forward")
    for a, b in zip(grads_c, grads):
        assert_close(a.float(), b.float(), 1e-6, "compiled grad")


@pytest.mark.parametrize("name", skt.LINEAR_OPS)
def test_opcheck_on_cuda(name):
    _direct()
    W, x, dy, bias = _cuda_problem(name.split("_")[0], torch.float32, m=16, n=48, k=64)
    torch.library.opcheck(getattr(torch.ops.sparsekern, name), op_args(name, W, x, dy, bias))


def test_mixed_devices_are_rejected():
    _direct()
    W, x, dy, bias = _cuda_problem("bsr", torch.float16, m=8, n=32, k=32)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        sk.linear(x.cpu(), W)


def _cuda_conv_problem(fmt, dtype, stride=1, padding=1, dilation=1, kernel=3):
    W, x, dy, bias, geo = conv_problem(fmt, 3, 40, 48, (11, 9), kernel, stride, padding,
                                       dilation, block=(16, 16), sparsity=0.7, empty=True,
                                       structured=fmt == "bsr")
    return W.to("cuda").to(dtype), x.cuda().to(dtype), dy.cuda().to(dtype), \
        bias.cuda().to(dtype), geo


CONV_GEOMETRIES = {"3x3_pad": dict(), "stride2_dilated": dict(stride=2, dilation=2),
                   "1x1": dict(kernel=1, padding=0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", list(CONV_GEOMETRIES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_ops_on_cuda(fmt, geometry, dtype):
    _direct()
    W, x, dy, bias, geo = _cuda_conv_problem(fmt, dtype, **CONV_GEOMETRIES[geometry])
    for name in CONV_BSR_OPS if fmt == "bsr" else CONV_CSR_OPS:
        args = conv_op_args(name, W, x, dy, bias, geo)
        out = run_op(name, args)
        if not name.endswith("grad_weight"):
            assert out.is_contiguous(memory_format=torch.channels_last), name
        _check_cuda(name, out, args, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_autograd_and_compile_on_cuda(fmt):
    _direct()
    W, x, dy, bias, (stride, padding, dilation) = _cuda_conv_problem(fmt, torch.bfloat16)
    values = W.values.clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()

    def f(x, v, b):
        return sk.conv2d(x, rebuild(W, v), b, stride=stride, padding=padding, dilation=dilation)

    y = f(xg, values, bg)
    grads = torch.autograd.grad(y, (xg, values, bg), dy)
    yc = torch.compile(f, fullgraph=True)(xg, values, bg)
    grads_c = torch.autograd.grad(yc, (xg, values, bg), dy)
    assert_close(yc.float(), y.float(), 1e-6, "compiled forward")
    for a, b in zip(grads_c, grads):
        assert_close(a.float(), b.float(), 1e-6, "compiled grad")


@pytest.mark.parametrize("name", CONV_CSR_OPS)
def test_csr_conv_opcheck_on_cuda(name):
    _direct()
    W, x, dy, bias, geo = _cuda_conv_problem("csr", torch.float32)
    torch.library.opcheck(getattr(torch.ops.sparsekern, name),
                          conv_op_args(name, W, x, dy, bias, geo))

"""Hypothesis fuzzing of the six ops against reference.py: shapes (ragged, one row, no rows),
sparsities (0 %, 100 % and in between), structured and unstructured masks, empty rows/columns,
all 16 block shapes, both dtypes and every available instruction set.

Tensor data comes from a torch.Generator seeded by hypothesis: fresh every run, reproducible
when hypothesis replays a failure. SPARSEKERN_FUZZ_EXAMPLES=<n> runs a longer campaign.
"""
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekern as sk
from _sk_helpers import (BLOCK_SIZES, ISAS, TOL, assert_close, block_mask, check_op,
                         format_ops, rebuild, unstructured_mask, use_isa)

EXAMPLES = int(os.environ.get("SPARSEKERN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])

sparsities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
batch_rows = st.one_of(st.sampled_from([0, 1]), st.integers(0, 80))


@st.composite
def kernels(draw):
    """(dtype, isa): float32 on any available ISA, or float64 (scalar kernels)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    isa = draw(st.sampled_from(ISAS)) if dtype == torch.float32 else "scalar"
    return dtype, isa


def _empties(draw, count):
    return draw(st.lists(st.integers(0, count - 1), max_size=min(count, 3), unique=True))


@st.composite
def bsr_problems(draw):
    bn, bk = draw(st.sampled_from(BLOCK_SIZES)), draw(st.sampled_from(BLOCK_SIZES))
    # up to ~3 blocks per dim (at most 160), often ragged (not a multiple of the block)
    n = draw(st.integers(1, min(3 * bn + 7, 160)))
    k = draw(st.integers(1, min(3 * bk + 7, 160)))
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    sparsity = draw(sparsities)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**63 - 1)))
    if draw(st.booleans()):  # whole blocks, some block rows / columns emptied
        mask = block_mask(n, k, (bn, bk), sparsity, _empties(draw, nb), _empties(draw, kb), g)
    else:  # unstructured: the format stores its block closure
        mask = unstructured_mask(n, k, sparsity, _empties(draw, n), _empties(draw, k), g)
    return (bn, bk), n, k, mask, g


@st.composite
def csr_problems(draw):
    n, k = draw(st.integers(1, 130)), draw(st.integers(1, 130))
    sparsity = draw(sparsities)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**63 - 1)))
    mask = unstructured_mask(n, k, sparsity, _empties(draw, n), _empties(draw, k), g)
    return None, n, k, mask, g


def _check_all_ops(fmt, problem, m, kernel, with_bias):
    block, n, k, mask, g = problem
    dtype, isa = kernel
    weight = torch.randn(n, k, dtype=dtype, generator=g)
    if fmt == "bsr":
        W = sk.BlockSparse.from_dense(weight, mask, block=block)
    else:
        W = sk.CSR.from_dense(weight, mask)
    x = torch.randn(m, k, dtype=dtype, generator=g)
    dy = torch.randn(m, n, dtype=dtype, generator=g)
    bias = torch.randn(n, dtype=dtype, generator=g) if with_bias else None
    with use_isa(isa):
        forward, grad_input, grad_weight = format_ops(fmt)
        y = check_op(forward, W, x, dy, bias)
        check_op(grad_input, W, x, dy)
        check_op(grad_weight, W, x, dy)
    if W.nnz == 0:  # all pruned: y is exactly the bias (or zeros)
        expected = torch.zeros(m, n, dtype=dtype) if bias is None else bias.expand(m, n)
        assert torch.equal(y, expected)


@FUZZ
@given(problem=bsr_problems(), m=batch_rows, kernel=kernels(), with_bias=st.booleans())
def test_fuzz_bsr_ops(problem, m, kernel, with_bias):
    _check_all_ops("bsr", problem, m, kernel, with_bias)


@FUZZ
@given(problem=csr_problems(), m=batch_rows, kernel=kernels(), with_bias=st.booleans())
def test_fuzz_csr_ops(problem, m, kernel, with_bias):
    _check_all_ops("csr", problem, m, kernel, with_bias)


@settings(deadline=None, max_examples=max(EXAMPLES // 2, 1),
          suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["bsr", "csr"]), problem=bsr_problems(),
       lead=st.lists(st.integers(0, 4), max_size=3), kernel=kernels(), with_bias=st.booleans())
def test_fuzz_linear_autograd(fmt, problem, lead, kernel, with_bias):
    """sk.linear end to end (any leading dims, forward + backward through the registered
    autograd formula) against torch autograd on the dense masked weight in float64."""
    block, n, k, mask, g = problem
    dtype, isa = kernel
    weight = torch.randn(n, k, dtype=dtype, generator=g)
    W = sk.BlockSparse.from_dense(weight, mask, block=block) if fmt == "bsr" else \
        sk.CSR.from_dense(weight, mask)
    x = torch.randn(*lead, k, dtype=dtype, generator=g)
    grad = torch.randn(*lead, n, dtype=dtype, generator=g)
    bias = torch.randn(n, dtype=dtype, generator=g) if with_bias else None

    xs = x.clone().requires_grad_()
    values = W.values.detach().clone().requires_grad_()
    bs = bias.clone().requires_grad_() if with_bias else None
    with use_isa(isa):
        y = sk.linear(xs, rebuild(W, values), bs)
        y.backward(grad)

    x64 = x.double().requires_grad_()
    dense64 = W.to_dense().double().requires_grad_()
    b64 = bias.double().requires_grad_() if with_bias else None
    y64 = torch.nn.functional.linear(x64, dense64, b64)
    y64.backward(grad.double())
    tol = TOL[dtype]
    assert_close(y, y64, tol, "y")
    assert_close(xs.grad, x64.grad, tol, "dx")
    assert_close(rebuild(W, values.grad).to_dense(), dense64.grad * W.mask(), tol, "dvalues")
    if with_bias:
        assert_close(bs.grad, b64.grad, tol, "dbias")

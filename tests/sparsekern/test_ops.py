"""The six ops against reference.py (float64 oracle), on poisoned memory, for every available
instruction set (float32) and float64; plus sk.linear's batching and the ISA controls."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import reference
from _sk_helpers import (BLOCK_SIZES, BSR_OPS, CSR_OPS, ISAS, OPS, TOL, assert_close,
                         block_closure, check_op, format_ops, op_args, random_problem,
                         poisoned, reference_op, rebuild, run_op, use_isa)

# name: (M rows, out_features N, in_features K, block (bn, bk), sparsity, empty rows/cols)
CASES = {
    "aligned": (64, 64, 128, (32, 32), 0.5, False),
    "ragged": (37, 45, 70, (16, 32), 0.5, False),
    "one_row": (1, 40, 24, (8, 16), 0.5, False),
    "no_rows": (0, 40, 24, (8, 8), 0.5, False),
    "empty_rows_cols": (29, 50, 61, (16, 8), 0.3, True),
    "all_pruned": (13, 33, 20, (16, 16), 1.0, False),
    "all_kept": (19, 40, 72, (8, 64), 0.0, False),
    "tall_batch": (131, 24, 40, (8, 16), 0.6, True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference(op, case, dtype):
    m, n, k, block, sparsity, empty = CASES[case]
    fmt = op[:3]
    W, x, dy, bias = random_problem(fmt, m, n, k, block=block, sparsity=sparsity, dtype=dtype,
                                    empty=empty)
    if sparsity == 1.0:
        assert W.nnz == 0
    if empty:  # the structure really has empty rows and columns
        dense_mask = W.mask()
        assert not bool(dense_mask.any(1).all()) and not bool(dense_mask.any(0).all())
    if op.endswith("_linear"):
        for b in (None, bias):
            out = check_op(op, W, x, dy, b)
            if sparsity == 1.0:  # nothing stored: the output is exactly the bias (or zeros)
                expected = torch.zeros(m, n, dtype=dtype) if b is None else b.expand(m, n)
                assert torch.equal(out, expected)
    else:
        out = check_op(op, W, x, dy)
        if sparsity == 1.0 or m == 0:
            assert not bool(out.any()), f"{op}: expected exact zeros"


@pytest.mark.parametrize("bn,bk", list(itertools.product(BLOCK_SIZES, BLOCK_SIZES)))
def test_bsr_every_block_shape(bn, bk, dtype):
    """All 16 block shapes, ragged in both dims (not multiples of the block) and with an empty
    block row and block column."""
    W, x, dy, bias = random_problem("bsr", 27, 2 * bn + 5, 2 * bk + 3, block=(bn, bk),
                                    sparsity=0.3, dtype=dtype, empty=True)
    for op in BSR_OPS:
        check_op(op, W, x, dy, bias)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 64, 65, 97])
def test_csr_batch_tails(m, dtype):
    """Batch sizes around the CSR panel widths (32 rows for AVX2, 64 for AVX-512)."""
    W, x, dy, bias = random_problem("csr", m, 37, 29, sparsity=0.6, dtype=dtype, empty=True)
    for op in CSR_OPS:
        check_op(op, W, x, dy, bias)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_thread_partitioning(fmt, threads, isa):
    """at::parallel_for splits block rows x batch-row chunks by the thread count: every split
    must give the same (reference) answer. CSR takes whole batch chunks per thread when their
    count divides by the threads (100 rows: 4 chunks of 32, 2 of 64) and splits rows otherwise
    (75 rows on 2 threads, 100 on 3); its dW packs chunk by chunk, adding into dW after the
    first, where rows are many (150 here, 16 not)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, n in ((100, 16), (75, 150)):
            W, x, dy, bias = random_problem(fmt, m, n, 90, block=(16, 16), sparsity=0.5,
                                            empty=True)
            for op in format_ops(fmt):
                check_op(op, W, x, dy, bias)
    finally:
        torch.set_num_threads(previous)


def test_bsr_ops_accept_other_multiples_of_8(dtype):
    """The ops' contract is block dims that are positive multiples of 8 (the formats restrict
    themselves to 8..64): a hand-made 24 x 40 block weight must be exact too."""
    bn, bk, n, k, m = 24, 40, 50, 90, 13
    present = torch.rand(3, 3) < 0.6
    present[0, 0] = present[2, 1] = True
    present[1] = False
    mask = present.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    dense = torch.randn(n, k, dtype=dtype) * mask
    blocks = torch.zeros(3 * bn, 3 * bk, dtype=dtype)
    blocks[:n, :k] = dense
    grid = blocks.view(3, bn, 3, bk).permute(0, 2, 3, 1)  # [Nb, Kb, bk, bn]
    rows, cols = present.nonzero(as_tuple=True)
    W = sk.BlockSparse.__new__(sk.BlockSparse)  # block dims outside BLOCK_SIZES: bypass checks
    W.values = grid[rows, cols].contiguous()
    W.shape = (n, k)
    W.block_row_ptr = torch.cat([torch.zeros(1, dtype=torch.long),
                                 present.sum(1).cumsum(0)]).int()
    W.block_col_idx = cols.int()
    t_cols, t_rows = present.t().nonzero(as_tuple=True)  # column-major order of the blocks
    position = torch.full(present.shape, -1, dtype=torch.long)
    position[rows, cols] = torch.arange(rows.numel())
    W.block_col_ptr = torch.cat([torch.zeros(1, dtype=torch.long),
                                 present.sum(0).cumsum(0)]).int()
    W.block_row_idx = t_rows.int()
    W.block_perm = position[t_rows, t_cols].int()
    x, dy, bias = (torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype),
                   torch.randn(n, dtype=dtype))
    # the reference itself reproduces the dense product for this hand-made weight
    assert_close(reference_op("bsr_linear", op_args("bsr_linear", W, x, dy, bias)),
                 F.linear(x.double(), dense.double(), bias.double()), 1e-12, "reference")
    for op in BSR_OPS:
        check_op(op, W, x, dy, bias)


# ---- the oracle itself ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_reference_is_plain_dense_math(fmt):
    """reference.py against the obvious formulas on the dense masked weight, so the oracle is
    not trusted blindly: y = x Wm^T + b, dX = dY Wm, dW = (dY^T X) at stored positions."""
    W, x, dy, bias = random_problem(fmt, 23, 45, 70, block=(16, 32), sparsity=0.5,
                                    dtype=torch.float64, empty=True)
    dense = W.to_dense()
    assert bool(dense.any())
    y = reference_op(f"{fmt}_linear", op_args(f"{fmt}_linear", W, x, dy, bias))
    assert_close(y, x @ dense.T + bias, 1e-13, "forward")
    dx = reference_op(f"{fmt}_linear_grad_input", op_args(f"{fmt}_linear_grad_input", W, x, dy,
                                                          None))
    assert_close(dx, dy @ dense, 1e-13, "grad_input")
    dw = reference_op(f"{fmt}_linear_grad_weight", op_args(f"{fmt}_linear_grad_weight", W, x, dy,
                                                           None))
    full = dy.T @ x
    assert_close(rebuild(W, dw).to_dense(), full * W.mask(), 1e-13, "grad_weight")
    if fmt == "bsr":  # the transposed index describes the same weight
        same = reference.bsr_transposed_to_dense(W.values, W.block_col_ptr, W.block_row_idx,
                                                 W.block_perm, *W.shape)
        assert torch.equal(same, dense)


# ---- sk.linear -----------------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(), (0,), (1,), (2, 3), (2, 1, 4)], ids=str)
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_linear_leading_dims(fmt, lead, dtype):
    W, _, _, bias = random_problem(fmt, 1, 30, 44, block=(8, 16), sparsity=0.5, dtype=dtype)
    x = torch.randn(*lead, 44, dtype=dtype)
    for b in (None, bias):
        y = sk.linear(x, W, b)
        assert y.shape == (*lead, 30) and y.dtype == dtype
        ref = F.linear(x.double(), W.to_dense().double(), None if b is None else b.double())
        assert_close(y, ref, TOL[dtype], f"linear{lead}")


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_linear_non_contiguous_operands(fmt, dtype):
    """Transposed x, broadcast (stride-0) x and strided bias are read correctly."""
    W, _, _, _ = random_problem(fmt, 1, 30, 44, block=(16, 8), sparsity=0.5, dtype=dtype)
    dense = W.to_dense().double()
    bias = torch.randn(60, dtype=dtype)[::2]
    for x in (torch.randn(44, 9, dtype=dtype).t(), torch.randn(1, 44, dtype=dtype).expand(5, 44),
              torch.randn(6, 88, dtype=dtype)[:, ::2]):
        assert not x.is_contiguous()
        assert_close(sk.linear(x, W, bias), F.linear(x.double(), dense, bias.double()),
                     TOL[dtype], "non-contiguous")


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_linear_autograd_matches_reference(fmt, dtype):
    """Backward of sk.linear (3-D x) equals torch autograd through the dense masked weight."""
    W, _, _, bias = random_problem(fmt, 1, 45, 70, block=(16, 32), sparsity=0.5, dtype=dtype,
                                   empty=True)
    x = torch.randn(3, 5, 70, dtype=dtype, requires_grad=True)
    values = W.values.detach().clone().requires_grad_()
    b = bias.clone().requires_grad_()
    grad = torch.randn(3, 5, 45, dtype=dtype)
    sk.linear(x, rebuild(W, values), b).backward(grad)

    x64 = x.detach().double().requires_grad_()
    dense64 = W.to_dense().double().requires_grad_()
    b64 = bias.double().requires_grad_()
    F.linear(x64, dense64, b64).backward(grad.double())
    tol = TOL[dtype]
    assert_close(x.grad, x64.grad, tol, "dx")
    assert_close(b.grad, b64.grad, tol, "dbias")
    assert_close(rebuild(W, values.grad).to_dense(), dense64.grad * W.mask(), tol, "dvalues")


def test_linear_needs_input_grad_subsets():
    """Only the requested gradients are computed, and each matches the full computation."""
    W, x, _, bias = random_problem("bsr", 11, 40, 50, block=(8, 8), dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (x, W.values, bias)]
    sk.linear(full[0], rebuild(W, full[1]), full[2]).sum().backward()
    for wanted in range(3):
        ts = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((x, W.values, bias))]
        sk.linear(ts[0], rebuild(W, ts[1]), ts[2]).sum().backward()
        for i, t in enumerate(ts):
            if i == wanted:
                assert_close(t.grad, full[i].grad, 1e-12, f"grad {i}")
            else:
                assert t.grad is None


def test_linear_rejects_non_format_weight():
    with pytest.raises(TypeError, match="weight must be a sparsekern.BlockSparse, CSR or NM "
                                        r"made from a 2-D linear weight, got Tensor of shape \(4, 3\)"):
        sk.linear(torch.randn(2, 3), torch.randn(4, 3))
    conv_weight = sk.CSR.from_dense(torch.randn(8, 4, 3, 3))  # a conv format is not a linear one
    with pytest.raises(TypeError, match=r"2-D linear weight, got CSR of shape \(8, 4, 3, 3\)"):
        sk.linear(torch.randn(2, 36), conv_weight)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_linear_zero_in_features(fmt):
    """A weight with in_features == 0 is a valid shape (nn.Linear(0, n) is): y = bias."""
    w = torch.randn(5, 0)
    W = sk.BlockSparse.from_dense(w, block=(8, 8)) if fmt == "bsr" else sk.CSR.from_dense(w)
    bias = torch.randn(5)
    y = sk.linear(torch.randn(3, 0), W, bias)
    assert torch.equal(y, bias.expand(3, 5))


# ---- instruction sets ----------------------------------------------------------------------

def test_isas_agree_with_each_other():
    """The same float32 problem on every ISA: all within float32 rounding of each other."""
    W, x, dy, bias = random_problem("bsr", 33, 70, 90, block=(16, 32), sparsity=0.4)
    outs = {}
    for name in ISAS:
        with use_isa(name):
            outs[name] = [run_op(op, op_args(op, W, x, dy, bias)) for op in BSR_OPS]
    for name in ISAS:
        for a, b in zip(outs[name], outs["scalar"]):
            assert_close(a, b, 1e-5, name)


def test_block_closure_helper():
    """Sanity of the test helper used as the independent definition of a BSR mask."""
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[9, 11] = True
    closure = block_closure(mask, (8, 8))
    assert closure[8:, 8:].all() and int(closure.sum()) == 2 * 4


def test_poison_harness_catches_unwritten_output():
    """The poisoning used by check_op: fresh allocations are NaN inside `poisoned()`, and an
    output with one element never written fails the comparison."""
    with poisoned(64, dtype=torch.float32):
        fresh = torch.empty(64)
        partly_written = torch.empty(8, 8)
        partly_written[:, :7] = 1.0
    assert bool(torch.isnan(fresh).all())
    assert torch.get_default_dtype() == torch.float32
    assert not torch.are_deterministic_algorithms_enabled()  # restored
    with pytest.raises(AssertionError, match="NaN elements"):
        assert_close(partly_written, torch.ones(8, 8), 1e-5)

"""The six conv2d ops against reference.py (float64 oracle) on poisoned memory, for every
available instruction set (float32) and float64; sk.conv2d (padding modes, unbatched input,
memory formats, bias, autograd); gradcheck, opcheck, torch.compile and bfloat16."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import sparsekern as sk
from _sk_helpers import (BLOCK_SIZES, CONV_BSR_OPS, CONV_CSR_OPS, CONV_OPS, FORMATS, ISAS, TOL,
                         assert_close, check_conv_op, conv_mask, conv_op_args, conv_problem,
                         make_format, pair, poisoned, rebuild, reference_op, rel_err, run_op,
                         use_isa)
from sparsekern import reference

BF16 = torch.bfloat16


def conv_ops(fmt):
    return CONV_BSR_OPS if fmt == "bsr" else CONV_CSR_OPS


# Batches around the SIMD panel widths: test_conv_csr_batch_tails / test_conv_bsr_batch_tails.
# name: (N, C_in, C_out, (H, W), kernel, stride, padding, dilation, block (bn, bk), sparsity,
#        empty block rows/cols (BSR) or rows/cols (CSR))
CASES = {
    "3x3_s1_p1": (4, 24, 40, (8, 8), 3, 1, 1, 1, (16, 8), 0.5, True),
    "3x3_s2_p1": (3, 20, 33, (9, 10), 3, 2, 1, 1, (16, 16), 0.5, True),
    "1x1_s1": (5, 40, 24, (6, 7), 1, 1, 0, 1, (8, 16), 0.5, True),
    "1x1_s2": (3, 17, 35, (7, 9), 1, 2, 0, 1, (32, 8), 0.4, True),
    "1x1_s2_p1": (2, 9, 12, (5, 6), 1, 2, 1, 1, (8, 8), 0.3, False),
    "5x5_p2": (2, 12, 20, (11, 10), 5, 1, 2, 1, (8, 8), 0.5, True),
    "5x5_s3": (2, 10, 9, (13, 12), 5, 3, 0, 1, (8, 8), 0.5, False),
    "2x2_even": (3, 19, 21, (7, 8), 2, 1, 0, 1, (16, 8), 0.5, True),
    "2x2_s2_p1": (2, 11, 13, (6, 7), 2, 2, 1, 1, (8, 8), 0.5, True),
    "4x4_s2_p1": (2, 10, 17, (9, 8), 4, 2, 1, 1, (16, 8), 0.4, True),
    "dilation2": (2, 18, 26, (10, 9), 3, 1, 2, 2, (8, 16), 0.5, True),
    "asym_a": (2, 13, 30, (9, 12), (3, 2), (1, 2), (2, 0), (1, 2), (16, 8), 0.5, True),
    "asym_b": (3, 21, 10, (11, 6), (1, 3), (2, 1), (0, 1), (2, 1), (8, 16), 0.5, True),
    "asym_c": (2, 9, 14, (7, 13), (5, 3), (3, 2), (1, 3), (1, 3), (8, 8), 0.4, True),
    "odd_spatial": (3, 9, 10, (5, 3), 3, 1, 1, 1, (8, 8), 0.4, False),
    "spatial_1x1": (4, 10, 12, (1, 1), 3, 1, 1, 1, (8, 8), 0.3, False),
    "kernel_fills_input": (2, 8, 16, (3, 4), (3, 4), 1, 0, 1, (8, 8), 0.2, False),
    "stride_gt_kernel": (2, 12, 9, (10, 11), 2, 3, 0, 1, (8, 8), 0.3, True),
    "wide_ragged": (2, 70, 45, (5, 5), 3, 1, 1, 1, (32, 64), 0.3, True),
    "spatial_32": (2, 16, 24, (32, 31), 3, 1, 1, 1, (8, 8), 0.5, True),
    "resnet_like_90": (4, 64, 64, (8, 8), 3, 1, 1, 1, (32, 32), 0.9, False),
    "batch1": (1, 24, 40, (8, 8), 3, 1, 1, 1, (16, 16), 0.5, True),
    "batch0": (0, 10, 14, (5, 5), 3, 1, 1, 1, (8, 8), 0.5, False),
    "all_kept": (3, 20, 24, (6, 6), 3, 1, 1, 1, (8, 16), 0.0, False),
    "all_pruned": (3, 20, 24, (6, 6), 3, 1, 1, 1, (8, 16), 1.0, False),
}


def _case(fmt, case, dtype, generator=None, structured=True):
    n, c_in, c_out, hw, kernel, stride, padding, dilation, block, sparsity, empty = CASES[case]
    return conv_problem(fmt, n, c_in, c_out, hw, kernel, stride, padding, dilation, block=block,
                        sparsity=sparsity, dtype=dtype, empty=empty, structured=structured,
                        generator=generator)


def _assert_has_empty_rows_and_cols(W):
    """The structure really has an empty (block) row and (block) column (where the grid has
    more than one)."""
    if isinstance(W, sk.BlockSparse):
        pattern = W.block_pattern()
    else:
        pattern = W.mask().reshape(W.matrix_shape)
    if pattern.shape[0] > 1:
        assert not bool(pattern.any(1).all()), "no empty row"
    if pattern.shape[1] > 1:
        assert not bool(pattern.any(0).all()), "no empty column"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_op_matches_reference(op, case, dtype):
    fmt = op[:3]
    W, x, dy, bias, geometry = _case(fmt, case, dtype)
    sparsity, empty = CASES[case][-2:]
    if sparsity == 1.0:
        assert W.nnz == 0
    if empty:
        _assert_has_empty_rows_and_cols(W)
    if op.endswith("_conv2d"):
        for b in (None, bias):
            out = check_conv_op(op, W, x, dy, b, geometry)
            if sparsity == 1.0:  # nothing stored: exactly the bias (or zeros)
                expected = torch.zeros_like(out) if b is None else \
                    b.view(1, -1, 1, 1).expand_as(out)
                assert torch.equal(out, expected)
    else:
        out = check_conv_op(op, W, x, dy, None, geometry)
        if sparsity == 1.0 or x.shape[0] == 0:
            assert not bool(out.any()), f"{op}: expected exact zeros"


@pytest.mark.parametrize("case", CASES)
def test_conv_bsr_forward_with_implicit_padding(case, dtype):
    """With whole channel blocks the BSR forward pads implicitly (taps outside the input
    masked): a channels_last input is read in place, an NCHW one only transposed. Every
    geometry of CASES (strides, dilation, asymmetric and over-wide padding, kernels as large
    as the input), channels rounded up to whole blocks, in both layouts, agrees with the
    reference; the ragged originals in CASES take the padded copy."""
    n, c_in, c_out, hw, kernel, stride, padding, dilation, block, sparsity, empty = CASES[case]
    c_in = math.ceil(c_in / block[1]) * block[1]
    W, x, dy, bias, geometry = conv_problem("bsr", n, c_in, c_out, hw, kernel, stride, padding,
                                            dilation, block=block, sparsity=sparsity,
                                            dtype=dtype, empty=empty)
    for b in (None, bias):
        nchw = check_conv_op("bsr_conv2d", W, x, dy, b, geometry)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert_close(check_conv_op("bsr_conv2d", W, x_cl, dy, b, geometry), nchw,
                     10 * TOL[dtype], f"{case}: channels_last vs NCHW")


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_input_never_read_gets_zero_grad(fmt, dtype):
    """Stride 3 with a 1x1 kernel reads only every third row/column of x: dX is exactly zero
    elsewhere (those elements must be written, not left over)."""
    W, x, dy, _, geometry = conv_problem(fmt, 3, 10, 12, (8, 7), 1, 3, 0, 1, block=(8, 8),
                                         sparsity=0.3, dtype=dtype)
    op = f"{fmt}_conv2d_grad_input"
    dx = check_conv_op(op, W, x, dy, None, geometry)
    read = torch.zeros(8, 7, dtype=torch.bool)
    read[::3, ::3] = True
    assert not bool(dx[:, :, ~read].any())


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_bsr_unstructured_mask_uses_block_closure(fmt, dtype):
    """An unstructured mask (BSR stores its block closure, zeros inside kept blocks)."""
    W, x, dy, bias, geometry = conv_problem(fmt, 3, 21, 27, (6, 5), 3, 1, 1, 1, block=(8, 16),
                                            sparsity=0.9, dtype=dtype, structured=False)
    for op in conv_ops(fmt):
        check_conv_op(op, W, x, dy, bias, geometry)


@pytest.mark.parametrize("bn,bk", list(itertools.product(BLOCK_SIZES, BLOCK_SIZES)))
def test_conv_bsr_every_block_shape(bn, bk, dtype):
    """All 16 block shapes, channels ragged in both dims, an empty block row and column."""
    W, x, dy, bias, geometry = conv_problem("bsr", 2, 2 * bk + 3, 2 * bn + 5, (5, 4), 3, 1, 1, 1,
                                            block=(bn, bk), sparsity=0.3, dtype=dtype,
                                            empty=True)
    _assert_has_empty_rows_and_cols(W)
    for op in CONV_BSR_OPS:
        check_conv_op(op, W, x, dy, bias, geometry)


# The benchmark's layer shapes (issue 6) at a small batch: wide channels and large feature maps
# reach the cache-blocking paths (pixel chunks, column segments, dW pixel chunks) that the small
# cases above do not. (N, C_in, C_out, hw, kernel, stride, padding, block)
LAYER_CASES = {
    "3x3_256_8x8": (2, 256, 256, (8, 8), 3, 1, 1, (32, 32)),
    "3x3_64_32x32": (2, 64, 64, (32, 32), 3, 1, 1, (32, 32)),
    "3x3_s2_128_16x16": (2, 128, 256, (16, 16), 3, 2, 1, (16, 32)),
    "1x1_512_2048_7x7": (2, 512, 2048, (7, 7), 1, 1, 0, (32, 32)),
}


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_benchmark_layer_shapes(fmt, case, dtype):
    n, c_in, c_out, hw, kernel, stride, padding, block = LAYER_CASES[case]
    W, x, dy, bias, geometry = conv_problem(fmt, n, c_in, c_out, hw, kernel, stride, padding, 1,
                                            block=block, sparsity=0.9, dtype=dtype, empty=True)
    for op in conv_ops(fmt):
        check_conv_op(op, W, x, dy, bias, geometry)


@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 31, 32, 33, 63])
@pytest.mark.parametrize("stride, hw", [(1, (4, 3)), (2, (5, 6))])
def test_conv_csr_batch_tails(n, stride, hw, dtype):
    """Batch sizes around the CSR conv panel widths (16 images for AVX2, 32 for AVX-512), at
    stride 1 (dX as a conv) and stride 2 (dX by scatter), with output pixel counts (12, 9) that
    leave partial pixel groups in every kernel."""
    W, x, dy, bias, geometry = conv_problem("csr", n, 5, 9, hw, 3, stride, 1, 1, sparsity=0.5,
                                            dtype=dtype, empty=True)
    for op in CONV_CSR_OPS:
        check_conv_op(op, W, x, dy, bias, geometry)


@pytest.mark.parametrize("n", [1, 31, 33, 65])
def test_conv_bsr_batch_tails(n, dtype):
    W, x, dy, bias, geometry = conv_problem("bsr", n, 11, 19, (3, 5), 3, 2, 1, 1, block=(8, 8),
                                            sparsity=0.4, dtype=dtype, empty=True)
    for op in CONV_BSR_OPS:
        check_conv_op(op, W, x, dy, bias, geometry)


def _layouts(t):
    """t in NCHW, channels_last, a non-contiguous slice, and an expanded (stride-0) batch."""
    n = t.shape[0]
    sliced = torch.stack([t, t], -1)[..., 0]  # every other element of a wider tensor: == t
    assert torch.equal(sliced, t) and not sliced.is_contiguous()
    yield "nchw", t.contiguous()
    yield "channels_last", t.contiguous(memory_format=torch.channels_last)
    yield "sliced", sliced
    if n > 0:
        yield "expanded", t[:1].expand_as(t)


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_ops_accept_any_memory_format(fmt, dtype):
    """x / grad_out in NCHW, channels_last, strided and stride-0 layouts: each call agrees with
    the reference, the results for the same values agree with each other, and no input is
    modified or aliased by an output (padding 0: the kernels may read a channels_last x in
    place, and dX may be their working buffer)."""
    for padding in (0, 1):
        W, x, dy, bias, geometry = conv_problem(fmt, 3, 16, 24, (6, 5), 3, 1, padding, 1,
                                                block=(8, 8), sparsity=0.5, dtype=dtype)
        bias = torch.stack([bias, bias], 1)[:, 0]  # a strided bias
        assert not bias.is_contiguous()
        first = {}
        for (xname, xl), (dname, dyl) in zip(_layouts(x), _layouts(dy)):
            inputs = [xl, dyl, bias, *W.tensors().values()]
            before = [t.clone() for t in inputs]
            for op in conv_ops(fmt):
                out = check_conv_op(op, W, xl, dyl, bias, geometry)
                for t, saved in zip(inputs, before):
                    assert torch.equal(t, saved), f"{op} modified an input"
                    assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), \
                        f"{op}: output aliases an input"
                if xname != "expanded":
                    if op in first:
                        assert_close(out, first[op], 10 * TOL[dtype], f"{op} {xname} vs nchw")
                    else:
                        first[op] = out


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_outputs_survive_later_calls(fmt, dtype):
    """The ops copy activations into per-thread scratch buffers kept between calls: an output
    never lives in one, so a later call (larger, smaller, other padding) leaves it unchanged."""
    problems = [conv_problem(fmt, n, c, c + 8, hw, 3, 1, padding, 1, block=(8, 8), sparsity=0.5,
                             dtype=dtype)
                for n, c, hw, padding in [(5, 16, (6, 5), 1), (9, 24, (8, 8), 0),
                                          (3, 8, (4, 4), 2), (5, 16, (6, 5), 1)]]
    kept = []
    for W, x, dy, bias, geometry in problems:
        for op in conv_ops(fmt):
            out = run_op(op, conv_op_args(op, W, x, dy, bias, geometry))
            kept.append((op, out, out.clone()))
    for op, out, saved in kept:
        assert torch.equal(out, saved), f"{op}: a later call changed this output"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_thread_partitioning(fmt, threads, isa):
    """Every split of the work by the thread count gives the reference answer (dX is a
    scatter: overlapping writes from two threads would show up here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # one pixel chunk split by block rows; several chunks, each split by block rows too
        for n, c_in, c_out, hw in ((5, 40, 16, (7, 6)), (2, 24, 70, (7, 6)),
                                   (4, 40, 48, (14, 14))):
            W, x, dy, bias, geometry = conv_problem(fmt, n, c_in, c_out, hw, 3, 1, 1, 1,
                                                    block=(8, 8), sparsity=0.4, empty=True)
            for op in conv_ops(fmt):
                check_conv_op(op, W, x, dy, bias, geometry)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv_bsr_pointwise_runs_as_linear(threads, dtype):
    """A 1x1 stride-1 unpadded BSR conv runs the linear kernel over the NHWC pixels: few block
    rows (split over pixels as well) and many (ranges of block rows per thread), ragged channels
    on both sides, every input layout, with and without bias; padded or strided 1x1 convs keep
    the conv kernel and must agree with it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, c_in, c_out, hw, block in ((3, 20, 12, (5, 7), (8, 8)),
                                         (2, 36, 200, (3, 4), (8, 16)),
                                         (1, 64, 96, (7, 7), (32, 32))):
            W, x, dy, bias, geometry = conv_problem("bsr", n, c_in, c_out, hw, 1, 1, 0, 1,
                                                    block=block, sparsity=0.5, dtype=dtype,
                                                    empty=True)
            for _, xl in _layouts(x):
                for b in (None, bias):
                    check_conv_op("bsr_conv2d", W, xl, dy, b, geometry)
            for stride, padding in ((1, 1), (2, 0)):
                geometry = (pair(stride), pair(padding), pair(1))
                check_conv_op("bsr_conv2d", W, x, dy, bias, geometry)
    finally:
        torch.set_num_threads(previous)


def test_conv_isas_agree_with_each_other():
    """The same float32 problem on every ISA: all within float32 rounding of the scalar one."""
    outs = {}
    problems = {fmt: conv_problem(fmt, 3, 20, 30, (7, 6), 3, 2, 1, 1, block=(16, 8),
                                  sparsity=0.4, empty=True) for fmt in FORMATS}
    for name in ISAS:
        with use_isa(name):
            outs[name] = [run_op(op, conv_op_args(op, *problems[op[:3]]))
                          for op in CONV_OPS]
    for name in ISAS:
        for op, a, b in zip(CONV_OPS, outs[name], outs["scalar"]):
            assert_close(a, b, 1e-5, f"{op} {name} vs scalar")


def test_conv_bsr_ops_accept_other_multiples_of_8(dtype):
    """The ops' contract is block dims that are positive multiples of 8 (the formats restrict
    themselves to 8..64): a hand-made 24 x 40 conv block weight must be exact too."""
    bn, bk, co, ci, kh, kw = 24, 40, 50, 90, 3, 2
    present = torch.rand(3, 3) < 0.6
    present[0, 0] = present[2, 1] = True
    present[1] = False
    dense = torch.randn(co, ci, kh, kw, dtype=dtype)
    dense *= present.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:co, :ci, None, None]
    padded = torch.zeros(3 * bn, 3 * bk, kh, kw, dtype=dtype)
    padded[:co, :ci] = dense
    grid = padded.view(3, bn, 3, bk, kh, kw).permute(0, 2, 4, 5, 3, 1)  # [Nb,Kb,kh,kw,bk,bn]
    rows, cols = present.nonzero(as_tuple=True)
    W = sk.BlockSparse.__new__(sk.BlockSparse)  # block dims outside BLOCK_SIZES: bypass checks
    W.values, W.shape = grid[rows, cols].contiguous(), (co, ci, kh, kw)
    W.block_row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), present.sum(1).cumsum(0)]).int()
    W.block_col_idx = cols.int()
    t_cols, t_rows = present.t().nonzero(as_tuple=True)
    position = torch.full(present.shape, -1, dtype=torch.long)
    position[rows, cols] = torch.arange(rows.numel())
    W.block_col_ptr = torch.cat([torch.zeros(1, dtype=torch.long), present.sum(0).cumsum(0)]).int()
    W.block_row_idx = t_rows.int()
    W.block_perm = position[t_rows, t_cols].int()
    geometry = ((2, 1), (1, 1), (1, 2))
    x = torch.randn(3, ci, 7, 8, dtype=dtype)
    bias = torch.randn(co, dtype=dtype)
    y_ref = F.conv2d(x.double(), dense.double(), bias.double(), *geometry)
    dy = torch.randn(y_ref.shape, dtype=dtype)
    assert_close(reference_op("bsr_conv2d", conv_op_args("bsr_conv2d", W, x, dy, bias, geometry)),
                 y_ref, 1e-12, "reference")
    for op in CONV_BSR_OPS:
        check_conv_op(op, W, x, dy, bias, geometry)


# ---- the oracle itself ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_reference_is_plain_dense_math(fmt):
    """reference.py against torch autograd of F.conv2d on the dense masked weight (to_dense of
    the format, independent code), so the oracle is not trusted blindly."""
    W, x, dy, bias, geometry = conv_problem(fmt, 3, 21, 27, (9, 8), (3, 2), (2, 1), (1, 2),
                                            (2, 1), block=(16, 8), sparsity=0.5,
                                            dtype=torch.float64, empty=True)
    dense = W.to_dense().clone().requires_grad_()
    xg = x.clone().requires_grad_()
    y = F.conv2d(xg, dense, bias, *geometry)
    dx, dw = torch.autograd.grad(y, (xg, dense), dy)
    ops = conv_ops(fmt)
    ref = [reference_op(op, conv_op_args(op, W, x, dy, bias, geometry)) for op in ops]
    assert_close(ref[0], y, 1e-13, "forward")
    assert_close(ref[1], dx, 1e-13, "grad_input")
    assert_close(rebuild(W, ref[2]).to_dense(), dw * W.mask(), 1e-13, "grad_weight")
    if fmt == "bsr":  # the transposed index describes the same weight
        same = reference.bsr_transposed_to_dense(W.values, W.block_col_ptr, W.block_row_idx,
                                                 W.block_perm, W.shape[0], W.shape[1])
        assert torch.equal(same, W.to_dense())


# ---- sk.conv2d -----------------------------------------------------------------------------

def _dense_conv(x, W, bias, stride=1, padding=0, dilation=1):
    """F.conv2d in float64 on the dense (masked) weight: what sk.conv2d must equal."""
    b = None if bias is None else bias.double()
    return F.conv2d(x.double(), W.to_dense().double(), b, stride, padding, dilation)


# (kernel, stride, padding, dilation)
PUBLIC_CASES = {
    "same_3x3": (3, 1, "same", 1),
    "same_5x5_dil2": (5, 1, "same", 2),
    "same_2x2": (2, 1, "same", 1),
    "same_4x4": (4, 1, "same", 1),
    "same_2x3": ((2, 3), 1, "same", 1),
    "same_2x2_dil3": (2, 1, "same", 3),
    "same_4x1_dil_2x1": ((4, 1), 1, "same", (2, 1)),
    "valid_3x3": (3, 1, "valid", 1),
    "valid_2x2_s2": (2, 2, "valid", 1),
    "int_padding": (3, 2, 1, 1),
    "pair_padding": ((3, 5), (1, 2), (2, 1), (1, 2)),
    "list_args": ((1, 3), [2, 1], [0, 1], [1, 1]),
}


@pytest.mark.parametrize("case", PUBLIC_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_public_conv2d_matches_torch(fmt, case, dtype):
    kernel, stride, padding, dilation = PUBLIC_CASES[case]
    W, x, _, bias, _ = conv_problem(fmt, 2, 13, 18, (9, 8), kernel, block=(8, 8), sparsity=0.4,
                                    dtype=dtype, empty=True)
    for b in (None, bias):
        y = sk.conv2d(x, W, b, stride, padding, dilation)
        ref = _dense_conv(x, W, b, stride, padding, dilation)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, ref, TOL[dtype], f"conv2d {case}")
        if padding == "same":
            assert y.shape[2:] == x.shape[2:]


@pytest.mark.parametrize("fmt", FORMATS)
def test_public_conv2d_unbatched(fmt, dtype):
    W, x, _, bias, _ = conv_problem(fmt, 1, 11, 17, (7, 6), 3, block=(8, 8), dtype=dtype)
    for padding in (1, "same", "valid"):
        y = sk.conv2d(x[0], W, bias, 1, padding)
        ref = _dense_conv(x, W, bias, 1, padding)
        assert y.shape == ref.shape[1:]
        assert_close(y, ref[0], TOL[dtype], f"unbatched padding={padding}")
    xg = x[0].clone().requires_grad_()
    sk.conv2d(xg, W, bias, 2, 1).square().sum().backward()
    xr = x[0].double().requires_grad_()
    F.conv2d(xr, W.to_dense().double(), bias.double(), 2, 1).square().sum().backward()
    assert_close(xg.grad, xr.grad, TOL[dtype], "unbatched dx")


@pytest.mark.parametrize("fmt", FORMATS)
def test_public_conv2d_memory_formats_agree(fmt, dtype):
    """NCHW and channels_last input give the same result (each equal to torch's), forward and
    backward."""
    W, x, dy, bias, _ = conv_problem(fmt, 3, 16, 20, (7, 7), 3, 1, 1, block=(8, 16),
                                     dtype=dtype, empty=True)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        for padding in (1, 0):
            xl = x.clone(memory_format=layout).requires_grad_()
            values = W.values.detach().clone().requires_grad_()
            y = sk.conv2d(xl, rebuild(W, values), bias, 1, padding)
            y.backward(torch.randn_like(y) if padding == 0 else dy)
            if padding == 1:
                results.append((y.detach(), xl.grad, values.grad))
    ref = _dense_conv(x, W, bias, 1, 1)
    for y, dx, dv in results:
        assert_close(y, ref, TOL[dtype], "forward")
    for a, b in zip(results[0], results[1]):
        assert_close(a, b, 10 * TOL[dtype], "NCHW vs channels_last")


# (N, C_in, C_out, hw, kernel, stride, padding, dilation, block)
AUTOGRAD_CASES = {
    "3x3_p1": (3, 19, 21, (6, 7), 3, 1, 1, 1, (8, 16)),
    "strided_asym": (2, 13, 18, (9, 8), (3, 2), (2, 3), (1, 0), 1, (16, 8)),
    "dilated": (2, 10, 12, (9, 9), 3, 1, 2, 2, (8, 8)),
    "same_even": (2, 9, 17, (6, 5), (2, 4), 1, "same", 1, (8, 8)),
}


@pytest.mark.parametrize("case", AUTOGRAD_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_public_conv2d_autograd_matches_torch(fmt, case, dtype):
    """Backward of sk.conv2d equals torch autograd through F.conv2d on the dense masked weight:
    dx, dbias, and dvalues = the dense dW at the stored positions."""
    n, c_in, c_out, hw, kernel, stride, padding, dilation, block = AUTOGRAD_CASES[case]
    W, x, _, bias, _ = conv_problem(fmt, n, c_in, c_out, hw, kernel, block=block,
                                    sparsity=0.4, dtype=dtype, empty=True)
    xg = x.clone().requires_grad_()
    values = W.values.detach().clone().requires_grad_()
    b = bias.clone().requires_grad_()
    y = sk.conv2d(xg, rebuild(W, values), b, stride, padding, dilation)
    grad = torch.randn(y.shape, dtype=dtype)
    y.backward(grad)

    x64 = x.double().requires_grad_()
    dense64 = W.to_dense().double().requires_grad_()
    b64 = bias.double().requires_grad_()
    y64 = F.conv2d(x64, dense64, b64, stride, padding, dilation)
    y64.backward(grad.double())
    tol = TOL[dtype]
    assert_close(y, y64, tol, "y")
    assert_close(xg.grad, x64.grad, tol, "dx")
    assert_close(b.grad, b64.grad, tol, "dbias")
    assert_close(rebuild(W, values.grad).to_dense(), dense64.grad * W.mask(), tol, "dvalues")


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_double_backward_is_correct_or_refused(fmt):
    """Second derivatives (a gradient penalty) must be right or raise, never silently wrong."""
    W, x, _, bias, _ = conv_problem(fmt, 2, 10, 12, (5, 5), 3, block=(8, 8), sparsity=0.3,
                                    dtype=torch.float64)

    def penalty(conv, x, weight):
        y = conv(x, weight)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return gx.pow(2).sum()

    xs = x.clone().requires_grad_()
    values = W.values.detach().clone().requires_grad_()
    try:
        got = torch.autograd.grad(penalty(lambda x, v: sk.conv2d(x, rebuild(W, v), bias, 1, 1),
                                          xs, values), values)[0]
    except RuntimeError:
        return  # refusing double backward is acceptable
    dense = W.to_dense().clone().requires_grad_()
    expected = torch.autograd.grad(penalty(lambda x, w: F.conv2d(x, w, bias, 1, 1),
                                           x.clone().requires_grad_(), dense), dense)[0]
    assert_close(rebuild(W, got).to_dense(), expected * W.mask(), 1e-10, "double backward")


def test_public_conv2d_needs_input_grad_subsets():
    """Only the requested gradients are computed, and each equals the full computation."""
    W, x, _, bias, _ = conv_problem("bsr", 2, 12, 20, (5, 6), 3, block=(8, 8),
                                    dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (x, W.values, bias)]
    sk.conv2d(full[0], rebuild(W, full[1]), full[2], 1, 1).sum().backward()
    for wanted in range(3):
        ts = [t.clone().requires_grad_(i == wanted) for i, t in enumerate((x, W.values, bias))]
        sk.conv2d(ts[0], rebuild(W, ts[1]), ts[2], 1, 1).sum().backward()
        for i, t in enumerate(ts):
            if i == wanted:
                assert_close(t.grad, full[i].grad, 1e-12, f"grad {i}")
            else:
                assert t.grad is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_public_conv2d_all_pruned_and_empty_batch(fmt, dtype):
    W, x, _, bias, _ = conv_problem(fmt, 2, 12, 20, (5, 6), 3, sparsity=1.0, dtype=dtype)
    assert W.nnz == 0
    xg = x.clone().requires_grad_()
    values = W.values.detach().clone().requires_grad_()
    y = sk.conv2d(xg, rebuild(W, values), bias, 1, 1)
    assert torch.equal(y, bias.view(1, -1, 1, 1).expand(2, 20, 5, 6))
    y.sum().backward()
    assert torch.equal(xg.grad, torch.zeros_like(x)) and values.grad.numel() == 0
    W, x, _, bias, _ = conv_problem(fmt, 0, 12, 20, (5, 6), 3, dtype=dtype)
    xg = x.clone().requires_grad_()
    values = W.values.detach().clone().requires_grad_()
    y = sk.conv2d(xg, rebuild(W, values), bias, 2, 1)
    assert y.shape == (0, 20, 3, 3)
    y.sum().backward()
    assert xg.grad.shape == x.shape and torch.equal(values.grad, torch.zeros_like(values))


# ---- gradcheck, opcheck --------------------------------------------------------------------

# (N, C_in, C_out, hw, kernel, stride, padding, dilation)
# Small: full gradcheck perturbs every element of x and values (a 3x3 8x8 block is 576
# values); "full" runs it element by element, the rest in gradcheck's fast mode (random
# projections of the Jacobian, a few evaluations).
GRADCHECK_CASES = {
    "full": (1, 9, 9, (3, 3), 3, 1, 1, 1),
    "3x3_p1": (2, 9, 9, (3, 4), 3, 1, 1, 1),
    "strided": (1, 9, 10, (5, 6), (3, 2), (2, 3), (1, 0), 1),
    "dilated": (1, 10, 9, (5, 4), 3, 1, 2, (2, 1)),
    "same_even": (1, 9, 9, (4, 3), 2, 1, "same", 1),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_gradcheck(fmt, case):
    n, c_in, c_out, hw, kernel, stride, padding, dilation = GRADCHECK_CASES[case]
    W, x, _, bias, _ = conv_problem(fmt, n, c_in, c_out, hw, kernel, block=(8, 8),
                                    sparsity=0.4, dtype=torch.float64, empty=True)
    assert W.nnz > 0
    inputs = (x.requires_grad_(), W.values.detach().clone().requires_grad_(),
              bias.requires_grad_())

    def f(x, values, bias):
        return sk.conv2d(x, rebuild(W, values), bias, stride, padding, dilation)

    # Thousands of tiny calls: on one thread, so that the OpenMP fork/join of each call cannot
    # stall on a busy machine (the thread splits are tested in test_conv_thread_partitioning).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=case != "full")
    finally:
        torch.set_num_threads(previous)


def _opcheck_args(op, dtype):
    """float32: a ragged sample with empty (block) rows/columns, asymmetric geometry and a bias;
    float64: a strided all-kept sample without bias. The forward ops with grads on."""
    fmt = op[:3]
    if dtype == torch.float32:
        W, x, dy, bias, geometry = conv_problem(fmt, 2, 11, 13, (6, 5), (3, 2), (1, 2), (1, 0),
                                                (2, 1), block=(8, 8), sparsity=0.4, dtype=dtype,
                                                empty=True)
    else:
        W, x, dy, bias, geometry = conv_problem(fmt, 3, 8, 16, (5, 5), 3, 2, 1, 1, block=(16, 8),
                                                sparsity=0.0, dtype=dtype)
        bias = None
    if op.endswith("_conv2d"):
        x.requires_grad_()
        W = rebuild(W, W.values.detach().clone().requires_grad_())
        bias = None if bias is None else bias.requires_grad_()
    return conv_op_args(op, W, x, dy, bias, geometry)


def _assert_opcheck(op, args):
    results = opcheck(getattr(torch.ops.sparsekern, op), args)
    assert set(results) == {"test_schema", "test_autograd_registration", "test_faketensor",
                            "test_aot_dispatch_dynamic"}, results
    assert all(r == "SUCCESS" for r in results.values()), results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_opcheck(op, dtype):
    """Schema, fake kernel (shapes and channels_last strides), autograd registration and AOT
    dispatch with dynamic shapes."""
    _assert_opcheck(op, _opcheck_args(op, dtype))


# ---- torch.compile -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_conv_compiled_matches_eager(backend):
    """fullgraph torch.compile of a BSR conv -> ReLU -> CSR conv (stride 2, even 'same'...):
    forward and the gradients of x, values and biases equal eager."""
    torch._dynamo.reset()
    W1, x, _, b1, _ = conv_problem("bsr", 2, 10, 16, (7, 6), 3, block=(8, 8), sparsity=0.4,
                                   empty=True)
    W2, _, _, b2, _ = conv_problem("csr", 1, 16, 12, (1, 1), 2, sparsity=0.6, empty=True)
    params = [W1.values.detach().clone().requires_grad_(), b1.requires_grad_(),
              W2.values.detach().clone().requires_grad_(), b2.requires_grad_()]
    W1, W2 = rebuild(W1, params[0]), rebuild(W2, params[2])  # captured, trainable values

    def f(x):
        h = torch.relu(sk.conv2d(x, W1, b1, 1, 1))
        return sk.conv2d(h, W2, b2, 2, (1, 0)).tanh()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    try:
        # a channels_last x is a second compilation (other strides): aot_eager only, inductor's
        # cold C++ compile is slow
        layouts = [torch.contiguous_format]
        if backend == "aot_eager":
            layouts.append(torch.channels_last)
        for layout in layouts:
            xs = x.contiguous(memory_format=layout)
            grads = []
            for fn in (f, compiled):
                xg = xs.clone().requires_grad_()
                for p in params:
                    p.grad = None
                y = fn(xg)
                y.square().sum().backward()
                grads.append([y.detach(), xg.grad] + [p.grad for p in params])
            for name, a, b in zip(("y", "dx", "dv1", "db1", "dv2", "db2"), *grads):
                assert_close(b, a, 1e-5, f"{backend} {name}")
    finally:
        torch._dynamo.reset()


# ---- bfloat16 ------------------------------------------------------------------------------

def _bf16_problem(fmt, n=3, c_in=20, c_out=24):
    W, x, dy, bias, geometry = conv_problem(fmt, n, c_in, c_out, (6, 7), 3, 2, 1, 1,
                                            block=(16, 8), sparsity=0.5, empty=True)
    return W.to(BF16), x.to(BF16), dy.to(BF16), bias.to(BF16), geometry


def _assert_within_torch_bf16(out, args, name, what):
    """Error vs the float64 reference (on the same bf16 inputs) at most 2x that of torch's own
    bf16 dense conv (reference.py run in bf16)."""
    exact = reference_op(name, args)
    torch_bf16 = getattr(reference, name)(*args)
    ours, theirs = rel_err(out, exact), rel_err(torch_bf16, exact)
    assert ours <= 2 * theirs + 1e-6, f"{what}: error {ours:.2e} > 2 x torch bf16 {theirs:.2e}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_ops_in_bf16_within_twice_torch_bf16_error(fmt, isa):
    W, x, dy, bias, geometry = _bf16_problem(fmt)
    for name in conv_ops(fmt):
        args = conv_op_args(name, W, x, dy, bias, geometry)
        with poisoned(dy.numel(), x.numel(), W.values.numel(), dtype=BF16):
            out = run_op(name, args)
        assert out.dtype == BF16 and not out.isnan().any(), name
        if not name.endswith("grad_weight"):
            assert out.is_contiguous(memory_format=torch.channels_last), name
        _assert_within_torch_bf16(out, args, name, f"{name} [{isa}]")


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_autograd_in_bf16(fmt):
    W, x, dy, bias, geometry = _bf16_problem(fmt)
    values = W.values.clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = sk.conv2d(xg, rebuild(W, values), bg, *geometry)
    dx, dv, db = torch.autograd.grad(y, (xg, values, bg), dy)
    assert y.dtype == dx.dtype == dv.dtype == db.dtype == BF16
    forward, grad_input, grad_weight = conv_ops(fmt)
    _assert_within_torch_bf16(y, conv_op_args(forward, W, x, dy, bias, geometry), forward, "y")
    _assert_within_torch_bf16(dx, conv_op_args(grad_input, W, x, dy, bias, geometry),
                              grad_input, "dx")
    _assert_within_torch_bf16(dv, conv_op_args(grad_weight, W, x, dy, bias, geometry),
                              grad_weight, "dvalues")


@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_opcheck_bf16(op):
    W, x, dy, bias, geometry = _bf16_problem(op[:3], n=2, c_in=9, c_out=16)
    _assert_opcheck(op, conv_op_args(op, W, x, dy, bias, geometry))

"""conv2d: bad input raises a clear exception naming the argument, never a crash. sk.conv2d
raises ValueError/TypeError for what it checks in Python; the ops (TORCH_CHECK) RuntimeError."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekern as sk
from _sk_helpers import (CONV_OPS, assert_refuses_a_meta_tensor, conv_op_args, conv_problem,
                         random_problem, reference_op, run_op)

I32 = torch.int32


def _i32(*values):
    return torch.tensor(values, dtype=I32)


# ---- sk.conv2d -----------------------------------------------------------------------------

def _public(fmt):
    """A valid (W [24, 20, 3, 3], x [2, 20, 6, 5], bias [24]) for sk.conv2d."""
    W, x, _, bias, _ = conv_problem(fmt, 2, 20, 24, (6, 5), 3, block=(8, 8), sparsity=0.3)
    return W, x, bias


# name: (change the valid call, expected exception, expected message)
PUBLIC_CASES = {
    "x_2d": (dict(x=lambda x: x[0, 0]), ValueError,
             r"x must be \[N, 20, H, W\] \(or unbatched \[20, H, W\]\), got shape \(6, 5\)"),
    "x_5d": (dict(x=lambda x: x.unsqueeze(0)), ValueError, r"x must be \[N, 20, H, W\]"),
    "x_channels": (dict(x=lambda x: x[:, :19]), ValueError,
                   r"x must be \[N, 20, H, W\] .*got shape \(2, 19, 6, 5\)"),
    "x_unbatched_channels": (dict(x=lambda x: x[0, :7]), ValueError,
                             r"x must be \[N, 20, H, W\] .*got shape \(7, 6, 5\)"),
    "x_zero_height": (dict(x=lambda x: x[:, :, :0]), ValueError,
                      r"x must have positive height and width, got shape \(2, 20, 0, 5\)"),
    "stride_0": (dict(stride=0), ValueError, "stride and dilation must be >= 1, got stride=\\(0, 0\\)"),
    "stride_pair_0": (dict(stride=(1, 0)), ValueError, r"stride=\(1, 0\)"),
    "stride_negative": (dict(stride=-2), ValueError, "stride and dilation must be >= 1"),
    "stride_float": (dict(stride=1.5), ValueError, "stride must be an int or a pair of ints"),
    "stride_triple": (dict(stride=(1, 1, 1)), ValueError, "stride must be an int or a pair"),
    "stride_bool": (dict(stride=True), ValueError, "stride must be an int or a pair"),
    "dilation_0": (dict(dilation=0), ValueError, r"dilation=\(0, 0\)"),
    "dilation_str": (dict(dilation="2"), ValueError, "dilation must be an int or a pair"),
    "dilation_huge": (dict(dilation=2**62), ValueError, r"dilation must be below 2\*\*31"),
    "padding_huge": (dict(padding=(0, 2**40)), ValueError, r"padding must be below 2\*\*31"),
    "padding_past_int32": (dict(padding=2**30), ValueError,
                           r"padding=1073741824 makes the padded input 2147483\d+ x 2147483\d+, "
                           r"beyond the kernels' int32 range"),
    "padding_negative": (dict(padding=-1), ValueError, "padding must be >= 0, got -1"),
    "padding_pair_negative": (dict(padding=(0, -2)), ValueError, r"padding must be >= 0"),
    "padding_string": (dict(padding="full"), ValueError,
                       "padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    "padding_string_case": (dict(padding="SAME"), ValueError, "padding must be an int, a pair"),
    "padding_float": (dict(padding=1.0), ValueError, "padding must be an int or a pair"),
    "padding_triple": (dict(padding=(1, 1, 1)), ValueError, "padding must be an int or a pair"),
    "same_stride_2": (dict(padding="same", stride=2), ValueError,
                      r"padding='same' needs stride 1, got stride=\(2, 2\)"),
    "same_stride_pair": (dict(padding="same", stride=(1, 2)), ValueError,
                         "padding='same' needs stride 1"),
    "kernel_larger_than_input": (dict(x=lambda x: x[:, :, :2, :2]), RuntimeError,
                                 r"padded input \(2x2\) is smaller than the dilated kernel \(3x3\)"),
    "dilated_kernel_too_large": (dict(dilation=3), RuntimeError,
                                 r"smaller than the dilated kernel \(7x7\)"),
    "x_dtype": (dict(x=lambda x: x.double()), RuntimeError,
                "values has dtype Float but expected Double"),
    "x_half": (dict(x=lambda x: x.half()), ValueError,
               "x, values and bias must share a dtype, got x torch.float16, values torch.float32"),
    "x_int": (dict(x=lambda x: x.long()), RuntimeError, "x must be float32, float64 or bfloat16"),
    "bias_dtype": (dict(bias=lambda b: b.double()), RuntimeError,
                   "bias has dtype Double but expected Float"),
    "bias_shape": (dict(bias=lambda b: b[:-1]), RuntimeError, r"bias must have shape \[24\]"),
    "bias_2d": (dict(bias=lambda b: b.view(4, 6)), RuntimeError, r"bias must have shape \[24\]"),
}


@pytest.mark.parametrize("case", PUBLIC_CASES)
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_conv2d_rejects(fmt, case):
    W, x, bias = _public(fmt)
    sk.conv2d(x, W, bias, 1, 1, 1)  # the unmodified call is valid
    changes, exc, match = PUBLIC_CASES[case]
    call = dict(x=x, bias=bias, stride=1, padding=0, dilation=1)
    for name, change in changes.items():
        call[name] = change(call[name]) if callable(change) else change
    with pytest.raises(exc, match=match):
        sk.conv2d(call["x"], W, call["bias"], call["stride"], call["padding"], call["dilation"])


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_conv2d_rejects_values_dtype_mismatch(fmt):
    W, x, bias = _public(fmt)
    with pytest.raises(RuntimeError, match="values has dtype Double but expected Float"):
        sk.conv2d(x, W.to(torch.float64), bias.float())


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_conv2d_rejects_non_conv_weight(fmt):
    """A linear (2-D) format or a dense tensor is not a conv weight."""
    W, _, _, _ = random_problem(fmt, 1, 24, 20, block=(8, 8))
    x = torch.randn(2, 20, 6, 5)
    with pytest.raises(TypeError, match="weight must be a sparsekern.BlockSparse, CSR or NM made "
                                        "from a 4-D conv weight"):
        sk.conv2d(x, W)
    with pytest.raises(TypeError, match="weight must be a sparsekern.BlockSparse, CSR or NM"):
        sk.conv2d(x, torch.randn(24, 20, 3, 3))


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_conv_formats_reject_bad_weights(fmt):
    cls = sk.BlockSparse if fmt == "bsr" else sk.CSR
    extra = dict(block=(8, 8)) if fmt == "bsr" else {}
    with pytest.raises(ValueError, match="weight must be a 2-D linear weight .* or a 4-D conv"):
        cls.from_dense(torch.randn(4, 3, 3), **extra)
    with pytest.raises(ValueError, match="weight must be a 2-D linear weight .* or a 4-D conv"):
        cls.from_dense(torch.randn(4, 3, 3, 3, 1), **extra)
    with pytest.raises(ValueError, match=r"mask shape \(4, 3, 3, 2\) does not match weight "
                                         r"shape \(4, 3, 3, 3\)"):
        cls.from_dense(torch.randn(4, 3, 3, 3), torch.ones(4, 3, 3, 2, dtype=torch.bool),
                       **extra)


def test_block_sparse_rejects_wrong_rank_conv_values():
    W, _, _, _, _ = conv_problem("bsr", 1, 16, 16, (4, 4), 3, block=(8, 8), sparsity=0.0)
    parts = (W.block_row_ptr, W.block_col_idx, W.shape)
    with pytest.raises(ValueError, match=r"values must be \[nnz_blocks, kh, kw, bk, bn\] for a "
                                         r"4-D weight"):
        sk.BlockSparse(W.values.flatten(1, 2), *parts)
    with pytest.raises(ValueError, match=r"values taps \(3, 2\) do not match the kernel size "
                                         r"\(3, 3\)"):
        sk.BlockSparse(W.values[:, :, :2].contiguous(), *parts)


# ---- the ops directly (TORCH_CHECK -> RuntimeError) -----------------------------------------

def _valid(op, generator=None):
    """A valid sample for `op`: [24, 20, 3, 3] weight (3 x 3 grid of 8 x 8 blocks), stride
    (1, 2), padding (1, 0), x [3, 20, 7, 6]."""
    W, x, dy, bias, geometry = conv_problem(op[:3], 3, 20, 24, (7, 6), 3, (1, 2), (1, 0), 1,
                                            block=(8, 8), sparsity=0.3, empty=True,
                                            generator=generator)
    return W, list(conv_op_args(op, W, x, dy, bias, geometry))


def _nondecreasing_broken(ptr):
    bad = ptr.clone()
    bad[1] = ptr[-1] + 1
    return bad


def _noncontiguous(t):
    return torch.stack([t, t], 1)[:, 0]


def _geometry_cases(op, first):
    """stride / padding / dilation arguments start at position `first`."""
    s, p, d = first, first + 1, first + 2
    return [
        (op, s, lambda v: [0, 1], r"stride entries must be >= 1, got \[0, 1\]"),
        (op, s, lambda v: [1, -2], "stride entries must be >= 1"),
        (op, p, lambda v: [-1, 0], r"padding entries must be >= 0, got \[-1, 0\]"),
        (op, d, lambda v: [1, 0], r"dilation entries must be >= 1, got \[1, 0\]"),
        (op, d, lambda v: [5, 1], r"padded input \(9x6\) is smaller than the dilated kernel "
                                  r"\(11x3\)"),
    ]


# (op, argument position, make the bad value from the good one, expected message)
def _op_cases():
    cases = []
    for op in ("bsr_conv2d", "csr_conv2d"):
        p = "block_" if op == "bsr_conv2d" else ""
        bias_pos = 7
        cases += [
            (op, 0, lambda t: t[0], r"x must be 4-D \[N, C, H, W\], got shape \[20, 7, 6\]"),
            (op, 0, lambda t: t.unsqueeze(0), "x must be 4-D"),
            (op, 0, lambda t: t.half(), "x must be float32, float64 or bfloat16 on the CPU, got Half"),
            (op, 0, lambda t: t.to(torch.bfloat16), "values has dtype Float but expected BFloat16"),
            (op, 1, lambda t: t.double(), "values has dtype Double but expected Float"),
            (op, 2, lambda t: t.long(), f"{p}row_ptr must be int32, got Long"),
            (op, 2, _noncontiguous, f"{p}row_ptr must be a contiguous 1-D tensor"),
            (op, 2, lambda t: t[:-1].contiguous(), f"{p}row_ptr must have"),
            (op, 2, _nondecreasing_broken, f"{p}row_ptr"),
            (op, 2, lambda t: t + 1, f"{p}row_ptr must start at 0"),
            (op, 3, lambda t: t.long(), f"{p}col_idx must be int32"),
            (op, 3, lambda t: t[:-1].contiguous(), f"{p}col_idx must have"),
            (op, 3, lambda t: torch.cat([t[:-1], _i32(1000)]), f"{p}col_idx has entries in"),
            (op, 3, lambda t: torch.cat([_i32(-1), t[1:]]), rf"{p}col_idx has entries in \[-1"),
            (op, bias_pos, lambda t: t[:-1], r"bias must have shape \[24\], got \[23\]"),
            (op, bias_pos, lambda t: t.view(1, -1), r"bias must have shape \[24\]"),
            (op, bias_pos, lambda t: t.double(), "bias has dtype Double but expected Float"),
            (op, 8, lambda n: -1, "out_channels must be >= 0, got -1"),
            (op, 8, lambda n: n + 100, f"{p}row_ptr must have"),
        ]
    cases += [
        ("bsr_conv2d", 1, lambda t: t.flatten(1, 2),
         r"values must be \[nnz_blocks, kh, kw, block_k, block_n\]"),
        ("bsr_conv2d", 1, lambda t: t[0], r"values must be \[nnz_blocks, kh, kw"),
        ("bsr_conv2d", 1, lambda t: t[..., :4].contiguous(),
         "block dims must be positive multiples of 8, got block_k=8 block_n=4"),
        ("bsr_conv2d", 0, lambda t: t[:, :, :1, :1], r"padded input \(3x1\) is smaller than the "
                                                     r"dilated kernel \(3x3\)"),
        ("csr_conv2d", 1, lambda t: t.view(-1, 1), r"values must be 1-D \[nnz\]"),
        ("csr_conv2d", 0, lambda t: t[:, :3], "col_idx has entries in"),  # C_in 3 < columns
        ("csr_conv2d", 9, lambda k: [3, 0], r"kernel_size entries must be >= 1, got \[3, 0\]"),
        ("csr_conv2d", 9, lambda k: [1, 1], "col_idx has entries in"),  # columns of 3x3 taps
        ("csr_conv2d", 9, lambda k: [10, 3], r"padded input \(9x6\) is smaller than the "
                                             r"dilated kernel \(10x3\)"),
    ]
    cases += _geometry_cases("bsr_conv2d", 9) + _geometry_cases("csr_conv2d", 10)

    for op in ("bsr_conv2d_grad_input", "csr_conv2d_grad_input"):
        p = "block_" if op.startswith("bsr") else ""
        size = 5
        cases += [
            (op, 0, lambda t: t[0], "grad_out must be 4-D"),
            (op, 0, lambda t: t.half(), "grad_out must be float32, float64 or bfloat16"),
            (op, 0, lambda t: t[:, :, :-1], r"grad_out must have shape \[3, 24, 7, 2\], got "
                                            r"\[3, 24, 6, 2\]"),
            (op, 0, lambda t: t[:, :, :, :1], r"grad_out must have shape \[3, 24, 7, 2\]"),
            (op, 0, lambda t: t[:2], r"grad_out must have shape \[3, 24, 7, 2\], got \[2, "),
            (op, 1, lambda t: t.double(), "values has dtype Double but expected Float"),
            (op, 2, lambda t: t.long(), f"{p}col_ptr must be int32"),
            (op, 2, _nondecreasing_broken, f"{p}col_ptr"),
            (op, 3, lambda t: torch.cat([t[:-1], _i32(99)]), f"{p}row_idx has entries in"),
            (op, 3, lambda t: torch.cat([_i32(-5), t[1:]]), f"{p}row_idx has entries in"),
            (op, 3, lambda t: t[1:].contiguous(), f"{p}row_idx must have"),
            (op, 4, lambda t: torch.cat([t[:-1], _i32(t.numel())]), f"{p}perm has entries in"),
            (op, 4, lambda t: torch.cat([_i32(-3), t[1:]]), f"{p}perm has entries in"),
            (op, 4, lambda t: t.long(), f"{p}perm must be int32"),
            (op, 4, lambda t: t[1:].contiguous(), f"{p}perm must have"),
            (op, size, lambda s: s[:3], r"input_size must be \[N, C, H, W\] with positive H, W"),
            (op, size, lambda s: s + [1], r"input_size must be \[N, C, H, W\]"),
            (op, size, lambda s: [s[0], s[1], 0, s[3]], r"input_size must be \[N, C, H, W\]"),
            (op, size, lambda s: [-1] + s[1:], r"input_size must be \[N, C, H, W\]"),
            (op, size, lambda s: [s[0], s[1] + 64] + s[2:], f"{p}col_ptr must have"),
            (op, size, lambda s: [s[0] + 1] + s[1:], r"grad_out must have shape \[4, 24, 7, 2\]"),
            (op, size, lambda s: s[:2] + [s[2] + 3, s[3]], r"grad_out must have shape \[3, 24, 10, 2\]"),
        ]
    cases += [
        ("bsr_conv2d_grad_input", 1, lambda t: t.flatten(3), r"values must be \[nnz_blocks"),
        ("csr_conv2d_grad_input", 1, lambda t: t.view(1, -1), r"values must be 1-D \[nnz\]"),
        ("csr_conv2d_grad_input", 6, lambda k: [3, 0], "kernel_size entries must be >= 1"),
        ("csr_conv2d_grad_input", 6, lambda k: [1, 1], "grad_out must have shape|col_ptr"),
    ]
    cases += _geometry_cases("bsr_conv2d_grad_input", 6) + \
        _geometry_cases("csr_conv2d_grad_input", 7)

    for op in ("bsr_conv2d_grad_weight", "csr_conv2d_grad_weight"):
        p = "block_" if op.startswith("bsr") else ""
        cases += [
            (op, 0, lambda t: t[:2], r"grad_out must have shape \[3, 24, 7, 2\], got \[2, "),
            (op, 0, lambda t: t[:, :, 1:], r"grad_out must have shape \[3, 24, 7, 2\]"),
            (op, 0, lambda t: t[0], "grad_out must be 4-D"),
            (op, 0, lambda t: t.half(), "grad_out must be float32, float64 or bfloat16"),
            (op, 1, lambda t: t.double(), "x has dtype Double but expected Float"),
            (op, 1, lambda t: t[0], "x must be 4-D"),
            (op, 1, lambda t: t[:, :, 2:], r"grad_out must have shape \[3, 24, 5, 2\]"),
            (op, 2, lambda t: t.long(), f"{p}row_ptr must be int32"),
            (op, 2, _nondecreasing_broken, f"{p}row_ptr"),
            (op, 3, lambda t: torch.cat([t[:-1], _i32(1000)]), f"{p}col_idx has entries in"),
            (op, 3, lambda t: torch.cat([_i32(-1), t[1:]]), f"{p}col_idx has entries in"),
            (op, 3, lambda t: t[1:].contiguous(), f"{p}row_ptr must start at 0 and end at"),
            (op, 4, lambda k: [3, 0], r"kernel_size entries must be >= 1, got \[3, 0\]"),
            (op, 4, lambda k: [3], "kernel_size must have 2 entries"),
            (op, 4, lambda k: [1, 3], "grad_out must have shape|col_idx"),
        ]
    cases += [
        ("bsr_conv2d_grad_weight", 5, lambda b: 12, "block dims must be positive multiples of 8"),
        ("bsr_conv2d_grad_weight", 6, lambda b: 0, "block dims must be positive multiples of 8"),
        ("bsr_conv2d_grad_weight", 5, lambda b: -8, "block dims must be positive multiples of 8"),
        ("bsr_conv2d_grad_weight", 5, lambda b: 16, "block_row_ptr must have"),
        ("bsr_conv2d_grad_weight", 1, lambda t: t[:, :4], "block_col_idx has entries in"),
    ]
    cases += _geometry_cases("bsr_conv2d_grad_weight", 7) + \
        _geometry_cases("csr_conv2d_grad_weight", 5)
    return cases


OP_CASES = _op_cases()


@pytest.mark.parametrize("op,pos,corrupt,match", OP_CASES,
                         ids=[f"{c[0]}-arg{c[1]}-{i}" for i, c in enumerate(OP_CASES)])
def test_conv_op_rejects(op, pos, corrupt, match):
    _, args = _valid(op)
    run_op(op, args)  # the unmodified sample is valid
    args[pos] = corrupt(args[pos])
    with pytest.raises(RuntimeError, match=f"sparsekern.{op}: .*({match})"):
        run_op(op, args)


@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_op_schema_rejects_wrong_list_lengths(op):
    """int[2] geometry with three entries, or input_size with five: an error, never a read past
    the list."""
    _, args = _valid(op)
    pos = {"bsr_conv2d": 9, "csr_conv2d": 10, "bsr_conv2d_grad_input": 6,
           "csr_conv2d_grad_input": 7, "bsr_conv2d_grad_weight": 7,
           "csr_conv2d_grad_weight": 5}[op]
    for i in range(3):
        bad = list(args)
        bad[pos + i] = [1, 1, 1]
        with pytest.raises(RuntimeError, match="(stride|padding|dilation)|int\\[2\\]|expected"):
            run_op(op, bad)


@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_op_rejects_a_meta_tensor_among_cpu_ones(op):
    assert_refuses_a_meta_tensor(op, _valid(op)[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_op_rejects_mixed_devices(op):
    _, args = _valid(op)
    args[1] = args[1].cuda()
    with pytest.raises((RuntimeError, NotImplementedError), match="(?i)cuda|device"):
        run_op(op, args)


@settings(deadline=None, derandomize=False, max_examples=60,
          suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(CONV_OPS), data=st.data())
def test_conv_corrupted_index_never_crashes(op, data):
    """Random corruption of one int32 argument of a valid call: the op raises RuntimeError, or,
    when the corrupted index happens to be valid, agrees with the reference on the same args."""
    _, args = _valid(op, torch.Generator().manual_seed(data.draw(st.integers(0, 2**32))))
    positions = [i for i, a in enumerate(args)
                 if isinstance(a, torch.Tensor) and a.dtype == I32 and a.numel() > 0]
    pos = data.draw(st.sampled_from(positions))
    bad = args[pos].clone()
    where = data.draw(st.integers(0, bad.numel() - 1))
    bad[where] = data.draw(st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-3, 40)))
    args[pos] = bad
    try:
        out = run_op(op, args)
    except RuntimeError as exc:
        assert f"sparsekern.{op}:" in str(exc)
        return
    if _duplicate_positions(op, args):
        # Duplicate (row, col) entries are not a canonical index: the kernels sum them, the
        # reference's index_put keeps one. Only "no crash, finite result" is asked of them.
        assert bool(torch.isfinite(out).all())
        return
    assert torch.allclose(out.double(), reference_op(op, args), rtol=1e-4, atol=1e-4)


def _duplicate_positions(op, args):
    if op.endswith("grad_weight"):  # sampling at a position twice is well defined
        return False
    ptr, idx = args[2], args[3]  # (row_ptr, col_idx) or the transposed (col_ptr, row_idx)
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr.diff().long())
    keys = rows * 2**32 + idx.long()
    return keys.unique().numel() < keys.numel()


def test_numpy_integer_geometry_is_taken_as_torch_takes_it(tmp_path):
    """nn.Conv2d runs with numpy integers for stride and padding; so do the sparse layer and its
    saved state (plain ints in the metadata, which torch.load(weights_only=True) reads)."""
    np = pytest.importorskip("numpy")
    conv = torch.nn.Conv2d(4, 8, 3, stride=np.int64(2), padding=np.int64(1))
    x = torch.randn(1, 4, 6, 6)
    layer = sk.SparseConv2d.from_dense(conv, torch.rand(8, 4, 3, 3) < 0.5, format="csr")
    expected = torch.nn.functional.conv2d(x, layer.dense_weight(), conv.bias, 2, 1)
    torch.testing.assert_close(layer(x), expected)
    torch.save(layer.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    torch.testing.assert_close(sk.nn.SparseConv2d.from_state_dict(state)(x), expected)

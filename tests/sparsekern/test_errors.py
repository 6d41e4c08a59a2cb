"""Bad input raises a clear exception naming the argument, never a crash: the formats and
modules raise ValueError/TypeError, the ops (TORCH_CHECK) RuntimeError."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsekern as sk
from _sk_helpers import (OPS, assert_refuses_a_meta_tensor, block_mask, op_args,
                         random_problem, reference_op, run_op, unstructured_mask)

I32 = torch.int32


def _i32(*values):
    return torch.tensor(values, dtype=I32)


# ---- from_dense ----------------------------------------------------------------------------

FROM_DENSE_CASES = {
    "mask_shape": (dict(mask=torch.ones(4, 3, dtype=torch.bool)),
                   r"mask shape \(4, 3\) does not match weight shape \(3, 4\)"),
    "mask_not_bool": (dict(mask=torch.ones(3, 4)), "mask must be a bool tensor, got torch.float32"),
    "mask_int": (dict(mask=torch.ones(3, 4, dtype=torch.int64)), "mask must be a bool tensor"),
    "mask_device": (dict(mask=torch.ones(3, 4, dtype=torch.bool, device="meta")),
                    "mask is on meta but weight is on cpu"),
    "weight_1d": (dict(weight=torch.randn(12)), "weight must be a 2-D linear weight .* or a 4-D conv weight"),
    "weight_3d": (dict(weight=torch.randn(2, 3, 4)), "weight must be a 2-D linear weight .* or a 4-D conv weight"),
    "weight_int": (dict(weight=torch.ones(3, 4, dtype=torch.int64)),
                   "weight must be floating point, got dtype torch.int64"),
    "weight_not_tensor": (dict(weight=[[1.0, 2.0]]), "weight must be a 2-D linear weight .* or a 4-D conv weight"),
    "weight_meta": (dict(weight=torch.randn(3, 4, device="meta")),
                    "weight is on the meta device: packing needs its values"),
}


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
@pytest.mark.parametrize("case", FROM_DENSE_CASES)
def test_from_dense_rejects(fmt, case):
    kwargs, match = FROM_DENSE_CASES[case]
    args = dict(weight=torch.randn(3, 4), mask=None) | kwargs
    cls = sk.BlockSparse if fmt == "bsr" else sk.CSR
    extra = dict(block=(8, 8)) if fmt == "bsr" else {}
    with pytest.raises(ValueError, match=match):
        cls.from_dense(args["weight"], args["mask"], **extra)


@pytest.mark.parametrize("block,match", [
    ((12, 8), r"block=\(12, 8\): each dim must be one of \(8, 16, 32, 64\)"),
    ((8, 128), r"block=\(8, 128\): each dim must be one of"),
    ((0, 8), r"block=\(0, 8\)"),
    ((4, 4), r"block=\(4, 4\)"),
    ((8,), r"block must be a pair \(bn, bk\), got \(8,\)"),
    ((8, 8, 8), "block must be a pair"),
    ("ab", "block must be a pair"),
    (8, "block must be a pair"),
    ((8.5, 8), r"block must be a pair \(bn, bk\), got \(8.5, 8\)"),  # refused, not truncated
])
def test_from_dense_rejects_block(block, match):
    with pytest.raises(ValueError, match=match):
        sk.BlockSparse.from_dense(torch.randn(20, 20), block=block)


# ---- hand-made formats (constructors validate) ---------------------------------------------

def _bsr_parts():
    """A valid 2 x 2 block grid of 8 x 8 blocks (16 x 16 weight) holding 3 blocks."""
    return dict(values=torch.randn(3, 8, 8), block_row_ptr=_i32(0, 2, 3),
                block_col_idx=_i32(0, 1, 1), shape=(16, 16))


def _csr_parts():
    """A valid 3 x 4 CSR weight holding 4 values."""
    return dict(values=torch.randn(4), row_ptr=_i32(0, 2, 2, 4), col_idx=_i32(0, 3, 1, 2),
                shape=(3, 4))


BSR_CTOR_CASES = {
    "values_2d": (dict(values=torch.randn(3, 64)), r"values must be \[nnz_blocks, bk, bn\]"),
    "values_block": (dict(values=torch.randn(3, 8, 12)), r"block dims must be in"),
    "ptr_int64": (dict(block_row_ptr=torch.tensor([0, 2, 3])),
                  "block_row_ptr must be a 1-D int32 tensor, got torch.int64"),
    "idx_float": (dict(block_col_idx=torch.tensor([0.0, 1.0, 1.0])),
                  "block_col_idx must be a 1-D int32 tensor"),
    "ptr_2d": (dict(block_row_ptr=_i32(0, 2, 3).view(1, 3)), "block_row_ptr must be a 1-D int32"),
    "ptr_length": (dict(block_row_ptr=_i32(0, 1, 2, 3)), "block_row_ptr must have 3 entries"),
    "ptr_non_monotone": (dict(block_row_ptr=_i32(0, 4, 3)), "never decrease and end at 3"),
    "ptr_start": (dict(block_row_ptr=_i32(1, 2, 3)), "must start at 0"),
    "ptr_end": (dict(block_row_ptr=_i32(0, 2, 2)), "end at 3"),
    "idx_length": (dict(block_col_idx=_i32(0, 1)), "block_col_idx must have 3 entries"),
    "idx_range": (dict(block_col_idx=_i32(0, 2, 1)),
                  r"block_col_idx entries must lie in \[0, 2\), got \[0, 2\]"),
    "idx_negative": (dict(block_col_idx=_i32(0, -1, 1)), r"must lie in \[0, 2\), got \[-1, 1\]"),
    "values_int": (dict(values=torch.ones(3, 8, 8, dtype=torch.int32)),
                   "values must be a floating-point .* tensor, got torch.int32"),
    "values_complex": (dict(values=torch.ones(3, 8, 8, dtype=torch.complex64)),
                       "values must be a floating-point"),
    "shape_negative": (dict(shape=(-3, 16)), r"shape must be .* of integers >= 0, got \(-3, 16\)"),
    "shape_float": (dict(shape=(16.7, 16)), r"of integers >= 0, got \(16.7, 16\)"),
}


@pytest.mark.parametrize("case", BSR_CTOR_CASES)
def test_block_sparse_constructor_rejects(case):
    changes, match = BSR_CTOR_CASES[case]
    parts = _bsr_parts() | changes
    with pytest.raises(ValueError, match=match):
        sk.BlockSparse(parts["values"], parts["block_row_ptr"], parts["block_col_idx"],
                       parts["shape"])


def test_valid_hand_made_formats_are_accepted():
    """The baselines the rejection cases above are derived from are themselves valid."""
    b = _bsr_parts()
    W = sk.BlockSparse(b["values"], b["block_row_ptr"], b["block_col_idx"], b["shape"])
    assert W.values.shape[0] == 3 and W.nnz == 3 * 64
    c = _csr_parts()
    C = sk.CSR(c["values"], c["row_ptr"], c["col_idx"], c["shape"])
    assert C.nnz == 4 and torch.equal(C.to_dense()[C.mask()], C.values)


CSR_CTOR_CASES = {
    "values_2d": (dict(values=torch.randn(4, 1)), r"values must be 1-D \[nnz\], got \(4, 1\)"),
    "values_3d": (dict(values=torch.randn(1, 4, 1)),
                  r"values must be 1-D \[nnz\], got \(1, 4, 1\)"),
    "ptr_int64": (dict(row_ptr=torch.tensor([0, 2, 2, 4])), "row_ptr must be a 1-D int32"),
    "idx_int16": (dict(col_idx=torch.tensor([0, 3, 1, 2], dtype=torch.int16)),
                  "col_idx must be a 1-D int32"),
    "ptr_length": (dict(row_ptr=_i32(0, 2, 4)), "row_ptr must have 4 entries, got 3"),
    "ptr_non_monotone": (dict(row_ptr=_i32(0, 3, 2, 4)), "never decrease"),
    "ptr_start": (dict(row_ptr=_i32(1, 2, 2, 4)), "must start at 0"),
    "ptr_end": (dict(row_ptr=_i32(0, 2, 2, 3)), "end at 4"),
    "idx_length": (dict(col_idx=_i32(0, 3, 1)), "col_idx must have 4 entries"),
    "idx_range": (dict(col_idx=_i32(0, 4, 1, 2)), r"col_idx entries must lie in \[0, 4\)"),
    "idx_negative": (dict(col_idx=_i32(0, 3, -7, 2)), r"got \[-7, 3\]"),
    "values_int": (dict(values=torch.ones(4, dtype=torch.int64)),
                   r"values must be a floating-point 1-D \[nnz\] tensor, got torch.int64"),
    "values_bool": (dict(values=torch.ones(4, dtype=torch.bool)), "values must be a floating"),
    "shape_negative": (dict(shape=(-1, 4)), r"shape must be .* of integers >= 0, got \(-1, 4\)"),
    "shape_float": (dict(shape=(3, 4.0)), r"of integers >= 0, got \(3, 4.0\)"),
}


@pytest.mark.parametrize("case", CSR_CTOR_CASES)
def test_csr_constructor_rejects(case):
    changes, match = CSR_CTOR_CASES[case]
    parts = _csr_parts() | changes
    with pytest.raises(ValueError, match=match):
        sk.CSR(parts["values"], parts["row_ptr"], parts["col_idx"], parts["shape"])


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_from_state_dict_rejects_corrupt_index(fmt):
    if fmt == "bsr":
        W = sk.BlockSparse.from_dense(torch.randn(40, 40), block_mask(40, 40, (8, 8), 0.3),
                                      block=(8, 8))
        state, key, cls = W.state_dict(), "block_col_idx", sk.BlockSparse
    else:
        W = sk.CSR.from_dense(torch.randn(40, 40), unstructured_mask(40, 40, 0.3))
        state, key, cls = W.state_dict(), "col_idx", sk.CSR
    state[key][0] = 1000
    with pytest.raises(ValueError, match=f"{key} entries must lie in"):
        cls.from_state_dict(state)


# ---- the ops directly (TORCH_CHECK -> RuntimeError) -----------------------------------------

def _valid(op, generator=None):
    """A valid sample for `op` (3 block rows / 3 rows so a pointer can decrease)."""
    W, x, dy, bias = random_problem(op[:3], 4, 24, 20, block=(8, 8), sparsity=0.3, empty=True,
                                    generator=generator)
    return W, list(op_args(op, W, x, dy, bias))


def _nondecreasing_broken(ptr):
    """Same first/last entries, but decreasing somewhere in the middle."""
    bad = ptr.clone()
    bad[1] = ptr[-1] + 1
    return bad


def _noncontiguous(t):
    return torch.stack([t, t], 1)[:, 0]


# (op, argument position, make the bad value from the good one, expected message)
def _op_cases():
    cases = []
    for op in ("bsr_linear", "csr_linear"):
        p = "block_" if op == "bsr_linear" else ""
        cases += [
            (op, 0, lambda t: t.unsqueeze(0), "x must be 2-D"),
            (op, 0, lambda t: t.half(), "x must be float32, float64 or bfloat16 on the CPU, got Half"),
            (op, 0, lambda t: t.to(torch.bfloat16), "values has dtype Float but expected BFloat16"),
            (op, 0, lambda t: t.long(), "x must be float32, float64 or bfloat16 on the CPU, got Long"),
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
            (op, 7, lambda t: t[:-1], r"bias must have shape \[24\], got \[23\]"),
            (op, 7, lambda t: t.view(1, -1), r"bias must have shape \[24\]"),
            (op, 7, lambda t: t.double(), "bias has dtype Double but expected Float"),
            (op, 8, lambda n: -1, "out_features must be >= 0, got -1"),
            (op, 8, lambda n: n + 100, f"{p}row_ptr must have"),
        ]
    cases += [
        ("bsr_linear", 1, lambda t: t.flatten(1),
         r"values must be \[nnz_blocks, block_k, block_n\]"),
        ("bsr_linear", 1, lambda t: t[:, :, :4].contiguous(),
         "block dims must be positive multiples of 8, got block_k=8 block_n=4"),
        ("csr_linear", 1, lambda t: t.view(-1, 1), r"values must be 1-D \[nnz\]"),
        ("csr_linear", 1, lambda t: t.view(1, -1, 1),
         r"values must be 1-D \[nnz\], got shape \[1, "),
        ("csr_linear_grad_input", 1, lambda t: t.view(1, -1, 1), r"values must be 1-D \[nnz\]"),
        ("bsr_linear_grad_input", 1, lambda t: t[0], r"values must be \[nnz_blocks"),
    ]
    for op in ("bsr_linear_grad_input", "csr_linear_grad_input"):
        p = "block_" if op.startswith("bsr") else ""
        cases += [
            (op, 0, lambda t: t[0], "grad_out must be 2-D"),
            (op, 0, lambda t: t.half(), "grad_out must be float32, float64 or bfloat16"),
            (op, 1, lambda t: t.double(), "values has dtype Double but expected Float"),
            (op, 2, lambda t: t.long(), f"{p}col_ptr must be int32"),
            (op, 2, _nondecreasing_broken, f"{p}col_ptr"),
            (op, 3, lambda t: torch.cat([t[:-1], _i32(99)]), f"{p}row_idx has entries in"),
            (op, 3, lambda t: t[1:].contiguous(), f"{p}row_idx must have"),
            (op, 4, lambda t: torch.cat([t[:-1], _i32(t.numel())]), f"{p}perm has entries in"),
            (op, 4, lambda t: torch.cat([_i32(-3), t[1:]]), f"{p}perm has entries in"),
            (op, 4, lambda t: t.long(), f"{p}perm must be int32"),
            (op, 5, lambda k: -1, "in_features must be >= 0, got -1"),
            (op, 5, lambda k: k + 64, f"{p}col_ptr must have"),
        ]
    for op in ("bsr_linear_grad_weight", "csr_linear_grad_weight"):
        p = "block_" if op.startswith("bsr") else ""
        cases += [
            (op, 0, lambda t: t[:-1], "x has 4 rows but grad_out has 3"),
            (op, 1, lambda t: t.double(), "x has dtype Double but expected Float"),
            (op, 1, lambda t: t.unsqueeze(0), "x must be 2-D"),
            (op, 0, lambda t: t.half(), "grad_out must be float32, float64 or bfloat16"),
            (op, 2, lambda t: t.long(), f"{p}row_ptr must be int32"),
            (op, 2, _nondecreasing_broken, f"{p}row_ptr"),
            (op, 3, lambda t: torch.cat([t[:-1], _i32(1000)]), f"{p}col_idx has entries in"),
            (op, 3, lambda t: t[1:].contiguous(), f"{p}row_ptr must start at 0 and end at"),
        ]
    cases += [
        ("bsr_linear_grad_weight", 4, lambda b: 12, "block dims must be positive multiples of 8"),
        ("bsr_linear_grad_weight", 5, lambda b: 0, "block dims must be positive multiples of 8"),
        ("bsr_linear_grad_weight", 4, lambda b: -8, "block dims must be positive multiples of 8"),
    ]
    return cases


OP_CASES = _op_cases()


@pytest.mark.parametrize("op,pos,corrupt,match", OP_CASES,
                         ids=[f"{c[0]}-arg{c[1]}-{i}" for i, c in enumerate(OP_CASES)])
def test_op_rejects(op, pos, corrupt, match):
    _, args = _valid(op)
    run_op(op, args)  # the unmodified sample is valid
    args[pos] = corrupt(args[pos])
    with pytest.raises(RuntimeError, match=f"sparsekern.{op}: .*{match}"):
        run_op(op, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", OPS)
def test_op_rejects_mixed_devices(op):
    _, args = _valid(op)
    args[1] = args[1].cuda()
    with pytest.raises((RuntimeError, NotImplementedError), match="(?i)cuda|device"):
        run_op(op, args)


@pytest.mark.parametrize("op", OPS)
def test_op_rejects_a_meta_tensor_among_cpu_ones(op):
    assert_refuses_a_meta_tensor(op, _valid(op)[1])


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(OPS), data=st.data())
def test_corrupted_index_never_crashes(op, data):
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


# ---- sk.linear and the modules --------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_linear_rejects_wrong_in_features(fmt):
    W, _, _, _ = random_problem(fmt, 1, 24, 20, block=(8, 8))
    with pytest.raises(ValueError, match=r"x must end in in_features=20, got shape \(3, 21\)"):
        sk.linear(torch.randn(3, 21), W)
    with pytest.raises(ValueError, match="x must end in in_features=20"):
        sk.linear(torch.tensor(1.0), W)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_linear_rejects_dtype_mismatch(fmt):
    W, x, _, _ = random_problem(fmt, 3, 24, 20, block=(8, 8))
    with pytest.raises(ValueError, match="linear: x, values and bias must share a dtype, got "
                                         "x torch.float16, values torch.float32"):
        sk.linear(x.half(), W)
    with pytest.raises(RuntimeError, match="values has dtype Float but expected Double"):
        sk.linear(x.double(), W)


def test_linear_rejects_arguments_that_are_not_tensors():
    W, x, _, _ = random_problem("csr", 3, 24, 20)
    with pytest.raises(TypeError, match="linear: bias must be a tensor or None, got list"):
        sk.linear(x, W, [0.0] * 24)
    with pytest.raises(TypeError, match="linear: x must be a tensor, got list"):
        sk.linear(x.tolist(), W)


def test_sparse_linear_rejects():
    W, _, _, _ = random_problem("csr", 1, 24, 20)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\), got \(3,\)"):
        sk.SparseLinear(W, torch.randn(3))
    with pytest.raises(TypeError, match="SparseLinear: weight must be a sparsekern.BlockSparse, "
                                        "CSR or NM, got Tensor"):
        sk.SparseLinear(torch.randn(24, 20))
    with pytest.raises(TypeError, match="linear must be nn.Linear, got Conv1d"):
        sk.SparseLinear.from_dense(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="format must be one of"):
        sk.SparseLinear.from_dense(nn.Linear(20, 24), format="coo")

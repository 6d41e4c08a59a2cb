"""Shared builders and checks for the sparsekern tests (not a test module).

Named `_sk_helpers` rather than `_helpers` so that it cannot shadow a helper module of another
test folder (tests/ has no __init__.py, so pytest puts each test folder on sys.path).

How a kernel is checked (DESIGN.md, "How a kernel is proven correct"):
  * the oracle is sparsekern.reference, run in float64 on the same (float64-cast) arguments;
  * relative error ||out - ref|| / ||ref|| below TOL[dtype];
  * fresh random data: tensors come from torch's global RNG (never seeded here) or from a
    generator seeded by hypothesis; weights are torch.randn, never zeros;
  * outputs are poisoned: see `poisoned()`.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import sparsekern as sk
from sparsekern import reference
from sparsekern._extension import _C

BLOCK_SIZES = (8, 16, 32, 64)
ISAS: tuple[str, ...] = tuple(_C.available_isas()) if _C is not None else ()
BSR_OPS = ("bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight")
CSR_OPS = ("csr_linear", "csr_linear_grad_input", "csr_linear_grad_weight")
OPS = BSR_OPS + CSR_OPS
FORMATS = ("bsr", "csr")
# float64 kernels vs float64 reference; float32 kernels vs float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ---- instruction sets ----------------------------------------------------------------------

@contextlib.contextmanager
def use_isa(name: str):
    """Runs the float32 kernels on instruction set `name`, restoring the previous one after."""
    if _C is None:
        yield
        return
    previous = _C.active_isa()
    _C.set_isa(name)
    try:
        yield
    finally:
        _C.set_isa(previous)


# ---- comparisons ---------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; the absolute error where ref is exactly zero."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    diff = float((out64 - ref64).norm())
    scale = float(ref64.norm())
    return diff / scale if scale > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output"):
    assert tuple(out.shape) == tuple(ref.shape), (
        f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    nan = torch.isnan(out)
    assert not bool(nan.any()), (
        f"{what}: {int(nan.sum())} NaN elements (left unwritten in a poisoned buffer?) at "
        f"{nan.nonzero()[:5].tolist()}")
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite elements"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"


# ---- poisoning -----------------------------------------------------------------------------

@contextlib.contextmanager
def poisoned(*numels: int, dtype=torch.float64):
    """Makes uninitialised memory NaN while the body runs, so an output element a kernel never
    writes shows up as NaN.

    Two mechanisms: (1) NaN-filled garbage of the given sizes is allocated and freed first, so
    the CPU allocator (malloc) tends to hand the same bytes to the op's `at::empty`; (2) torch's
    deterministic mode with `fill_uninitialized_memory`, under which every `empty` (also the
    ones in C++ extensions, they go through the dispatcher) is NaN-filled.
    """
    sizes = [max(int(n), 1) for n in numels] or [1]
    garbage = [torch.full((n,), float("nan"), dtype=dtype) for n in sizes]
    garbage += [torch.full((2 * n,), float("nan"), dtype=dtype) for n in sizes]
    del garbage
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


# ---- random data ---------------------------------------------------------------------------

def randn(*shape, dtype=torch.float32, generator=None) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=generator)


def unstructured_mask(n: int, k: int, sparsity: float, empty_rows=(), empty_cols=(),
                      generator=None) -> torch.Tensor:
    """Bool [n, k]: each position kept with probability 1 - sparsity; listed rows/cols empty.
    Unless sparsity is 1, at least one position is kept."""
    mask = torch.rand(n, k, generator=generator) >= sparsity  # rand < 1: 1.0 prunes all
    return _apply_empty(mask, sparsity, empty_rows, empty_cols, generator)


def _apply_empty(pattern, sparsity, empty_rows, empty_cols, generator):
    """Empties the listed rows/cols; keeps one allowed entry if sparsity < 1 left none."""
    allowed = torch.ones_like(pattern)
    allowed[list(empty_rows)] = False
    allowed[:, list(empty_cols)] = False
    pattern &= allowed
    if sparsity < 1.0 and not bool(pattern.any()) and bool(allowed.any()):
        candidates = allowed.flatten().nonzero().flatten()
        pick = candidates[torch.randint(candidates.numel(), (1,), generator=generator)]
        pattern.view(-1)[pick] = True
    return pattern


def block_mask(n: int, k: int, block, sparsity: float, empty_block_rows=(),
               empty_block_cols=(), generator=None) -> torch.Tensor:
    """Bool [n, k] made of whole (bn, bk) blocks (cropped at ragged edges): each block kept with
    probability 1 - sparsity; the listed block rows / block columns are empty. Unless sparsity
    is 1, at least one block is kept."""
    bn, bk = block
    present = block_pattern(math.ceil(n / bn), math.ceil(k / bk), sparsity, generator)
    present = _apply_empty(present, sparsity, empty_block_rows, empty_block_cols, generator)
    return expand_pattern(present, block, n, k)


def block_pattern(nb: int, kb: int, sparsity: float, generator=None) -> torch.Tensor:
    return torch.rand(nb, kb, generator=generator) >= sparsity


def expand_pattern(present: torch.Tensor, block, n: int, k: int) -> torch.Tensor:
    bn, bk = block
    return present.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k].contiguous()


def block_closure(mask: torch.Tensor, block) -> torch.Tensor:
    """Every position of every (bn, bk) block that holds at least one True of `mask`."""
    bn, bk = block
    n, k = mask.shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.bool)
    padded[:n, :k] = mask
    present = padded.view(nb, bn, kb, bk).any(dim=3).any(dim=1)
    return expand_pattern(present, block, n, k)


def make_format(fmt: str, weight: torch.Tensor, mask: torch.Tensor, block=(32, 32)):
    if fmt == "bsr":
        return sk.BlockSparse.from_dense(weight, mask, block=block)
    return sk.CSR.from_dense(weight, mask)


def random_problem(fmt: str, m: int, n: int, k: int, *, block=(16, 16), sparsity=0.5,
                   dtype=torch.float32, empty=False, generator=None, structured=True):
    """(W, x, dy, bias) for y = x W^T + bias with a random sparse W of the given format.

    empty=True makes the second block row / CSR row and the first block column / CSR column
    (and the last CSR column) empty, so the kernels must still write their outputs there.
    """
    w = randn(n, k, dtype=dtype, generator=generator)
    if fmt == "bsr":
        if structured:
            rows, cols = ((1,), (0,)) if empty else ((), ())
            nb, kb = math.ceil(n / block[0]), math.ceil(k / block[1])
            rows = tuple(r for r in rows if r < nb)
            cols = tuple(c for c in cols if c < kb and kb > 1)
            mask = block_mask(n, k, block, sparsity, rows, cols, generator)
        else:
            mask = unstructured_mask(n, k, sparsity, generator=generator)
    else:
        rows = (1,) if empty and n > 1 else ()
        cols = tuple(sorted({0, k - 1})) if empty and k > 2 else ()
        mask = unstructured_mask(n, k, sparsity, rows, cols, generator)
    W = make_format(fmt, w, mask, block)
    x = randn(m, k, dtype=dtype, generator=generator)
    dy = randn(m, n, dtype=dtype, generator=generator)
    bias = randn(n, dtype=dtype, generator=generator)
    return W, x, dy, bias


# ---- calling the ops -----------------------------------------------------------------------

def op_args(name: str, W, x: torch.Tensor, dy: torch.Tensor, bias: torch.Tensor | None):
    """The argument tuple of torch.ops.sparsekern.<name> (= reference.<name>) for weight W."""
    n, k = W.shape
    if name == "bsr_linear":
        return (x, W.values, W.block_row_ptr, W.block_col_idx, W.block_col_ptr,
                W.block_row_idx, W.block_perm, bias, n)
    if name == "bsr_linear_grad_input":
        return (dy, W.values, W.block_col_ptr, W.block_row_idx, W.block_perm, k)
    if name == "bsr_linear_grad_weight":
        bn, bk = W.block
        return (dy, x, W.block_row_ptr, W.block_col_idx, bn, bk)
    if name == "csr_linear":
        return (x, W.values, W.row_ptr, W.col_idx, W.col_ptr, W.row_idx, W.perm, bias, n)
    if name == "csr_linear_grad_input":
        return (dy, W.values, W.col_ptr, W.row_idx, W.perm, k)
    if name == "csr_linear_grad_weight":
        return (dy, x, W.row_ptr, W.col_idx)
    raise KeyError(name)


def to_float64(args):
    return tuple(a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


def run_op(name: str, args):
    return getattr(torch.ops.sparsekern, name)(*args)


def block_for(fmt: str, block=(8, 8)):
    """The `block` argument of from_dense for format `fmt`: only BSR takes one."""
    return block if fmt == "bsr" else None


def assert_refuses_a_meta_tensor(name: str, args) -> None:
    """One meta argument (the first or the last tensor) among CPU ones sends the call to the
    op's fake kernel (the dispatcher picks it for any meta input): it must refuse the mix, not
    return uninitialised memory on the CPU."""
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for pos in (tensors[0], tensors[-1]):
        bad = list(args)
        bad[pos] = bad[pos].to("meta")
        with pytest.raises(ValueError, match=f"{name}: all tensors must be on one device: "
                                             r".* is on (cpu|meta), but .* is on (meta|cpu)"):
            run_op(name, bad)


def reference_op(name: str, args):
    return getattr(reference, name)(*to_float64(args))


def check_op(name: str, W, x, dy, bias=None, tol=None):
    """Runs op `name` on poisoned memory and compares it with the float64 reference."""
    args = op_args(name, W, x, dy, bias)
    dtype = x.dtype
    with poisoned(dy.numel(), x.numel(), W.values.numel(), dtype=dtype):
        out = run_op(name, args)
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype} != input dtype {dtype}"
    assert_close(out, reference_op(name, args), TOL[dtype] if tol is None else tol, name)
    return out


def format_ops(fmt: str):
    return BSR_OPS if fmt == "bsr" else CSR_OPS


def rebuild(W, values: torch.Tensor):
    """A format object like W (same index) holding `values` (which may require grad)."""
    if isinstance(W, sk.BlockSparse):
        return sk.BlockSparse(values, W.block_row_ptr, W.block_col_idx, W.shape,
                              W.block_col_ptr, W.block_row_idx, W.block_perm)
    return sk.CSR(values, W.row_ptr, W.col_idx, W.shape, W.col_ptr, W.row_idx, W.perm)


# ---- conv2d --------------------------------------------------------------------------------

CONV_BSR_OPS = ("bsr_conv2d", "bsr_conv2d_grad_input", "bsr_conv2d_grad_weight")
CONV_CSR_OPS = ("csr_conv2d", "csr_conv2d_grad_input", "csr_conv2d_grad_weight")
CONV_OPS = CONV_BSR_OPS + CONV_CSR_OPS


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_out_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def conv_mask(fmt, c_out, c_in, kernel, *, block=(16, 16), sparsity=0.5, empty=False,
              structured=True, generator=None) -> torch.Tensor:
    """Bool [C_out, C_in, kh, kw]. BSR + structured: whole (bn, bk) channel blocks spanning the
    window; empty=True empties block row 1 and block column 0. Otherwise unstructured over the
    (C_out, C_in*kh*kw) view; empty=True empties output channel 1, every tap of input channel 0
    and the last column."""
    kh, kw = kernel
    if fmt == "bsr" and structured:
        nb, kb = math.ceil(c_out / block[0]), math.ceil(c_in / block[1])
        rows = (1,) if empty and nb > 1 else ()
        cols = (0,) if empty and kb > 1 else ()
        m = block_mask(c_out, c_in, block, sparsity, rows, cols, generator)
        return m[:, :, None, None].expand(-1, -1, kh, kw).contiguous()
    k = c_in * kh * kw
    rows = (1,) if empty and c_out > 1 else ()
    cols = tuple(sorted(set(range(kh * kw)) | {k - 1})) if empty and c_in > 1 else ()
    return unstructured_mask(c_out, k, sparsity, rows, cols, generator).view(c_out, c_in, kh, kw)


def conv_problem(fmt, n, c_in, c_out, hw, kernel=3, stride=1, padding=0, dilation=1, *,
                 block=(16, 16), sparsity=0.5, dtype=torch.float32, empty=False,
                 structured=True, generator=None):
    """(W, x, dy, bias, geometry) for a conv2d with a random sparse 4-D weight of the given
    format; geometry = (stride, padding, dilation) as pairs (symmetric padding, as the ops)."""
    kernel, geometry = pair(kernel), (pair(stride), pair(padding), pair(dilation))
    w = randn(c_out, c_in, *kernel, dtype=dtype, generator=generator)
    mask = conv_mask(fmt, c_out, c_in, kernel, block=block, sparsity=sparsity, empty=empty,
                     structured=structured, generator=generator)
    W = make_format(fmt, w, mask, block)
    x = randn(n, c_in, *pair(hw), dtype=dtype, generator=generator)
    dy = randn(n, c_out, *conv_out_hw(pair(hw), kernel, *geometry), dtype=dtype,
               generator=generator)
    return W, x, dy, randn(c_out, dtype=dtype, generator=generator), geometry


def conv_op_args(name: str, W, x, dy, bias, geometry):
    """The argument tuple of torch.ops.sparsekern.<name> (= reference.<name>) for conv weight W."""
    stride, padding, dilation = (list(g) for g in geometry)
    c_out, _, kh, kw = W.shape
    if name == "bsr_conv2d":
        return (x, W.values, W.block_row_ptr, W.block_col_idx, W.block_col_ptr,
                W.block_row_idx, W.block_perm, bias, c_out, stride, padding, dilation)
    if name == "bsr_conv2d_grad_input":
        return (dy, W.values, W.block_col_ptr, W.block_row_idx, W.block_perm, list(x.shape),
                stride, padding, dilation)
    if name == "bsr_conv2d_grad_weight":
        bn, bk = W.block
        return (dy, x, W.block_row_ptr, W.block_col_idx, [kh, kw], bn, bk, stride, padding,
                dilation)
    if name == "csr_conv2d":
        return (x, W.values, W.row_ptr, W.col_idx, W.col_ptr, W.row_idx, W.perm, bias, c_out,
                [kh, kw], stride, padding, dilation)
    if name == "csr_conv2d_grad_input":
        return (dy, W.values, W.col_ptr, W.row_idx, W.perm, list(x.shape), [kh, kw], stride,
                padding, dilation)
    if name == "csr_conv2d_grad_weight":
        return (dy, x, W.row_ptr, W.col_idx, [kh, kw], stride, padding, dilation)
    raise KeyError(name)


def check_conv_op(name, W, x, dy, bias, geometry, tol=None):
    """Runs conv op `name` on poisoned memory and compares it with the float64 reference;
    forward and dX must come back channels_last (the ops' documented layout)."""
    args = conv_op_args(name, W, x, dy, bias, geometry)
    dtype = x.dtype
    with poisoned(dy.numel(), x.numel(), W.values.numel(), dtype=dtype):
        out = run_op(name, args)
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype} != input dtype {dtype}"
    if not name.endswith("grad_weight"):
        assert out.is_contiguous(memory_format=torch.channels_last), f"{name}: not channels_last"
    assert_close(out, reference_op(name, args), TOL[dtype] if tol is None else tol, name)
    return out

"""BlockSparse and CSR: packing, round trips, index consistency, state_dict, .to()."""
import math

import pytest
import torch

import sparsekern as sk
from _sk_helpers import (BLOCK_SIZES, block_closure, block_mask, make_format, unstructured_mask)

SHAPES = [(64, 64), (45, 70), (1, 9), (9, 1), (130, 17)]
BLOCKS = [(8, 8), (16, 32), (64, 8), (32, 64)]


def _weight_and_mask(n, k, sparsity=0.6, dtype=torch.float32):
    return torch.randn(n, k, dtype=dtype), unstructured_mask(n, k, sparsity)


# ---- CSR -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_csr_round_trip(shape, sparsity):
    weight, mask = _weight_and_mask(*shape, sparsity)
    W = sk.CSR.from_dense(weight, mask)
    assert torch.equal(W.to_dense(), torch.where(mask, weight, torch.zeros_like(weight)))
    assert torch.equal(W.mask(), mask)
    assert W.nnz == int(mask.sum()) == W.values.numel()
    assert W.sparsity == pytest.approx(1 - int(mask.sum()) / mask.numel())
    assert W.shape == shape and W.dtype == weight.dtype and W.device == weight.device
    # values are the kept weights in row-major order
    assert torch.equal(W.values, weight[mask])
    for name, t in W.tensors().items():
        assert t.dtype == (weight.dtype if name == "values" else torch.int32), name
        assert t.is_contiguous() and t.dim() == 1, name


def test_csr_mask_none_means_nonzeros():
    weight = torch.randn(20, 30)
    weight[weight.abs() < 0.5] = 0
    W = sk.CSR.from_dense(weight)
    assert torch.equal(W.mask(), weight != 0)
    assert torch.equal(W.to_dense(), weight)
    assert W.nnz == int((weight != 0).sum())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_csr_transposed_index(shape):
    """(col_ptr, row_idx, perm) lists the stored entries column by column: entry i of the
    transposed order is stored value perm[i], at row row_idx[i] of its column."""
    weight, mask = _weight_and_mask(*shape, 0.5)
    W = sk.CSR.from_dense(weight, mask)
    n, k = shape
    assert W.col_ptr.numel() == k + 1 and int(W.col_ptr[0]) == 0
    assert int(W.col_ptr[-1]) == W.nnz and bool((W.col_ptr.diff() >= 0).all())
    assert torch.equal(W.col_ptr.diff().long(), mask.sum(0))
    assert torch.equal(W.perm.sort().values.long(), torch.arange(W.nnz))
    cols_t = torch.repeat_interleave(torch.arange(k), W.col_ptr.diff().long())
    rows = torch.repeat_interleave(torch.arange(n), W.row_ptr.diff().long())
    assert torch.equal(rows[W.perm.long()], W.row_idx.long())
    assert torch.equal(W.col_idx[W.perm.long()].long(), cols_t)
    dense_t = torch.zeros(n, k).index_put((W.row_idx.long(), cols_t), W.values[W.perm.long()])
    assert torch.equal(dense_t, W.to_dense())


# ---- BlockSparse ---------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bsr_round_trip_unstructured_mask(shape, block):
    """Any mask: the stored pattern is its block closure; values outside the given mask but
    inside a kept block are stored as zeros, so to_dense() is the weight masked by `mask`."""
    weight, mask = _weight_and_mask(*shape, 0.9)
    W = sk.BlockSparse.from_dense(weight, mask, block=block)
    closure = block_closure(mask, block)
    assert torch.equal(W.mask(), closure)
    assert torch.equal(W.to_dense(), torch.where(mask, weight, torch.zeros_like(weight)))
    assert W.nnz == int(closure.sum())
    assert W.sparsity == pytest.approx(1 - int(closure.sum()) / closure.numel())
    bn, bk = block
    assert W.block == (bn, bk)
    assert W.grid == (math.ceil(shape[0] / bn), math.ceil(shape[1] / bk))
    assert W.values.shape[1:] == (bk, bn)
    assert W.values.shape[0] == int(W.block_pattern().sum()) == W.block_col_idx.numel()


@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bsr_round_trip_block_mask(shape, block):
    """A block-aligned mask is its own closure: to_dense() == weight * mask() exactly."""
    weight = torch.randn(*shape)
    mask = block_mask(*shape, block, 0.5, empty_block_rows=(0,))
    W = sk.BlockSparse.from_dense(weight, mask, block=block)
    assert torch.equal(W.mask(), mask)
    assert torch.equal(W.to_dense(), weight * W.mask())
    assert W.nnz == int(mask.sum())


def test_bsr_values_layout():
    """values[b] is block b transposed: values[b][kk][n] = W[I*bn + n, J*bk + kk]."""
    bn, bk = 8, 16
    weight = torch.randn(3 * bn - 2, 2 * bk + 3)
    W = sk.BlockSparse.from_dense(weight, torch.ones_like(weight, dtype=torch.bool),
                                  block=(bn, bk))
    rows = torch.repeat_interleave(torch.arange(W.grid[0]), W.block_row_ptr.diff().long())
    padded = torch.zeros(W.grid[0] * bn, W.grid[1] * bk)
    padded[: weight.shape[0], : weight.shape[1]] = weight
    for b, (i, j) in enumerate(zip(rows.tolist(), W.block_col_idx.tolist())):
        expected = padded[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].t()
        assert torch.equal(W.values[b], expected), b  # ragged padding is stored as zeros
    assert W.nnz == weight.numel()  # padding does not count as stored


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_bsr_transposed_index(block):
    weight = torch.randn(70, 90)
    W = sk.BlockSparse.from_dense(weight, block_mask(70, 90, block, 0.5, (1,), (0,)),
                                  block=block)
    nb, kb = W.grid
    present = W.block_pattern()
    assert torch.equal(W.block_row_ptr.diff().long(), present.sum(1))
    assert torch.equal(W.block_col_ptr.diff().long(), present.sum(0))
    assert W.block_col_ptr.numel() == kb + 1 and W.block_row_ptr.numel() == nb + 1
    nnzb = W.values.shape[0]
    assert torch.equal(W.block_perm.sort().values.long(), torch.arange(nnzb))
    rows = torch.repeat_interleave(torch.arange(nb), W.block_row_ptr.diff().long())
    cols_t = torch.repeat_interleave(torch.arange(kb), W.block_col_ptr.diff().long())
    assert torch.equal(rows[W.block_perm.long()], W.block_row_idx.long())
    assert torch.equal(W.block_col_idx[W.block_perm.long()].long(), cols_t)
    for name, t in W.tensors().items():
        assert t.dtype == (torch.float32 if name == "values" else torch.int32), name
        assert t.is_contiguous(), name


def test_bsr_mask_none_means_nonzeros_closure():
    weight = torch.zeros(40, 40)
    weight[3, 5] = 1.5
    weight[20, 39] = -2.0
    W = sk.BlockSparse.from_dense(weight, block=(16, 16))
    assert W.values.shape[0] == 2
    assert torch.equal(W.mask(), block_closure(weight != 0, (16, 16)))
    assert torch.equal(W.to_dense(), weight)


@pytest.mark.parametrize("bn", BLOCK_SIZES)
@pytest.mark.parametrize("bk", BLOCK_SIZES)
def test_bsr_every_block_size_accepted(bn, bk):
    weight, mask = _weight_and_mask(50, 77, 0.95)
    W = sk.BlockSparse.from_dense(weight, mask, block=(bn, bk))
    assert W.block == (bn, bk)
    assert torch.equal(W.to_dense(), weight * mask)


# ---- both formats --------------------------------------------------------------------------

def _make(fmt, weight, mask):
    return make_format(fmt, weight, mask, block=(16, 8))


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_extreme_sparsities(fmt, sparsity):
    weight, mask = _weight_and_mask(30, 20, sparsity)
    W = _make(fmt, weight, mask)
    assert W.sparsity == sparsity
    assert W.nnz == (0 if sparsity == 1.0 else weight.numel())
    if sparsity == 1.0:
        assert W.values.numel() == 0 and W.values.shape[0] == 0
    expected = torch.zeros_like(weight) if sparsity == 1.0 else weight
    assert torch.equal(W.to_dense(), expected)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (0, 3, 3, 3), (4, 0, 3, 3)], ids=str)
def test_weights_with_no_rows_or_columns_pack(fmt, shape):
    """An empty dimension is a weight too (an nn.Linear(5, 0)): it packs to no entries."""
    weight = torch.randn(shape)
    W = _make(fmt, weight, torch.ones(shape, dtype=torch.bool))
    assert W.nnz == 0 and W.shape == shape
    assert torch.equal(W.to_dense(), weight) and W.mask().shape == shape


def test_more_entries_than_int32_indexes_are_refused():
    """The row pointer of 2**31 entries would wrap around in int32 (the counts alone are enough
    to show it: a real layer that size needs 8 GB of values)."""
    from sparsekern.formats import compressed_ptr
    assert compressed_ptr(torch.tensor([2, 0, 3])).tolist() == [0, 2, 2, 5]
    with pytest.raises(ValueError, match="2147483648 stored entries exceed the int32 index range"):
        compressed_ptr(torch.tensor([2**30, 2**30]))


def _assert_same(a, b):
    assert type(a) is type(b) and a.shape == b.shape
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_state_dict_round_trip(fmt, tmp_path):
    weight, mask = _weight_and_mask(45, 70, 0.7)
    W = _make(fmt, weight, mask)
    state = W.state_dict()
    assert set(state) == set(W.tensors()) | {"shape"}
    cls = type(W)
    _assert_same(cls.from_state_dict(state), W)
    # a copy: editing the state does not touch the format
    state["values"].add_(1.0)
    assert not torch.equal(state["values"], W.values)
    path = tmp_path / f"{fmt}.pt"
    torch.save(W.state_dict(), path)
    loaded = cls.from_state_dict(torch.load(path, weights_only=True))
    _assert_same(loaded, W)
    assert torch.equal(loaded.to_dense(), W.to_dense())


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_to_dtype_changes_values_only(fmt):
    weight, mask = _weight_and_mask(45, 70, 0.7)
    W = _make(fmt, weight, mask)
    W64 = W.to(torch.float64)
    assert W64.dtype == W64.values.dtype == torch.float64
    assert W.dtype == torch.float32  # the original is untouched
    for name, t in W64.tensors().items():
        if name != "values":
            assert t.dtype == torch.int32 and torch.equal(t, getattr(W, name)), name
    assert W64.shape == W.shape and W64.nnz == W.nnz
    assert torch.equal(W64.to_dense(), W.to_dense().double())
    for moved in (W.to("cpu"), W.to(torch.device("cpu"), torch.float64),
                  W.to(dtype=torch.float64), W.to(torch.zeros(1, dtype=torch.float64))):
        assert moved.device.type == "cpu"
        assert torch.equal(moved.to_dense().double(), W.to_dense().double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_to_device_moves_every_tensor(fmt):
    weight, mask = _weight_and_mask(45, 70, 0.7)
    W = _make(fmt, weight, mask).to("cuda")
    for name, t in W.tensors().items():
        assert t.device.type == "cuda", name
    assert torch.equal(W.to("cpu").to_dense(), _make(fmt, weight, mask).to_dense())


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_constructor_rebuilds_transposed_index(fmt):
    """Constructing from the forward index alone builds the same transposed index."""
    weight, mask = _weight_and_mask(45, 70, 0.7)
    W = _make(fmt, weight, mask)
    if fmt == "bsr":
        again = sk.BlockSparse(W.values, W.block_row_ptr, W.block_col_idx, W.shape)
    else:
        again = sk.CSR(W.values, W.row_ptr, W.col_idx, W.shape)
    _assert_same(again, W)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_repr_and_weight_not_aliased(fmt):
    weight, mask = _weight_and_mask(12, 20, 0.5)
    W = _make(fmt, weight, mask)
    text = repr(W)
    assert type(W).__name__ in text and "shape=(12, 20)" in text and f"nnz={W.nnz}" in text
    dense_before = W.to_dense().clone()
    weight.add_(1.0)  # packing copied the weight
    assert torch.equal(W.to_dense(), dense_before)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_from_dense_of_parameter_is_detached(fmt):
    weight = torch.nn.Parameter(torch.randn(12, 20))
    W = _make(fmt, weight, torch.rand(12, 20) < 0.5)
    assert not W.values.requires_grad

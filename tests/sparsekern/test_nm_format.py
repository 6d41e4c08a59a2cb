"""NM (N:M) weight format: packing, the regular-row CSR layout, validation with clear errors,
state_dict, .to(), and the CUTLASS 2:4 metadata (checked on the CPU with torch's own converter).

`random_nm_mask` is shared with the other test_nm_* files.
"""
import pytest
import torch
from torch.sparse._semi_structured_conversions import (sparse_semi_structured_from_dense_cutlass,
                                                       sparse_semi_structured_to_dense_cutlass)

import sparsekern as sk
from sparsekern.formats import SEMI_STRUCTURED_MULTIPLE, nm_slots_per_row

PATTERNS = [(2, 4), (1, 4), (4, 8)]
# ragged K, K < M, no rows, no inputs, one row
SHAPES = [(8, 16), (5, 10), (3, 3), (0, 8), (4, 0), (7, 17), (1, 9)]


def random_nm_mask(rows: int, k: int, n: int, m: int, *, exact: bool = True,
                   generator=None) -> torch.Tensor:
    """Bool [rows, k] keeping at most n of every m consecutive inputs: exactly n of each group
    (a ragged tail group: of its first m positions, those in range) when `exact`, else a random
    count 0..n per group (all-pruned groups and groups keeping fewer than n)."""
    groups = -(-k // m)
    rank = torch.rand(rows, groups, m, generator=generator).argsort(-1).argsort(-1)
    if exact:
        count = torch.full((rows, groups, 1), n)
    else:
        count = torch.randint(0, n + 1, (rows, groups, 1), generator=generator)
    return (rank < count).view(rows, groups * m)[:, :k].contiguous()


def _slot_cols(W):
    rows = W.matrix_shape[0]
    return W.col_idx.view(rows, W.slots_per_row).long()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fewer"])
@pytest.mark.parametrize("nm", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_and_layout(shape, nm, exact):
    rows, k = shape
    n, m = nm
    weight = torch.randn(rows, k, dtype=torch.float64)
    mask = random_nm_mask(rows, k, n, m, exact=exact)
    W = sk.NM.from_dense(weight, mask, n, m)
    assert torch.equal(W.to_dense(), torch.where(mask, weight, torch.zeros_like(weight)))
    assert torch.equal(W.mask(), mask)
    assert W.nnz == int(mask.sum())
    assert W.sparsity == pytest.approx(1 - mask.sum().item() / mask.numel() if mask.numel()
                                       else 0.0)
    assert W.nm == nm and W.shape == shape and W.dtype == torch.float64
    # regular rows: N slots per full group, min(N, r) for a ragged tail of r inputs
    s = (k // m) * n + min(n, k % m)
    assert W.values.shape == (rows, s) == (rows, nm_slots_per_row(k, n, m))
    assert torch.equal(W.row_ptr.long(), torch.arange(rows + 1) * s)
    cols = _slot_cols(W)
    if rows * s:
        assert bool((cols // m == torch.arange(s) // n).all()), "slot j lies in group j // N"
        assert bool((cols.diff(dim=1) > 0).all()), "columns ascend within a row"
        assert torch.equal(W.kept, mask.gather(1, cols))
        assert bool((W.values[~W.kept] == 0).all()), "free slots hold exact zeros"
    for name in ("col_idx", "row_ptr", "col_ptr", "row_idx", "perm"):
        assert getattr(W, name).dtype == torch.int32, name


def test_free_slots_take_the_lowest_unkept_inputs():
    mask = torch.tensor([[False, False, True, False, False, False, False, False]])
    W = sk.NM.from_dense(torch.randn(1, 8), mask)
    assert W.col_idx.tolist() == [0, 2, 4, 5]
    assert W.kept.tolist() == [[False, True, False, False]]


def test_conv_weight_packs_the_flattened_view():
    weight = torch.randn(6, 3, 3, 3)
    mask = random_nm_mask(6, 27, 2, 4).view(6, 3, 3, 3)  # K = 27: a ragged tail group
    W = sk.NM.from_dense(weight, mask)
    assert W.shape == (6, 3, 3, 3) and W.matrix_shape == (6, 27)
    assert torch.equal(W.to_dense(), weight * mask)
    assert torch.equal(W.mask(), mask)
    flat = sk.NM.from_dense(weight.reshape(6, 27), mask.reshape(6, 27))
    assert torch.equal(W.col_idx, flat.col_idx) and torch.equal(W.values, flat.values)


def test_mask_none_means_nonzeros():
    weight = torch.randn(4, 8) * random_nm_mask(4, 8, 2, 4, exact=False)
    W = sk.NM.from_dense(weight)
    assert torch.equal(W.mask(), weight != 0) and torch.equal(W.to_dense(), weight)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fewer"])
def test_derived_index_is_the_csr_of_the_slots(exact):
    """The CPU runs NM on the CSR kernels: its derived index is exactly the CSR index of the
    slot pattern (kept and free slots), built by CSR.from_dense."""
    weight = torch.randn(9, 22)
    W = sk.NM.from_dense(weight, random_nm_mask(9, 22, 2, 4, exact=exact))
    C = sk.CSR.from_dense(weight, W.slot_pattern())
    for name in ("row_ptr", "col_idx", "col_ptr", "row_idx", "perm"):
        assert torch.equal(getattr(W, name), getattr(C, name)), name
    assert torch.equal(W.values.reshape(-1), torch.where(W.kept, W.values, 0).reshape(-1))
    assert torch.equal(C.values[W.kept.reshape(-1)], W.values[W.kept])


# ---- errors ----------------------------------------------------------------------------------

def test_mask_over_n_is_refused_naming_row_and_group():
    mask = random_nm_mask(5, 12, 2, 4)
    mask[3, 4:8] = torch.tensor([True, True, True, False])  # row 3, group 1 keeps 3
    with pytest.raises(ValueError, match=r"NM.from_dense: mask keeps 3 of the inputs 4\.\.7 of "
                                         r"row 3 \(group 1\); a 2:4 weight keeps at most 2 of "
                                         r"every 4 consecutive inputs \(1 groups break it\)"):
        sk.NM.from_dense(torch.randn(5, 12), mask)
    ragged = torch.ones(2, 6, dtype=torch.bool)
    ragged[:, :4] = False  # only the tail group (inputs 4..5) breaks 1:4
    with pytest.raises(ValueError, match=r"keeps 2 of the inputs 4\.\.5 of row 0 \(group 1\); "
                                         r"a 1:4 weight .* \(2 groups break it\)"):
        sk.NM.from_dense(torch.randn(2, 6), ragged, 1, 4)
    conv = torch.ones(4, 2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"of output channel 0 \(group 0\)"):
        sk.NM.from_dense(torch.randn(4, 2, 3, 3), conv)


@pytest.mark.parametrize("n, m, match", [(0, 4, "need 0 < n < m"), (4, 4, "need 0 < n < m"),
                                         (3, 2, "need 0 < n < m"), (2.0, 4, "n must be an int"),
                                         (2, "4", "m must be an int")])
def test_bad_n_m(n, m, match):
    with pytest.raises(ValueError, match=f"NM.from_dense: {match}"):
        sk.NM.from_dense(torch.randn(4, 8), None, n, m)


def test_bad_weight_and_mask():
    with pytest.raises(ValueError, match="mask shape"):
        sk.NM.from_dense(torch.randn(4, 8), torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        sk.NM.from_dense(torch.randn(4, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        sk.NM.from_dense(torch.randn(8))
    with pytest.raises(ValueError, match="must be floating point"):
        sk.NM.from_dense(torch.ones(4, 8, dtype=torch.int64))


def _parts(W):
    return dict(values=W.values.clone(), col_idx=W.col_idx.clone(), kept=W.kept.clone(),
                shape=W.shape, nm=W.nm)


def test_constructor_refuses_inconsistent_parts():
    W = sk.NM.from_dense(torch.randn(4, 8), random_nm_mask(4, 8, 2, 4, exact=False))
    bad = _parts(W)
    bad["col_idx"][1] = 5  # row 0, slot 1 (group 0) moved into group 1
    with pytest.raises(ValueError, match=r"col_idx of row 0, slot 1 is 5, outside its group 0 "
                                         r"\(inputs 0\.\.3\)"):
        sk.NM(**bad)
    bad = _parts(W)
    bad["col_idx"] = bad["col_idx"].long()
    with pytest.raises(ValueError, match=r"col_idx must be a 1-D int32 tensor of 16 entries"):
        sk.NM(**bad)
    ragged = sk.NM.from_dense(torch.randn(2, 6), random_nm_mask(2, 6, 2, 4))
    bad = _parts(ragged)
    bad["col_idx"][3] = 6  # the tail group (inputs 4..5) pointing past the last input
    with pytest.raises(ValueError, match=r"col_idx entries must lie in \[0, 6\)"):
        sk.NM(**bad)
    bad = _parts(W)
    bad["col_idx"][0], bad["col_idx"][1] = bad["col_idx"][1].clone(), bad["col_idx"][0].clone()
    with pytest.raises(ValueError, match="strictly increasing"):
        sk.NM(**bad)
    bad = _parts(W)
    bad["kept"][:] = False
    with pytest.raises(ValueError, match=r"values of the free slots \(kept False\) must be "
                                         r"exactly 0"):
        sk.NM(**bad)
    bad = _parts(W)
    bad["kept"] = bad["kept"].to(torch.uint8)
    with pytest.raises(ValueError, match=r"kept must be a bool \[4, 4\] tensor"):
        sk.NM(**bad)
    bad = _parts(W)
    bad["values"] = bad["values"][:, :3]
    with pytest.raises(ValueError, match=r"values must be a floating-point \[rows, slots\] = "
                                         r"\[4, 4\]"):
        sk.NM(**bad)
    with pytest.raises(ValueError, match=r"NM: nm must be a pair"):
        sk.NM(**{**_parts(W), "nm": 4})


def test_state_dict_round_trip(tmp_path):
    W = sk.NM.from_dense(torch.randn(6, 2, 3, 3), random_nm_mask(6, 18, 2, 4, exact=False)
                         .view(6, 2, 3, 3))
    state = W.state_dict()
    assert set(state) == {"values", "col_idx", "kept", "shape", "nm"}  # derived: rebuilt
    path = tmp_path / "nm.pt"
    torch.save(state, path)
    loaded = sk.NM.from_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(loaded.to_dense(), W.to_dense()) and loaded.nm == W.nm
    for name, t in W.tensors().items():
        assert torch.equal(getattr(loaded, name), t), name
    broken = dict(state)
    broken["col_idx"] = broken["col_idx"].flip(0)
    with pytest.raises(ValueError, match="NM: col_idx"):
        sk.NM.from_state_dict(broken)
    del broken["kept"]
    with pytest.raises(ValueError, match=r"NM.from_state_dict: state lacks \['kept'\]"):
        sk.NM.from_state_dict(broken)


def test_to_dtype_keeps_the_index():
    W = sk.NM.from_dense(torch.randn(32, 64), random_nm_mask(32, 64, 2, 4))
    D = W.to(torch.float64)
    assert D.dtype == torch.float64 and torch.equal(D.to_dense(), W.to_dense().double())
    for name, t in W.tensors().items():
        if name != "values":
            assert getattr(D, name) is t, name
    assert W.to("cpu").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_to_cuda_moves_every_tensor():
    W = sk.NM.from_dense(torch.randn(32, 64), random_nm_mask(32, 64, 2, 4)).to("cuda")
    for name, t in W.tensors().items():
        assert t.device.type == "cuda", name
    assert torch.equal(W.to("cpu").to_dense(), W.to_dense().cpu())


# ---- the CUTLASS 2:4 operand -------------------------------------------------------------------

def test_semi_structured_multiple_is_torchs_constraint():
    table = torch.sparse.SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS
    for dtype in (torch.float16, torch.bfloat16):
        assert (table[dtype].sparse_min_rows, table[dtype].sparse_min_cols) == \
            SEMI_STRUCTURED_MULTIPLE


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fewer"])
@pytest.mark.parametrize("shape", [(32, 64), (64, 192), (96, 128)], ids=str)
def test_semi_structured_meta_decodes_to_the_weight(shape, exact):
    """values + semi_structured_meta is CUTLASS's 2:4 operand: torch's decoder (the inverse of
    the encoder torch feeds the CUTLASS kernels) rebuilds the dense weight from them, in every
    dtype it decodes, and the metadata is what torch's encoder makes of the slot pattern."""
    rows, k = shape
    weight = torch.randn(rows, k, dtype=torch.float64)
    W = sk.NM.from_dense(weight, random_nm_mask(rows, k, 2, 4, exact=exact))
    meta = W.semi_structured_meta
    assert meta.dtype == torch.int16 and meta.shape == (rows, k // 16)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        decoded = sparse_semi_structured_to_dense_cutlass(W.values.to(dtype), meta)
        assert torch.equal(decoded, W.to_dense().to(dtype)), dtype
    slots = torch.where(W.slot_pattern(), torch.rand(rows, k) + 1, torch.zeros(rows, k))
    packed, torch_meta = sparse_semi_structured_from_dense_cutlass(slots.half())
    assert torch.equal(torch_meta, meta)
    assert torch.equal(packed, slots.half()[W.slot_pattern()].view(rows, k // 2))


@pytest.mark.parametrize("shape, nm", [((16, 64), (2, 4)), ((32, 48), (2, 4)), ((32, 66), (2, 4)),
                                       ((32, 64), (1, 4)), ((32, 64), (4, 8)), ((0, 64), (2, 4))],
                         ids=str)
def test_no_semi_structured_meta_where_cutlass_cannot_take_it(shape, nm):
    W = sk.NM.from_dense(torch.randn(shape), random_nm_mask(*shape, *nm), *nm)
    assert W.semi_structured_meta is None and "semi_structured_meta" not in W.tensors()
    assert not W.semi_structured_ready()


def test_large_index_is_refused():
    with pytest.raises(ValueError, match="exceed the int32 index range"):
        sk.NM(torch.empty(0, 0), torch.empty(0, dtype=torch.int32), torch.empty(0, 0, dtype=bool),
              (2**20, 2**13))

"""State dicts of the formats and the layers: an index that is in range but inconsistent (the
transposed index dX reads does not list the entries of the forward index) is refused by the
constructors, from_state_dict and load_state_dict, naming the tensor; a sparsified model is
rebuilt from its state_dict alone (sk.load_sparse / from_state_dict), with no mask."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from _sk_helpers import block_mask, unstructured_mask
from test_nm_format import random_nm_mask

BSR_NAMES = ("block_col_ptr", "block_row_idx", "block_perm")
CSR_NAMES = ("col_ptr", "row_idx", "perm")


def _weight(fmt: str, shape=(40, 44)):
    w = torch.randn(*shape)
    if fmt == "bsr":
        return sk.BlockSparse.from_dense(w, block_mask(*shape, (8, 8), 0.4), block=(8, 8))
    return sk.CSR.from_dense(w, unstructured_mask(*shape, 0.6))


def _column_with_two(t_ptr: torch.Tensor) -> int:
    """The first position of a column holding at least two entries."""
    counts = t_ptr[1:] - t_ptr[:-1]
    return int(t_ptr[int((counts >= 2).nonzero()[0])])


def _corruptions(W):
    """(what, {tensor name: corrupted tensor}, error pattern): in range, wrong."""
    t_ptr_name, t_idx_name, perm_name = BSR_NAMES if isinstance(W, sk.BlockSparse) else CSR_NAMES
    t_ptr, t_idx, perm = (getattr(W, n) for n in (t_ptr_name, t_idx_name, perm_name))
    last = perm.numel() - 1
    duplicated = perm.clone()
    duplicated[1] = duplicated[0]
    swapped = perm.clone()
    swapped[[0, last]] = perm[[last, 0]]  # first and last column: another column's entry
    other_row = t_idx.clone()
    other_row[0] = (t_idx[0] + 1) % W.grid[0] if isinstance(W, sk.BlockSparse) else \
        (t_idx[0] + 1) % W.shape[0]
    shifted = t_ptr.clone()
    shifted[1:-1] = torch.clamp(shifted[1:-1] + 1, max=int(t_ptr[-1]))
    q = _column_with_two(t_ptr)
    reordered_rows, reordered_perm = t_idx.clone(), perm.clone()
    reordered_rows[[q, q + 1]], reordered_perm[[q, q + 1]] = t_idx[[q + 1, q]], perm[[q + 1, q]]
    return [
        ("duplicated perm", {perm_name: duplicated},
         f"{perm_name} must be a permutation of 0..{last} \\(every stored entry once\\)"),
        ("perm of another column", {perm_name: swapped},
         rf"{perm_name}\[0\] = {int(perm[last])} is an entry of column"),
        ("row index of another row", {t_idx_name: other_row},
         rf"{t_idx_name}\[0\] = {int(other_row[0])} does not match the row"),
        ("column pointer shifted", {t_ptr_name: shifted},
         f"{t_ptr_name} does not match"),
        ("rows out of order in a column", {t_idx_name: reordered_rows, perm_name: reordered_perm},
         f"{t_idx_name} must be strictly increasing within each column"),
    ]


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_constructor_and_from_state_dict_refuse_an_inconsistent_transposed_index(fmt):
    W = _weight(fmt)
    cls = type(W)
    cls(shape=W.shape, **W.tensors())  # the consistent index passes
    for what, changes, match in _corruptions(W):
        with pytest.raises(ValueError, match=f"{cls.__name__}: {match}"):
            cls(shape=W.shape, **(W.tensors() | changes))
        with pytest.raises(ValueError, match=match):
            cls.from_state_dict(W.state_dict() | changes)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_layer_load_state_dict_refuses_an_inconsistent_index_and_stays_intact(fmt):
    layer = sk.SparseLinear.from_dense(nn.Linear(44, 40), _weight(fmt).mask(), format=fmt,
                                       block=(8, 8) if fmt == "bsr" else None)
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    for what, changes, match in _corruptions(layer.weight_format()):
        state = layer.state_dict() | {k: v.clone() for k, v in changes.items()}
        with pytest.raises(ValueError, match=f"SparseLinear.load_state_dict: .*{match}"):
            layer.load_state_dict(state)
        after = layer.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), what


def test_conv_layer_in_a_model_refuses_a_duplicated_perm_naming_the_layer():
    conv = nn.Conv2d(6, 8, 3)
    model = nn.Sequential(sk.SparseConv2d.from_dense(conv, torch.rand(8, 6, 3, 3) < 0.4,
                                                     format="csr"))
    state = model.state_dict()
    state["0.perm"] = state["0.perm"].clone()
    state["0.perm"][2] = state["0.perm"][3]
    with pytest.raises(ValueError, match="SparseConv2d.load_state_dict \\('0'\\): CSR: perm "
                                         "must be a permutation"):
        model.load_state_dict(state)


def test_nm_load_and_constructor_check_the_index():
    layer = sk.SparseLinear.from_dense(nn.Linear(16, 8), random_nm_mask(8, 16, 2, 4),
                                       format="nm")
    state = layer.state_dict()
    state["col_idx"] = state["col_idx"].clone()
    state["col_idx"][1] = state["col_idx"][0]  # a duplicated column within its group
    with pytest.raises(ValueError, match="SparseLinear.load_state_dict: NM: col_idx must be "
                                         "strictly increasing within each row"):
        layer.load_state_dict(state)
    W = layer.weight_format()
    perm = W.perm.clone()
    perm[1] = perm[0]
    with pytest.raises(ValueError, match="NM: perm must be a permutation"):
        sk.NM(W.values, W.col_idx, W.kept, W.shape, W.nm, W.row_ptr, W.col_ptr, W.row_idx, perm)


def test_load_into_a_layer_of_another_format_or_shape_is_refused():
    mask = torch.rand(40, 44) < 0.5
    csr = sk.SparseLinear.from_dense(nn.Linear(44, 40), mask, format="csr")
    bsr = sk.SparseLinear.from_dense(nn.Linear(44, 40), mask, format="bsr", block=(8, 8))
    with pytest.raises(ValueError, match=r"the state holds a bsr weight of shape \(40, 44\), "
                                         r"this layer a csr weight of shape \(40, 44\); rebuild"):
        csr.load_state_dict(bsr.state_dict())


def test_load_into_a_conv_layer_of_another_stride_is_refused():
    mask = torch.rand(16, 8, 3, 3) < 0.4
    saved = sk.SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, stride=2, padding=1), mask,
                                       format="csr")
    other = sk.SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, stride=1, padding=1), mask,
                                       format="csr")
    before = other.values.detach().clone()
    with pytest.raises(ValueError, match=r"differs from this layer's in 'stride' "
                                         r"\(state \[2, 2\], layer \[1, 1\]\)"):
        other.load_state_dict(saved.state_dict())
    assert torch.equal(other.values, before)
    same = sk.SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, stride=2, padding=1), mask,
                                      format="csr")
    same.load_state_dict(saved.state_dict())
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(same(x), saved(x))


# ---- rebuilding a sparsified model from its state_dict alone -----------------------------------

class _Net(nn.Module):
    """A small CNN + MLP: a block-pruned conv (BSR), an unstructured conv (CSR), a grouped conv
    (stays MaskedConv2d), BatchNorm, a 2:4 linear (NM), an unstructured one (CSR), an unpruned
    classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 30)
        self.head = nn.Linear(30, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.grouped(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.head(F.relu(self.fc2(x)))


def _ticket() -> tuple[nn.Module, dict]:
    net = _Net()
    channel_blocks = torch.zeros(16, 3, dtype=torch.bool)  # conv1: one whole channel block
    channel_blocks[torch.randint(2, ()) * 8:][:8] = True
    masks = {
        "conv1.weight": channel_blocks[:, :, None, None].expand(16, 3, 3, 3).contiguous(),
        "conv2.weight": torch.rand(16, 16, 3, 3) < 0.3,
        "grouped.weight": torch.rand(16, 4, 3, 3) < 0.5,
        "fc1.weight": random_nm_mask(64, 256, 2, 4),
        "fc2.weight": unstructured_mask(30, 64, 0.8),
    }
    return net, masks


def _train(model, x, y, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_a_saved_ticket_rebuilds_from_its_state_dict_alone_and_trains_on():
    net, masks = _ticket()
    model = sk.sparsify(net, masks, policy="sparse")
    formats = {k[: -len(".weight")]: sk.decisions(model)[k[: -len(".weight")]]["format"]
               for k in masks}
    assert formats == {"conv1": "bsr", "conv2": "csr", "grouped": "dense", "fc1": "nm",
                       "fc2": "csr"}
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    _train(model, x, y)  # a trained ticket: BatchNorm statistics and momentum moved
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    rebuilt = sk.load_sparse(_Net(), state)  # a fresh dense skeleton, no masks
    kinds = {n: type(rebuilt.get_submodule(n)).__name__ for n in formats}
    assert kinds == {"conv1": "SparseConv2d", "conv2": "SparseConv2d", "grouped": "MaskedConv2d",
                     "fc1": "SparseLinear", "fc2": "SparseLinear"}
    assert type(rebuilt.head) is nn.Linear
    assert rebuilt.conv1.weight_format().block == model.conv1.weight_format().block
    assert rebuilt.fc1.nm == (2, 4) and rebuilt.conv2.stride == (2, 2)
    for name in formats:
        assert torch.equal(rebuilt.get_submodule(name).mask(), model.get_submodule(name).mask())
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(rebuilt, mode)()
        assert torch.equal(rebuilt(x), model(x)), mode  # train mode moved both BN stats alike
    # training continues identically, pruned weights stay zero
    _train(model, x, y)
    _train(rebuilt, x, y)
    model.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(x), model(x))
    for name, m in masks.items():
        dense = sk.densify(copy.deepcopy(rebuilt)).get_submodule(name[:-len(".weight")]).weight
        assert bool((dense[~m] == 0).all()), name


def test_load_sparse_strictness_and_bad_state():
    net, masks = _ticket()
    state = sk.sparsify(net, masks, policy="sparse").state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        sk.load_sparse(_Net(), state | {"extra": torch.zeros(1)})
    sk.load_sparse(_Net(), state | {"extra": torch.zeros(1)}, strict=False)
    with pytest.raises(ValueError, match=r"unexpected keys \['fc1.weight'\]"):
        sk.load_sparse(_Net(), state | {"fc1.weight": torch.zeros(64, 256)})
    partial = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['head.bias'\]"):
        sk.load_sparse(_Net(), partial)
    broken = dict(state)
    broken["fc2.row_idx"] = broken["fc2.row_idx"].flip(0)
    with pytest.raises(ValueError, match="load_sparse: layer 'fc2': SparseLinear.from_state_dict "
                                         "\\('fc2'\\): CSR: row_idx"):
        sk.load_sparse(_Net(), broken)
    no_bias = {k: v for k, v in state.items() if k != "fc2.bias"}  # a sparse layer's bias
    with pytest.raises(ValueError, match="layer 'fc2': .*has bias, the state lacks fc2.bias"):
        sk.load_sparse(_Net(), no_bias)
    wrong = _Net()
    wrong.conv2 = nn.Conv2d(16, 16, 3, stride=1, padding=1, bias=False)
    with pytest.raises(ValueError, match="load_sparse: layer 'conv2': .*'stride': \\[2, 2\\]"):
        sk.load_sparse(wrong, state)


def test_a_state_saved_without_metadata_still_loads():
    """State dicts saved before the layers recorded `_extra_state`: load_state_dict into a layer
    takes them; load_sparse rebuilds BSR/CSR from the skeleton's shapes (a ragged BSR weight
    included); an N:M one cannot say its N:M pattern and is refused with the reason."""
    mask = block_mask(20, 36, (8, 16), 0.3)
    layer = sk.SparseLinear.from_dense(nn.Linear(36, 20), mask, format="bsr", block=(8, 16))
    old = {k: v for k, v in layer.state_dict().items() if k != "_extra_state"}
    twin = sk.SparseLinear.from_dense(nn.Linear(36, 20), mask, format="bsr", block=(8, 16))
    twin.load_state_dict(old)
    x = torch.randn(3, 36)
    assert torch.equal(twin(x), layer(x))
    with pytest.raises(ValueError, match="no metadata .* pass layer="):
        sk.SparseLinear.from_state_dict(old)
    rebuilt = sk.load_sparse(nn.Sequential(nn.Linear(36, 20)),
                             {f"0.{k}": v for k, v in old.items()})
    assert rebuilt[0].weight_shape == (20, 36) and torch.equal(rebuilt[0](x), layer(x))
    nm = sk.SparseLinear.from_dense(nn.Linear(16, 8), random_nm_mask(8, 16, 2, 4), format="nm")
    old_nm = {f"0.{k}": v for k, v in nm.state_dict().items() if k != "_extra_state"}
    with pytest.raises(ValueError, match="N:M pattern is unknown"):
        sk.load_sparse(nn.Sequential(nn.Linear(16, 8)), old_nm)


def test_from_state_dict_of_a_conv_layer_alone():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding="valid", dilation=2)
    layer = sk.SparseConv2d.from_dense(conv, torch.rand(16, 8, 3, 3) < 0.3)
    again = sk.SparseConv2d.from_state_dict(layer.state_dict())
    assert (again.stride, again.padding, again.dilation) == ((2, 2), "valid", (2, 2))
    x = torch.randn(2, 8, 11, 11)
    assert torch.equal(again(x), layer(x))
    with pytest.raises(ValueError, match="must be the metadata of a 2-D SparseLinear weight"):
        sk.SparseLinear.from_state_dict(layer.state_dict())


def test_load_sparse_refuses_a_state_that_dropped_or_added_a_value_mask():
    """The metadata records whether the layer kept a value_mask: without this check a state
    whose value_mask was lost rebuilt a layer that trains the pruned weights inside its blocks."""
    mask = block_mask(16, 24, (8, 8), 0.5) & (torch.rand(16, 24) < 0.6)  # scattered in blocks
    net = sk.sparsify(nn.Sequential(nn.Linear(24, 16)), masks={"0.weight": mask}, format="bsr",
                      block=(8, 8), policy="sparse")
    state = net.state_dict()
    assert net[0].value_mask is not None and state["0._extra_state"]["value_mask"] is True
    dropped = {k: v for k, v in state.items() if k != "0.value_mask"}
    with pytest.raises(ValueError, match="saved with a value_mask .*lacks 0.value_mask"):
        sk.load_sparse(nn.Sequential(nn.Linear(24, 16)), dropped)
    aligned = sk.sparsify(nn.Sequential(nn.Linear(24, 16)),
                          masks={"0.weight": block_mask(16, 24, (8, 8), 0.5)}, format="bsr",
                          block=(8, 8), policy="sparse").state_dict()
    with pytest.raises(ValueError, match="saved without a value_mask .*holds 0.value_mask"):
        sk.load_sparse(nn.Sequential(nn.Linear(24, 16)),
                       aligned | {"0.value_mask": state["0.value_mask"]})
    rebuilt = sk.load_sparse(nn.Sequential(nn.Linear(24, 16)), state)
    assert torch.equal(rebuilt[0].value_mask, net[0].value_mask)
    # a state saved before the metadata recorded it still loads, both ways
    old_meta = {k: v for k, v in state["0._extra_state"].items() if k != "value_mask"}
    old = state | {"0._extra_state": old_meta}
    assert torch.equal(sk.load_sparse(nn.Sequential(nn.Linear(24, 16)), old)[0].value_mask,
                       net[0].value_mask)
    net.load_state_dict(old)


def test_a_non_dict_extra_state_is_refused_naming_it():
    state = sk.sparsify(nn.Sequential(nn.Linear(24, 16)),
                        masks={"0.weight": torch.rand(16, 24) > 0.5}, policy="sparse").state_dict()
    with pytest.raises(ValueError, match="0._extra_state must be the metadata dict a "
                                         "SparseLinear saves, got str 'garbage'"):
        sk.load_sparse(nn.Sequential(nn.Linear(24, 16)), state | {"0._extra_state": "garbage"})


@pytest.mark.parametrize("geometry, match", [({"padding": "bogus"}, "padding must be"),
                                             ({"stride": [0, 0]}, "stride and dilation must be"),
                                             ({"dilation": [1, -1]}, "stride and dilation")])
def test_a_conv_state_with_a_bad_geometry_is_refused_at_load(geometry, match):
    net = sk.sparsify(nn.Sequential(nn.Conv2d(4, 8, 3)),
                      masks={"0.weight": torch.rand(8, 4, 3, 3) > 0.5}, format="csr",
                      policy="sparse")
    state = net.state_dict()
    state["0._extra_state"] = state["0._extra_state"] | geometry
    with pytest.raises(ValueError, match=f"SparseConv2d.from_state_dict \\('0'\\): .*{match}"):
        sk.SparseConv2d.from_state_dict(state, "0.")

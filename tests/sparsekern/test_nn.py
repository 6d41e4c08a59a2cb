"""SparseLinear / MaskedLinear and model conversion (sparsify / densify / decisions)."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from _sk_helpers import TOL, assert_close, block_for, block_mask, rebuild, unstructured_mask

BLOCK = (8, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: one thread is as fast and immune to a busy neighbour on shared cores (two
    OpenMP threads on an oversubscribed 2-core box made each op ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mask_for(fmt, n, k, sparsity=0.6, block=BLOCK):
    """A mask the format stores exactly: whole blocks for bsr, anything for csr."""
    if fmt == "bsr":
        return block_mask(n, k, block, sparsity, empty_block_rows=(0,))
    return unstructured_mask(n, k, sparsity, empty_rows=(0,), empty_cols=(1,))


def _masked_reference(linear, mask):
    """The dense equivalent: an nn.Linear holding weight * mask."""
    dense = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None,
                      dtype=linear.weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(linear.weight * mask)
        if linear.bias is not None:
            dense.bias.copy_(linear.bias)
    return dense


# ---- SparseLinear --------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_sparse_linear_matches_masked_dense(fmt, with_bias, dtype):
    linear = nn.Linear(45, 37, bias=with_bias, dtype=dtype)  # ragged for (8, 8) blocks
    mask = _mask_for(fmt, 37, 45)
    layer = sk.SparseLinear.from_dense(linear, mask, format=fmt, block=block_for(fmt, BLOCK))
    dense = _masked_reference(linear, mask)
    assert layer.format == fmt and torch.equal(layer.mask(), mask)

    x = torch.randn(4, 6, 45, dtype=dtype)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(4, 6, 37, dtype=dtype)
    ys, yd = layer(xs), dense(xd)
    ys.backward(grad)
    yd.backward(grad)
    tol = TOL[dtype] * 10  # the dense side is float32 too when dtype is float32
    assert_close(ys, yd, tol, "forward")
    assert_close(xs.grad, xd.grad, tol, "grad x")
    assert_close(rebuild(layer.weight_format(), layer.values.grad).to_dense(),
                 dense.weight.grad * mask, tol, "grad values")
    if with_bias:
        assert_close(layer.bias.grad, dense.bias.grad, tol, "grad bias")


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_sparse_linear_parameters_are_kept_weights_only(fmt):
    """Only `values` (+ bias) are parameters, with one entry per kept weight, so gradients and
    optimizer state exist for kept weights only; index tensors are int32 buffers."""
    linear = nn.Linear(64, 48)  # block-aligned: BSR stores no padding
    mask = _mask_for(fmt, 48, 64)
    layer = sk.SparseLinear.from_dense(linear, mask, format=fmt, block=block_for(fmt, BLOCK))
    params = dict(layer.named_parameters())
    assert set(params) == {"values", "bias"}
    assert params["values"].numel() == int(mask.sum()) == layer.weight_format().nnz
    index_names = set(layer.weight_format().tensors()) - {"values"}
    buffers = dict(layer.named_buffers())
    assert set(buffers) == index_names
    assert all(b.dtype == torch.int32 and not b.requires_grad for b in buffers.values())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(3, 64)).sum().backward()
    opt.step()
    state_numel = sum(s["momentum_buffer"].numel() for s in opt.state.values())
    assert state_numel == int(mask.sum()) + 48


def test_sparse_linear_ragged_bsr_values_hold_whole_blocks():
    linear = nn.Linear(45, 37)
    mask = _mask_for("bsr", 37, 45)
    layer = sk.SparseLinear.from_dense(linear, mask, format="bsr", block=BLOCK)
    w = layer.weight_format()
    assert layer.values.numel() == w.values.shape[0] * BLOCK[0] * BLOCK[1] >= w.nnz
    assert torch.equal(layer.dense_weight(), linear.weight.detach() * mask)


def _dense_masked_training(model, masks, x, target, steps):
    """Plain dense training with fixed masks: weights start masked, gradients are masked before
    each step and the weights re-masked after it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, mask in zip(layers, masks):
            layer.weight.mul_(mask)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        for layer, mask in zip(layers, masks):
            layer.weight.grad.mul_(mask)
        opt.step()
        with torch.no_grad():
            for layer, mask in zip(layers, masks):
                layer.weight.mul_(mask)
        losses.append(loss.item())
    return losses


def _sparse_training(model, x, target, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_training_matches_dense_masked_training(fmt):
    """30 steps of SGD (momentum 0.9, weight decay 5e-4) of a two-layer model of SparseLinear
    layers (the second one exercises grad_input) equal dense masked training from the same
    initialisation; after densify the pruned weights are exactly zero."""
    dtype = torch.float64
    dense_model = nn.Sequential(nn.Linear(40, 48, dtype=dtype), nn.Tanh(),
                                nn.Linear(48, 24, dtype=dtype))
    masks = [_mask_for(fmt, 48, 40, 0.5), _mask_for(fmt, 24, 48, 0.7)]
    sparse_model = nn.Sequential(
        sk.SparseLinear.from_dense(dense_model[0], masks[0], format=fmt, block=block_for(fmt, BLOCK)), nn.Tanh(),
        sk.SparseLinear.from_dense(dense_model[2], masks[1], format=fmt, block=block_for(fmt, BLOCK)))
    assert all(torch.equal(sparse_model[i].mask(), m) for i, m in zip((0, 2), masks))
    x = torch.randn(64, 40, dtype=dtype)
    target = torch.randn(64, 24, dtype=dtype)

    sparse_losses = _sparse_training(sparse_model, x, target, 30)
    dense_losses = _dense_masked_training(dense_model, masks, x, target, 30)
    assert sparse_losses[-1] < sparse_losses[0]  # it trained
    assert max(abs(a - b) / abs(b) for a, b in zip(sparse_losses, dense_losses)) < 1e-4
    for i in (0, 2):
        assert_close(sparse_model[i].dense_weight(), dense_model[i].weight, 1e-4, f"weight {i}")
        assert_close(sparse_model[i].bias, dense_model[i].bias, 1e-4, f"bias {i}")

    densified = sk.densify(sparse_model)
    for i, mask in zip((0, 2), masks):
        assert type(densified[i]) is nn.Linear
        assert bool((densified[i].weight[~mask] == 0).all())
        assert_close(densified[i].weight, dense_model[i].weight, 1e-4, f"densified {i}")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_bsr_unaligned_mask_trains_only_the_mask(optimizer):
    """format="bsr" with a mask that is not made of whole blocks stores the block closure, but
    the mask that trains is the given one: the weights inside kept blocks and outside the mask
    stay exactly zero through training with momentum and weight decay (issue 8)."""
    linear = nn.Linear(40, 32, dtype=torch.float64)
    mask = unstructured_mask(32, 40, 0.9)
    layer = sk.SparseLinear.from_dense(linear, mask, format="bsr", block=BLOCK)
    assert layer.value_mask is not None and torch.equal(layer.mask(), mask)
    closure = sk.BlockSparse.from_dense(linear.weight, mask, block=BLOCK).mask()
    assert bool((closure & ~mask).any())  # there are such weights to keep at zero
    x, target = torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
    opt = (torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
           if optimizer == "sgd" else torch.optim.AdamW(layer.parameters(), lr=0.01,
                                                        weight_decay=0.1))
    for _ in range(10):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    weight = sk.densify(nn.Sequential(layer))[0].weight
    assert bool((weight[~mask] == 0).all())
    assert bool((weight[mask] != 0).all())
    assert_close(layer(x), F.linear(x, linear.weight * 0 + weight, layer.bias), 1e-12)
    # format="auto" (the default) never needs a value mask: CSR for a scattered mask
    assert sk.SparseLinear.from_dense(linear, mask).format == "csr"


@pytest.mark.parametrize("kind", ["bsr_value_mask", "csr", "masked_linear", "masked_conv"])
def test_an_inf_in_x_leaves_pruned_weights_exactly_zero(kind):
    """One inf in the input makes a pruned weight's gradient inf; a mask applied as a product
    (inf * 0 = NaN) would put NaN into the pruned weight for good. Kept weights may go
    non-finite (that is the divergence the trainer reports), pruned ones stay exact zeros."""
    if kind == "masked_conv":
        conv = nn.Conv2d(4, 6, 3, padding=1)
        mask = unstructured_mask(6, 36, 0.5).view(6, 4, 3, 3)
        layer, x = sk.MaskedConv2d(conv, mask), torch.randn(2, 4, 5, 5)
        x[0, 1, 2, 3] = float("inf")
    else:
        mask = unstructured_mask(16, 24, 0.5)
        linear = nn.Linear(24, 16)
        layer = (sk.MaskedLinear(linear, mask) if kind == "masked_linear" else
                 sk.SparseLinear.from_dense(linear, mask, format=kind.split("_")[0],
                                                   block=block_for(kind.split("_")[0], BLOCK)))
        x = torch.randn(4, 24)
        x[0, 3] = float("inf")
    if kind == "bsr_value_mask":
        assert layer.value_mask is not None
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    layer(x).sum().backward()
    opt.step()
    weight = layer.weight if kind.startswith("masked") else layer.dense_weight()
    assert bool((weight[~mask] == 0).all()), "a pruned weight is no longer an exact zero"


def test_float_masks_are_accepted():
    """A float 0/1 mask (torch.nn.utils.prune's weight_mask) is converted; other values are
    refused with the argument named."""
    linear = nn.Linear(16, 8)
    mask = unstructured_mask(8, 16, 0.5)
    layer = sk.SparseLinear.from_dense(linear, mask.float())
    assert torch.equal(layer.mask(), mask)
    with pytest.raises(ValueError, match="mask: a non-bool mask must hold only 0 and 1"):
        sk.SparseLinear.from_dense(linear, mask.float() * 0.5)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_sparse_linear_state_dict_round_trip(fmt, tmp_path):
    linear = nn.Linear(45, 37)
    mask = _mask_for(fmt, 37, 45)
    layer = sk.SparseLinear.from_dense(linear, mask, format=fmt, block=block_for(fmt, BLOCK))
    with torch.no_grad():
        layer.values.add_(torch.randn_like(layer.values))  # differs from a fresh packing
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    fresh = sk.SparseLinear.from_dense(nn.Linear(45, 37), mask, format=fmt, block=block_for(fmt, BLOCK))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(5, 45)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dense_weight(), layer.dense_weight())


def test_sparse_linear_to_float64_keeps_index():
    layer = sk.SparseLinear.from_dense(nn.Linear(45, 37), _mask_for("csr", 37, 45),
                                       format="csr").double()
    assert layer.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert all(b.dtype == torch.int32 for b in layer.buffers())
    x = torch.randn(3, 45, dtype=torch.float64)
    assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias), 1e-12)


@pytest.mark.parametrize("block", [8, 16, 32])
def test_from_dense_auto_format(block):
    """format="auto": BSR with the largest block shape a block-aligned mask is made of (square
    or not: a random pattern may also be whole blocks of a larger shape), CSR for anything
    else; the packed mask is exactly the given one."""
    linear = nn.Linear(64, 64)
    mask = block_mask(64, 64, (block, block), 0.5)
    layer = sk.SparseLinear.from_dense(linear, mask, format="auto")
    bn, bk = layer.weight_format().block
    assert layer.format == "bsr" and bn * bk >= block * block
    assert torch.equal(layer.mask(), mask)
    rect = torch.zeros(64, 64, dtype=torch.bool)
    rect[16:32, 8:16] = True  # one 16x8 block: (16, 8) is the only fitting shape >= 8x8 x2
    assert sk.SparseLinear.from_dense(linear, rect, format="auto").weight_format().block == (16, 8)
    scattered = unstructured_mask(64, 64, 0.5)
    assert sk.SparseLinear.from_dense(linear, scattered, format="auto").format == "csr"


def test_masked_linear():
    linear = nn.Linear(20, 10)
    mask = unstructured_mask(10, 20, 0.5)
    layer = sk.MaskedLinear(linear, mask)
    x = torch.randn(4, 20)
    assert_close(layer(x), F.linear(x, linear.weight * mask, linear.bias), 1e-6)
    layer(x).sum().backward()
    assert bool((layer.weight.grad[~mask] == 0).all())
    assert bool((layer.weight.grad[mask] != 0).any())
    assert torch.equal(layer.mask(), mask)


# ---- sparsify / densify / decisions --------------------------------------------------------

def _model(dtype=torch.float32):
    torch_dtype = dict(dtype=dtype)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(32, 48, **torch_dtype), act=nn.ReLU(),
        block=nn.Sequential(OrderedDict(fc2=nn.Linear(48, 40, **torch_dtype))),
        fc3=nn.Linear(40, 8, **torch_dtype)))


def _masks():
    return {"fc1.weight": block_mask(48, 32, (16, 16), 0.5, empty_block_rows=(1,)),
            "block.fc2.weight": unstructured_mask(40, 48, 0.8)}


def _dense_masked_copy(model, masks):
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            ref.get_parameter(name).mul_(mask)
    return ref


@pytest.mark.parametrize("policy", ["sparse", "dense", "auto"])
def test_sparsify(policy):
    model = _model()
    masks = _masks()
    ref = _dense_masked_copy(model, masks)
    fc3 = model.fc3
    kwargs = dict(batch_size=16, repeats=3) if policy == "auto" else {}
    out = sk.sparsify(model, masks=masks, format="auto", policy=policy, **kwargs)
    assert out is model
    assert model.fc3 is fc3  # not named in masks: untouched
    decisions = sk.decisions(model)
    assert set(decisions) == {"fc1", "block.fc2"}
    for name, layer in (("fc1", model.fc1), ("block.fc2", model.block.fc2)):
        d = decisions[name]
        assert d["chosen"] in ("sparse", "dense")
        if policy != "auto":
            assert d["chosen"] == policy
        else:
            assert math.isfinite(d["dense_ms"]) and d["dense_ms"] > 0
            assert math.isfinite(d["sparse_ms"]) and d["sparse_ms"] > 0
            assert (d["chosen"] == "sparse") == (d["sparse_ms"] < d["dense_ms"])
        expected_type = sk.SparseLinear if d["chosen"] == "sparse" else sk.MaskedLinear
        assert type(layer) is expected_type
        assert torch.equal(layer.mask(), masks[f"{name}.weight"])
        assert d["sparsity"] == pytest.approx(1 - masks[f"{name}.weight"].float().mean().item())
    assert decisions["fc1"]["format"] == "bsr"  # whole 16x16 blocks
    assert decisions["block.fc2"]["format"] == "csr"
    x = torch.randn(7, 32)
    assert_close(model(x), ref(x), 1e-5, "sparsified model")

    sk.densify(model)
    assert type(model.fc1) is nn.Linear and type(model.block.fc2) is nn.Linear
    assert sk.decisions(model) == {}
    for name, mask in masks.items():
        assert bool((model.get_parameter(name)[~mask] == 0).all())
    assert_close(model(x), ref(x), 1e-5, "densified model")


def test_sparsify_without_masks_prunes_zeros():
    model = _model()
    with torch.no_grad():
        model.fc1.weight[model.fc1.weight.abs() < 0.1] = 0
    fc2, fc3 = model.block.fc2, model.fc3
    sk.sparsify(model, policy="sparse", format="csr")
    assert type(model.fc1) is sk.SparseLinear
    assert torch.equal(model.fc1.mask(), model.fc1.dense_weight() != 0)
    assert model.block.fc2 is fc2 and model.fc3 is fc3  # no zeros: left dense


def test_densify_restores_identical_outputs():
    model = _model(torch.float64)
    masks = _masks()
    sk.sparsify(model, masks=masks, policy="sparse")
    x = torch.randn(5, 32, dtype=torch.float64)
    before = model(x)
    sk.densify(model)
    assert all(type(m) is not sk.SparseLinear for m in model.modules())
    assert_close(model(x), before, 1e-12)


def test_sparsify_rejects_unknown_layer():
    model = _model()
    with pytest.raises(ValueError, match=r"no nn.Linear / nn.Conv2d weight named \['fc9.weight'\]"):
        sk.sparsify(model, masks={"fc9.weight": torch.ones(3, 3, dtype=torch.bool)},
                    policy="sparse")
    assert type(model.fc1) is nn.Linear  # nothing converted


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy="fastest"), "policy must be one of"),
    (dict(format="coo"), "format must be one of"),
])
def test_sparsify_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.sparsify(_model(), masks=_masks(), **kwargs)


def test_sparsify_rejects_masks_that_are_not_a_dict():
    with pytest.raises(TypeError, match=r"masks must be a dict \{'<layer>.weight': bool mask\} "
                                        r"\(or None\), got list"):
        sk.sparsify(_model(), list(_masks().values()))


def test_sparsify_root_linear_is_refused():
    linear = nn.Linear(8, 8)
    with torch.no_grad():
        linear.weight.mul_(torch.eye(8))  # zeros: pruned when masks=None
    with pytest.raises(ValueError, match="wrap it in a container"):
        sk.sparsify(linear, policy="sparse")


def test_sparsify_example_input_times_what_each_layer_receives():
    """With example_input the auto policy times each layer on its real input: its batch size,
    and no dX where the input needs no gradient (the first layer's data); modes are kept."""
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 8)).train()
    masks = {f"{i}.weight": unstructured_mask(*model[i].weight.shape, 0.8) for i in (0, 3)}
    sk.sparsify(model, masks, policy="auto", example_input=torch.randn(12, 40), repeats=2)
    found = sk.decisions(model)
    assert found["0"]["timed_input"] == [12, 40] and found["0"]["timed_grad_input"] is False
    assert found["3"]["timed_input"] == [12, 64] and found["3"]["timed_grad_input"] is True
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="example_input never reached"):
        detour = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
        detour.forward = lambda x: detour["used"](x)
        sk.sparsify(detour, {"unused.weight": unstructured_mask(4, 4, 0.5)},
                    example_input=torch.randn(2, 4))


def test_sparsify_auto_leaves_no_gradient_from_its_timing_steps():
    """The layers come back with the gradients they had (none): the timed backward passes must
    not add to the user's first step."""
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 8))
    masks = {f"{i}.weight": unstructured_mask(*model[i].weight.shape, 0.8) for i in (0, 2)}
    sk.sparsify(model, masks, policy="auto", example_input=torch.randn(12, 40), repeats=2)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


@pytest.mark.parametrize("policy", ["sparse", "dense"])
def test_sparsify_keeps_frozen_layers_frozen(policy):
    model = _model()
    model.fc1.requires_grad_(False)
    model.block.fc2.bias.requires_grad_(False)
    sk.sparsify(model, masks=_masks(), policy=policy)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    weight = "values" if policy == "sparse" else "weight"
    assert trainable[f"fc1.{weight}"] is False and trainable["fc1.bias"] is False
    assert trainable[f"block.fc2.{weight}"] is True and trainable["block.fc2.bias"] is False
    assert trainable["fc3.weight"] is True


@pytest.mark.parametrize("make", [lambda m: sk.MaskedLinear(nn.Linear(8, 4), m),
                                  lambda m: sk.MaskedConv2d(nn.Conv2d(2, 4, 3), m)])
def test_masked_layers_refuse_a_mask_not_shaped_like_the_weight(make):
    for bad in (torch.ones(8, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool), None):
        with pytest.raises(ValueError, match="mask must be a tensor shaped like the weight"):
            make(bad)


def test_sparsify_without_masks_names_the_subclassed_layers_it_leaves():
    class Scaled(nn.Linear):
        pass

    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 8), sub=Scaled(8, 8)))
    with torch.no_grad():
        model.fc.weight[0] = 0
        model.sub.weight[0] = 0
    with pytest.warns(UserWarning, match=r"subclasses of nn.Linear / nn.Conv2d: sub \(Scaled\)"):
        sk.sparsify(model, policy="sparse", format="csr")
    assert type(model.fc) is sk.SparseLinear and type(model.sub) is Scaled

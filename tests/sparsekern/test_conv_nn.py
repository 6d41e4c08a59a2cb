"""SparseConv2d / MaskedConv2d and model conversion of CNNs (sparsify / densify / report)
against the masked-dense model: same logits, same gradients, pruned weights exactly zero
through training, optimizer state only for kept weights, errors that name the argument."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from _sk_helpers import assert_close, block_for, unstructured_mask
from lth import pruning
from lth.hparams import ModelHparams
from lth.models import build_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast and immune to a busy neighbour on shared cores (two
    OpenMP threads on an oversubscribed 2-core box made each op ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _channel_block_mask(c_out, c_in, kh, kw, block, sparsity, generator=None):
    bn, bk = block
    present = torch.rand(-(-c_out // bn), -(-c_in // bk), generator=generator) >= sparsity
    present.view(-1)[0] = True
    chan = present.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:c_out, :c_in]
    return chan[:, :, None, None].expand(c_out, c_in, kh, kw).contiguous()


def _conv_mask(fmt, shape, sparsity=0.6, block=(8, 8)):
    """A mask the format stores exactly: whole channel blocks for bsr, anything for csr."""
    if fmt == "bsr":
        return _channel_block_mask(*shape, block, sparsity)
    return unstructured_mask(shape[0], shape[1] * shape[2] * shape[3], sparsity).view(shape)


def _masked_conv(conv, mask):
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.mul_(mask)
    return ref


# ---- SparseConv2d --------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=1, stride=2, padding=0), dict(kernel_size=(3, 5), padding="same",
                                                   dilation=2),
    dict(kernel_size=5, padding=(2, 1), bias=False)], ids=str)
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_sparse_conv_matches_masked_dense(fmt, geometry):
    conv = nn.Conv2d(20, 24, dtype=torch.float64, **geometry)  # 20, 24: ragged for 8x8 blocks
    mask = _conv_mask(fmt, conv.weight.shape)
    layer = sk.SparseConv2d.from_dense(conv, mask, format=fmt, block=block_for(fmt))
    ref = _masked_conv(conv, mask)
    assert layer.format == fmt and torch.equal(layer.mask(), mask)
    assert (layer.stride, layer.padding, layer.dilation) == (conv.stride, conv.padding,
                                                             conv.dilation)
    x = torch.randn(3, 20, 9, 11, dtype=torch.float64)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):  # NCHW and NHWC inputs
        xs, xd = inp.clone().requires_grad_(), inp.clone().requires_grad_()
        ys, yd = layer(xs), ref(xd)
        grad = torch.randn_like(yd)
        ys.backward(grad)
        yd.backward(grad)
        assert_close(ys, yd, 1e-10, "forward")
        assert_close(xs.grad, xd.grad, 1e-10, "grad x")
        dense_grad = layer._format(layer.values.grad).to_dense()
        assert_close(dense_grad, ref.weight.grad * mask, 1e-10, "grad values")
        if conv.bias is not None:
            assert_close(layer.bias.grad, ref.bias.grad, 1e-10, "grad bias")
        layer.zero_grad()
        ref.zero_grad()
    assert_close(layer(x[0]), ref(x[0]), 1e-10, "unbatched")


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_sparse_conv_parameters_are_kept_weights_only(fmt):
    conv = nn.Conv2d(16, 32, 3, padding=1)
    mask = _conv_mask(fmt, conv.weight.shape)
    layer = sk.SparseConv2d.from_dense(conv, mask, format=fmt, block=block_for(fmt))
    params = dict(layer.named_parameters())
    assert set(params) == {"values", "bias"}
    assert params["values"].numel() == int(mask.sum())
    assert all(b.dtype == torch.int32 and not b.requires_grad for b in layer.buffers())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(2, 16, 6, 6)).sum().backward()
    opt.step()
    assert sum(s["momentum_buffer"].numel() for s in opt.state.values()) == int(mask.sum()) + 32
    assert "format=" + fmt in repr(layer) and "sparsity=" in repr(layer)


def test_auto_format_picks_the_largest_channel_block():
    conv = nn.Conv2d(64, 64, 3)
    mask = _channel_block_mask(64, 64, 3, 3, (16, 32), 0.5)
    layer = sk.SparseConv2d.from_dense(conv, mask)  # format="auto"
    assert layer.format == "bsr" and torch.equal(layer.mask(), mask)
    bn, bk = layer.weight_format().block
    assert bn * bk >= 16 * 32 and bn % 16 == 0 and bk % 32 == 0
    partial = mask.clone()
    partial[0, 0, 1, 1] = False  # one tap of a kept channel pair: not a channel block
    assert sk.SparseConv2d.from_dense(conv, partial).format == "csr"
    assert sk.SparseConv2d.from_dense(conv, mask, block=(8, 8)).weight_format().block == (8, 8)


def test_bsr_with_a_scattered_mask_trains_only_the_mask():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    mask = unstructured_mask(16, 16 * 9, 0.8).view(16, 16, 3, 3)
    layer = sk.SparseConv2d.from_dense(conv, mask, format="bsr", block=(8, 8))
    assert layer.value_mask is not None and torch.equal(layer.mask(), mask)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(4, 16, 6, 6)).square().mean().backward()
        opt.step()
    weight = layer.to_conv().weight
    assert bool((weight[~mask] == 0).all()) and bool((weight[mask] != 0).all())


def test_masked_conv2d_any_groups():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    mask = torch.rand(conv.weight.shape) > 0.5
    layer = sk.MaskedConv2d(conv, mask)
    x = torch.randn(2, 8, 5, 5)
    assert_close(layer(x), F.conv2d(x, conv.weight * mask, conv.bias, padding=1, groups=4), 1e-6)
    layer(x).sum().backward()
    assert bool((layer.weight.grad[~mask] == 0).all())
    back = layer.to_conv()
    assert type(back) is nn.Conv2d and back.groups == 4
    assert torch.equal(back.weight, conv.weight.detach() * mask)


# ---- whole models --------------------------------------------------------------------------

def _resnet20_ticket(granularity, sparsity, seed=0):
    model = build_model(ModelHparams(name="resnet20"), (3, 8, 8), 10, seed=seed)
    names = pruning.prunable_names(model, ("first_conv",), granularity)
    params = dict(model.named_parameters())
    masks = pruning.prune_to(pruning.magnitude_scores({n: params[n] for n in names}),
                             pruning.full_masks(model, names), sparsity, granularity, (8, 8),
                             scope="layerwise")
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    return model, masks


@pytest.mark.parametrize("granularity,fmt", [("block", "bsr"), ("unstructured", "csr")])
def test_sparsified_resnet20_gives_the_masked_dense_logits_and_gradients(granularity, fmt):
    """Logits in float32; logits and every gradient in float64 as well. Float32 gradients are not
    compared: the sparse model computes in channels_last, the dense one in NCHW, and where a
    ReLU's input rounds to the other side of zero in one of them a gradient element flips (for
    some inputs a relative error of up to 7e-3, which torch's own dense model shows as well when
    run in channels_last)."""
    dense, masks = _resnet20_ticket(granularity, 0.8)
    model = sk.sparsify(copy.deepcopy(dense), masks, policy="sparse")
    found = sk.decisions(model)
    assert {d["format"] for d in found.values() if d["kind"] == "conv"} == {fmt}
    assert all(d["chosen"] == "sparse" for d in found.values())
    assert sum(isinstance(m, sk.SparseConv2d) for m in model.modules()) == 20  # + classifier
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    # On copies: a forward in train mode moves the batch-norm running statistics.
    assert_close(copy.deepcopy(model)(x), copy.deepcopy(dense)(x), 1e-4, "float32 logits")
    dense, model, x = dense.double(), model.double(), x.double()
    for net in (dense, model):
        F.cross_entropy(net(x), y).backward()
    assert_close(model(x), dense(x), 1e-10, "logits")
    sparse_grads = {}
    for name, module in model.named_modules():
        if isinstance(module, (sk.SparseConv2d, sk.SparseLinear)):
            sparse_grads[f"{name}.weight"] = module._format(module.values.grad).to_dense()
    params = dict(model.named_parameters())
    for name, p in dense.named_parameters():
        if name in masks:
            assert_close(sparse_grads[name], p.grad * masks[name], 1e-10, name)
        else:  # batch norm, first conv, classifier
            assert_close(params[name].grad, p.grad, 1e-10, name)
    dense.eval(), model.eval()
    assert_close(model(x), dense(x), 1e-10, "eval logits")


def test_densify_of_sparsify_is_exact():
    dense, masks = _resnet20_ticket("unstructured", 0.9)
    del masks["blocks.0.conv1.weight"]  # one pruned conv stays as it is
    model = sk.sparsify(copy.deepcopy(dense), masks, policy="sparse")
    restored = sk.densify(model)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in restored.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert not any(isinstance(m, sk.SparseConv2d) for m in restored.modules())
    a, b = dense.state_dict(), restored.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, zeros where pruned
    conv = restored.blocks[3].conv1
    assert (conv.stride, conv.padding, conv.bias) == ((2, 2), (1, 1), None)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_pruned_weights_stay_zero_through_sgd_with_momentum_and_weight_decay(fmt):
    """30 steps of SGD (momentum, weight decay) of a sparsified CNN equal masked-dense training
    (gradients masked, weights re-masked) and leave every pruned weight exactly zero; the
    optimizer holds state for kept weights only."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(24, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 5)).double()
    masks = {f"{i}.weight": _conv_mask(fmt, dense[i].weight.shape, 0.7) for i in (0, 3, 5)}
    with torch.no_grad():
        for n, m in masks.items():
            dense.get_parameter(n).mul_(m)
    model = sk.sparsify(copy.deepcopy(dense), masks, format=fmt, policy="sparse",
                        block=block_for(fmt))
    x, y = torch.randn(3, 8, 5, 5, dtype=torch.float64), torch.randint(0, 5, (3,))
    opt_s = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    for _ in range(30):
        for net, opt in ((model, opt_s), (dense, opt_d)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if net is dense:
                for n, m in masks.items():
                    dense.get_parameter(n).grad.mul_(m)
            opt.step()
    for i in (0, 3, 5):
        w = model[i].dense_weight()
        mask = masks[f"{i}.weight"]
        assert bool((w[~mask] == 0).all()) and bool((w[mask] != 0).all())
        assert_close(w, dense[i].weight, 1e-8, f"weight {i}")
    state = sum(s["momentum_buffer"].numel() for s in opt_s.state.values())
    kept = sum(int(m.sum()) for m in masks.values())
    others = sum(p.numel() for n, p in dense.named_parameters() if n not in masks)
    assert state == kept + others


def test_grouped_convs_stay_dense_with_the_reason():
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"))
    masks = {f"{i}.weight": torch.rand(model[i].weight.shape) > 0.5 for i in range(3)}
    x = torch.randn(2, 8, 6, 6)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in masks.items():
            ref.get_parameter(n).mul_(m)
    for policy in ("sparse", "auto"):
        net = sk.sparsify(copy.deepcopy(model), masks, policy=policy, example_input=x,
                          repeats=1)
        found = sk.decisions(net)
        assert isinstance(net[1], sk.MaskedConv2d) and isinstance(net[2], sk.MaskedConv2d)
        assert found["1"]["chosen"] == "dense" and "groups=16" in found["1"]["reason"]
        assert "padding_mode='reflect'" in found["2"]["reason"]
        assert found["0"]["kind"] == "conv" and found["0"]["format"] == "csr"
        assert_close(net(x), ref(x), 1e-5, policy)
        table = sk.report(net)
        assert len(table.splitlines()) == 2 + 3 and "groups=16" in table
    assert "dense_ms" in found["0"] and found["0"]["timed_input"] == [2, 8, 6, 6]
    assert found["0"]["timed_grad_input"] is False  # data: no dX timed


def test_sparsify_converts_an_already_converted_layer_with_the_new_mask():
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    half = torch.rand(8, 8, 3, 3) > 0.5
    sk.sparsify(model, {"0.weight": half}, policy="dense")
    assert isinstance(model[0], sk.MaskedConv2d)
    quarter = half & (torch.rand(8, 8, 3, 3) > 0.5)
    sk.sparsify(model, {"0.weight": quarter}, policy="sparse")
    assert isinstance(model[0], sk.SparseConv2d) and torch.equal(model[0].mask(), quarter)


def test_fold_batchnorm_keeps_the_eval_logits():
    dense, masks = _resnet20_ticket("block", 0.75)
    for m in dense.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    model = sk.sparsify(copy.deepcopy(dense), masks, policy="sparse")
    with pytest.raises(ValueError, match="training mode"):
        sk.fold_batchnorm(model)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        sk.fold_batchnorm(model)
        assert_close(model(x), before, 1e-5, "folded logits")
    assert len(model.sparsekern_folded) == 21  # every BatchNorm follows a conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    conv = model.blocks[4].conv1
    assert isinstance(conv, sk.SparseConv2d) and conv.bias is not None
    assert torch.equal(conv.mask(), masks["blocks.4.conv1.weight"])  # same mask and format
    assert sk.decisions(model)["blocks.4.conv1"]["folded_batchnorm"] is True
    branch = _Branch().eval()  # a conv whose output also goes elsewhere keeps its BatchNorm
    sk.fold_batchnorm(branch)
    assert branch.sparsekern_folded == [] and isinstance(branch.bn, nn.BatchNorm2d)


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


# ---- errors --------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="groups=2: the sparse conv kernels need groups=1"):
        sk.SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        sk.SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding_mode="circular"))
    with pytest.raises(TypeError, match="conv must be nn.Conv2d, got Linear"):
        sk.SparseConv2d.from_dense(nn.Linear(4, 4))
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"mask shape \(6, 4\) does not match weight shape"):
        sk.SparseConv2d.from_dense(conv, torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D conv weight"):
        sk.SparseConv2d(sk.CSR.from_dense(torch.randn(6, 4)))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        sk.SparseConv2d(sk.CSR.from_dense(conv.weight), torch.randn(4))
    layer = sk.SparseConv2d.from_dense(conv)
    with pytest.raises(ValueError, match=r"x must be \[N, 4, H, W\]"):
        layer(torch.randn(2, 5, 8, 8))  # channel mismatch
    model = nn.Sequential(conv)
    with pytest.raises(ValueError, match=r"masks\['0.weight'\]: shape \(6, 4, 3\) does not match"):
        sk.sparsify(model, {"0.weight": torch.ones(6, 4, 3, dtype=torch.bool)}, policy="sparse")
    with pytest.raises(ValueError, match="needs example_input"):
        sk.sparsify(model, {"0.weight": torch.rand(6, 4, 3, 3) > 0.5})  # policy="auto"

    class MyConv(nn.Conv2d):
        pass
    with pytest.raises(ValueError, match="layer '0' is a MyConv"):
        sk.sparsify(nn.Sequential(MyConv(4, 4, 3)), {"0.weight": torch.ones(4, 4, 3, 3) > 0})
    assert type(model[0]) is nn.Conv2d  # nothing converted by the failed calls


def test_auto_policy_keeps_a_layer_dense_when_its_kernel_is_missing(monkeypatch):
    """A format without a kernel on the device (its op raises NotImplementedError):
    policy="auto" keeps that layer masked-dense and records why, instead of failing."""
    import sparsekern.nn as sknn

    def missing(*args, **kwargs):
        raise NotImplementedError("sparsekern.csr_conv2d: there is no GPU kernel for CSR conv")
    monkeypatch.setattr(sknn, "sparse_conv2d", missing)
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(2, 8, 5, 5)
    model(x)
    masks = {"0.weight": torch.rand(8, 8, 3, 3) > 0.5, "3.weight": torch.rand(4, 72) > 0.5}
    sk.sparsify(model, masks, example_input=x, repeats=1)
    found = sk.decisions(model)
    assert isinstance(model[0], sk.MaskedConv2d) and "no GPU kernel" in found["0"]["reason"]
    assert "dense_ms" in found["3"]  # the linear layer was timed as usual


def test_auto_policy_times_convs_after_a_sparse_conv_on_channels_last_input():
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3,
                                                                               padding=1))
    x = torch.randn(2, 8, 6, 6)
    masks = {"2.weight": torch.rand(32, 32, 3, 3) > 0.9, "0.weight": torch.rand(32, 8, 3, 3) > 0.5}
    sk.sparsify(model, masks, example_input=x, repeats=1)
    found = sk.decisions(model)
    assert found["0"]["timed_layout"] == "contiguous"  # the data, as given
    expected = "channels_last" if found["0"]["chosen"] == "sparse" else "contiguous"
    assert found["2"]["timed_layout"] == expected
    model2 = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    sk.sparsify(model2, {"0.weight": masks["0.weight"]}, policy="sparse")
    sk.sparsify(model2, {"1.weight": masks["2.weight"]}, example_input=x, repeats=1)
    assert sk.decisions(model2)["1"]["timed_layout"] == "channels_last"


def test_sparsified_cnn_compiles_fullgraph():
    """torch.compile(fullgraph=True) of a model of SparseConv2d layers (BSR with a value mask,
    CSR) and BatchNorm gives the eager logits and gradients."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Flatten(),
                          nn.LazyLinear(4))
    x = torch.randn(3, 8, 6, 6)
    model(x)
    sk.sparsify(model, {"0.weight": torch.rand(16, 8, 3, 3) > 0.7}, format="bsr", block=(8, 8),
                policy="sparse")
    sk.sparsify(model, {"3.weight": torch.rand(16, 16, 3, 3) > 0.7}, policy="sparse")
    assert model[0].value_mask is not None and model[3].format == "csr"
    eager = model(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    assert_close(out, eager, 1e-5, "compiled logits")
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n], 1e-5, f"compiled grad {n}")

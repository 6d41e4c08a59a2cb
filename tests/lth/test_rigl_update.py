"""RigL / SET mask updates and re-packing a model that trains on sparse kernels: each layer's
sparsity is exactly constant, RigL drops the smallest |w| and grows the largest |grad|, grown
weights and their optimizer state (SGD momentum, Adam moments) start at zero, kept ones carry
over, dropped weights are exactly zero, and the model keeps running the sparse kernels."""
import math

import pytest
import torch
from torch import nn

import sparsekern as sk
from lth import pruning
from lth.pruning import dst
from lth.pruning.erk import random_masks
from lth.sparse import dense_state_dict, dense_weights_and_gradients, repack, sparsify_model


def test_drop_fraction_decays_with_a_cosine_to_zero_at_the_end():
    assert dst.drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert dst.drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert dst.drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert dst.drop_fraction(100, 0.3, 100) == 0.0
    assert dst.drop_fraction(40, 0.3, 100, "constant") == 0.3
    assert [s for s in range(1, 400) if dst.is_update_step(s, 100, 301)] == [100, 200, 300]


def test_rigl_drops_smallest_magnitude_and_grows_largest_gradient():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    weight = torch.tensor([0.1, -2.0, 3.0, -0.2, 0.0, 0.0, 0.0, 0.0])
    grad = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.5, -4.0, 1.0, 0.1])
    new, grown = dst.update_mask(mask, weight, grad.abs(), 0.5)
    # drop 0.1 and -0.2; grow among the 6 now inactive: |9.0| (just dropped) and |-4.0|
    assert new.tolist() == [True, True, True, False, False, True, False, False]
    assert grown.tolist() == [True, False, False, False, False, True, False, False]


@pytest.mark.parametrize("shape,block", [((40, 24), (8, 8)), ((19, 13, 3, 3), (8, 8))])
def test_block_rigl_keeps_whole_blocks_and_exact_weight_counts_on_ragged_layers(shape, block):
    gen = torch.Generator().manual_seed(0)
    mask = pruning.block_expand(torch.rand(pruning._grid(pruning._block_shape(shape), block),
                                           generator=gen) < 0.4, shape, block)
    for seed in range(5):
        weight = torch.randn(shape, generator=gen) * mask
        new, grown = dst.update_mask(mask, weight, torch.randn(shape, generator=gen).abs(),
                                     0.5, "block", block)
        assert pruning.is_block_aligned(new, block) and pruning.is_block_aligned(grown, block)
        assert int(new.sum()) == int(mask.sum())
        assert int(pruning.block_pattern(new, block).sum()) == \
            int(pruning.block_pattern(mask, block).sum())
        assert not bool((grown & ~new).any())
        mask = new


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.fc1 = nn.Linear(24 * 4 * 4, 48)
        self.fc2 = nn.Linear(48, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x)))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 4, 4, generator=gen), torch.randint(0, 5, (16,), generator=gen)


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(params, lr=0.01, weight_decay=1e-4)


def _state_tensors(kind):
    return ["momentum_buffer"] if kind == "sgd" else ["exp_avg", "exp_avg_sq"]


def _dense_state(module, value):
    """A per-weight optimizer state of a converted layer, as a dense tensor."""
    if isinstance(module, (sk.SparseLinear, sk.SparseConv2d)):
        return module._format(value).to_dense()
    return value.clone()


def _snapshot(model, opt, names, kind):
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        m = modules[n[: -len(".weight")]]
        p = m.values if hasattr(m, "values") else m.weight
        out[n] = {k: _dense_state(m, opt.state[p][k]) for k in _state_tensors(kind)}
    return out


def _train(model, opt, steps, seed=0):
    loss_fn = nn.CrossEntropyLoss()
    for s in range(steps):
        x, y = _batch(seed + s)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def _setup(granularity, policy, kind):
    torch.manual_seed(0)
    model = Net()
    names = ["conv2.weight", "fc1.weight"]
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    block = (8, 8)
    densities = {n: 0.5 for n in names}
    masks = random_masks(shapes, densities, granularity, block, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n in names:
            params[n].mul_(masks[n])
    fmt = "bsr" if granularity == "block" else "csr"
    sparsify_model(model, masks, format=fmt, policy=policy, block=block if fmt == "bsr" else None)
    opt = _optimizer(kind, model.parameters())
    return model, opt, masks, names, block


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("granularity,policy", [("unstructured", "sparse"),
                                                ("block", "sparse"),
                                                ("unstructured", "dense")])
def test_updates_keep_sparsity_reset_grown_and_carry_kept(kind, granularity, policy):
    model, opt, masks, names, block = _setup(granularity, policy, kind)
    fmt = "bsr" if granularity == "block" else "csr"
    _train(model, opt, 3)
    counts = {n: int(m.sum()) for n, m in masks.items()}
    loss_fn = nn.CrossEntropyLoss()
    for update in range(3):
        before = dense_state_dict(model)
        states = _snapshot(model, opt, names, kind)
        weights, grads = dense_weights_and_gradients(model, _batch(100 + update), loss_fn, names)
        assert all(torch.equal(weights[n], before[n]) for n in names)
        assert all(bool((grads[n][~masks[n]] != 0).any()) for n in names)  # really dense
        new, grown = dst.update_masks(masks, weights, {n: g.abs() for n, g in grads.items()},
                                      0.3, granularity, block)
        changed = repack(model, opt, new, grown, fmt, block if fmt == "bsr" else None)
        assert sorted(changed) == names
        after = dense_state_dict(model)
        after_states = _snapshot(model, opt, names, kind)
        modules = dict(model.named_modules())
        for n in names:
            module = modules[n[: -len(".weight")]]
            assert torch.equal(module.mask(), new[n])
            if policy == "sparse":  # rebuilt as sparsify builds it: a resume gets this layout
                assert module.format == fmt and module.value_mask is None
            assert int(new[n].sum()) == counts[n]  # exactly constant per layer
            assert bool(grown[n].any())
            kept = new[n] & ~grown[n]
            dropped = masks[n] & ~new[n]
            assert bool(dropped.any()) or bool((grown[n] & masks[n]).any())  # moved/regrown
            assert torch.equal(after[n][grown[n]], torch.zeros(int(grown[n].sum())))
            assert torch.equal(after[n][kept], before[n][kept])
            assert torch.equal(after[n][~new[n]], torch.zeros(int((~new[n]).sum())))
            for k in _state_tensors(kind):
                assert not bool(after_states[n][k][grown[n]].any())
                assert torch.equal(after_states[n][k][kept], states[n][k][kept])
                assert not bool(after_states[n][k][~new[n]].any())
        masks = new
        _train(model, opt, 2, seed=10 * (update + 1))
        state = dense_state_dict(model)
        for n in names:  # training after the update never moves a weight outside the mask
            assert not bool(state[n][~masks[n]].any())
    # the optimizer trains exactly the model's parameters (no stale `values`)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters()}
    assert set(opt.state) <= set(model.parameters())


def _two_of_four(rows, cols, seed):
    scores = torch.rand(rows, cols // 4, 4, generator=torch.Generator().manual_seed(seed))
    return (scores.argsort(-1).argsort(-1) < 2).view(rows, cols)


@pytest.mark.parametrize("fmt", ["nm", "auto"])
def test_an_nm_layer_repacks_as_nm_carrying_kept_weights_and_state(fmt):
    torch.manual_seed(0)
    old, new = _two_of_four(16, 32, 1), _two_of_four(16, 32, 2)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        model[0].weight.mul_(old)
    sparsify_model(model, {"0.weight": old}, format="nm", policy="sparse")
    assert model[0].format == "nm"
    opt = _optimizer("adam", model.parameters())

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
        opt.step()
    step()
    step()
    before = dense_state_dict(model)["0.weight"]
    states = _snapshot(model, opt, ["0.weight"], "adam")["0.weight"]
    grown = new & ~old
    assert repack(model, opt, {"0.weight": new}, {"0.weight": grown}, fmt) == ["0.weight"]
    assert model[0].format == "nm" and model[0].nm == (2, 4)
    assert torch.equal(model[0].mask(), new)
    kept = new & old
    after = dense_state_dict(model)["0.weight"]
    assert torch.equal(after[kept], before[kept]) and not bool(after[~kept].any())
    for k, now in _snapshot(model, opt, ["0.weight"], "adam")["0.weight"].items():
        assert torch.equal(now[kept], states[k][kept]) and not bool(now[~kept].any())
    step()
    assert not bool(dense_state_dict(model)["0.weight"][~new].any())


def test_between_updates_the_model_runs_the_sparse_kernels(monkeypatch):
    model, opt, masks, names, block = _setup("unstructured", "sparse", "sgd")
    weights, grads = dense_weights_and_gradients(model, _batch(0), nn.CrossEntropyLoss(), names)
    new, grown = dst.update_masks(masks, weights, {n: g.abs() for n, g in grads.items()},
                                  0.3)
    repack(model, opt, new, grown)
    calls = {"linear": 0, "conv": 0}
    real_linear, real_conv = sk.nn.sparse_linear, sk.nn.sparse_conv2d

    def count(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(sk.nn, "sparse_linear", count("linear", real_linear))
    monkeypatch.setattr(sk.nn, "sparse_conv2d", count("conv", real_conv))
    values = {n: m.values.detach().clone() for n, m in model.named_modules()
              if isinstance(m, (sk.SparseLinear, sk.SparseConv2d))}
    assert sorted(values) == ["conv2", "fc1"]
    _train(model, opt, 2)
    assert calls == {"linear": 2, "conv": 2}
    for n, m in model.named_modules():  # the packed values are what the optimizer trains
        if n in values:
            assert m.values.shape == values[n].shape and not torch.equal(m.values, values[n])


def test_set_grows_at_random_with_the_generator():
    masks = {"w": torch.rand(30, 30, generator=torch.Generator().manual_seed(0)) < 0.2}
    weights = {"w": torch.randn(30, 30) * masks["w"]}
    a = dst.update_masks(masks, weights, dst.random_scores(masks, torch.Generator()
                                                           .manual_seed(5)), 0.5)
    b = dst.update_masks(masks, weights, dst.random_scores(masks, torch.Generator()
                                                           .manual_seed(5)), 0.5)
    c = dst.update_masks(masks, weights, dst.random_scores(masks, torch.Generator()
                                                           .manual_seed(6)), 0.5)
    assert torch.equal(a[0]["w"], b[0]["w"]) and not torch.equal(a[0]["w"], c[0]["w"])
    assert int(a[0]["w"].sum()) == int(masks["w"].sum())


def test_bad_granularity_is_a_clear_error():
    with pytest.raises(ValueError, match="granularity nm"):
        dst.update_mask(torch.ones(4, 4, dtype=torch.bool), torch.ones(4, 4), torch.ones(4, 4),
                        0.3, "nm")
    with pytest.raises(TypeError, match="not a layer converted"):
        model = Net()
        repack(model, _optimizer("sgd", model.parameters()),
               {"fc1.weight": torch.ones(48, 384, dtype=torch.bool)},
               {"fc1.weight": torch.zeros(48, 384, dtype=torch.bool)})


def test_dense_layers_are_left_alone():
    mask = torch.ones(6, 5, dtype=torch.bool)
    new, grown = dst.update_mask(mask, torch.randn(6, 5), torch.rand(6, 5), 0.3)
    assert torch.equal(new, mask) and not bool(grown.any())  # no weight reset to zero

"""N:M in the modules: SparseLinear / SparseConv2d with format="nm", format="auto" detection,
training that keeps pruned weights exactly zero (SGD momentum + weight decay, AdamW), state_dict,
sparsify with an lth-made 2:4 mask and its report, fold_batchnorm, torch.compile."""
import pytest
import torch
from torch import nn

import sparsekern as sk
from lth import pruning
from test_nm_format import random_nm_mask

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one thread (two OpenMP threads on the shared 2-core box are much slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _linear(k=24, n=16):
    return nn.Linear(k, n, dtype=F64)


def _conv(ci=4, co=8):  # K = ci * 9: a multiple of 4
    return nn.Conv2d(ci, co, 3, padding=1, dtype=F64)


def _conv_mask(conv, n=2, m=4, exact=True):
    co = conv.weight.shape[0]
    return random_nm_mask(co, conv.weight[0].numel(), n, m, exact=exact).view_as(conv.weight)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fewer"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_nm_module_matches_masked_dense(kind, exact):
    layer = _linear() if kind == "linear" else _conv()
    mask = (random_nm_mask(16, 24, 2, 4, exact=exact) if kind == "linear"
            else _conv_mask(layer, exact=exact))
    cls, masked_cls = ((sk.SparseLinear, sk.MaskedLinear) if kind == "linear"
                       else (sk.SparseConv2d, sk.MaskedConv2d))
    sparse, masked = cls.from_dense(layer, mask, format="nm"), masked_cls(layer, mask)
    assert sparse.format == "nm" and sparse.nm == (2, 4) and sparse.nm_padded == (not exact)
    assert [n for n, _ in sparse.named_parameters()] == ["values", "bias"]
    assert torch.equal(sparse.mask(), mask)
    x = torch.randn((5, 24) if kind == "linear" else (2, 4, 5, 5), dtype=F64)
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, ym = sparse(xs), masked(xm)
    torch.testing.assert_close(ys, ym, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(ym)
    ys.backward(dy)
    ym.backward(dy)
    torch.testing.assert_close(xs.grad, xm.grad, rtol=1e-10, atol=1e-12)
    dense_grad = sparse.weight_format()._replace({"values": sparse.values.grad}).to_dense()
    torch.testing.assert_close(dense_grad, masked.weight.grad, rtol=1e-10, atol=1e-12)
    assert bool((sparse.values.grad[~sparse.kept] == 0).all()), "free slots get no gradient"


def _exact_4_8_not_2_4(rows, k):
    """Every group of 8 keeps 4, three of them in its first half: 4:8 but not 2:4."""
    mask = torch.zeros(rows, k // 8, 8, dtype=torch.bool)
    mask[..., [0, 1, 2, 5]] = True
    return mask.view(rows, k)


@pytest.mark.parametrize("make, expected", [
    (lambda: random_nm_mask(16, 24, 2, 4), ("nm", (2, 4))),
    (lambda: random_nm_mask(16, 24, 1, 4), ("nm", (1, 4))),
    (lambda: _exact_4_8_not_2_4(16, 24), ("nm", (4, 8))),
    (lambda: random_nm_mask(16, 24, 2, 4, exact=False), ("csr", None)),  # fits, not exact
    (lambda: torch.rand(16, 24) < 0.3, ("csr", None)),
    (lambda: torch.ones(16, 24, dtype=torch.bool).index_fill_(1, torch.arange(8, 16), False),
     ("bsr", None)),  # whole blocks: BSR is preferred
], ids=["2:4", "1:4", "4:8", "fewer-than-2:4", "unstructured", "blocks"])
def test_auto_format(make, expected):
    layer = sk.SparseLinear.from_dense(_linear(), make())
    assert (layer.format, layer.nm) == expected


def test_auto_format_conv_and_given_nm():
    conv = _conv()
    mask = _conv_mask(conv)
    assert sk.SparseConv2d.from_dense(conv, mask).format == "nm"
    # an explicit nm restricts what auto recognises
    assert sk.SparseConv2d.from_dense(conv, mask, nm=(4, 8)).nm == (4, 8)
    assert sk.SparseConv2d.from_dense(conv, mask, nm=(1, 4)).format == "csr"


def test_format_nm_finds_the_pattern_or_says_why():
    layer = _linear()
    fewer = random_nm_mask(16, 24, 1, 4, exact=False)
    assert sk.SparseLinear.from_dense(layer, fewer, format="nm").nm == (2, 4)  # fits, first
    assert sk.SparseLinear.from_dense(layer, random_nm_mask(16, 24, 1, 4),
                                      format="nm").nm == (1, 4)  # exact wins
    dense = torch.ones(16, 24, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"format='nm': mask keeps more than N of some group of M "
                                         r"for every N:M of \{'2:4': 4, '1:4': 4, '4:8': 8\}"):
        sk.SparseLinear.from_dense(layer, dense, format="nm")
    with pytest.raises(ValueError, match=r"mask keeps 3 of the inputs 0\.\.3 of row 0"):
        sk.SparseLinear.from_dense(layer, random_nm_mask(16, 24, 3, 4), format="nm", nm=(2, 4))
    with pytest.raises(ValueError, match=r"block=\(8, 8\) applies to format='bsr' or 'auto', "
                                         r"not 'nm'"):
        sk.SparseLinear.from_dense(layer, fewer, format="nm", block=(8, 8))
    # an argument the chosen format would ignore, or a bad block under "auto", is an error
    with pytest.raises(ValueError, match=r"block='x' applies to format='bsr' or 'auto', not 'csr'"):
        sk.SparseLinear.from_dense(layer, fewer, format="csr", block="x")
    for fmt in ("csr", "bsr"):
        with pytest.raises(ValueError, match=f"nm=\\(2, 4\\) applies to format='nm' or 'auto', "
                                             f"not '{fmt}'"):
            sk.SparseLinear.from_dense(layer, fewer, format=fmt, nm=(2, 4))
    with pytest.raises(ValueError, match=r"block=\(3, 3\): each dim must be one of"):
        sk.SparseLinear.from_dense(layer, fewer, format="auto", block=(3, 3))
    with pytest.raises(ValueError, match=r"nm: need 0 < n < m"):
        sk.SparseLinear.from_dense(layer, fewer, format="nm", nm=(4, 2))
    with pytest.raises(ValueError, match=r"nm must be a pair \(n, m\), got 4"):
        sk.SparseLinear.from_dense(layer, fewer, format="nm", nm=4)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_keeps_pruned_weights_exactly_zero(optimizer, kind):
    """A mask with all-pruned groups and groups keeping fewer than N (free slots): after
    training steps with momentum / weight decay / AdamW, every pruned weight is exactly zero,
    and the trajectory is the masked-dense one."""
    torch.manual_seed(0)
    layer = _linear() if kind == "linear" else _conv()
    mask = (random_nm_mask(16, 24, 2, 4, exact=False) if kind == "linear"
            else _conv_mask(layer, exact=False))
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)}[optimizer]
    if kind == "linear":
        sparse, masked = sk.SparseLinear.from_dense(layer, mask, format="nm"), \
            sk.MaskedLinear(layer, mask)
    else:
        sparse, masked = sk.SparseConv2d.from_dense(layer, mask, format="nm"), \
            sk.MaskedConv2d(layer, mask)
    assert sparse.nm_padded
    opt_s, opt_m = make(sparse.parameters()), make(masked.parameters())
    for _ in range(4):
        x = torch.randn((8, 24) if kind == "linear" else (2, 4, 5, 5), dtype=F64)
        for module, opt in ((sparse, opt_s), (masked, opt_m)):
            opt.zero_grad()
            (module(x) ** 2).mean().backward()
            opt.step()
    dense = sparse.dense_weight()
    assert bool((dense[~mask] == 0).all()) and bool((sparse.values[~sparse.kept] == 0).all())
    torch.testing.assert_close(dense, masked.weight * mask, rtol=1e-9, atol=1e-12)
    assert torch.equal(sparse.mask(), mask)


def test_state_dict_saves_only_col_idx_and_kept_and_rebuilds_the_rest(tmp_path):
    layer = _linear(k=64, n=32)
    mask = random_nm_mask(32, 64, 2, 4, exact=False)
    source = sk.SparseLinear.from_dense(layer, mask, format="nm")
    assert set(source.state_dict()) == {"values", "bias", "col_idx", "kept", "_extra_state"}
    path = tmp_path / "nm.pt"
    torch.save(source.state_dict(), path)
    # a module made from another mask takes the saved one: its derived index is rebuilt
    other = sk.SparseLinear.from_dense(layer, random_nm_mask(32, 64, 2, 4), format="nm")
    other.load_state_dict(torch.load(path, weights_only=True))
    for name, t in source.index().items():
        assert torch.equal(getattr(other, name), t), name
    assert other.nm_padded and torch.equal(other.mask(), mask)
    x = torch.randn(3, 64, dtype=F64)
    torch.testing.assert_close(other(x), source(x), rtol=0, atol=0)
    state = source.state_dict()
    state["col_idx"] = state["col_idx"].flip(0)
    with pytest.raises(ValueError, match="NM: col_idx of row 0, slot 0"):
        other.load_state_dict(state)


def test_module_float_keeps_the_index():
    layer = sk.SparseLinear.from_dense(_linear(k=64, n=32), random_nm_mask(32, 64, 2, 4))
    weight, bias = layer.dense_weight().clone(), layer.bias.detach().clone()
    index = {name: t.clone() for name, t in layer.index().items()}
    layer.float()
    assert layer.values.dtype == torch.float32
    for name, t in index.items():
        assert torch.equal(getattr(layer, name), t) and getattr(layer, name).dtype == t.dtype
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), (x.double() @ weight.T + bias).float(), rtol=1e-5,
                               atol=1e-5)


def _lth_nm_masks(model, names, n=2, m=4, sparsity=0.5):
    """What `lth --granularity nm` makes: magnitude N:M masks via lth.pruning."""
    params = dict(model.named_parameters())
    weights = {name: params[name] for name in names}
    full = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    return pruning.prune_to(pruning.magnitude_scores(weights), full, sparsity,
                            granularity="nm", nm=(n, m))


def test_sparsify_an_lth_ticket_into_nm_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 32), nn.ReLU(), nn.Linear(32, 10))
    masks = _lth_nm_masks(model, ["0.weight", "3.weight", "5.weight"])
    reference = sk.sparsify(_copy(model), masks, policy="dense")
    sk.sparsify(model, masks, policy="sparse")
    decisions = sk.decisions(model)
    for name in ("0", "3", "5"):
        assert decisions[name]["format"] == "nm" and decisions[name]["nm"] == [2, 4], name
        assert decisions[name]["chosen"] == "sparse" and decisions[name]["sparsity"] == 0.5
        assert torch.equal(model.get_submodule(name).mask(), masks[f"{name}.weight"])
    report = sk.report(model)
    assert report.count("nm 2:4") == 3, report
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    sk.densify(model)
    for name, mask in masks.items():
        weight = dict(model.named_parameters())[name]
        assert type(model.get_submodule(name[:-len(".weight")])) in (nn.Linear, nn.Conv2d)
        assert bool((weight[~mask] == 0).all())


def test_sparsify_format_nm_names_the_layer_that_is_not_nm():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = {"0.weight": random_nm_mask(8, 8, 2, 4), "2.weight": torch.ones(4, 8, dtype=bool)}
    with pytest.raises(ValueError, match=r"sparsify: layer '2': format='nm': mask keeps more "
                                         r"than N of some group of M"):
        sk.sparsify(model, masks, format="nm", policy="sparse")


def _copy(model):
    import copy
    return copy.deepcopy(model)


def test_fold_batchnorm_keeps_nm():
    conv = _conv()
    model = nn.Sequential(sk.SparseConv2d.from_dense(conv, _conv_mask(conv)),
                          nn.BatchNorm2d(8, dtype=F64)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    before = model(x)
    sk.fold_batchnorm(model)
    assert model[0].format == "nm" and model[0].nm == (2, 4)
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_matches_eager():
    layer = sk.SparseLinear.from_dense(nn.Linear(32, 16), random_nm_mask(16, 32, 2, 4,
                                                                        exact=False))
    x = torch.randn(4, 32, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    grads = (x.grad.clone(), layer.values.grad.clone())
    x.grad = layer.values.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close((x.grad, layer.values.grad), grads)

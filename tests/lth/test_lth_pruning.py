"""Pruning math: exact counts for global and layerwise pruning, excluded layers untouched, block
masks made of whole blocks (and run on BSR), N:M groups valid, baselines keep layer counts."""
import math
import warnings

import pytest
import torch
from torch import nn

import sparsekern as sk
from lth import pruning
from lth.models.lenet import LeNet5
from lth.models.mlp import MLP


def _weights(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def _full(weights):
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}


def _kept(masks):
    return sum(int(m.sum()) for m in masks.values())


def _prune_noting_floor(*args, **kwargs):
    """prune(), plus the layers whose last unit the no-layer-collapse rule kept (warned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = pruning.prune(*args, **kwargs)
    text = "".join(str(c.message) for c in caught)
    return new, [n for n in new if f"'{n}'" in text]


SHAPES = [(40, 30), (64, 64), (10, 3, 3, 3)]


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_global_prunes_exactly_the_fraction_of_remaining(fraction):
    w = _weights(SHAPES)
    masks = _full(w)
    scores = pruning.magnitude_scores(w)
    for _ in range(3):
        remaining = _kept(masks)
        new, floored = _prune_noting_floor(scores, masks, fraction, "global")
        # a layer the exact count would empty keeps its best unit, and the warning names it
        assert all(int(new[n].sum()) == 1 for n in floored)
        assert _kept(new) == remaining - math.floor(fraction * remaining + 0.5) + len(floored)
        for n in masks:  # never revives a pruned weight, never empties a layer
            assert not bool((new[n] & ~masks[n]).any())
            assert bool(new[n].any())
        masks = new


def test_global_pruning_never_removes_a_whole_layer():
    """Layer collapse: a layer whose weights are all small would be pruned away entirely by the
    exact global count; it keeps its highest-scoring unit instead, with a warning."""
    w = _weights(SHAPES)
    w["l2.weight"] *= 1e-3
    with pytest.warns(RuntimeWarning, match=r"every unit of \['l2.weight'\]"):
        new = pruning.prune(pruning.magnitude_scores(w), _full(w), 0.8, "global")
    assert int(new["l2.weight"].sum()) == 1
    assert bool(new["l2.weight"].view(-1)[w["l2.weight"].abs().argmax()])
    with pytest.warns(RuntimeWarning, match="every unit of"):
        new = pruning.prune_to(pruning.magnitude_scores(w), _full(w), 0.8)
    assert int(new["l2.weight"].sum()) == 1


def test_global_keeps_the_largest_magnitudes_across_layers():
    w = _weights(SHAPES)
    new = pruning.prune(pruning.magnitude_scores(w), _full(w), 0.6, "global")
    kept = torch.cat([w[n].abs()[new[n]] for n in w])
    pruned = torch.cat([w[n].abs()[~new[n]] for n in w])
    assert kept.min() >= pruned.max()
    # global pruning does not give every layer the same sparsity here: the scales differ
    w["l0.weight"] *= 10
    new = pruning.prune(pruning.magnitude_scores(w), _full(w), 0.6, "global")
    assert pruning.layer_sparsity(new)["l0.weight"] < 0.1


@pytest.mark.parametrize("fraction", [0.2, 0.75])
def test_layerwise_prunes_each_layer_exactly(fraction):
    w = _weights(SHAPES)
    w["l0.weight"] *= 10  # scale must not matter layerwise
    masks = _full(w)
    for _ in range(2):
        new = pruning.prune(pruning.magnitude_scores(w), masks, fraction, "layerwise")
        for n in w:
            remaining = int(masks[n].sum())
            assert int(new[n].sum()) == remaining - math.floor(fraction * remaining + 0.5)
            kept, pruned = w[n].abs()[new[n]], w[n].abs()[masks[n] & ~new[n]]
            assert kept.min() >= pruned.max()
        masks = new


def test_prune_to_reaches_the_target_in_one_step():
    w = _weights(SHAPES)
    total = sum(x.numel() for x in w.values())
    new = pruning.prune_to(pruning.magnitude_scores(w), _full(w), 0.893)
    assert total - _kept(new) == math.floor(0.893 * total + 0.5)
    layer = pruning.prune_to(pruning.magnitude_scores(w), _full(w), 0.5, scope="layerwise")
    for n, m in layer.items():
        assert m.numel() - int(m.sum()) == math.floor(0.5 * m.numel() + 0.5)


def test_excluded_layers_are_not_prunable_and_stay_untouched():
    model = LeNet5((1, 8, 8), 10)
    names = pruning.layer_weights(model)
    assert names == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight",
                     "classifier.weight"]
    assert pruning.prunable_names(model) == ["conv2.weight", "fc1.weight", "fc2.weight"]
    assert pruning.prunable_names(model, ()) == names
    assert pruning.prunable_names(model, ("first_layer", "fc*")) == ["conv2.weight",
                                                                     "classifier.weight"]
    assert pruning.prunable_names(model, ("conv2",)) == ["conv1.weight", "fc1.weight",
                                                         "fc2.weight", "classifier.weight"]
    mlp = MLP(64, (32, 32), 10)
    assert pruning.prunable_names(mlp) == ["fcs.0.weight", "fcs.1.weight"]  # no conv
    with pytest.raises(ValueError, match="'fc9' matches no layer weight"):
        pruning.prunable_names(mlp, ("fc9",))
    # pruning many rounds never creates a mask for an excluded layer
    masks = pruning.full_masks(model, pruning.prunable_names(model))
    params = dict(model.named_parameters())
    for _ in range(3):
        masks = pruning.prune(pruning.magnitude_scores({n: params[n] for n in masks}), masks,
                              0.5)
    assert set(masks) == {"conv2.weight", "fc1.weight", "fc2.weight"}


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("block", [(32, 32), (16, 8)])
def test_block_masks_are_whole_blocks(scope, block):
    # ragged shapes: 70 x 100 is not a multiple of any block
    w = _weights([(70, 100), (64, 64), (12, 4, 3, 3)])
    masks = _full(w)
    units = {n: pruning.block_pattern(m, block).numel() for n, m in masks.items()}
    for _ in range(3):
        remaining = sum(int(pruning.block_pattern(m, block).sum()) for m in masks.values())
        masks, floored = _prune_noting_floor(pruning.magnitude_scores(w), masks, 0.3, scope,
                                             "block", block)
        for n, m in masks.items():
            assert pruning.is_block_aligned(m, block), n
        after = sum(int(pruning.block_pattern(m, block).sum()) for m in masks.values())
        if scope == "global":
            assert after == remaining - math.floor(0.3 * remaining + 0.5) + len(floored)
    assert sum(units.values()) > 0


def test_conv_block_units_are_channel_blocks_over_the_whole_window():
    """A conv weight's block is BN output x BK input channels spanning every kh x kw tap (the
    BSR conv block), scored by its mean |w|; the masks run on SparseConv2d's BSR kernels."""
    g = torch.Generator().manual_seed(3)
    w = {"c.weight": torch.randn(32, 24, 3, 3, generator=g)}
    w["c.weight"][:8, :8] *= 10  # the strongest channel block
    masks = pruning.prune(pruning.magnitude_scores(w), _full(w), 0.75, "global", "block", (8, 8))
    m = masks["c.weight"]
    assert pruning.block_pattern(m, (8, 8)).shape == (4, 3)  # channel grid, not C_in*kh*kw
    assert int(pruning.block_pattern(m, (8, 8)).sum()) == 3  # 12 blocks - round(0.75 * 12)
    assert bool(m[:8, :8].all())
    channels = m.flatten(2)
    assert bool((channels.all(2) == channels.any(2)).all())  # each channel pair: all taps or none
    scores = pruning.block_sum(w["c.weight"].abs(), (8, 8))
    kept = pruning.block_pattern(m, (8, 8))
    assert scores[kept].min() >= scores[~kept].max()
    conv = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1, bias=False))
    with torch.no_grad():
        conv[0].weight.copy_(w["c.weight"])
    sk.sparsify(conv, {"0.weight": m}, policy="sparse")
    assert isinstance(conv[0], sk.SparseConv2d) and conv[0].format == "bsr"
    assert conv[0].weight_format().block == (8, 8) and torch.equal(conv[0].mask(), m)


def test_block_granularity_leaves_grouped_convs_unpruned():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16),
                          nn.Conv2d(16, 32, 1), nn.Flatten(), nn.Linear(32, 10))
    assert pruning.prunable_names(model, ()) == ["0.weight", "1.weight", "2.weight", "4.weight"]
    assert pruning.prunable_names(model, (), "block") == ["0.weight", "2.weight", "4.weight"]


def test_block_ticket_runs_on_bsr():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(96, 128))
    w = {"0.weight": lin[0].weight.detach()}
    masks = pruning.prune(pruning.magnitude_scores(w), _full(w), 0.75, granularity="block",
                          block=(32, 32))
    model = sk.sparsify(lin, masks, format="auto", policy="sparse")
    assert isinstance(model[0], sk.SparseLinear) and model[0].format == "bsr"
    assert torch.equal(model[0].mask(), masks["0.weight"])


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
def test_nm_rounds_end_in_a_valid_n_of_m_pattern(nm):
    n, m = nm
    w = _weights([(16, 32), (8, 4, 2, 2)])
    masks = _full(w)
    previous = m
    for _ in range(12):
        masks = pruning.prune(pruning.magnitude_scores(w), masks, 0.2, granularity="nm", nm=nm)
        counts = {k: pruning.nm_counts(v, m) for k, v in masks.items()}
        for c in counts.values():
            assert bool((c == c.flatten()[0]).all())  # every group alike
            assert int(c.flatten()[0]) <= previous
        previous = int(next(iter(counts.values())).flatten()[0])
    for k, v in masks.items():
        assert bool((pruning.nm_counts(v, m) == n).all()), k
        groups = pruning.nm_groups(w[k].abs(), m)
        kept = pruning.nm_groups(v, m)
        # the kept ones are the largest of their group
        assert bool(((groups * kept).amax(-1) >= (groups * ~kept).amax(-1)).all())
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        pruning.prune(pruning.magnitude_scores(_weights([(4, 6)])), _full(_weights([(4, 6)])),
                      0.2, granularity="nm", nm=(2, 4))


@pytest.mark.parametrize("granularity", ["unstructured", "block", "nm"])
def test_random_ticket_and_shuffle_keep_layer_counts(granularity):
    w = _weights([(64, 64), (32, 96)])
    masks = _full(w)
    for _ in range(3):
        masks = pruning.prune(pruning.magnitude_scores(w), masks, 0.4, "layerwise", granularity,
                              (16, 16), (2, 4))
    g = torch.Generator().manual_seed(1)
    for fn in (pruning.random_like, pruning.shuffle):
        other = fn(masks, granularity, (16, 16), (2, 4), g)
        for n in masks:
            assert int(other[n].sum()) == int(masks[n].sum())
            assert not torch.equal(other[n], masks[n])
            if granularity == "block":
                assert pruning.is_block_aligned(other[n], (16, 16))
            if granularity == "nm":
                assert torch.equal(pruning.nm_counts(other[n], 4), pruning.nm_counts(masks[n], 4))


def test_sparsity_is_over_prunable_weights():
    masks = {"a": torch.tensor([True, False, False, False]), "b": torch.ones(4, dtype=torch.bool)}
    assert pruning.sparsity(masks) == pytest.approx(3 / 8)
    assert pruning.layer_sparsity(masks) == {"a": 0.75, "b": 0.0}

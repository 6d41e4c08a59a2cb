"""ERK / ER / uniform layerwise densities: they hit the global density, never exceed 1, follow
the Erdos-Renyi(-Kernel) ratios between the layers that are not dense, and the random masks drawn
with them keep those densities."""
import functools
import math

import pytest
import torch

from lth import pruning
from lth.hparams import ModelHparams
from lth.models import build_model
from lth.pruning.erk import layer_densities, random_masks, raw_density

MODELS = {"mlp": (1, 8, 8), "lenet5": (1, 28, 28), "lenet300": (1, 28, 28),
          "resnet20": (3, 32, 32), "vgg16": (3, 32, 32)}


@functools.cache
def _shapes(name):
    with torch.device("meta"):  # shapes only: no weights allocated or initialised
        model = build_model(ModelHparams(name=name), MODELS[name], 10, seed=0)
    params = dict(model.named_parameters())
    return {n: tuple(params[n].shape) for n in pruning.prunable_names(model)}


def _global(densities, shapes):
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    return sum(densities[n] * sizes[n] for n in shapes) / sum(sizes.values())


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.2, 0.5])
def test_densities_hit_the_target_and_never_exceed_one(model, distribution, density):
    shapes = _shapes(model)
    d = layer_densities(shapes, density, distribution)
    assert set(d) == set(shapes)
    assert all(0 < v <= 1 for v in d.values())
    assert _global(d, shapes) == pytest.approx(density, rel=1e-9)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_random_masks_keep_the_layer_densities_and_the_global_target(model, distribution):
    shapes = _shapes(model)
    d = layer_densities(shapes, 0.1, distribution)
    masks = random_masks(shapes, d, generator=torch.Generator().manual_seed(0))
    assert abs((1 - pruning.sparsity(masks)) - 0.1) <= 0.005 * 0.1
    for n, m in masks.items():
        assert m.shape == shapes[n]
        assert int(m.sum()) == max(1, round(d[n] * m.numel()))


@pytest.mark.parametrize("distribution", ["er", "erk"])
def test_sparse_layers_follow_the_raw_ratios_and_dense_ones_are_the_largest_raw(distribution):
    shapes = _shapes("resnet20")
    d = layer_densities(shapes, 0.5, distribution)
    dense = {n for n, v in d.items() if v == 1.0}
    sparse = [n for n in shapes if n not in dense]
    assert dense and sparse  # at 50% the small early layers of ResNet-20 saturate
    epsilons = {d[n] / raw_density(shapes[n], distribution) for n in sparse}
    assert max(epsilons) == pytest.approx(min(epsilons), rel=1e-9)
    assert min(raw_density(shapes[n], distribution) for n in dense) > \
        max(raw_density(shapes[n], distribution) for n in sparse)


def test_erk_formula_on_known_shapes():
    conv, linear = (64, 32, 3, 3), (100, 300)
    assert raw_density(conv, "erk") == pytest.approx((64 + 32 + 3 + 3) / (64 * 32 * 9))
    assert raw_density(conv, "er") == pytest.approx((64 + 32) / (64 * 32))
    assert raw_density(linear, "erk") == pytest.approx(400 / 30000)
    d = layer_densities({"conv": conv, "fc": linear}, 0.1, "erk")
    assert d["conv"] / d["fc"] == pytest.approx(raw_density(conv, "erk") / (400 / 30000))


def test_uniform_is_the_target_everywhere_and_full_density_is_dense():
    shapes = _shapes("vgg16")
    assert set(layer_densities(shapes, 0.3, "uniform").values()) == {0.3}
    assert set(layer_densities(shapes, 1.0, "erk").values()) == {1.0}


def test_block_masks_are_whole_blocks_at_the_layer_density():
    shapes = _shapes("resnet20")
    d = layer_densities(shapes, 0.25, "erk")
    masks = random_masks(shapes, d, "block", (8, 8), torch.Generator().manual_seed(1))
    for n, m in masks.items():
        assert pruning.is_block_aligned(m, (8, 8))
        blocks = pruning.block_pattern(m, (8, 8))
        assert int(blocks.sum()) == max(1, round(d[n] * blocks.numel()))


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match="density-distribution"):
        layer_densities({"w": (4, 4)}, 0.5, "lognormal")
    with pytest.raises(ValueError, match="density must be in"):
        layer_densities({"w": (4, 4)}, 0.0, "erk")
    with pytest.raises(ValueError, match="granularity nm"):
        random_masks({"w": (4, 4)}, {"w": 0.5}, "nm")

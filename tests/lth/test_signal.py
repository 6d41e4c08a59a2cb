"""lth.pruning.signal: an output counts as reached exactly when a path of kept weights joins it
to the input, whatever the activations, normalizations and skip paths of the model."""
import pytest
import torch

from lth.hparams import ModelHparams
from lth.methods.tweaks import swap_activations
from lth.models import build_model
from lth.models.mlp import MLP
from lth.pruning.signal import outputs_reached


def _mlp_masks(into: int, out_of: int):
    masks = {"fcs.0.weight": torch.zeros(32, 64, dtype=torch.bool),
             "fcs.1.weight": torch.zeros(32, 32, dtype=torch.bool)}
    masks["fcs.0.weight"][into, 5] = True
    masks["fcs.1.weight"][:, out_of] = True
    return masks


def test_a_chain_is_cut_by_masks_that_keep_weights_in_every_layer():
    model = MLP(64, (32, 32), 10)
    x = torch.randn(3, 64)
    assert outputs_reached(model, _mlp_masks(3, 7), x) == (0, 10)
    assert outputs_reached(model, _mlp_masks(3, 3), x) == (10, 10)
    masks = _mlp_masks(3, 3)
    masks["classifier.weight"] = torch.zeros(10, 32, dtype=torch.bool)
    masks["classifier.weight"][[2, 6], 4] = True  # hidden unit 4 of fc2 is fed from unit 3
    assert outputs_reached(model, masks, x) == (2, 10)


def test_the_model_is_not_touched():
    model = MLP(64, (32, 32), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outputs_reached(model, _mlp_masks(3, 7), torch.randn(2, 64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and next(model.parameters()).dtype == torch.float32


def _build(name, shape):
    return build_model(ModelHparams(name=name, width_mult=0.25), shape, 10, seed=0)


@pytest.mark.parametrize("name,layer,reached", [
    ("vgg16", "features.24.weight", 0),        # a plain chain: an empty conv cuts it
    ("resnet20", "blocks.4.conv2.weight", 10),  # the identity skip path bypasses the branch
    ("mobilenetv2", "features.9.body.2.0.weight", 10),  # an inverted residual's projection
])
def test_empty_convs_cut_chains_but_not_residual_blocks(name, layer, reached):
    model = _build(name, (3, 32, 32))
    weight = dict(model.named_parameters())[layer]
    empty = {layer: torch.zeros_like(weight, dtype=torch.bool)}
    x = torch.randn(1, 3, 32, 32)
    assert outputs_reached(model, {}, x) == (10, 10)
    assert outputs_reached(model, empty, x) == (reached, 10)


def test_an_activation_that_is_not_zero_at_zero_does_not_fake_a_path():
    """softplus(0) = log 2: evaluated as is, the cut VGG would still give every output a value."""
    model, _ = swap_activations(_build("vgg16", (3, 32, 32)), "softplus")
    weight = dict(model.named_parameters())["features.24.weight"]
    x = torch.randn(1, 3, 32, 32)
    assert outputs_reached(model, {}, x) == (10, 10)
    cut = {"features.24.weight": torch.zeros_like(weight, dtype=torch.bool)}
    assert outputs_reached(model, cut, x) == (0, 10)


def test_a_deep_dense_network_neither_overflows_nor_underflows():
    model = _build("resnet110", (3, 16, 16))
    assert outputs_reached(model, {}, torch.randn(1, 3, 16, 16)) == (10, 10)

"""ResNet-18/34/50: parameter counts equal torchvision's published ones (1000 classes, ImageNet
stem), both stems give the expected shapes, and resnet18's parameter names are unchanged."""
import pytest
import torch

from lth.hparams import ModelHparams
from lth.models import MODELS, build_model

# torchvision.models.resnet{18,34,50}(num_classes=1000): sum(p.numel() for p in parameters())
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "resnet34": 21_797_672,
                          "resnet50": 25_557_032}


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMETERS))
def test_parameter_count_matches_torchvision(name):
    with torch.device("meta"):  # 25M parameters without allocating or initialising them
        model = MODELS.get(name)(ModelHparams(name=name), (3, 224, 224), 1000)
    assert _count(model) == TORCHVISION_PARAMETERS[name]


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
@pytest.mark.parametrize("shape,stem_stride", [((3, 64, 64), 4), ((3, 16, 16), 1)])
def test_stems_and_output_shapes(name, shape, stem_stride):
    model = build_model(ModelHparams(name=name, width_mult=0.125), shape, 7, seed=0)
    stem = model.stem(torch.randn(2, *shape))
    assert stem.shape[-1] == shape[-1] // stem_stride  # ImageNet stem /4, CIFAR stem /1
    features = model.blocks(stem)
    assert features.shape[-1] == shape[-1] // stem_stride // 8  # three stride-2 stages
    expansion = 4 if name == "resnet50" else 1
    assert features.shape[1] == 64 * expansion  # 512 * 0.125 channels, x4 for a bottleneck
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()


def test_resnet50_blocks_are_bottlenecks_with_stride_in_the_3x3():
    model = build_model(ModelHparams(name="resnet50", width_mult=0.125), (3, 16, 16), 5, 0)
    first_down = model.blocks[3]  # first block of stage 2
    assert first_down.conv1.stride == (1, 1) and first_down.conv2.stride == (2, 2)
    assert first_down.conv3.out_channels == 4 * first_down.conv1.out_channels
    assert len(model.blocks) == 16


def test_resnet18_keeps_its_parameter_names():
    model = build_model(ModelHparams(name="resnet18", width_mult=0.125), (3, 16, 16), 5, 0)
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "stem.0.weight" and names[-1] == "classifier.bias"
    assert "blocks.7.shortcut.0.weight" not in names and "blocks.2.shortcut.0.weight" in names

"""ResNet-18/34/50 of He et al. 2016 (torchvision's layout: stride in the 3x3 conv of a
bottleneck, projection shortcuts where the shape changes). Inputs of 64 pixels or more get the
ImageNet stem (7x7/2 conv + max-pool); smaller ones the CIFAR stem (3x3/1 conv), as is usual for
CIFAR ResNets of these depths."""
from __future__ import annotations

from torch import nn

from lth.models import MODELS, scaled
from lth.models.cifar_resnet import BasicBlock
from lth.models.lenet import _image_shape


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand to 4x the width, plus the shortcut."""
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = nn.functional.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return nn.functional.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, stage_blocks, input_shape, num_classes: int, mult: float = 1.0):
        super().__init__()
        c, h, w = _image_shape(input_shape)
        widths = [scaled(x, mult) for x in (64, 128, 256, 512)]
        if min(h, w) >= 64:
            self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        expansion = getattr(block, "expansion", 1)
        blocks, cin = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, stage_blocks)):
            for i in range(count):
                blocks.append(block(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width * expansion
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


ARCHITECTURES = {  # name: (block, blocks per stage)
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def _register(name):
    block, stage_blocks = ARCHITECTURES[name]
    depth = name[len("resnet"):]

    @MODELS.register(name, f"ResNet-{depth} (ImageNet stem for inputs >= 64 px, else CIFAR "
                     f"stem)")
    def build(hp, input_shape, num_classes):
        return ResNet(block, stage_blocks, input_shape, num_classes, hp.width_mult)


for _name in ARCHITECTURES:
    _register(_name)
